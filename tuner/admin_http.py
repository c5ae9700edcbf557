"""The gateway's admin API over HTTP, for the drift monitor: the controller's status (free GPUs, studies,
pools), where its verdicts go, and the tuning and promotion routes a re-tune uses. One ``aiohttp`` session,
explicit timeouts; a refused or failed call raises :class:`AdminCallFailed` with the gateway's message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

TIMEOUT_S = 30.0


class AdminCallFailed(RuntimeError):
    """An admin call that did not succeed: the method, path, status and the gateway's message."""


class AdminHttp:
    """The admin API of one gateway with its token (implements :class:`tuner.retune.RetuneBackend`)."""

    def __init__(self, gateway_url: str, admin_token: str, *, timeout_s: float = TIMEOUT_S) -> None:
        self._url = gateway_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {admin_token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """The JSON answer of ``method path`` (with ``body`` as JSON)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        try:
            async with self._session.request(method, self._url + path, json=body) as response:
                answer = await response.json(content_type=None)
                if response.status >= 400:
                    message = answer.get("error", {}).get("message") if isinstance(answer, dict) else answer
                    raise AdminCallFailed(f"{method} {path}: HTTP {response.status}: {message}")
                return answer
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise AdminCallFailed(f"{method} {path}: {exc!r}") from None

    async def status(self) -> dict[str, Any]:
        return dict(await self.call("GET", "/admin/status"))

    async def promotions(self) -> list[dict[str, Any]]:
        return list(await self.call("GET", "/admin/promotions"))

    async def start_study(self, request: Mapping[str, Any]) -> dict[str, Any]:
        return dict(await self.call("POST", "/admin/tuning", dict(request)))

    async def study(self, study_id: str) -> dict[str, Any]:
        return dict(await self.call("GET", f"/admin/tuning/{study_id}"))

    async def promote(self, study_id: str, *, trial: int) -> dict[str, Any]:
        return dict(await self.call("POST", f"/admin/tuning/{study_id}/promote", {"trial": trial}))

    async def promotion(self, promotion_id: str) -> dict[str, Any]:
        return dict(await self.call("GET", f"/admin/promotions/{promotion_id}"))

    async def report_drift(self, class_name: str, report: Mapping[str, Any]) -> dict[str, Any]:
        return dict(await self.call("PUT", f"/admin/drift/{class_name}", dict(report)))

    async def studies(self) -> list[dict[str, Any]]:
        return list(await self.call("GET", "/admin/tuning"))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
