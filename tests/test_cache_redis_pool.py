"""Regression: a burst of cache writes must not open one Redis connection per concurrent write.

The soak run (python -m bench.chaos --soak) showed each ext_proc keeping ~50 idle Redis sockets
after a moment of CPU contention: redis-py's default pool grows with concurrency and never
shrinks. The pool is now bounded (ResponseCache.REDIS_MAX_CONNECTIONS) and writes wait for a slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis

from extproc.cache import CachedResponse, ResponseCache, cache_key
from extproc.dev.processes import RedisServer
from protos.spec import CacheSpec


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    srv = RedisServer()
    srv.start()
    yield srv
    srv.kill()


def test_burst_of_writes_uses_a_bounded_pool(server: RedisServer) -> None:
    probe = redis.Redis.from_url(server.url)
    baseline = len(probe.client_list())

    async def burst() -> tuple[int, float]:
        cache = ResponseCache(CacheSpec(redis_url=server.url))
        value = CachedResponse(200, "application/json", b'{"choices": [1]}')
        await asyncio.gather(*(cache.put(cache_key("t", "/chat", {"n": i}), value) for i in range(100)))
        clients = len(probe.client_list()) - baseline
        await cache.close()
        return clients, cache._redis_down_until

    clients, down_until = asyncio.run(burst())
    assert 1 <= clients <= ResponseCache.REDIS_MAX_CONNECTIONS
    assert down_until == 0.0, "a burst must not switch Redis off"
    assert probe.dbsize() >= 100
    probe.close()
