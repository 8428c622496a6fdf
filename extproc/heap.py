"""The garbage collector, tuned for the ext_proc's heap once it has started.

A request allocates a few hundred container objects that nearly all die by reference counting
before the stream ends; what the cycle collector scans is mostly the start-up heap (modules,
gRPC, protobuf, aiohttp, the config): ~300k objects that never become garbage. Each full
collection walked all of them (milliseconds: a p99 spike for whichever request was running).
"""

from __future__ import annotations

import gc

# First-generation threshold: allocations minus deallocations between young collections. A
# request's garbage is freed by reference counting long before, so a larger figure only means
# fewer collections of in-flight objects that are still alive (and their promotion to older
# generations). The default is 700.
GEN0_THRESHOLD = 20_000


def settle() -> None:
    """Once start-up is done: move every object alive now to the permanent generation the
    collector never scans (gc.freeze), and collect young objects less often. Objects created
    later (a reloaded config) are collected as usual."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
