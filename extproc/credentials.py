"""Provider credentials, read from mounted Secret files or the environment.

Files are polled off the event loop and kept in memory, so the request path never touches the
disk, and a rotated Secret (kubelet swaps the ``..data`` symlink) takes effect within one poll
interval without a restart. Values never leave this module except into an auth header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable

from extproc.spec import AuthSpec

log = logging.getLogger(__name__)

DEFAULT_SECRETS_DIR = "/var/run/secrets/holysheep"


class Credential:
    """A secret value that refuses to be printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Credential(<redacted>)"

    __str__ = __repr__


class CredentialStore:
    def __init__(self, secrets_dir: str = DEFAULT_SECRETS_DIR, poll_interval: float = 1.0) -> None:
        self.secrets_dir = secrets_dir
        self.poll_interval = poll_interval
        self._files: dict[str, Credential | None] = {}
        self._task: asyncio.Task[None] | None = None

    def path_for(self, auth: AuthSpec) -> str | None:
        if auth.secret_name is None or auth.key is None:
            return None
        return os.path.join(self.secrets_dir, auth.secret_name, auth.key)

    def track(self, auths: Iterable[AuthSpec]) -> None:
        """Load the files a config references (synchronously: called at config load time)."""
        wanted = {p for p in (self.path_for(a) for a in auths) if p}
        self._files = {p: self._files.get(p) for p in wanted}
        self._refresh_sync()

    def get(self, auth: AuthSpec) -> Credential | None:
        path = self.path_for(auth)
        if path is not None:
            cred = self._files.get(path)
            if cred is not None:
                return cred
        if auth.env:
            value = os.environ.get(auth.env, "").strip()
            if value:
                return Credential(value)
        return None

    def _refresh_sync(self) -> None:
        for path in list(self._files):
            try:
                with open(path, encoding="utf-8") as fh:
                    value = fh.read().strip()
            except OSError:
                value = ""
            previous = self._files.get(path)
            if value and (previous is None or previous.reveal() != value):
                log.info("credential loaded", extra={"secret_file": path})
            self._files[path] = Credential(value) if value else None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await asyncio.to_thread(self._refresh_sync)
            except Exception:  # a transient FS error must not stop rotation forever
                log.exception("credential refresh failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
