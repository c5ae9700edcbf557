"""The state store: the controller's desired state and records, in one JSON file, written atomically.

It is what survives a restart of the controller actor, of ``tpgate serve`` and of Ray: pools, routes, the state
version, and named record sections other control-plane parts keep (promotion history, study references). The
configuration file only seeds an empty store. Writes go to a temporary file in the same directory, are synced,
and replace the store in one rename, so a crash leaves the old or the new state, never half of one. A store that
cannot be read or parsed raises :class:`StoreError` and is left untouched for inspection.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.control.state import DesiredState, state_from_dict, state_to_dict

STORE_FORMAT = 1


class StoreError(Exception):
    """The store exists but cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class StoredState:
    """What the store holds: the desired state at ``version``, and free-form JSON record sections."""

    state: DesiredState
    version: int
    records: Mapping[str, Any] = field(default_factory=dict)


class StateStore:
    """One JSON file (mode 600, in a 700 directory created if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    def load(self) -> StoredState | None:
        """The stored state, or None when there is no store yet."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read the state store: {exc.strerror}") from None
        try:
            data = json.loads(text)
            if data.get("format") != STORE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {STORE_FORMAT}")
            return StoredState(state=state_from_dict(data["state"]), version=int(data["version"]),
                               records=dict(data.get("records", {})))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(
                f"{self.path}: the state store is corrupt ({type(exc).__name__}: {exc}); it was left as it is "
                f"for inspection: move it away (or start with --reset-state) to start from the configuration"
            ) from None

    def save(self, stored: StoredState) -> None:
        document = {"format": STORE_FORMAT, "version": stored.version, "state": state_to_dict(stored.state),
                    "records": dict(stored.records)}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(document, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def reset(self) -> None:
        """Forget the stored state (``tpgate serve --reset-state``)."""
        self.path.unlink(missing_ok=True)
