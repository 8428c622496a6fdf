"""Response cache: bounded in-process memory, optionally backed by Redis.

Memory is always written, so when Redis dies the fallback still has answers and no request
fails; Redis errors switch it off for a short back-off instead of costing a timeout each time.
Keys are hashes of tenant scope, endpoint and the canonical request body; credentials are
never part of a key or a value.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any, NamedTuple

from extproc import jsoncodec, metrics
from protos.spec import CacheSpec

log = logging.getLogger(__name__)


class CachedResponse(NamedTuple):  # a tuple: built per stored answer (a frozen dataclass costs twice as much)
    status: int
    content_type: str
    body: bytes

    def encode(self) -> bytes:
        ct = self.content_type.encode()
        return struct.pack("!HH", self.status, len(ct)) + ct + self.body

    @classmethod
    def decode(cls, raw: bytes) -> CachedResponse:
        status, ct_len = struct.unpack_from("!HH", raw)
        return cls(status, raw[4 : 4 + ct_len].decode(), raw[4 + ct_len :])


# v3: BLAKE2b-256 (v2 was SHA-256 of the same text; v1, before orjson wrote the canonical text).
# Earlier versions are never read again: their Redis entries expire with their TTL.
KEY_PREFIX = "holysheep:v3:"


def cache_key(tenant: str, endpoint: str, payload: dict[str, Any], strict: bool = False) -> str:
    """``strict``: the payload was parsed by orjson (extproc/jsoncodec.py); the key is the same
    for the same payload whatever its key order.

    BLAKE2b, not SHA-256: hashlib's SHA-256 is OpenSSL 3's, whose EVP machinery (digest fetch,
    context set-up) costs 9-10 us per key in the live server, against 0.4 us in a loop, because
    between two requests Envoy and gRPC evict it from the caches. Python's own BLAKE2b is a
    small routine: 3 us live (bench.phases). Both are collision-resistant at 256 bits, which is
    what keeps one request from reading another's entry."""
    return KEY_PREFIX + hashlib.blake2b(_scope(tenant, endpoint) + jsoncodec.canonical(payload, strict),
                                        digest_size=32).hexdigest()


_scopes: dict[tuple[str, str], bytes] = {}


def _scope(tenant: str, endpoint: str) -> bytes:
    """The key's prefix for a tenant and endpoint: NUL-separated (neither holds a NUL, so no two
    pairs give the same prefix); surrogatepass, so no text ever raises."""
    found = _scopes.get((tenant, endpoint))
    if found is None:
        found = b"%s\x00%s\x00" % (tenant.encode("utf-8", "surrogatepass"), endpoint.encode("utf-8", "surrogatepass"))
        if len(_scopes) < 4096:
            _scopes[(tenant, endpoint)] = found
    return found


class MemoryCache:
    """LRU bounded by entry count and total bytes, with per-entry expiry."""

    # Entries over every live memory tier of this process (one per config): the
    # holysheep_cache_entries gauge, kept exact on eviction, expiry and retirement.
    live_entries = 0

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.closed = False
        self._data: OrderedDict[str, tuple[float, CachedResponse]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> CachedResponse | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires < time.monotonic():
            self._drop(key)
            _report_entries()
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: str, value: CachedResponse, ttl: float) -> None:
        size = len(value.body)
        if size > self.max_bytes or self.closed:  # closed: a request that outlived its config
            return
        data, entries = self._data, MemoryCache.live_entries
        old = data.pop(key, None)
        if old is not None:  # a newer answer for the same key: the entry count stays
            self.bytes -= len(old[1].body)
            MemoryCache.live_entries -= 1
        data[key] = (time.monotonic() + ttl, value)
        self.bytes += size
        MemoryCache.live_entries += 1
        while len(data) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(data)))
        if MemoryCache.live_entries != entries:  # a newer answer for a key, nothing evicted: no change
            _report_entries()

    def close(self) -> None:
        self.closed = True
        MemoryCache.live_entries -= len(self._data)
        self._data.clear()
        self.bytes = 0
        _report_entries()

    def _drop(self, key: str) -> None:
        _, value = self._data.pop(key)
        self.bytes -= len(value.body)
        MemoryCache.live_entries -= 1


_STORED = metrics.CACHE_EVENTS.labels("store")


def _report_entries() -> None:
    metrics.CACHE_ENTRIES.set(MemoryCache.live_entries)


class ResponseCache:
    REDIS_BACKOFF = 2.0
    REDIS_MAX_CONNECTIONS = 16

    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec
        self.enabled = spec.mode != "Off"
        # Memory is bounded to maxEntries entries and maxEntries * maxEntryBytes / 8 bytes at most
        # 256 MiB, since entries are usually far below the per-entry limit.
        max_bytes = min(256 << 20, max(spec.max_entry_bytes, spec.max_entries * spec.max_entry_bytes // 8))
        self.memory = MemoryCache(spec.max_entries, max_bytes)
        self._redis: Any = None
        self._redis_down_until = 0.0
        if spec.redis_url:
            import redis.asyncio as aioredis

            # A bounded pool: redis-py's default pool opens one more connection for every concurrent
            # command and keeps it, so a burst (or a stalled loop) left dozens of idle sockets per
            # process on the shared Redis. Writes are off the hot path and may wait for a slot.
            pool = aioredis.BlockingConnectionPool.from_url(
                spec.redis_url, max_connections=self.REDIS_MAX_CONNECTIONS, timeout=1.0,
                socket_timeout=0.25, socket_connect_timeout=0.25, retry_on_timeout=False,
            )
            self._redis = aioredis.Redis.from_pool(pool)


    def _redis_usable(self) -> bool:
        return self._redis is not None and time.monotonic() >= self._redis_down_until

    def _redis_failed(self, op: str, exc: BaseException) -> None:
        self._redis_down_until = time.monotonic() + self.REDIS_BACKOFF
        metrics.CACHE_EVENTS.labels("error").inc()
        log.warning("redis %s failed, using memory cache: %s", op, type(exc).__name__)

    async def get(self, key: str) -> CachedResponse | None:
        value = self.memory.get(key)
        if value is None and self._redis_usable():
            try:
                raw = await self._redis.get(key)
            except Exception as exc:
                self._redis_failed("get", exc)
                raw = None
            if raw:
                value = CachedResponse.decode(raw)
                self.memory.put(key, value, self.spec.ttl)
        return value

    async def put(self, key: str, value: CachedResponse) -> None:
        redis_write = self.store(key, value)
        if redis_write is not None:
            await redis_write

    def store(self, key: str, value: CachedResponse) -> Coroutine[Any, Any, None] | None:
        """Store `value` in memory now; the Redis write, when Redis is in use, is the returned
        coroutine (for the caller to spawn). Without Redis a store costs no task."""
        if len(value.body) > self.spec.max_entry_bytes:
            return None
        self.memory.put(key, value, self.spec.ttl)
        _STORED.inc()
        return self._redis_set(key, value) if self._redis is not None and self._redis_usable() else None

    async def _redis_set(self, key: str, value: CachedResponse) -> None:
        try:
            await self._redis.set(key, value.encode(), px=int(self.spec.ttl * 1000))
        except Exception as exc:
            self._redis_failed("set", exc)

    async def close(self) -> None:
        self.memory.close()  # a retired config's answers are no longer served
        if self._redis is not None:
            try:
                await asyncio.wait_for(self._redis.aclose(), 1.0)
            except Exception:
                pass
