"""``tpgate admin`` against the admin API (served in this process over a real controller): the same calls, the
token file, one-line refusals with status 2, and following a promotion."""

import asyncio
import json

import yaml

from gateway.cli import main
from loadtests import load_profile
from tests.gateway.admin.test_app import LIVE_PROFILE, TOKEN, admin  # noqa: F401  (the fixture)


async def tpgate(capsys, *argv):
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def flags(admin, tmp_path):  # noqa: F811
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    return ["admin", "--url", admin.url, "--token-file", str(token)]


async def test_state_pools_and_routes(admin, tmp_path, capsys):  # noqa: F811
    base = flags(admin, tmp_path)
    code, out, _ = await tpgate(capsys, *base, "state")
    assert code == 0
    assert out.splitlines()[0] == "state v1: llama-3-8b, GPUs 2/4 used, 2 free"
    assert "  class batch: bat 100%" in out.splitlines()
    code, out, _ = await tpgate(capsys, *base, "add-pool", "extra", "--tp", "1", "--knob", "max_batch_size=64")
    assert code == 0 and out.startswith("pool extra: state v")
    code, out, _ = await tpgate(capsys, *base, "--json", "pools")
    pools = {p["id"]: p for p in json.loads(out)}
    assert pools["extra"]["engine"]["knobs"]["max_batch_size"] == 64
    code, out, _ = await tpgate(capsys, *base, "route", "batch", "bat=0.5", "extra=0.5")
    assert code == 0 and out.startswith("class batch: bat 50%, extra 50%")


async def test_refusals_are_one_line_with_the_reason(admin, tmp_path, capsys):  # noqa: F811
    base = flags(admin, tmp_path)
    code, _, err = await tpgate(capsys, *base, "add-pool", "huge", "--tp", "4")
    assert code == 2
    assert err.strip().startswith("tpgate: error: POST /admin/pools: HTTP 409: pools need 6 GPUs")
    code, _, err = await tpgate(capsys, *base, "route", "batch", "bat")
    assert code == 2 and "expected POOL=WEIGHT" in err
    bad_token = tmp_path / "bad"
    bad_token.write_text("nope")
    code, _, err = await tpgate(capsys, "admin", "--url", admin.url, "--token-file", str(bad_token), "state")
    assert code == 2 and "HTTP 403: admin API: the bearer token is not the admin token" in err
    code, _, err = await tpgate(capsys, "admin", "--url", "http://127.0.0.1:9", "--token-file", str(bad_token),
                                "state")
    assert code == 2 and "no gateway answers at http://127.0.0.1:9" in err


async def test_tune_promote_and_follow_until_rolled_back(admin, tmp_path, capsys):  # noqa: F811
    base = flags(admin, tmp_path)
    admin.engine.release.set()
    code, out, _ = await tpgate(capsys, *base, "tune", "--class", "batch", "--trials", "2", "--window", "5s",
                                "--wait")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("study batch-") and lines[0].endswith("on up to 2 GPUs, 2 trials")
    assert any(line.startswith("  #0 [1/2] tp1x1") for line in lines)
    assert "completed, 1/2 trials" in lines[-1] and "best #0 tp1x1" in lines[-1]
    study_id = lines[0].split()[1].rstrip(":")
    code, out, _ = await tpgate(capsys, *base, "promote", study_id)
    assert code == 0 and out.startswith("promotion batch-") and "(batch): starting" in out
    promotion_id = out.split()[1]
    follow = asyncio.create_task(tpgate(capsys, *base, "promotion", promotion_id, "--wait"))
    await asyncio.sleep(0.5)
    code, out, _ = await tpgate(capsys, *base, "abort", promotion_id)
    code, out, _ = await follow
    assert code == 1 and out.splitlines()[-1].endswith("rolled_back: aborted by the operator")


async def test_tune_with_a_profile_file_of_ones_own(admin, tmp_path, capsys):  # noqa: F811
    base = flags(admin, tmp_path)
    admin.engine.release.set()
    profile = tmp_path / "observed.yaml"
    profile.write_text(yaml.safe_dump(LIVE_PROFILE))
    code, out, _ = await tpgate(capsys, *base, "tune", "--class", "batch", "--profile", str(profile))
    assert code == 0 and out.startswith("study batch-")
    assert load_profile(admin.engine.calls[0]["profile"]).users == LIVE_PROFILE["users"]
    profile.write_text(yaml.safe_dump({**LIVE_PROFILE, "users": 0}))
    code, _, err = await tpgate(capsys, *base, "tune", "--class", "interactive", "--profile", str(profile))
    assert code == 2 and "users" in err
    code, _, err = await tpgate(capsys, *base, "tune", "--class", "interactive", "--profile", str(tmp_path / "none"))
    assert code == 2 and "--profile" in err
