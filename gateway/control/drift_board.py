"""What the drift monitor last said about each class, as the gateway keeps it: pure, no I/O.

The monitor (``tpgate drift``) reports every class it watches once per interval, the whole verdict each time
(level-triggered: a lost report is made good by the next, a repeated one changes nothing). The board keeps the
latest report per class, says which reports are events (the class drifted or cleared, a re-tune ended), and tells
a report that outlived its ``valid_for_s`` (the monitor stopped) from a current one: a stale report is shown as
such and no longer counts as drifted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DriftEvent:
    """An event a report brings: ``kind`` is ``drift.detected``, ``drift.cleared`` or ``retune.<result>``."""

    kind: str
    message: str


@dataclass(frozen=True)
class _Entry:
    report: Mapping[str, Any]
    received_s: float  # the board's clock (monotonic) when it arrived


class DriftBoard:
    """The latest drift report of each class."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def report(self, class_name: str, report: Mapping[str, Any], *, now_s: float) -> list[DriftEvent]:
        """Keep ``report`` as the class's latest; the events it brings compared with the previous one."""
        previous = self._current(class_name, now_s=now_s)
        last = self._entries.get(class_name)  # stale or not: a re-tune already told is not told again
        self._entries[class_name] = _Entry(dict(report), now_s)
        events = []
        was_drifted = bool(previous is not None and previous["drifted"])
        if bool(report["drifted"]) != was_drifted:
            kind = "drift.detected" if report["drifted"] else "drift.cleared"
            events.append(DriftEvent(kind, f"class {class_name}: {report['reason']}"))
        retune = report.get("retune")
        if retune is not None and (last is None or last.report.get("retune") != retune):
            events.append(DriftEvent(f"retune.{retune['result']}", f"class {class_name}: {retune['reason']}"))
        return events

    def drifted(self, *, now_s: float) -> dict[str, int]:
        """1 or 0 per class with a current report (what the ``tpgate_class_drifted`` gauges show)."""
        return {name: int(bool(report["drifted"])) for name in self._entries
                if (report := self._current(name, now_s=now_s)) is not None}

    def as_dict(self, *, now_s: float) -> dict[str, dict[str, Any]]:
        """Every class's latest report with its age and whether it is ``stale``."""
        return {name: {**entry.report, "age_s": round(now_s - entry.received_s, 1),
                       "stale": self._current(name, now_s=now_s) is None}
                for name, entry in sorted(self._entries.items())}

    def _current(self, class_name: str, *, now_s: float) -> Mapping[str, Any] | None:
        entry = self._entries.get(class_name)
        if entry is None or now_s - entry.received_s > float(entry.report["valid_for_s"]):
            return None
        return entry.report
