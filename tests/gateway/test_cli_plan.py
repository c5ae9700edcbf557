import json

import pytest

from gateway.cli import main


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_plan_json_for_internvl_on_8_h100(capsys):
    status, out, err = run(capsys, "plan", "--model", "internvl2_5-38b", "--gpu", "h100-80gb", "--gpus", "8", "--json")
    assert status == 0, err
    rows = json.loads(out)
    assert [r["tp"] for r in rows] == list(range(1, 9))
    assert [r["tp"] for r in rows if r["feasible"]] == [2, 4, 8]
    for row in rows:
        assert {"tp", "feasible", "reason", "max_replicas", "kv_cache_tokens_per_replica"} <= set(row)
    assert rows[2]["reason"] == "tp=3: 40 attention heads are not divisible by 3"


def test_plan_table_names_every_verdict(capsys):
    status, out, _ = run(capsys, "plan", "--gpus", "8", "--gpus-per-node", "4")
    assert status == 0
    assert "tp=8: exceeds the 4 GPUs per node" in out
    assert out.count("feasible") == 2  # tp 2 and 4


def test_single_tp(capsys):
    status, out, _ = run(capsys, "plan", "--model", "llama-3-8b", "--gpus", "4", "--tp", "2", "--json")
    assert status == 0
    assert [r["tp"] for r in json.loads(out)] == [2]


def test_user_gpu_type_from_config(tmp_path, capsys):
    config = tmp_path / "tpgate.yaml"
    config.write_text(
        "gpu: mi300x\ngpus: 8\ngpu_types:\n  mi300x: {memory_mib: 196608, bf16_tflops: 1307, hbm_gb_per_s: 5300,"
        " interconnect: pcie, interconnect_gb_per_s: 64}\n"
    )
    status, out, err = run(capsys, "plan", "--config", str(config), "--json")
    assert status == 0, err
    assert json.loads(out)[0]["feasible"]  # 192 GiB holds InternVL2.5-38B on one GPU


def test_environment_overrides_the_budget(capsys, monkeypatch):
    monkeypatch.setenv("TPGATE_GPUS", "2")
    status, out, _ = run(capsys, "plan", "--json")
    assert status == 0
    assert [r["tp"] for r in json.loads(out)] == [1, 2]


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "/nonexistent/model"], "unknown model '/nonexistent/model'"),
    (["--model", "gpt-9"], "unknown model 'gpt-9'"),
    (["--gpu", "v100"], "--gpu must be a known GPU type (a100-40gb, a100-80gb, h100-80gb, h200-141gb, l40s, "
                        "rtx-4090, or one under gpu_types), not 'v100'"),
    (["--gpus", "0"], "tpgate: error: --gpus must be at least 1, not 0"),
    (["--gpus", "4", "--tp", "8"], "tp=8 is larger than the GPU budget of 4"),
    (["--gpus", "many"], "argument --gpus: invalid int value: 'many'"),
    (["--config", "/nonexistent.yaml"], "/nonexistent.yaml: cannot read"),
])
def test_bad_input_is_one_line_and_status_2(capsys, argv, message):
    status, out, err = run(capsys, "plan", *argv)
    assert status == 2
    assert out == ""
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_malformed_and_incomplete_config_json(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{")
    status, _, err = run(capsys, "plan", "--model", str(bad))
    assert (status, "malformed config.json" in err) == (2, True)
    (bad / "config.json").write_text('{"hidden_size": 10}')
    status, _, err = run(capsys, "plan", "--model", str(bad))
    assert (status, "no 'num_attention_heads'" in err) == (2, True)


def test_console_script_exit_status():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "gateway.cli", "plan", "--gpus", "-1"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("tpgate: error: ")
