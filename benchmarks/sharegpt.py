"""ShareGPT-like request lengths for the replays in ``calibrate_sim.py`` and ``validate_sim.py``.

The shape is the shipped ``sharegpt-like`` load profile's (``loadtests/profiles/sharegpt-like.yaml``):
independent log-normal prompt and output lengths with a spread of 1, after LMDeploy's ShareGPT filter (both
at least 4 tokens, prompt at most 1,024, prompt + output at most 2,048; pairs outside are drawn again), with
the means LMDeploy's Llama-2 benchmark rows imply (246.9 prompt, 232.7 output tokens after the filter). Another
tokenizer turns the same conversations into other token counts: :func:`sharegpt_lengths` then rescales the
distribution so that its means *after the filter* are the ones a published row implies.

    .venv/bin/python benchmarks/sharegpt.py     # the profile's means, spread and tail after the filter
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from loadtests.profile import LogNormal, Profile, load_profile, sample_lengths, with_overrides

PROFILE = "sharegpt-like"
# Pairs drawn to find the pre-filter means that give a target mean after the filter (common random numbers,
# so the search is deterministic and smooth).
SOLVER_DRAWS = 20_000


@dataclass(frozen=True)
class LengthStats:
    """Token-count statistics of a list of (prompt, output) pairs."""

    prompt_mean: float
    output_mean: float
    prompt_median: float
    output_median: float
    prompt_log_sd: float
    output_log_sd: float
    prompt_p99: float
    output_p99: float

    @classmethod
    def of(cls, pairs: list[tuple[int, int]]) -> LengthStats:
        prompts = sorted(p for p, _ in pairs)
        outputs = sorted(o for _, o in pairs)
        return cls(
            prompt_mean=statistics.fmean(prompts),
            output_mean=statistics.fmean(outputs),
            prompt_median=statistics.median(prompts),
            output_median=statistics.median(outputs),
            prompt_log_sd=statistics.pstdev(math.log(p) for p in prompts),
            output_log_sd=statistics.pstdev(math.log(o) for o in outputs),
            prompt_p99=prompts[int(0.99 * len(prompts))],
            output_p99=outputs[int(0.99 * len(outputs))],
        )


def sharegpt_profile(prompt_mean: float | None = None, output_mean: float | None = None) -> Profile:
    """The ``sharegpt-like`` profile, its log-normals rescaled so that the means after its filter are
    ``prompt_mean`` and ``output_mean`` (unchanged where None)."""
    profile = load_profile(PROFILE)
    if prompt_mean is None and output_mean is None:
        return profile
    prompt, output = _lognormals(profile)
    target_prompt = prompt_mean if prompt_mean is not None else filtered_means(profile)[0]
    target_output = output_mean if output_mean is not None else filtered_means(profile)[1]
    means = [prompt.mean, output.mean]  # before the filter
    for _ in range(4):  # the joint cap couples the two means a little; alternate until both settle
        for side, target in enumerate((target_prompt, target_output)):

            def after_filter(mean: float, side: int = side) -> float:
                trial = [mean if i == side else means[i] for i in range(2)]
                return filtered_means(_rescaled(profile, *trial))[side]

            means[side] = _solve(after_filter, target, means[side])
    return _rescaled(profile, *means)


def sharegpt_lengths(
    count: int, *, seed: int, prompt_mean: float | None = None, output_mean: float | None = None
) -> list[tuple[int, int]]:
    """``count`` seeded (prompt, output) pairs of the ShareGPT-like shape (see :func:`sharegpt_profile`)."""
    profile = sharegpt_profile(prompt_mean, output_mean)
    rng = random.Random(seed)
    return [sample_lengths(profile, rng) for _ in range(count)]


def filtered_means(profile: Profile) -> tuple[float, float]:
    """Mean prompt and output tokens of the profile's pairs after its bounds and ``max_total_tokens``.

    Drawing each length again until it is within bounds, then the pair again while it is over the cap, is the
    product of the two log-normals restricted to where every condition holds; so the mean over the accepted
    pairs of one fixed set of draws is that mean, and it moves smoothly with the parameters.
    """
    prompt, output = _lognormals(profile)
    rng = random.Random(0)
    cap = profile.max_total_tokens or math.inf
    prompt_sum = output_sum = accepted = 0
    for _ in range(SOLVER_DRAWS):
        prompt_value = math.exp(prompt.mu + prompt.sigma * rng.gauss())
        output_value = math.exp(output.mu + output.sigma * rng.gauss())
        p, o = max(1, round(prompt_value)), max(1, round(output_value))  # as loadtests' sample_count rounds
        if _within(prompt, prompt_value) and _within(output, output_value) and p + o <= cap:
            prompt_sum, output_sum, accepted = prompt_sum + p, output_sum + o, accepted + 1
    return prompt_sum / accepted, output_sum / accepted


def _within(distribution: LogNormal, value: float) -> bool:
    return distribution.low <= value <= (math.inf if distribution.high is None else distribution.high)


def _lognormals(profile: Profile) -> tuple[LogNormal, LogNormal]:
    prompt, output = profile.prompt_tokens, profile.output_tokens
    if not isinstance(prompt, LogNormal) or not isinstance(output, LogNormal):
        raise ValueError(f"profile {profile.name}: prompt and output lengths must be log-normal")
    return prompt, output


def _rescaled(profile: Profile, prompt_mean: float, output_mean: float) -> Profile:
    prompt, output = _lognormals(profile)
    return with_overrides(
        profile,
        prompt_tokens=prompt.model_copy(update={"mean": prompt_mean}).model_dump(),
        output_tokens=output.model_copy(update={"mean": output_mean}).model_dump(),
    )


def _solve(mean_after_filter: Callable[[float], float], target: float, start: float) -> float:
    """The pre-filter mean whose mean after the filter is ``target`` (bisection; the map is increasing)."""
    low, high = start / 4, start * 4
    for _ in range(40):
        middle = math.sqrt(low * high)
        if mean_after_filter(middle) < target:
            low = middle
        else:
            high = middle
        if high / low < 1.0005:
            break
    return math.sqrt(low * high)


def main() -> None:
    profile = sharegpt_profile()
    stats = LengthStats.of(sharegpt_lengths(20_000, seed=1))
    prompt, output = _lognormals(profile)
    print(f"profile {profile.name}: prompt log-normal mean {prompt.mean:g} sigma {prompt.sigma:g}, "
          f"output mean {output.mean:g} sigma {output.sigma:g}, max_total_tokens {profile.max_total_tokens}")
    print(f"after the filter (20,000 pairs): prompt mean {stats.prompt_mean:.1f} median {stats.prompt_median:.0f} "
          f"p99 {stats.prompt_p99:.0f} log-sd {stats.prompt_log_sd:.2f}; output mean {stats.output_mean:.1f} "
          f"median {stats.output_median:.0f} p99 {stats.output_p99:.0f} log-sd {stats.output_log_sd:.2f}")


if __name__ == "__main__":
    main()
