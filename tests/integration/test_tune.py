"""`tpgate tune` end to end: its own gateway on simulated engines, a real Prometheus, real locust load; an engine
killed in the middle of a trial; a tuner interrupted and resumed from its storage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.config import load_config
from tests.processes import alive, engine_pids, wait_until

pytestmark = pytest.mark.integration

CONFIG = """
model: llama-3-8b
gpu: h100-80gb
gpus: 4
engine:
  health_check_period_s: 1
  stop_timeout_s: 5
auth:
  admin_token_file: {workdir}/admin-token
  ray_token_file: {ray_token}
state_file: {workdir}/state.json
tuning:
  knobs:
    max_batch_size: [128, 256]
    cache_max_entry_count: [0.8]
    quant_policy: [0]
    max_prefill_token_num: [8192]
  warmup_s: 4
  window_s: 8
  trial_timeout_s: 180
"""


class Tune:
    """One `tpgate tune` process and its stderr, line by line."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.log = workdir / f"tune-{time.monotonic_ns()}.log"
        self._handle = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "tune", "--config", str(workdir / "tpgate.yaml"), *args],
            stdout=self._handle, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text()

    def trial_lines(self) -> list[str]:
        return [line for line in self.text().splitlines() if line.startswith("tpgate tune: #")]

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"tpgate tune did not finish in {timeout_s:g} s:\n{self.text()[-3000:]}") from None
        finally:
            self._handle.close()


@pytest.fixture
def workdir(tmp_path):
    from tests.conftest import RAY_TOKEN_FILE

    (tmp_path / "tpgate.yaml").write_text(CONFIG.format(workdir=tmp_path, ray_token=RAY_TOKEN_FILE))
    return tmp_path


def test_a_study_survives_a_killed_engine_and_an_interrupted_tuner(workdir):
    storage = f"sqlite:///{workdir / 'study.db'}"
    common = ("--class", "interactive", "--storage", storage, "--seed", "3")
    first = Tune(workdir, *common, "--trials", "3")
    wait_until(lambda: len(first.trial_lines()) >= 1 or first.process.poll() is not None, timeout_s=240,
               what="the first trial")
    assert first.process.poll() is None, first.text()[-3000:]
    # the second trial: kill its engine once its load runs
    before = set(engine_pids())
    wait_until(lambda: set(engine_pids()) - before, timeout_s=120, what="the second trial's engine")
    time.sleep(8)  # past the pool's readiness, into the warm-up or the window
    for pid in set(engine_pids()) - before:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: len(first.trial_lines()) >= 2, timeout_s=240, what="the second trial's outcome")
    killed = first.trial_lines()[1]
    assert any(word in killed for word in ("failed", "invalid", "infeasible")), killed
    # interrupt the tuner during the third trial, as Ctrl-C would
    first.process.send_signal(signal.SIGINT)
    assert first.wait(180) == 130, first.text()[-3000:]
    assert "the study is saved" in first.text()
    assert not any(alive(pid) for pid in engine_pids() if pid not in before)  # nothing left running

    resumed = Tune(workdir, *common, "--trials", "3", "--out", str(workdir / "best.yaml"),
                   "--json", str(workdir / "trials.json"))
    assert resumed.wait(420) == 0, resumed.text()[-3000:]
    trials = json.loads((workdir / "trials.json").read_text())
    outcomes = [t["outcome"] for t in trials["trials"]]
    assert trials["measured_trials"] >= 3 - outcomes.count("failed") - outcomes.count("invalid")
    assert {"failed", "invalid", "infeasible"} & set(outcomes) and "feasible" in outcomes
    assert "Prometheus started by the tuner" in resumed.text()
    winner = load_config(workdir / "best.yaml")
    assert winner.routes["interactive"] and set(winner.routes["interactive"]) <= set(winner.pools)
