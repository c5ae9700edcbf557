"""Workload profiles: the load that defines a workload class, as data (YAML), validated where it enters.

A profile says how many users send requests and when (closed loop with think time, or open loop at a request
rate), how long prompts and outputs are (fixed, uniform or log-normal token counts, optionally with a cap on
prompt plus output), how requests are sent (chat or completions, streaming or not, which workload class), and
how the run is bounded (duration, warm-up, request cap). Shipped profiles live in
``loadtests/profiles/<name>.yaml``; any other YAML file with the same fields works too.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.yamlfile import YamlFileError, read_yaml_mapping
from loadtests.errors import LoadTestInputError

PROFILES_DIR = Path(__file__).parent / "profiles"
# A redrawing distribution or length cap must accept at least this share of draws (else sampling would crawl).
MIN_ACCEPTED_SHARE = 0.01


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Fixed(_Strict):
    """Always the same value."""

    kind: Literal["fixed"]
    value: float = Field(ge=0)

    def sample(self, rng: random.Random) -> float:
        return self.value

    def probability_at_most(self, x: float) -> float:
        return 1.0 if self.value <= x else 0.0

    @property
    def low_bound(self) -> float:
        return self.value

    @property
    def mean_value(self) -> float:
        return self.value


class Uniform(_Strict):
    """Uniform between ``low`` and ``high`` (both included)."""

    kind: Literal["uniform"]
    low: float = Field(ge=0)
    high: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if self.high < self.low:
            raise ValueError(f"uniform: high ({self.high:g}) is below low ({self.low:g})")
        return self

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)

    def probability_at_most(self, x: float) -> float:
        if self.high == self.low:
            return 1.0 if self.low <= x else 0.0
        return min(1.0, max(0.0, (x - self.low) / (self.high - self.low)))

    @property
    def low_bound(self) -> float:
        return self.low

    @property
    def mean_value(self) -> float:
        return (self.low + self.high) / 2


class LogNormal(_Strict):
    """Log-normal with the given arithmetic ``mean``; ``sigma`` is the spread (standard deviation of the log).

    Long-tailed like real prompt and output lengths (ShareGPT). ``mean`` is the mean before ``[low, high]``
    applies. Samples outside the bounds are clipped to them (``truncate: clip``, the default), which piles the
    tail up on the bound, or drawn again (``truncate: redraw``), which removes the tail as a benchmark's length
    filter does; either moves the realised mean when the bounds cut into the distribution.
    """

    kind: Literal["lognormal"]
    mean: float = Field(gt=0)
    sigma: float = Field(gt=0, le=3)
    low: float = Field(default=0, ge=0)
    high: float | None = Field(default=None, gt=0)
    truncate: Literal["clip", "redraw"] = "clip"

    @model_validator(mode="after")
    def _bounds_around_mean(self) -> LogNormal:
        high = math.inf if self.high is None else self.high
        if not self.low <= self.mean <= high:
            raise ValueError(f"lognormal: mean ({self.mean:g}) must lie within low ({self.low:g}) and high ({high:g})")
        if self.truncate == "redraw" and self._untruncated_mass() < MIN_ACCEPTED_SHARE:
            raise ValueError(
                f"lognormal: fewer than {MIN_ACCEPTED_SHARE:.0%} of the draws fall within low ({self.low:g}) and "
                f"high ({high:g}); redrawing would never end"
            )
        return self

    @property
    def mu(self) -> float:
        """The mean of the underlying normal, so that E[X] = ``mean`` before truncation."""
        return math.log(self.mean) - self.sigma**2 / 2

    def sample(self, rng: random.Random) -> float:
        high = math.inf if self.high is None else self.high
        value = rng.lognormvariate(self.mu, self.sigma)
        if self.truncate == "redraw":
            while not self.low <= value <= high:
                value = rng.lognormvariate(self.mu, self.sigma)
            return value
        return min(high, max(self.low, value))

    def probability_at_most(self, x: float) -> float:
        high = math.inf if self.high is None else self.high
        if x >= high:
            return 1.0
        if x < self.low:
            return 0.0
        below_x = self._cdf(x)
        if self.truncate == "clip":
            return below_x
        low_mass = self._cdf(self.low)
        return (below_x - low_mass) / self._untruncated_mass()

    def _cdf(self, x: float) -> float:
        """P(X <= x) of the untruncated log-normal."""
        if x <= 0:
            return 0.0
        return 0.5 * (1 + math.erf((math.log(x) - self.mu) / (self.sigma * math.sqrt(2))))

    def _untruncated_mass(self) -> float:
        """P(low <= X <= high) of the untruncated log-normal."""
        high = 1.0 if self.high is None else self._cdf(self.high)
        return high - self._cdf(self.low)

    @property
    def low_bound(self) -> float:
        return self.low

    @property
    def mean_value(self) -> float:
        return self.mean


Distribution = Annotated[Fixed | Uniform | LogNormal, Field(discriminator="kind")]


def sample_count(distribution: Fixed | Uniform | LogNormal, rng: random.Random) -> int:
    """A token count drawn from ``distribution``: rounded, at least 1."""
    return max(1, round(distribution.sample(rng)))


class ClosedLoop(_Strict):
    """Each user sends a request, waits for the whole response, thinks, and sends the next one."""

    kind: Literal["closed"]
    think_time_s: Distribution = Field(default_factory=lambda: Fixed(kind="fixed", value=0))


class OpenLoop(_Strict):
    """Requests arrive as a Poisson process at ``rate_per_s``, whatever the responses do.

    The profile's ``users`` bound the requests in flight: when all users are busy, arrivals wait (and the
    achieved rate falls short of the target, which the summary shows).
    """

    kind: Literal["open"]
    rate_per_s: float = Field(gt=0)


class WorkloadClass(_Strict):
    """The workload class requests ask for: an ``x-workload-class`` header or a ``<model>:<class>`` alias."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    via: Literal["header", "model_alias"] = "header"


class Profile(_Strict):
    """One workload: who sends what, how, and for how long. All times in seconds, lengths in tokens."""

    name: str = Field(min_length=1)
    description: str = ""
    users: int = Field(ge=1, le=10_000, description="concurrent users (closed loop) or in-flight cap (open loop)")
    spawn_rate_per_s: float | None = Field(default=None, gt=0, description="users started per second; all at once")
    arrival: ClosedLoop | OpenLoop = Field(discriminator="kind")
    prompt_tokens: Distribution
    output_tokens: Distribution
    max_total_tokens: int | None = Field(
        default=None, ge=2, description="prompt plus output tokens at most; pairs above are drawn again")
    stream: bool = True
    api: Literal["chat", "completions"] = "chat"
    workload_class: WorkloadClass | None = None
    model: str | None = Field(default=None, description="served model name; the first of /v1/models when unset")
    duration_s: float = Field(gt=0, le=24 * 3600, description="measured window, after the warm-up")
    warmup_s: float = Field(default=0, ge=0, le=3600, description="requests that finish in it are not measured")
    max_requests: int = Field(ge=1, description="requests sent in all, warm-up included; the run stops there")
    request_timeout_s: float = Field(default=300, gt=0)
    drain_timeout_s: float = Field(default=30, ge=0, description="how long requests in flight may finish at the end")
    seed: int = 0

    @model_validator(mode="after")
    def _lengths_are_tokens(self) -> Profile:
        for field in ("prompt_tokens", "output_tokens"):
            distribution = getattr(self, field)
            if distribution.low_bound < 1 and not isinstance(distribution, LogNormal):
                raise ValueError(f"{field}: token counts must be at least 1 (got {distribution.low_bound:g})")
        if self.max_total_tokens is not None:
            # Both halves below half the cap is a lower bound on the share of pairs the cap accepts.
            half = self.max_total_tokens / 2
            accepted = self.prompt_tokens.probability_at_most(half) * self.output_tokens.probability_at_most(half)
            if accepted < MIN_ACCEPTED_SHARE:
                raise ValueError(
                    f"max_total_tokens: {self.max_total_tokens} rejects nearly every prompt and output pair "
                    "(redrawing would never end)"
                )
        return self

    @property
    def spawn_rate(self) -> float:
        """Users started per second (all of them within one second when the profile does not say)."""
        return self.spawn_rate_per_s or float(self.users)

    @property
    def run_time_s(self) -> float:
        """Warm-up plus the measured window: how long users keep sending requests."""
        return self.warmup_s + self.duration_s


def sample_lengths(profile: Profile, rng: random.Random) -> tuple[int, int]:
    """One request's (prompt, output) token counts: each drawn from its distribution, the pair drawn again
    while it exceeds ``max_total_tokens`` (a benchmark's length filter, e.g. LMDeploy's and vLLM's ShareGPT
    sampling: prompt + output at most 2,048)."""
    while True:
        prompt = sample_count(profile.prompt_tokens, rng)
        output = sample_count(profile.output_tokens, rng)
        if profile.max_total_tokens is None or prompt + output <= profile.max_total_tokens:
            return prompt, output


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped in ``loadtests/profiles``."""
    return sorted(path.stem for path in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (``batch``) or a profile YAML file by path. Raises LoadTestInputError."""
    shipped = PROFILES_DIR / f"{name_or_path}.yaml"
    path = shipped if shipped.is_file() and "/" not in str(name_or_path) else Path(name_or_path)
    if not path.is_file():
        raise LoadTestInputError(
            f"unknown profile {str(name_or_path)!r}: not a shipped profile ({', '.join(shipped_profiles())}) "
            "nor a YAML file"
        )
    try:
        data = read_yaml_mapping(path, what="a profile")
    except YamlFileError as exc:
        raise LoadTestInputError(str(exc)) from None
    data.setdefault("name", path.stem)
    return validate_profile(data, source=str(path))


def validate_profile(data: dict[str, Any], *, source: str = "profile") -> Profile:
    """Validate profile fields; errors name the field and the bad value."""
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise LoadTestInputError(f"{source}: {describe_validation_error(exc)}") from None


def with_overrides(profile: Profile, **overrides: Any) -> Profile:
    """A copy of ``profile`` with the given fields replaced (None leaves a field as it is), validated again."""
    data = profile.model_dump(mode="json")
    data.update({key: value for key, value in overrides.items() if value is not None})
    return validate_profile(data, source=f"profile {profile.name} with overrides")


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, ``field.path: message (got value)``, joined with ``; ``."""
    parts = []
    for error in exc.errors():
        # drop the union tag pydantic inserts into the location (``prompt_tokens.uniform.high``)
        where = ".".join(str(p) for p in error["loc"] if p not in ("fixed", "uniform", "lognormal", "closed", "open"))
        message = error["msg"].removeprefix("Value error, ")
        got = "" if error["type"] in ("missing", "value_error") else f" (got {error['input']!r})"
        parts.append(f"{where or 'profile'}: {message}{got}")
    return "; ".join(parts)
