"""The tests' stack: extproc.dev.stack.Stack (mocks, ext_proc, a real Envoy 1.40) plus a leak guard.

The stack itself, its processes and their helpers (free ports, waits, Envoy/ExtProc/Redis) are
shared with the bench and live in extproc/dev/ (``extproc.dev.stack``, ``extproc.dev.processes``);
what is here is test-only.

Every Stack is a leak guard: it records every response a client got through it (its own
``client`` and any ``recording_client()``), and ``check_leaks()`` scans those, every log in its
work directory (ext_proc, all workers, and Envoy) and a /metrics scrape of every ext_proc for the
provider keys it was given, in the encodings a careless log line would use. ``stop()`` runs a
final check, and ``tests/conftest.py`` runs one after every test while a stack is up, so a leak
fails the test that caused it. Mock providers are exempt: receiving the key is their job.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import threading
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx

from extproc.dev import stack as dev_stack
from extproc.dev.processes import http_get
from extproc.dev.stack import running
from protos.spec import ConfigError, load_text

__all__ = ["GUARDS", "LeakError", "LeakGuard", "LeakStats", "Stack", "guard_summary", "key_encodings", "running"]


MIN_KEY_LEN = 8  # shorter values are not keys (and would match by chance)


def _stable_base64(secret: bytes, alphabet: bytes = b"+/") -> list[bytes]:
    """Base64 fragments that appear in the encoding of ANY byte string containing ``secret``.

    Base64 maps 3-byte groups to 4 characters, so the secret encodes differently for each of the
    three alignments it can have inside a larger value (``Basic base64(user:key)``, a JSON blob
    encoded whole). For each alignment keep only the characters of groups made of secret bytes.
    """
    fragments = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret)
        first = -(-offset // 3)  # the first group that starts at or after the secret's first byte
        last = (offset + len(secret)) // 3  # groups before this one end inside the secret
        fragment = encoded[first * 4:last * 4]
        if len(fragment) >= MIN_KEY_LEN:
            fragments.append(fragment.replace(b"+", alphabet[:1]).replace(b"/", alphabet[1:]))
    return fragments


def key_encodings(key: str) -> dict[str, bytes]:
    """Every form of ``key`` the guard looks for: raw, base64 (both alphabets, any alignment),
    URL-encoded (quote and quote_plus), JSON-escaped and hex."""
    raw = key.encode()
    forms: dict[str, bytes] = {"raw": raw}
    for i, frag in enumerate(_stable_base64(raw)):
        forms[f"base64[{i}]"] = frag
    for i, frag in enumerate(_stable_base64(raw, b"-_")):
        forms.setdefault(f"base64url[{i}]", frag)
    forms["url"] = urllib.parse.quote(key, safe="").encode()
    forms["url+"] = urllib.parse.quote_plus(key, safe="").encode()
    forms["json"] = json.dumps(key)[1:-1].encode()
    forms["hex"] = raw.hex().encode()
    unique: dict[str, bytes] = {}
    for name, form in forms.items():
        if form not in unique.values():
            unique[name] = form
    return unique


@dataclass
class Leak:
    key_hint: str  # the key's first 4 characters and its length, never the key
    encoding: str
    where: str
    context: str  # the surroundings, with the match masked

    def __str__(self) -> str:
        return f"{self.where}: key {self.key_hint} ({self.encoding}) in ...{self.context}..."


@dataclass
class LeakStats:
    checks: int = 0
    responses: int = 0
    response_bytes: int = 0
    log_files: int = 0
    log_bytes: int = 0
    log_lines: int = 0
    metrics_scrapes: int = 0
    metrics_bytes: int = 0
    leaks_found: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


GUARDS: list[LeakGuard] = []  # every guard of this session, for the summary figures


def guard_summary() -> str:
    """One line of figures over every stack of the session (printed by tests/conftest.py)."""
    total = LeakStats()
    keys: set[str] = set()
    planted = 0
    for guard in GUARDS:
        for name, value in guard.stats.as_dict().items():
            setattr(total, name, getattr(total, name) + value)
        keys |= guard.keys
        planted += guard.planted
    return (
        f"leak guard: {len(GUARDS)} stacks, {len(keys)} provider keys, {total.checks} checks; scanned "
        f"{total.responses} client responses ({total.response_bytes} B), {total.log_files} log files "
        f"({total.log_lines} lines, {total.log_bytes} B), {total.metrics_scrapes} /metrics scrapes "
        f"({total.metrics_bytes} B); key occurrences found: {total.leaks_found - planted} unexpected, "
        f"{planted} planted on purpose"
    )


class LeakGuard:
    """Scans what a client, an operator or a log shipper can see for provider keys.

    Needles are every encoding of every key (``key_encodings``), matched as bytes with one regex.
    Responses are scanned once, when their body is closed; log files incrementally from where
    the previous scan stopped (with an overlap, so a key split across two scans is still found);
    a finding is reported once, by the ``check`` that saw it first.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: set[str] = set()
        self._needles: dict[bytes, tuple[str, str]] = {}
        self._pattern: re.Pattern[bytes] | None = None
        self._overlap = 0
        self._offsets: dict[Path, int] = {}
        self.pending: list[Leak] = []
        self.stats = LeakStats()
        self.planted = 0  # leaks a test put there on purpose, to prove the guard fails
        GUARDS.append(self)

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(self._keys)

    def add_keys(self, keys: Iterable[str]) -> None:
        with self._lock:
            fresh = {k.strip() for k in keys if len(k.strip()) >= MIN_KEY_LEN} - self._keys
            if not fresh:
                return
            self._keys |= fresh
            for key in fresh:
                hint = f"{key[:4]}…({len(key)})"
                for encoding, needle in key_encodings(key).items():
                    self._needles.setdefault(needle, (hint, encoding))
            ordered = sorted(self._needles, key=len, reverse=True)
            self._pattern = re.compile(b"|".join(re.escape(n) for n in ordered))
            self._overlap = max(len(n) for n in ordered)

    def scan(self, data: bytes, where: str, fresh_from: int = 0) -> list[Leak]:
        """Leaks in ``data``; only matches ending after ``fresh_from`` (earlier bytes were seen)."""
        pattern = self._pattern
        if pattern is None or not data:
            return []
        found = []
        for match in pattern.finditer(data):
            if match.end() <= fresh_from:
                continue
            hint, encoding = self._needles[match.group()]
            before = data[max(0, match.start() - 40):match.start()]
            after = data[match.end():match.end() + 40]
            context = (before + b"<KEY>" + after).decode("utf-8", "replace").replace("\n", "\\n")
            found.append(Leak(hint, encoding, where, context))
        return found

    def report(self, leaks: list[Leak]) -> None:
        if leaks:
            with self._lock:
                self.pending.extend(leaks)
                self.stats.leaks_found += len(leaks)

    def record_response(self, where: str, headers: httpx.Headers, body: bytes) -> None:
        """One response a client received: its headers and its (decoded) body."""
        encoding = headers.get("content-encoding", "").lower()
        if encoding in ("gzip", "deflate"):
            import zlib

            with contextlib.suppress(zlib.error):
                body = zlib.decompress(body, 47 if encoding == "gzip" else 15)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.multi_items()).encode("latin-1", "replace")
        with self._lock:
            self.stats.responses += 1
            self.stats.response_bytes += len(head) + len(body)
        self.report(self.scan(head + b"\r\n" + body, where))

    def scan_file(self, path: Path) -> None:
        try:
            size = path.stat().st_size
        except OSError:
            return
        start = self._offsets.get(path, 0)
        if size < start:  # truncated or replaced: read it again from the start
            start = 0
        if size == start:
            return
        begin = max(0, start - self._overlap)
        with open(path, "rb") as fh:
            fh.seek(begin)
            data = fh.read(size - begin)
        self._offsets[path] = begin + len(data)
        fresh = data[start - begin:]
        with self._lock:
            if start == 0:
                self.stats.log_files += 1
            self.stats.log_bytes += len(fresh)
            self.stats.log_lines += fresh.count(b"\n")
        # Only matches that end in the fresh part are new: the overlap was scanned before.
        self.report(self.scan(data, str(path), fresh_from=start - begin))

    def scan_text(self, text: str, where: str, kind: str = "metrics") -> None:
        data = text.encode("utf-8", "replace")
        with self._lock:
            if kind == "metrics":
                self.stats.metrics_scrapes += 1
                self.stats.metrics_bytes += len(data)
        self.report(self.scan(data, where))

    def take(self) -> list[Leak]:
        with self._lock:
            leaks, self.pending = self.pending, []
            self.stats.checks += 1
            return leaks


class _TeeStream(httpx.SyncByteStream):
    """A response body stream that hands every byte it passes to the guard when it closes."""

    def __init__(self, inner: httpx.SyncByteStream, done: Any) -> None:
        self._inner = inner
        self._done = done
        self._chunks: list[bytes] = []
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._chunks.append(chunk)
            yield chunk

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._inner.close()
            finally:
                self._done(b"".join(self._chunks))


class _AsyncTeeStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, done: Any) -> None:
        self._inner = inner
        self._done = done
        self._chunks: list[bytes] = []
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._chunks.append(chunk)
            yield chunk

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                await self._inner.aclose()
            finally:
                self._done(b"".join(self._chunks))


class RecordingTransport(httpx.HTTPTransport):
    """httpx transport that shows the guard every response a client receives."""

    def __init__(self, guard: LeakGuard, label: str = "client", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._guard = guard
        self._label = label

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = super().handle_request(request)
        where = f"{self._label} response to {request.method} {request.url.path}"
        headers = httpx.Headers(resp.headers)
        assert isinstance(resp.stream, httpx.SyncByteStream)

        def done(body: bytes) -> None:
            self._guard.record_response(where, headers, body)

        return httpx.Response(resp.status_code, headers=resp.headers, stream=_TeeStream(resp.stream, done),
                              extensions=resp.extensions)


class AsyncRecordingTransport(httpx.AsyncHTTPTransport):
    def __init__(self, guard: LeakGuard, label: str = "async client", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._guard = guard
        self._label = label

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        resp = await super().handle_async_request(request)
        where = f"{self._label} response to {request.method} {request.url.path}"
        headers = httpx.Headers(resp.headers)
        assert isinstance(resp.stream, httpx.AsyncByteStream)

        def done(body: bytes) -> None:
            self._guard.record_response(where, headers, body)

        return httpx.Response(resp.status_code, headers=resp.headers,
                              stream=_AsyncTeeStream(resp.stream, done), extensions=resp.extensions)


class LeakError(AssertionError):
    pass


class Stack(dev_stack.Stack):
    """extproc.dev.stack.Stack whose every client response, log and /metrics the leak guard scans.

    Leak guard: the keys are every Secret value written through the stack, every environment
    value a loaded config names in ``auth.env``, every mock's ``expect_key`` and ``leak_keys``.
    """

    live: ClassVar[set[Stack]] = set()  # started and not yet stopped: tests/conftest.py checks these

    def __init__(self, *args: Any, leak_keys: Iterable[str] = (), **kwargs: Any) -> None:
        self.guard = LeakGuard()  # before the base class writes the first Secret
        self.guard.add_keys(leak_keys)
        super().__init__(*args, **kwargs)

    def _transport(self, label: str, http2: bool) -> httpx.HTTPTransport:
        return RecordingTransport(self.guard, label, http1=not http2, http2=http2)

    def _async_transport(self, label: str, http2: bool) -> httpx.AsyncHTTPTransport:
        return AsyncRecordingTransport(self.guard, label, http1=not http2, http2=http2)

    def recording_client(self, label: str = "recording client", http2: bool = False,
                         **kwargs: Any) -> httpx.Client:
        """An httpx client to this stack's Envoy whose every response the leak guard scans.
        ``http2=True`` speaks HTTP/2 with prior knowledge (h2c)."""
        return self.new_client(label, http2, **kwargs)

    def recording_async_client(self, label: str = "async recording client", http2: bool = False,
                               **kwargs: Any) -> httpx.AsyncClient:
        return self.new_async_client(label, http2, **kwargs)

    def record(self, resp: httpx.Response, label: str = "response") -> None:
        """Show the guard a response obtained some other way (it must have been read)."""
        self.guard.record_response(f"{label} to {resp.request.method} {resp.request.url.path}",
                                   resp.headers, resp.content)

    def _collect_keys(self, template: str | None = None) -> None:
        self.guard.add_keys(m.expect_key for m in self.mocks.values() if m.expect_key)
        with contextlib.suppress(ConfigError, KeyError, ValueError):
            for cfg in load_text(self.render(template)):
                for provider in cfg.providers:
                    if provider.auth.env and self.env.get(provider.auth.env):
                        self.guard.add_keys([self.env[provider.auth.env]])

    def write_config(self, template: str | None = None) -> None:
        super().write_config(template)
        self._collect_keys(template)

    def write_secret(self, secret: str, key: str, value: str) -> None:
        self.guard.add_keys([value])
        super().write_secret(secret, key, value)

    def scrape_metrics(self) -> None:
        """Every running ext_proc's /metrics, and Envoy's own stats, into the guard."""
        for i, ep in enumerate(self.extprocs):
            if ep.proc is not None and ep.proc.poll() is None:
                with contextlib.suppress(OSError, RuntimeError):
                    self.guard.scan_text(ep.metrics(), f"ext_proc {i} /metrics")
        if self.envoy is not None and self.envoy.proc is not None and self.envoy.proc.poll() is None:
            with contextlib.suppress(OSError):
                _, stats = http_get(f"{self.envoy.admin}/stats/prometheus")
                self.guard.scan_text(stats, "envoy /stats/prometheus")

    def check_leaks(self, scrape: bool = True) -> LeakStats:
        """Raise LeakError naming every place a provider key showed up since the last check."""
        if scrape:
            self.scrape_metrics()
        for path in self.log_files():
            self.guard.scan_file(path)
        leaks = self.guard.take()
        if leaks:
            shown = "\n  ".join(str(leak) for leak in leaks[:10])
            more = f"\n  ... and {len(leaks) - 10} more" if len(leaks) > 10 else ""
            raise LeakError(f"{len(leaks)} provider key occurrence(s) outside the mock providers:\n  {shown}{more}")
        return self.guard.stats

    def start(self) -> Stack:
        super().start()
        Stack.live.add(self)
        return self

    def stop(self) -> None:
        """Stop everything, then the final leak check (what processes log on their way out too)."""
        was_started = self.started
        if was_started:
            with contextlib.suppress(Exception):
                self.scrape_metrics()
        super().stop()
        Stack.live.discard(self)
        if was_started:
            self.check_leaks(scrape=False)
