"""holysheep_cache_entries counts every memory tier of the process, exactly.

One ResponseCache per config: the gauge is their sum, and it follows eviction, expiry and the
retirement of a config's cache on reload (a request that outlives its config stores nothing).
"""

from __future__ import annotations

import asyncio
import re
import time

from prometheus_client import REGISTRY, generate_latest

from extproc.cache import CachedResponse, ResponseCache
from protos.spec import CacheSpec

ANSWER = CachedResponse(200, "application/json", b'{"choices":[]}')


def _gauge() -> float:
    found = re.search(r"^holysheep_cache_entries (\S+)$", generate_latest(REGISTRY).decode(), re.MULTILINE)
    assert found is not None
    return float(found[1])


def test_gauge_is_the_sum_of_every_tier_and_follows_eviction_expiry_and_retirement() -> None:
    async def scenario() -> None:
        start = _gauge()
        small = ResponseCache(CacheSpec(max_entries=2))
        short = ResponseCache(CacheSpec(ttl=0.05))
        for i in range(5):
            await small.put(f"s{i}", ANSWER)  # bounded: 2 stay
        await short.put("t0", ANSWER)
        assert _gauge() == start + 3
        deadline = time.monotonic() + 5
        while await short.get("t0") is not None and time.monotonic() < deadline:  # until the ttl passes
            await asyncio.sleep(0.01)
        assert await short.get("t0") is None  # expired on read
        assert _gauge() == start + 2
        await small.close()  # the config was removed on reload
        assert _gauge() == start
        await small.put("late", ANSWER)  # a request that outlived its config
        assert _gauge() == start and await small.get("late") is None
        await short.close()

    asyncio.run(scenario())
