"""Budget counters: a table the worker processes of one replica share, and Redis across replicas.

A counter is one budget's usage for one subject (a service account, a namespace, or everyone)
in one fixed window: requests, tokens and US dollars. Its key names the config's scope, the
budget's name, the window's length, the subject and the window's start, never a config object,
so a reload that keeps a budget keeps its counts (a changed limit applies to them at once) and
a removed budget's counters just expire with their window.

Two stores, one interface (``admit``, ``add_usage``):

- ``CounterTable``: a fixed-size open-addressing hash table in a file every worker of a replica
  mmaps (``$HOLYSHEEP_STATE_DIR/budgets-v2``; a private anonymous file without workers). A slot is
  88 bytes; a key lives in one of the PROBE slots after its home slot, and every operation holds
  POSIX record locks (``fcntl.lockf``) on the byte ranges of the probe windows of all the keys it
  touches, taken in ascending order (so two workers never deadlock) plus a thread lock (POSIX
  locks belong to the process; a private table takes the thread lock only). A key is inserted
  only after its whole probe window was searched
  under that lock, so there is never more than one live slot per key; check-and-increment of
  every matching counter happens under one hold of the locks, so it is exact across the workers.
  The locks are held for microseconds and die with a crashed worker. A slot whose window has
  ended is free again; a full probe window is a store error (the request is admitted uncounted).
- ``RedisBudgetStore``: one Lua script (EVALSHA) checks and increments every matching counter
  atomically, with PEXPIREAT at the window's end: one round trip per request. A response's
  usage is counted in the replica's table at once and goes to Redis with the counter's next
  admission on the replica, or in a batched flush (a pipeline of HINCRBY/HINCRBYFLOAT)
  USAGE_FLUSH seconds later at the latest: no round trip of its own. The replica's table
  keeps two figures per counter: the highest counts Redis returned (the mirror, with the
  incarnation of the Redis key they came from) and what this replica counted that Redis never
  saw (its own, while Redis was failing). Any Redis error switches Redis off for REDIS_BACKOFF
  seconds (like the response cache) and the replica counts locally on mirror + own. Each script
  call also hands Redis the mirror as a floor and the own counts as increments (then zeroes
  them). A Redis that was only unreachable gets the missed counts added. A Redis that lost the
  key (a restart) gets the counts back: the key's new incarnation (a fresh ``g``) keeps the
  highest floor any replica handed it from an earlier incarnation (``b``, what it lost) apart
  from the increments since, so every replica's own counts add up and the base counts once, in
  whatever order the replicas come back. Nothing is handed over twice. The only double count is
  an operation Redis applied whose answer was lost with the connection: it is counted locally
  too (at most the requests in flight when Redis failed), which errs towards the limit.

What an outage means for a limit: each replica enforces the full limit on its own counts (the
last counts it saw from Redis plus its own since), so N replicas admit at most N times the
limit in the worst case (less by what they had seen counted), until Redis answers again.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import mmap
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from extproc import metrics, wakeups
from extproc.shared_state import STATE_DIR_ENV

log = logging.getLogger(__name__)

# key digest, budget id, window end (Unix seconds; 0: never used), then requests, tokens and USD
# twice: the mirror of Redis's figures, and what this replica counted that Redis has not seen
# (everything, for the memory store); a counter's figures are the sum of the two. Last, the
# incarnation of the Redis key the mirror came from (0: none).
_SLOT = struct.Struct("<16sQdqqdqqdq")
_HEAD = struct.Struct("<16sQd")
_BOTH = struct.Struct("<qqdqqd")
_NONE = (0, 0, 0.0, 0, 0, 0.0)  # the figures of an absent counter
_GEN = struct.Struct("<q")
_COUNTS_AT = 32  # offset of the figures within a slot
_GEN_AT = 80
SLOT_BYTES = _SLOT.size  # 88
PROBE = 32
DEFAULT_SLOTS = 16384  # 1.4 MiB; one slot per live counter (budget x subject x window)
TABLE_FILE = "budgets-v2"


class Counts(NamedTuple):
    requests: int = 0
    tokens: int = 0
    cost_usd: float = 0.0

    def plus(self, other: Counts) -> Counts:
        return Counts(self.requests + other.requests, self.tokens + other.tokens, self.cost_usd + other.cost_usd)

    def peak(self, other: Counts) -> Counts:
        return Counts(max(self.requests, other.requests), max(self.tokens, other.tokens),
                      max(self.cost_usd, other.cost_usd))


ZERO = Counts()


@dataclass(frozen=True, slots=True)
class Limits:
    requests: int | None = None
    tokens: int | None = None
    cost_usd: float | None = None

    def exceeded(self, used: Counts) -> tuple[str, ...]:
        """The units that refuse one more request: a request limit counts the new request
        itself; tokens and cost are only known after a response, so they refuse once reached."""
        units = []
        if self.cost_usd is not None and used.cost_usd >= self.cost_usd:
            units.append("usd")
        if self.tokens is not None and used.tokens >= self.tokens:
            units.append("tokens")
        if self.requests is not None and used.requests + 1 > self.requests:
            units.append("requests")
        return tuple(units)

    def refuse(self, used: Counts) -> bool:
        """Whether ``exceeded`` would name any unit (the hot path's question)."""
        r, t, c = used
        return ((self.requests is not None and r + 1 > self.requests) or (self.tokens is not None and t >= self.tokens)
                or (self.cost_usd is not None and c >= self.cost_usd))


@dataclass(frozen=True, slots=True)
class CounterRef:
    """One counter: its key (and the key's digest, which names its slot), budget, expiry, limits."""

    key: str
    budget_id: int
    expires_at: float  # the window's end, Unix seconds
    limits: Limits
    digest: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", hashlib.blake2b(self.key.encode(), digest_size=16).digest())


class BudgetStore(Protocol):
    async def admit(self, counters: Sequence[CounterRef], now: float) -> tuple[bool, list[Counts]]:
        """Atomically: if no counter is over its limits, count one request in every one.
        Returns whether it did and each counter's figures (after the increment when it did)."""
        ...

    def add_usage(self, counters: Sequence[CounterRef], tokens: int, cost_usd: float, now: float) -> None:
        """Add a response's usage; never blocks on I/O."""
        ...

    def table(self) -> CounterTable:
        """The replica's counters (the store itself, or Redis's mirror): read for the gauges."""
        ...

    async def drain(self) -> None:
        """Wait for usage writes still in flight."""
        ...

    async def close(self) -> None: ...


_warned_full = 0.0


def _table_full(key: str) -> None:
    global _warned_full
    metrics.BUDGET_STORE_ERRORS.inc()
    if time.monotonic() - _warned_full > 60:
        _warned_full = time.monotonic()
        log.warning("budget counter table full near %s: that counter is not kept here (raise its size)", key)


class CounterTable:
    def __init__(self, path: str | None = None, slots: int = DEFAULT_SLOTS) -> None:
        self.slots = slots
        size = (slots + PROBE) * SLOT_BYTES  # the last probe window needs no wrap-around
        # A private table (no path: one process) needs no record locks, only the thread lock.
        self._shared = path is not None
        if path is None:
            fd, tmp = tempfile.mkstemp(prefix="holysheep-budgets-")
            os.unlink(tmp)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)  # zero-filled: every slot free
        self._fd = fd  # kept open: the record locks live on it
        self._map = mmap.mmap(fd, size)
        self._thread_lock = threading.Lock()

    # Locking ---------------------------------------------------------------------------------

    def _home(self, ref: CounterRef) -> int:
        return int.from_bytes(ref.digest[:8], "little") % self.slots

    def _lock(self, homes: list[int]) -> list[tuple[int, int]]:
        self._thread_lock.acquire()
        if not self._shared:
            return []
        ranges: list[tuple[int, int]] = []
        for home in sorted(homes):  # merged: one process's overlapping POSIX locks would coalesce
            if ranges and home <= ranges[-1][1]:
                ranges[-1] = (ranges[-1][0], home + PROBE)
            else:
                ranges.append((home, home + PROBE))
        done = 0
        try:
            for start, end in ranges:
                fcntl.lockf(self._fd, fcntl.LOCK_EX, (end - start) * SLOT_BYTES, start * SLOT_BYTES)
                done += 1
        except BaseException:
            self._unlock(ranges[:done])
            raise
        return ranges

    def _unlock(self, ranges: list[tuple[int, int]]) -> None:
        try:
            for start, end in reversed(ranges):
                fcntl.lockf(self._fd, fcntl.LOCK_UN, (end - start) * SLOT_BYTES, start * SLOT_BYTES)
        finally:
            self._thread_lock.release()

    # Slots (call with the key's probe window locked) -----------------------------------------

    def _find(self, ref: CounterRef, home: int, now: float, claim: bool) -> int:
        """The slot holding `ref`'s live counter; with `claim`, a free slot made its counter.
        -1: absent (or, with `claim`, no free slot in the probe window)."""
        free = -1
        for slot in range(home, home + PROBE):
            digest, _, expires = _HEAD.unpack_from(self._map, slot * SLOT_BYTES)
            if expires > now:
                if digest == ref.digest:
                    return slot
            elif free < 0:
                free = slot
        if claim and free >= 0:
            _SLOT.pack_into(self._map, free * SLOT_BYTES, ref.digest, ref.budget_id, ref.expires_at, 0, 0, 0.0,
                            0, 0, 0.0, 0)
            return free
        return -1

    def _both(self, slot: int) -> tuple[Counts, Counts]:
        """(mirror, own) of a slot; zeros for an absent one."""
        if slot < 0:
            return ZERO, ZERO
        r, t, c, own_r, own_t, own_c = _BOTH.unpack_from(self._map, slot * SLOT_BYTES + _COUNTS_AT)
        return Counts(r, t, c), Counts(own_r, own_t, own_c)

    def _write(self, slot: int, mirror: Counts, own: Counts) -> None:
        _BOTH.pack_into(self._map, slot * SLOT_BYTES + _COUNTS_AT, *mirror, *own)

    def _gen(self, slot: int) -> int:
        return 0 if slot < 0 else int(_GEN.unpack_from(self._map, slot * SLOT_BYTES + _GEN_AT)[0])

    def _each(self, counters: Sequence[CounterRef], now: float, claim: bool,
              update: Callable[[int, CounterRef, int], None]) -> None:
        homes = [self._home(c) for c in counters]
        ranges = self._lock(homes)
        try:
            for i, (ref, home) in enumerate(zip(counters, homes, strict=True)):
                slot = self._find(ref, home, now, claim)
                if slot < 0 and claim:
                    _table_full(ref.key)
                update(i, ref, slot)
        finally:
            self._unlock(ranges)

    # Operations ------------------------------------------------------------------------------

    def admit(self, counters: Sequence[CounterRef], now: float) -> tuple[bool, list[Counts]]:
        """Check-and-increment on this replica's figures (mirror + own); counted as own. (The
        hot path of the memory store, once per request: written for few instructions.)"""
        homes = [self._home(c) for c in counters]
        ranges = self._lock(homes)
        try:
            found: list[tuple[int, tuple[int, int, float, int, int, float]]] = []
            used: list[Counts] = []
            refused = False
            for ref, home in zip(counters, homes, strict=True):
                slot = self._find(ref, home, now, claim=False)
                figures = _BOTH.unpack_from(self._map, slot * SLOT_BYTES + _COUNTS_AT) if slot >= 0 else _NONE
                r, t, c, own_r, own_t, own_c = figures
                u = Counts(r + own_r, t + own_t, c + own_c)
                refused = refused or ref.limits.refuse(u)
                found.append((slot, figures))
                used.append(u)
            if refused:
                return False, used
            for i, (ref, (slot, (r, t, c, own_r, own_t, own_c))) in enumerate(zip(counters, found, strict=True)):
                if slot < 0:
                    slot = self._find(ref, homes[i], now, claim=True)
                if slot < 0:
                    _table_full(ref.key)
                else:
                    _BOTH.pack_into(self._map, slot * SLOT_BYTES + _COUNTS_AT, r, t, c, own_r + 1, own_t, own_c)
                u = used[i]
                used[i] = Counts(u[0] + 1, u[1], u[2])
            return True, used
        finally:
            self._unlock(ranges)

    def add(self, counters: Sequence[CounterRef], tokens: int, cost_usd: float, now: float) -> None:
        """Usage counted here (as own)."""
        homes = [self._home(c) for c in counters]
        ranges = self._lock(homes)
        try:
            for ref, home in zip(counters, homes, strict=True):
                slot = self._find(ref, home, now, claim=True)
                if slot < 0:
                    _table_full(ref.key)
                    continue
                at = slot * SLOT_BYTES + _COUNTS_AT
                r, t, c, own_r, own_t, own_c = _BOTH.unpack_from(self._map, at)
                _BOTH.pack_into(self._map, at, r, t, c, own_r, own_t + tokens, own_c + cost_usd)
        finally:
            self._unlock(ranges)

    def add_own(self, counters: Sequence[CounterRef], own: Sequence[Counts], now: float) -> None:
        """Give back own counts taken for Redis when the hand-over failed."""
        if all(o == ZERO for o in own):
            return

        def update(i: int, _: CounterRef, slot: int) -> None:
            if slot >= 0:
                mirror, old = self._both(slot)
                self._write(slot, mirror, old.plus(own[i]))
        self._each(counters, now, True, update)

    def take_for_redis(self, counters: Sequence[CounterRef], now: float) -> list[tuple[Counts, Counts, int]]:
        """Each counter's (mirror, own, the mirror's incarnation), its own counts now handed to
        the caller (zeroed here)."""
        out: list[tuple[Counts, Counts, int]] = []

        def update(_: int, __: CounterRef, slot: int) -> None:
            mirror, own = self._both(slot)
            if own != ZERO:
                self._write(slot, mirror, ZERO)
            out.append((mirror, own, self._gen(slot)))
        self._each(counters, now, False, update)
        return out

    def mirror(self, counters: Sequence[CounterRef], figures: Sequence[Counts], now: float,
               gens: Sequence[int] | None = None) -> None:
        """Raise each counter's mirror to Redis's figures (answers may come back out of order).
        With the incarnations they came from (``gens``): figures of a newer incarnation replace
        the mirror, of an older one are ignored; without (usage writes), the same one's."""
        def update(i: int, _: CounterRef, slot: int) -> None:
            if slot < 0:
                return
            mirror, own = self._both(slot)
            mine, theirs = self._gen(slot), (gens[i] if gens is not None else self._gen(slot))
            if theirs > mine:
                self._write(slot, figures[i], own)
                _GEN.pack_into(self._map, slot * SLOT_BYTES + _GEN_AT, theirs)
            elif theirs == mine:
                self._write(slot, mirror.peak(figures[i]), own)
        self._each(counters, now, True, update)

    def read(self, counters: Sequence[CounterRef], now: float) -> list[Counts]:
        """This replica's figures of each counter (mirror + own)."""
        out: list[Counts] = []

        def update(_: int, __: CounterRef, slot: int) -> None:
            mirror, own = self._both(slot)
            out.append(mirror.plus(own))
        self._each(counters, now, False, update)
        return out

    def peaks(self, now: float) -> dict[int, Counts]:
        """Per budget id, the highest live figures of any of its counters (for the gauges).

        Lock-free: a slot being rewritten at that instant may be read half-old, which a gauge
        can afford (the next scrape is right), and a scrape must never stall admissions."""
        out: dict[int, Counts] = {}
        for _, budget_id, expires, r, t, c, own_r, own_t, own_c, _ in _SLOT.iter_unpack(self._map):
            if expires > now:
                figures = Counts(r + own_r, t + own_t, c + own_c)
                old = out.get(budget_id)
                out[budget_id] = figures if old is None else old.peak(figures)
        return out

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


_tables: dict[str | None, CounterTable] = {}
_tables_lock = threading.Lock()


def replica_table() -> CounterTable:
    """This process's counter table: the one the replica's workers share when running as one of
    several workers, else a private one. One per process, kept across config reloads."""
    directory = os.environ.get(STATE_DIR_ENV) or None
    with _tables_lock:
        table = _tables.get(directory)
        if table is None:
            table = CounterTable(os.path.join(directory, TABLE_FILE) if directory else None)
            _tables[directory] = table
        return table


class MemoryBudgetStore:
    """Exact across the workers of one replica; each replica counts on its own."""

    def __init__(self, table: CounterTable | None = None) -> None:
        self._table = table or replica_table()

    async def admit(self, counters: Sequence[CounterRef], now: float) -> tuple[bool, list[Counts]]:
        return self._table.admit(counters, now)

    def add_usage(self, counters: Sequence[CounterRef], tokens: int, cost_usd: float, now: float) -> None:
        self._table.add(counters, tokens, cost_usd, now)

    def table(self) -> CounterTable:
        return self._table

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        return None


# KEYS: the counters (hashes: r requests, t tokens, c USD; g the key's incarnation; br, bt, bc
# the highest floors handed over from earlier incarnations). ARGV, 11 per key: expire-at (ms);
# the request, token and USD limits (-1: none); the caller's floors for r, t, c (the highest it
# saw, of incarnation ARGV 11); its own counts for r, t, c (counted while Redis was failing,
# never seen here); the incarnation its floors are of (0: none). A key without g is a new
# incarnation (its first use, or Redis lost it): g is made from Redis's clock, so a later
# incarnation has a higher g. Floors of another incarnation are counts the key lost: the count
# is raised by what they exceed the base (b) by, once, whatever else was added since. Returns
# {admitted (1/0), r, t, c, g, r, t, c, g, ...}; c as Redis's string, Lua would truncate it.
ADMIT_LUA = """
local out = {0}
local ok = 1
for i = 1, #KEYS do
  local k, a = KEYS[i], (i - 1) * 11
  local v = redis.call('HMGET', k, 'r', 't', 'c', 'g', 'br', 'bt', 'bc')
  local r, t, cs = tonumber(v[1]) or 0, tonumber(v[2]) or 0, v[3] or '0'
  local c = tonumber(cs)
  local g = v[4]
  local wrote = false
  if not g then
    local now = redis.call('TIME')
    g = string.format('%.0f', tonumber(now[1]) * 1000000 + tonumber(now[2]))
    redis.call('HSET', k, 'g', g)
    wrote = true
  end
  if ARGV[a + 11] ~= g then
    local fr, ft, fc = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
    local br, bt, bc = tonumber(v[5]) or 0, tonumber(v[6]) or 0, tonumber(v[7]) or 0
    if fr > br then
      r = redis.call('HINCRBY', k, 'r', fr - br); redis.call('HSET', k, 'br', ARGV[a + 5]); wrote = true
    end
    if ft > bt then
      t = redis.call('HINCRBY', k, 't', ft - bt); redis.call('HSET', k, 'bt', ARGV[a + 6]); wrote = true
    end
    if fc > bc then
      cs = redis.call('HINCRBYFLOAT', k, 'c', fc - bc); c = tonumber(cs)
      redis.call('HSET', k, 'bc', ARGV[a + 7]); wrote = true
    end
  end
  if tonumber(ARGV[a + 8]) > 0 then r = redis.call('HINCRBY', k, 'r', ARGV[a + 8]); wrote = true end
  if tonumber(ARGV[a + 9]) > 0 then t = redis.call('HINCRBY', k, 't', ARGV[a + 9]); wrote = true end
  if tonumber(ARGV[a + 10]) > 0 then
    cs = redis.call('HINCRBYFLOAT', k, 'c', ARGV[a + 10]); c = tonumber(cs); wrote = true
  end
  if wrote then redis.call('PEXPIREAT', k, ARGV[a + 1]) end
  local lr, lt, lc = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  if (lr >= 0 and r + 1 > lr) or (lt >= 0 and t >= lt) or (lc >= 0 and c >= lc) then ok = 0 end
  out[#out + 1] = r
  out[#out + 1] = t
  out[#out + 1] = cs
  out[#out + 1] = g
end
if ok == 1 then
  for i = 1, #KEYS do
    out[(i - 1) * 4 + 2] = redis.call('HINCRBY', KEYS[i], 'r', 1)
    redis.call('PEXPIREAT', KEYS[i], ARGV[(i - 1) * 11 + 1])
  end
end
out[1] = ok
return out
"""

# Redis keeps a counter this long past its window, so a replica whose clock lags a little still
# finds it instead of recreating it (PEXPIREAT in the past deletes a key at once).
REDIS_GRACE = 60.0


def _limit_arg(value: float | None) -> str:
    return "-1" if value is None else repr(value)


class RedisBudgetStore:
    REDIS_BACKOFF = 2.0
    REDIS_MAX_CONNECTIONS = 16
    # A reply (or a free connection) may take this long before Redis counts as down. Not the
    # cache's 0.25 s: a busy event loop reads replies late, and a false "down" costs exactness
    # (local counting), while a hung Redis costs this wait once per back-off, never a request.
    REDIS_TIMEOUT = 1.0
    REDIS_CONNECT_TIMEOUT = 0.25
    # Usage waits at most this long for an admission to take it to Redis before it is flushed:
    # how late another replica may learn of it.
    USAGE_FLUSH = 0.05

    def __init__(
        self, url: str, table: CounterTable | None = None, monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        import redis.asyncio as aioredis

        self._table = table or replica_table()
        self._monotonic = monotonic
        self._down_until = float("-inf")
        # Bounded like the cache's pool. No command is retried: a retried script could count twice.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=self.REDIS_MAX_CONNECTIONS, timeout=self.REDIS_TIMEOUT,
            socket_timeout=self.REDIS_TIMEOUT, socket_connect_timeout=self.REDIS_CONNECT_TIMEOUT,
            retry_on_timeout=False,
        )
        self._redis: Any = aioredis.Redis.from_pool(pool)
        # EVALSHA; on NOSCRIPT (a restarted Redis) it loads the script once and calls again.
        self._script = self._redis.register_script(ADMIT_LUA)
        self._pending: dict[str, CounterRef] = {}  # counters with usage not yet handed over
        self._pending_now = 0.0
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()

    def table(self) -> CounterTable:
        return self._table

    def _usable(self) -> bool:
        return self._monotonic() >= self._down_until

    def _failed(self, op: str, exc: BaseException) -> None:
        self._down_until = self._monotonic() + self.REDIS_BACKOFF
        metrics.BUDGET_STORE_ERRORS.inc()
        log.warning("redis budget %s failed, counting locally: %s", op, type(exc).__name__)

    async def admit(self, counters: Sequence[CounterRef], now: float) -> tuple[bool, list[Counts]]:
        if self._usable():
            held = self._table.take_for_redis(counters, now)
            args: list[str | int] = []
            for ref, (seen, own, gen) in zip(counters, held, strict=True):
                lim = ref.limits
                args += [int((ref.expires_at + REDIS_GRACE) * 1000), _limit_arg(lim.requests), _limit_arg(lim.tokens),
                         _limit_arg(lim.cost_usd), seen.requests, seen.tokens, repr(seen.cost_usd),
                         own.requests, own.tokens, repr(own.cost_usd), gen]
            try:
                reply = await self._script(keys=[c.key for c in counters], args=args)
                used = [Counts(int(reply[i]), int(reply[i + 1]), float(reply[i + 2])) for i in range(1, len(reply), 4)]
                gens = [int(reply[i + 3]) for i in range(1, len(reply), 4)]
            except BaseException as exc:
                self._table.add_own(counters, [own for _, own, _ in held], now)  # not handed over after all
                if not isinstance(exc, Exception):
                    raise  # cancelled: the request is gone, nothing to admit
                self._failed("admit", exc)
            else:
                self._table.mirror(counters, used, now, gens)
                return bool(reply[0]), used
        return self._table.admit(counters, now)

    def add_usage(self, counters: Sequence[CounterRef], tokens: int, cost_usd: float, now: float) -> None:
        """Counted here at once (as this replica's own, like during an outage) and handed to Redis
        with the counter's next admission here, or by a flush USAGE_FLUSH seconds later at the
        latest: an answer's usage costs no round trip of its own, and flushes are batched."""
        if not (tokens or cost_usd):
            return
        self._table.add(counters, tokens, cost_usd, now)
        for ref in counters:
            self._pending[ref.key] = ref
        self._pending_now = max(self._pending_now, now)
        if self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await wakeups.sleep(self.USAGE_FLUSH)
        self._flush_task = None
        await self._flush()

    async def _flush(self) -> None:
        """Hand over the own counts of every counter with usage since the last flush (those an
        admission handed over meanwhile have none left); one flush at a time. While Redis is
        down they stay here, for the next admission or flush once it answers."""
        async with self._flush_lock:
            if not self._pending or not self._usable():
                return
            refs, now = list(self._pending.values()), self._pending_now
            self._pending.clear()
            taken = self._table.take_for_redis(refs, now)
            held = [(ref, own) for ref, (_, own, _) in zip(refs, taken, strict=True) if own != ZERO]
            if not held:
                return
            pipe = self._redis.pipeline(transaction=False)
            for ref, own in held:  # HINCRBY* 0 to read a field would create it: nonzero ones only
                if own.requests:
                    pipe.hincrby(ref.key, "r", own.requests)
                if own.tokens:
                    pipe.hincrby(ref.key, "t", own.tokens)
                if own.cost_usd:
                    pipe.hincrbyfloat(ref.key, "c", own.cost_usd)
                pipe.pexpireat(ref.key, int((ref.expires_at + REDIS_GRACE) * 1000))
            try:
                reply = iter(await pipe.execute())
            except BaseException as exc:
                # Counted here again, to be handed over later; if Redis did apply it after all,
                # it counts twice, which errs towards the limit.
                self._table.add_own([ref for ref, _ in held], [own for _, own in held], now)
                self._pending.update((ref.key, ref) for ref, _ in held)
                if not isinstance(exc, Exception):
                    raise
                self._failed("usage", exc)
                return
            figures = []
            for _, own in held:
                r = int(next(reply)) if own.requests else 0
                t = int(next(reply)) if own.tokens else 0
                c = float(next(reply)) if own.cost_usd else 0.0
                next(reply)  # PEXPIREAT
                figures.append(Counts(r, t, c))
            self._table.mirror([ref for ref, _ in held], figures, now)

    async def drain(self) -> None:
        """Usage still waiting for its flush, handed over now (after a flush in flight)."""
        await self._flush()

    async def close(self) -> None:
        if self._flush_task is not None:
            self._flush_task.cancel()  # what it would flush, drain() does now
            self._flush_task = None
        try:
            await asyncio.wait_for(self.drain(), 1.0)
        except Exception:
            pass
        try:
            await asyncio.wait_for(self._redis.aclose(), 1.0)
        except Exception:
            pass
