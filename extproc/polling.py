"""A background task that runs one refresh every few seconds: the file pollers share it.

``extproc.credentials.CredentialStore`` (Secret files) and ``extproc.tls.ReloadingServerCredentials``
(TLS files) both re-read files on a timer off the request path; the loop, its error handling and
its start/stop live here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from extproc import wakeups


class Poller:
    """Awaits ``refresh()`` every ``interval`` seconds between ``start()`` and ``stop()``."""

    def __init__(self, refresh: Callable[[], Awaitable[object]], interval: float,
                 log: logging.Logger, failure: str) -> None:
        self.refresh = refresh
        self.interval = interval
        self._log = log
        self._failure = failure  # the message logged (with the traceback) when a refresh raises
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await wakeups.sleep(self.interval)
            try:
                await self.refresh()
            except Exception:  # a transient FS error must not stop rotation forever
                self._log.exception(self._failure)

    def start(self) -> None:
        """Start polling on the running loop; a second call is a no-op."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
