"""One engine process, supervised: started in its own process group, tied to its parent's life, stopped as a
group.

The engine must not outlive the pool replica that started it, even when Ray kills the replica with
SIGKILL. The child asks the kernel for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)`` in
``preexec_fn``). That signal fires when the *thread* that forked the child exits, so :meth:`start` must
run on the replica's long-lived event-loop thread (asyncio's subprocess support forks from there).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence

import aiohttp

from gateway.cluster.procutil import die_with_parent


class EngineStartError(RuntimeError):
    """The engine exited or did not become healthy in time."""


class EngineProcess:
    """A running engine: its process and the URL it serves on."""

    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def exit_code(self) -> int | None:
        return self.process.returncode

    @classmethod
    async def start(cls, argv: Sequence[str], *, url: str, env: Mapping[str, str]) -> EngineProcess:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env={**os.environ, **env},
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so stop() reaches its children too
            preexec_fn=die_with_parent,
        )
        return cls(process, url)

    async def wait_healthy(self, session: aiohttp.ClientSession, *, timeout_s: float, poll_s: float = 0.2) -> None:
        """Poll ``/health`` until it answers 200; raise :class:`EngineStartError` on exit or timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if self.exit_code is not None:
                raise EngineStartError(f"engine exited with status {self.exit_code} before it was healthy")
            if await self.healthy(session, timeout_s=min(2.0, timeout_s)):
                return
            await asyncio.sleep(poll_s)
        raise EngineStartError(f"engine at {self.url} not healthy after {timeout_s:g} s")

    async def healthy(self, session: aiohttp.ClientSession, *, timeout_s: float) -> bool:
        if self.exit_code is not None:
            return False
        try:
            async with session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def stop(self, *, timeout_s: float) -> None:
        """SIGTERM to the whole group, then SIGKILL after ``timeout_s``."""
        if self.exit_code is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout_s)
            except TimeoutError:
                self._signal_group(signal.SIGKILL)
                await self.process.wait()
        # children the engine left behind in its group
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)
