"""Per-request records: what the locustfile writes (JSON lines) and the summary reads, so percentiles are
computed from every request rather than from locust's rounded buckets.

Four kinds of line: ``{"type": "request", ...}`` for each finished request; ``{"type": "phase", ...}`` when
the run moves from warm-up to the measured window (``measure``) and when it stops (``stop``, with the reason);
``{"type": "sent", ...}`` about twice a second while the count changes: how many requests were sent so far,
so that a reader knows how many are in flight; ``{"type": "client", ...}`` about twice a second: how busy the
load generator itself was (its CPU, and how late its scheduler woke), so a summary can tell when the client,
not the target, was the bottleneck. Times are Unix epoch seconds (so they line up with Prometheus)
and durations seconds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Literal

PhaseName = Literal["measure", "stop"]


@dataclass(frozen=True)
class RequestRecord:
    """One finished request (or one that failed)."""

    index: int  # position in the run's request sequence
    start_s: float  # Unix time the request was sent
    e2e_s: float  # until the last byte of the response
    ttft_s: float | None  # until the first content token; None when not streamed or no token came
    output_tokens: int
    prompt_tokens: int  # as requested (the generator makes prompts of exactly this many tokens)
    ok: bool
    status: int = 200  # HTTP status; 0 when the connection failed
    error: str | None = None
    cause: str | None = None  # why it failed, one of loadtests.failures' causes; None when it succeeded

    @property
    def end_s(self) -> float:
        return self.start_s + self.e2e_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output tokens - 1); None below 2 tokens."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Phase:
    """A change of phase: ``measure`` (warm-up over) or ``stop`` (no more requests will be sent)."""

    phase: PhaseName
    at_s: float
    reason: str | None = None  # for stop: "duration", "max_requests" or "stopped"


@dataclass(frozen=True)
class Sent:
    """How many requests the run had sent by ``at_s``; those not among the finished ones are in flight."""

    at_s: float
    requests: int


@dataclass(frozen=True)
class ClientLoad:
    """The load generator's own load over the interval that ended at ``at_s``: its CPU time per wall second
    (1.0: one core busy all the time; locust runs on one core) and how much later than asked its scheduler
    woke a sleeping task (seconds; grows when the client has no CPU to spare, its own or the machine's)."""

    at_s: float
    cpu_ratio: float
    lag_s: float


Entry = RequestRecord | Phase | Sent | ClientLoad
_KINDS: dict[type, str] = {RequestRecord: "request", Phase: "phase", Sent: "sent", ClientLoad: "client"}


def to_line(entry: Entry) -> str:
    """The JSON line for ``entry``, newline included."""
    return json.dumps({"type": _KINDS[type(entry)], **asdict(entry)}, separators=(",", ":")) + "\n"


def from_line(line: str) -> Entry:
    """Parse one JSON line written by :func:`to_line`."""
    data = json.loads(line)
    kind = data.pop("type")
    if kind == "request":
        return RequestRecord(**data)
    if kind == "phase":
        return Phase(**data)
    if kind == "sent":
        return Sent(**data)
    if kind == "client":
        return ClientLoad(**data)
    raise ValueError(f"unknown record type {kind!r}")


class RecordWriter:
    """Appends entries to a JSON lines file, one write and flush per entry so a reader can follow along."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, entry: Entry) -> None:
        if self._stream.closed:  # a straggler after the run was closed is not part of it
            return
        self._stream.write(to_line(entry))
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()


class RecordReader:
    """Reads a growing JSON lines file incrementally; a half-written last line waits for the next read."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._offset = 0

    def read_new(self) -> list[Entry]:
        """Entries completed since the last call (none while the file does not exist yet)."""
        try:
            with self._path.open("rb") as stream:
                stream.seek(self._offset)
                data = stream.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [from_line(line) for line in complete.decode().splitlines() if line.strip()]


def read_entries(path: str | Path) -> list[Entry]:
    """Every complete entry in the file."""
    return RecordReader(path).read_new()
