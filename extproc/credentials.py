"""Provider credentials, read from mounted Secret files or the environment.

Files are polled off the event loop and kept in memory, so the request path never touches the
disk, and a rotated Secret (kubelet swaps the ``..data`` symlink) takes effect within one poll
interval without a restart. Values never leave this module except into an auth header.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable

from extproc.polling import Poller
from protos.spec import AuthSpec

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


def read_secret_file(path: str) -> tuple[str, str | None]:
    """The file's value ("" when missing or unusable) and what is wrong with it, if anything.

    Never raises with the content: a UnicodeDecodeError's repr carries every byte of the file,
    so the bytes are decoded here and a bad file is described without them.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return "", None
    except OSError as exc:
        return "", f"unreadable: {exc.strerror}"
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "", "not UTF-8 text"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "", "contains a control character (a newline would split the auth header)"
    return value, None


class CredentialStore:
    def __init__(self, secrets_dir: str = DEFAULT_SECRETS_DIR, poll_interval: float = 1.0) -> None:
        self.secrets_dir = secrets_dir
        self._files: dict[str, Credential | None] = {}
        self._bad: set[str] = set()  # files already reported as unusable
        self._poller = Poller(self._refresh, poll_interval, log, "credential refresh failed")

    def path_for(self, auth: AuthSpec) -> str | None:
        if auth.secret_name is None or auth.key is None:
            return None
        return os.path.join(self.secrets_dir, auth.secret_name, auth.key)

    def track(self, auths: Iterable[AuthSpec]) -> None:
        """Load the files a config references (synchronously: called at config load time)."""
        wanted = {p for p in (self.path_for(a) for a in auths) if p}
        self._files = {p: self._files.get(p) for p in wanted}
        self._refresh_sync()

    def reader(self, auth: AuthSpec) -> Callable[[], Credential | None]:
        """``get(auth)`` as a function for the hot path: the file's path is joined once, and
        the environment variable read once (a process's environment does not change under it;
        a reload builds new readers). The file's current value is still read on every call, so
        a rotated Secret applies at once, and the same Credential object is returned until it
        changes (callers may remember what they built from it)."""
        path = self.path_for(auth)
        value = os.environ.get(auth.env, "").strip() if auth.env else ""
        from_env = Credential(value) if value else None

        def read() -> Credential | None:
            if path is not None:
                cred = self._files.get(path)
                if cred is not None:
                    return cred
            return from_env

        return read

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
            value, problem = read_secret_file(path)
            if problem is not None and path not in self._bad:
                log.warning("credential file ignored", extra={"secret_file": path, "problem": problem})
            if problem is None:
                self._bad.discard(path)
            else:
                self._bad.add(path)
            previous = self._files.get(path)
            if value and previous is not None and previous.reveal() == value:
                continue  # unchanged: the same object, so what was built from it stays valid
            if value:
                log.info("credential loaded", extra={"secret_file": path})
            self._files[path] = Credential(value) if value else None

    async def _refresh(self) -> None:
        await asyncio.to_thread(self._refresh_sync)

    def start(self) -> None:
        self._poller.start()

    async def stop(self) -> None:
        await self._poller.stop()
