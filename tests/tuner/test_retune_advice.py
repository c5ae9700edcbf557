"""The performance model's view of a re-tune: the best configuration for the live profile against the current."""

from gateway.config import load_config
from gateway.planner import EngineKnobs
from tuner.drift import figure
from tuner.live_profile import LengthSummary, LiveProfile
from tuner.retune_advice import predicted_gain, workload_of
from tuner.space import Candidate

# InternVL2.5-38B on two nodes of 8 H100s, 8 GPUs per class; batch maximises output tokens/s
CONFIG = load_config(overrides={"gpus": 16, "gpus_per_node": 8})
KNOBS = EngineKnobs.of(max_batch_size=256, max_prefill_token_num=8192)


def live(concurrency, prompt, output, *, measured=True):
    def lengths(mean):
        if not measured:
            return LengthSummary(count=0, mean=None)
        return LengthSummary(count=500, mean=mean, quantiles={0.5: mean * 0.9, 0.99: mean * 2.5})

    return LiveProfile(class_name="batch", window_s=60, end_s=60, arrivals=500, streamed=500, chat=500,
                       requests=500, ok_requests=500, slo_met_requests=500, concurrency_mean=concurrency,
                       concurrency_peak=concurrency, prompt=lengths(prompt), output=lengths(output))


def test_the_live_profile_is_the_models_workload():
    shape = workload_of(live(12.4, 800.0, 200.0))
    assert (shape.users, shape.prompt_mean, shape.prompt_p99, shape.output_mean) == (13, 800.0, 2000.0, 200.0)
    assert workload_of(live(12.4, 800.0, 200.0, measured=False)) is None


def test_many_users_with_short_prompts_favour_more_smaller_replicas_than_one_tp8():
    gain = predicted_gain(CONFIG, "batch", live(256.0, 300.0, 300.0), Candidate(8, 1, KNOBS), gpus=8)
    assert gain is not None and gain.objective.name == "max_output_tokens_per_s"
    assert gain.best.replicas > 1 and gain.best.tp < 8
    assert gain.best_value > gain.current_value and gain.gain_ratio > 0.1
    assert gain.describe().startswith(f"the performance model predicts {gain.best.label()} at ")
    assert f"tok/s against output tokens/s {figure(gain.current_value)} tok/s for the current tp8x1" in gain.describe()


def test_the_best_candidate_itself_gains_nothing():
    first = predicted_gain(CONFIG, "batch", live(64.0, 1000.0, 300.0), Candidate(8, 1, KNOBS), gpus=8)
    again = predicted_gain(CONFIG, "batch", live(64.0, 1000.0, 300.0), first.best, gpus=8)
    assert again.best == first.best and again.gain_ratio == 0
    assert again.describe().startswith("the performance model predicts nothing better than output tokens/s")


def test_no_prediction_without_lengths_or_without_room():
    assert predicted_gain(CONFIG, "batch", live(8.0, 1.0, 1.0, measured=False), Candidate(2, 1, KNOBS),
                          gpus=8) is None
    assert predicted_gain(CONFIG, "batch", live(8.0, 500.0, 100.0), Candidate(2, 1, KNOBS), gpus=1) is None
