"""Where each class's drift record lives: its reference profile, when it was last re-tuned, and its last verdict.

One JSON-safe mapping (:class:`DriftRecords`), kept either in the controller's store — the ``drift`` record
section, through the typed control client (``records`` / ``put_records``), so it survives restarts with the
gateway's state — or in a JSON file when no controller is reachable (written atomically).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tuner.drift import ReferenceProfile

if TYPE_CHECKING:
    from gateway.control.client import ControlClient

RECORD_SECTION = "drift"


@dataclass
class DriftRecords:
    """Per class: the reference, the Unix time of its last re-tune (None: never), and the last verdict (as the
    monitor reported it, JSON-safe)."""

    references: dict[str, ReferenceProfile] = field(default_factory=dict)
    last_retune_s: dict[str, float] = field(default_factory=dict)
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"references": {name: ref.as_dict() for name, ref in self.references.items()},
                "last_retune_s": dict(self.last_retune_s), "verdicts": dict(self.verdicts)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> DriftRecords:
        data = data or {}
        return cls(
            references={name: ReferenceProfile.from_dict(ref) for name, ref in data.get("references", {}).items()},
            last_retune_s={name: float(at) for name, at in data.get("last_retune_s", {}).items()},
            verdicts=dict(data.get("verdicts", {})),
        )


class DriftStore(Protocol):
    async def load(self) -> DriftRecords: ...

    async def save(self, records: DriftRecords) -> None: ...


class RecordSections(Protocol):
    """The part of :class:`gateway.control.client.ControlClient` the store uses."""

    async def records(self, section: str) -> Any: ...

    async def put_records(self, section: str, value: Any) -> None: ...


class ControllerDriftStore:
    """The controller's ``drift`` record section."""

    def __init__(self, client: RecordSections) -> None:
        self._client = client

    async def load(self) -> DriftRecords:
        return DriftRecords.from_dict(await self._client.records(RECORD_SECTION))

    async def save(self, records: DriftRecords) -> None:
        await self._client.put_records(RECORD_SECTION, records.as_dict())


def controller_store(client: ControlClient) -> ControllerDriftStore:
    """The store of a gateway's controller, through its typed client."""
    return ControllerDriftStore(client)


class FileDriftStore:
    """A JSON file (``~`` expanded); a missing file is an empty record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    async def load(self) -> DriftRecords:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return DriftRecords()
        try:
            return DriftRecords.from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{self.path}: not a drift record file: {exc}") from None

    async def save(self, records: DriftRecords) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(handle, "w") as out:
            json.dump(records.as_dict(), out, indent=2)
        os.replace(temporary, self.path)
