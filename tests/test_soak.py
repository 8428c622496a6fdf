"""Soak, short form of ``python -m bench.chaos --soak`` (same code): steady load, no fault.

About 15 s at 100 requests/s through Envoy, two ext_procs and Redis: no client error, open file
descriptors flat, the memory cache tier within maxEntries (the prompts outnumber it, so it
evicts) and Redis holding every distinct answer. RSS is reported, not asserted: 15 s is too
short to tell growth from warm-up; the 10-minute form is in bench/results/.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench.chaos import ChaosSettings, run_soak, soak_summary
from extproc.cache import ResponseCache
from tests.harness import Stack  # the leak guard watches the soak too

pytestmark = [pytest.mark.soak, pytest.mark.timeout(120)]

SECONDS = 15.0
SETTINGS = ChaosSettings(rate=100, max_entries=200, distinct_prompts=500)


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    rep = asyncio.run(run_soak(SETTINGS, SECONDS, sample_every=1.5, stack_class=Stack))
    print("\n" + soak_summary(rep))
    return rep


def test_no_error(report: dict[str, Any]) -> None:
    assert report["totals"]["failures"] == 0, report["totals"]["failures_by_kind"]
    assert report["totals"]["dropped"] == 0
    assert report["totals"]["sent"] >= 0.8 * SETTINGS.rate * SECONDS


def test_file_descriptors_flat(report: dict[str, Any]) -> None:
    # Every socket an ext_proc keeps is pooled: Envoy's gRPC connections, the provider and
    # health-check pools, and Redis, whose pool grows to the peak of concurrent writes and is
    # bounded per process (ResponseCache.REDIS_MAX_CONNECTIONS). A leak would grow past that.
    fds = [sum(e["fds"] for e in s["extprocs"]) for s in report["samples"]]
    assert len(fds) >= 5
    bound = fds[0] + 2 * (ResponseCache.REDIS_MAX_CONNECTIONS + 4)
    assert max(fds) <= bound, fds


def test_cache_within_bounds(report: dict[str, Any]) -> None:
    assert report["cache_entries_max"] <= SETTINGS.max_entries
    assert report["cache_entries_max"] == SETTINGS.max_entries  # 500 prompts: the bound is reached
    assert 0 < report["redis_keys_max"] <= SETTINGS.distinct_prompts
