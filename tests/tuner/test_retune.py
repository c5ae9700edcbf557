"""Automatic re-tuning over a stand-in admin API: the study it asks for, the judge between the current
configuration and the winner, and the promotion."""

import pytest

from gateway.config import load_config
from gateway.planner import EngineKnobs
from tests.tuner.test_drift import interval
from tuner.retune import Retuner, choose, earlier_winners, study_profile
from tuner.space import Candidate

CURRENT = Candidate(2, 1, EngineKnobs(max_batch_size=128))
WIDER = Candidate(1, 2, EngineKnobs(max_batch_size=128))
OTHER = Candidate(1, 1, EngineKnobs(max_batch_size=128))


def configured(tmp_path, margin=0.05):
    path = tmp_path / "tpgate.yaml"
    path.write_text("engine: {time_scale: 4}\nclasses:\n  batch: {objective: max_output_tokens_per_s, profile: batch}\n"
                    "default_class: batch\ndrift:\n  classes:\n"
                    f"    batch: {{mode: auto, retune_trials: 3, margin_ratio: {margin}}}\n")
    return load_config(path)


def trial(number, candidate, outcome="feasible", value=1000.0):
    return {"number": number, "params": candidate.params(), "label": candidate.label(), "outcome": outcome,
            "reason": None, "objectives": None if outcome in ("rejected", "failed") else [value]}


class Backend:
    """The admin API's tuning and promotion routes, answering from prepared trials and a promotion's end."""

    def __init__(self, trials, *, study_state="completed", promotion_phase="succeeded", earlier=()):
        self.trials, self.study_state, self.promotion_phase = trials, study_state, promotion_phase
        self.earlier = list(earlier)
        self.requests, self.promoted, self.polls = [], [], 0

    async def studies(self):
        return self.earlier

    async def start_study(self, request):
        self.requests.append(request)
        return {"id": "batch-abc123", "gpus": request["max_gpus"], "state": "running"}

    async def study(self, study_id):
        self.polls += 1
        state = "running" if self.polls < 3 else self.study_state
        return {"id": study_id, "state": state, "reason": "stopped by trials", "trial_records": self.trials}

    async def promote(self, study_id, *, trial):
        self.promoted.append((study_id, trial))
        return {"id": "prom-1", "phase": "starting"}

    async def promotion(self, promotion_id):
        return {"id": promotion_id, "phase": self.promotion_phase, "reason": "step 1 (50%) failed: TTFT p99"}


def test_the_study_profile_is_the_live_one_in_the_engines_clock():
    profile = study_profile(interval(30.0, rate=8.0, prompt=300.0, output=50.0), time_scale=4)
    assert profile["arrival"] == {"kind": "open", "rate_per_s": 2.0}  # 8/s on the wall clock, 2/s for the engine
    assert profile["prompt_tokens"] == {"kind": "fixed", "value": 300}
    assert profile["workload_class"] == {"name": "batch", "via": "header"}


async def test_a_clearly_better_winner_is_promoted_after_the_current_configuration_is_measured(tmp_path):
    backend = Backend([trial(0, CURRENT, value=1000), trial(1, OTHER, value=900),
                       trial(2, WIDER, value=1400)])
    lines = []
    outcome = await Retuner(configured(tmp_path), backend, say=lines.append, poll_s=0).retune(
        "batch", interval(30.0), gpus=2, current=CURRENT)
    request = backend.requests[0]
    assert request["first"] == [CURRENT.params()] and request["trials"] == 3 and request["max_gpus"] == 2
    assert request["profile"]["arrival"]["rate_per_s"] == 0.5  # 2/s at time scale 4
    assert backend.promoted == [("batch-abc123", 2)]
    assert (outcome.result, outcome.study_id, outcome.promotion_id) == ("promoted", "batch-abc123", "prom-1")
    assert outcome.winner == WIDER.label() and "+40.0%" in outcome.reason
    assert any("the current tp2x1 mbs128" in line for line in lines)


@pytest.mark.parametrize(("trials", "reason"), [
    ([trial(0, CURRENT, value=1000), trial(1, WIDER, value=1030)], "not better by the 5% margin"),
    ([trial(0, CURRENT, value=1000), trial(1, WIDER, value=900)], "worse in one objective"),
    ([trial(0, CURRENT, outcome="rejected"), trial(1, WIDER, value=5000)], "was not measured"),
    ([trial(0, CURRENT), trial(1, WIDER, outcome="infeasible", value=5000)], "no other configuration met"),
])
async def test_nothing_clearly_better_changes_nothing(tmp_path, trials, reason):
    backend = Backend(trials)
    outcome = await Retuner(configured(tmp_path), backend, poll_s=0).retune("batch", interval(30.0), gpus=2,
                                                                            current=CURRENT)
    assert outcome.result == "kept" and reason in outcome.reason
    assert backend.promoted == []


async def test_a_current_configuration_that_breaks_an_slo_gives_way_to_a_feasible_winner(tmp_path):
    chosen, reason = choose([trial(0, CURRENT, outcome="infeasible", value=2000), trial(1, WIDER)], CURRENT,
                            configured(tmp_path), "batch", margin_ratio=0.05)
    assert chosen is not None and chosen.candidate == WIDER and "current configuration is infeasible" in reason


async def test_a_rolled_back_promotion_and_a_failed_study_are_said(tmp_path):
    rolled = await Retuner(configured(tmp_path), Backend([trial(0, CURRENT), trial(1, WIDER, value=2000)],
                                                         promotion_phase="rolled_back"), poll_s=0).retune(
        "batch", interval(30.0), gpus=2, current=CURRENT)
    assert rolled.result == "rolled_back" and "TTFT p99" in rolled.reason
    failed = await Retuner(configured(tmp_path), Backend([], study_state="failed"), poll_s=0).retune(
        "batch", interval(30.0), gpus=2, current=CURRENT)
    assert failed.result == "failed" and "study batch-abc123 failed" in failed.reason


def earlier_study(class_name, candidate, started, outcome="feasible"):
    return {"id": f"s{started}", "class": class_name, "state": "completed", "started_unix_s": started,
            "best": {"params": candidate.params(), "outcome": outcome}}


def test_the_warm_start_is_each_earlier_studys_winner_newest_first_without_the_current_one_or_repeats():
    studies = [earlier_study("batch", OTHER, 100), earlier_study("batch", WIDER, 300),
               earlier_study("batch", CURRENT, 400), earlier_study("batch", WIDER, 200),
               earlier_study("interactive", Candidate(4, 1, EngineKnobs()), 500),
               earlier_study("batch", Candidate(8, 1, EngineKnobs()), 600, outcome="infeasible"),
               {"id": "running", "class": "batch", "state": "running", "started_unix_s": 700, "best": None}]
    assert earlier_winners(studies, "batch", CURRENT) == [WIDER, OTHER]
    assert earlier_winners(studies, "batch", CURRENT, limit=1) == [WIDER]


async def test_a_re_tune_measures_earlier_winners_after_the_current_configuration(tmp_path):
    backend = Backend([trial(0, CURRENT, value=1000), trial(1, WIDER, value=1010)],
                      earlier=[earlier_study("batch", WIDER, 100)])
    lines = []
    await Retuner(configured(tmp_path), backend, say=lines.append, poll_s=0).retune(
        "batch", interval(30.0), gpus=2, current=CURRENT)
    assert backend.requests[0]["first"] == [CURRENT.params(), WIDER.params()]
    assert any(f"then earlier winners {WIDER.label()}" in line for line in lines)
