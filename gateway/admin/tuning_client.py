"""The typed client over the tuning service actor: the admin API's way to the studies.

Errors come back as the service's own types (:class:`StudyConflict`, :class:`StudyRejected`,
:class:`UnknownStudy`, :class:`gateway.control.client.Conflict` and its kin for a promotion the controller
refused), or :class:`gateway.admin.app.ServiceUnavailable` when the service does not answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from gateway.admin.app import ServiceUnavailable

DEFAULT_TIMEOUT_S = 30.0
REPORT_TIMEOUT_S = 120.0  # rendering a report reads every trial and embeds plotly


class TuningClient:
    """Async client over the named tuning-service actor (re-resolved after a failure)."""

    def __init__(self, *, name: str, namespace: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._name = name
        self._namespace = namespace
        self._timeout_s = timeout_s
        self._actor: Any = None

    async def start_study(self, request: Mapping[str, Any]) -> dict[str, Any]:
        study: dict[str, Any] = await self._call("start_study", dict(request))
        return study

    async def studies(self) -> list[dict[str, Any]]:
        studies: list[dict[str, Any]] = await self._call("studies")
        return studies

    async def study(self, study_id: str) -> dict[str, Any]:
        study: dict[str, Any] = await self._call("study", study_id)
        return study

    async def stop_study(self, study_id: str) -> dict[str, Any]:
        study: dict[str, Any] = await self._call("stop_study", study_id, timeout_s=60.0)
        return study

    async def report_html(self, study_id: str) -> str:
        html: str = await self._call("report_html", study_id, timeout_s=REPORT_TIMEOUT_S)
        return html

    async def promote(self, study_id: str, *, trial: int | None) -> dict[str, Any]:
        promotion: dict[str, Any] = await self._call("promote", study_id, trial=trial, timeout_s=120.0)
        return promotion

    async def _call(self, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
        import ray

        limit_s = timeout_s or self._timeout_s
        try:
            if self._actor is None:
                self._actor = ray.get_actor(self._name, namespace=self._namespace)
            return await asyncio.wait_for(getattr(self._actor, method).remote(*args, **kwargs), limit_s)
        except ValueError:
            raise ServiceUnavailable(f"the tuning service is not running (no actor {self._name!r})") from None
        except TimeoutError:
            raise ServiceUnavailable(f"the tuning service did not answer {method} within {limit_s:g} s") from None
        except ray.exceptions.RayTaskError as exc:
            raise _unwrapped(exc) from None
        except ray.exceptions.RayError as exc:
            self._actor = None
            raise ServiceUnavailable(f"the tuning service is unavailable: {type(exc).__name__}") from None


def _unwrapped(exc: Any) -> Exception:
    """The service's own exception (or the controller client's, raised inside the service)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, Exception):
        return cause
    return RuntimeError(f"the tuning service failed: {exc}")
