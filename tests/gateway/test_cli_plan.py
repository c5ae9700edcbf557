import json
import re

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


# --- nothing feasible: the closest miss, and what would make it fit -------------------------------------------

KV_SHORT = ["--model", "llama-3-8b", "--gpu", "rtx-4090", "--gpus", "1", "--session-len", "45000"]


def suggested_flags(message: str) -> list[list[str]]:
    """Each ``--flag value`` group the message suggests, e.g. ``["--gpus", "2"]``."""
    groups = re.findall(r"\((?:[^()]*: )?((?:--[a-z-]+ [\w.-]+ ?)+)", message)
    return [group.split() for group in groups]


def test_nothing_feasible_prints_the_table_then_one_line_and_exits_1(capsys):
    status, out, err = run(capsys, "plan", "--gpu", "a100-40gb", "--gpus", "2")
    assert status == 1
    assert out.count("rejected") == 2 and "feasible" not in out.replace("rejected", "")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("tpgate: nothing feasible: the closest is tp=2, whose KV cache holds 5,501 tokens, 17% of "
                          "one 32,768-token session")
    assert "--session-len 5501 or less" in err and "tp=4: --gpus 4" in err and "--gpu l40s" in err


def test_nothing_feasible_in_json_keeps_stdout_a_json_list(capsys):
    status, out, err = run(capsys, "plan", "--gpu", "a100-40gb", "--gpus", "2", "--json")
    assert status == 1
    rows = json.loads(out)
    assert [r["tp"] for r in rows] == [1, 2] and not any(r["feasible"] for r in rows)
    assert err.startswith("tpgate: nothing feasible: ") and err.count("\n") == 1


def test_every_suggested_change_makes_the_plan_feasible(capsys):
    status, _, err = run(capsys, "plan", *KV_SHORT)
    assert status == 1
    assert "88% of one 45,000-token session" in err
    suggestions = suggested_flags(err)
    assert [flags[0] for flags in suggestions] == [
        "--session-len", "--quant-policy", "--cache-max-entry-count", "--gpus", "--gpu",
    ]
    for flags in suggestions:
        argv = list(KV_SHORT)
        for flag, value in zip(flags[::2], flags[1::2], strict=True):
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
        status, out, err = run(capsys, "plan", *argv, "--json")
        assert status == 0, (flags, err)
        assert any(row["feasible"] for row in json.loads(out))


def test_weights_that_do_not_fit_name_the_shortfall(capsys):
    status, _, err = run(capsys, "plan", "--gpu", "rtx-4090", "--gpus", "2", "--json")
    assert status == 1
    assert ("the closest is tp=2, whose weights need 35.7 GiB per GPU plus a 3.0 GiB runtime reserve, 14.8 GiB "
            "more than the 24.0 GiB of a rtx-4090") in err
    assert "more GPUs (tp=4: --gpus 4)" in err and "a GPU with more memory (45 GiB: --gpu l40s)" in err


def test_tp_sizes_the_model_cannot_take_point_to_one_it_can(capsys):
    status, _, err = run(capsys, "plan", "--gpus", "8", "--tp", "3", "--tp", "6")
    assert status == 1
    assert "40 attention heads are not divisible by 3" in err
    assert err.rstrip().endswith("it would fit with tp=2 (--tp 2)")
