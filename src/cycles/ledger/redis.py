"""The scale-out store: Redis or Redis Cluster, many `cycles serve` processes and hosts on one keyspace.

The same rules (rules.py, admin.py) run over it as over SQLite; only the store differs.

Keys. Everything a tenant owns carries its hash tag, so it lives in one cluster slot:

    {t:<tenant>}:tenant            the tenant record          {t:<tenant>}:budgets   index: "scope\\0unit" (lex)
    {t:<tenant>}:b:<unit>:<scope>  a budget ledger            {t:<tenant>}:res       index: every reservation id
    {t:<tenant>}:r:<id>            a reservation              {t:<tenant>}:ttl       index: ACTIVE ids by expires+grace
    {t:<tenant>}:rk:<key>          reservation by its idempotency key
    {t:<tenant>}:i:<endpoint>:<key> an idempotency snapshot   {t:<tenant>}:policies  the tenant's policies
    {t:<tenant>}:k:<key id>        an API key                 {t:<tenant>}:keys      index: key ids (lex)
    {t:<tenant>}:e:<event id>      an event

Outside the tenants' slots, each in a slot of its own: `cycles:tenants` (every tenant with data: list_tenants and
the sweep walk it) and write-once pointers from ids the rules look up without a tenant to that tenant
(`cycles:rid:<id>`, `cycles:kid:<key id>`, `cycles:kh:<key hash>`, `cycles:pid:<policy id>`). They are written
before the transaction that needs them commits (a pointer to nothing is harmless: the lookup finds no record) and
never change afterwards.

Transactions are optimistic. Every record is a hash {v: version, d: JSON}; a version is random, new at each write
(a counter could meet another writer's same count). A transaction reads records (from Redis, or from this process's
cache of records it has seen, which may be stale), hands the rules objects, and buffers their writes. At the end ONE
Lua script per tenant slot (loaded once, run with EVALSHA) gets every key it touches in KEYS, checks that each
record read still has the version it had, and then applies every write; or it applies nothing and returns the
current copies of the records that changed: the cache takes them and the whole operation runs again (`retrying`,
bounded, with jitter). A transaction that only read one record straight from Redis needs no check; a refusal (a
CyclesError) is checked too before it is believed, since it may rest on a stale record. In the steady state an
operation is one round trip.

Budgets are the exception that makes processes scale: a budget's reserved and spent counters (and its remaining,
kept with them) live in fields of their own beside the record, and a `move` (reserve, commit, release, expiry) is
sent as deltas the script adds itself (HINCRBY), under a condition instead of the exact version: the budget's
*static* version (`w`: everything but the two counters, changed only by a write of the whole record) is the one
read, and a move that lowers remaining leaves it above zero. Those are the facts the rules decide on for a budget
they only move (see `_seal`), so two processes reserving against one budget do not fail each other until
it runs out. A move to zero or below, a debt, or a budget written whole checks the exact version as before.

The server batches (`Store.batch`, see _Batch): the calls one event loop iteration gathered commit together, one
script per slot running each call's part in order, after one MSET of the batch's pointers, all in one pipeline, so
a round trip is shared by the whole batch; a call whose records another process changed fails alone (with the later
calls that read its writes) and runs again. The server's batches are deferred: written on a connection the event
loop drives (`_Wire`: TCP, a Unix socket or TLS; on a cluster `_ClusterWire`, one to each primary, the pointers
answered before the scripts go) instead of waited for in redis-py, so the loop goes on serving requests meanwhile
and runs the next batch, which reads what the batch on its way wrote as its scripts will leave it (`pending`;
checked like any read, so a guess that did not land only fails the calls that relied on it). Under contention a
store takes the slot's *turn* (`take_turn`: a short-lived key every commit script of that slot checks), so that two
busy processes take turns instead of failing each other forever.

Only the expiry sweep writes more than one tenant in one transaction (a read sweeps every tenant's due holds
first): each tenant's writes then commit in their own slot's script, the operation's own tenant (the last
one written) last, and only its outcome decides; expiring a hold twice is impossible and expiring it later
harmless. Events and audit entries a change writes in another slot (a pseudo-tenant's) commit right after it,
only if it did (`_plan`).

Amounts stay exact: JSON integers, parsed by Python; the script never reads a record's content, it compares
versions, stores text and adds integer strings with HINCRBY (int64, exact). Time is Redis's clock (`TIME`, sampled
every few seconds and tracked with the local monotonic clock), so every server decides expiry on one clock; an
injected `clock=` still wins (the rules).

Durability is Redis's: with `appendonly yes` and `appendfsync always` a Redis crash loses nothing acknowledged, with
`everysec` at most about a second; a server process crash loses nothing acknowledged (every answer follows its
commit).

Limits: a reservation listing reads all of the tenant's reservations and filters them here, and a read sweeps by
walking every tenant's TTL index; both fit thousands of records per tenant, not millions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import itertools
import operator
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pydantic_core import from_json, to_json

from ..errors import CyclesError, InvalidRequest, StoreUnavailable
from .store import (
    ApiKeyRecord,
    AuditFilter,
    AuditRecord,
    BudgetRecord,
    Conflict,
    DeliveryRecord,
    DuplicateKey,
    EventFilter,
    EventRecord,
    OutboxEvent,
    PolicyRecord,
    ReservationFilter,
    ReservationRecord,
    TenantRecord,
    WebhookRecord,
)

try:
    import redis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError:  # pragma: no cover - the redis extra is not installed
    redis = None  # type: ignore[assignment]

# One slot's part of one or more transactions, in order: for each, check the versions it read and the conditions of
# its moves, then apply its writes and moves; or apply nothing of it and report the records that changed. KEYS[1]:
# the slot's turn (see `take_turn`), then every key the parts touch (declared: the parts name them); ARGV[1]: JSON
# [[checks, ops, moves, base], ...] with checks [key, version, ...], ops P k version data | B k version data reserved
# spent remaining (a budget) | Z k score member | X k member, and moves [key, static version, token, reserved delta,
# spent delta, remaining delta, its opposite, lowers, ...] (see `RedisTransaction.move`); ARGV[2]: this store's owner
# token; then the records' data, ARGV[base + n] for an op's data n (sent as they are: no JSON string escaped inside
# JSON on either side).
# Answers JSON: per part, 0 (committed), [0, key, version, reserved, spent, ...] (committed, with what its moves left)
# or [key, version, data, ...] (nothing done); or "turn" while another store holds the slot's turn. Only strings
# cross, and counters change by HINCRBY (int64, exact): no number of the ledger ever becomes a Lua double (a
# remaining's sign survives the conversion, which is all a move's condition looks at).
COMMIT = """
local turn = redis.call('GET', KEYS[1])
if turn and turn ~= ARGV[2] then return '"turn"' end
local parts = cjson.decode(ARGV[1])
local out = {}
local function report(changed, key)
  local now = redis.call('HMGET', key, 'v', 'd', 'r', 's', 'w')
  changed[#changed + 1] = key
  changed[#changed + 1] = now[1] or '0'
  if now[3] then  -- a budget: its counters beside its record
    changed[#changed + 1] = now[2] .. '\\0' .. now[3] .. '\\0' .. now[4] .. '\\0' .. now[5]
  else
    changed[#changed + 1] = now[2] or ''
  end
end
for p = 1, #parts do
  local checks, ops, moves, base = parts[p][1], parts[p][2], parts[p][3], parts[p][4]
  local changed = {}
  for c = 1, #checks, 2 do
    local key = checks[c]
    if (redis.call('HGET', key, 'v') or '0') ~= checks[c + 1] then report(changed, key) end
  end
  if #changed == 0 then
    local applied = 0
    for m = 1, #moves, 8 do
      local key = moves[m]
      local fine = redis.call('HGET', key, 'w') == moves[m + 1]
      if fine then
        local left = redis.pcall('HINCRBY', key, 'm', moves[m + 5])
        fine = type(left) == 'number' and (left > 0 or moves[m + 7] == '0')
        if type(left) == 'number' and not fine then redis.call('HINCRBY', key, 'm', moves[m + 6]) end
      end
      if not fine then
        report(changed, key)
        break
      end
      applied = m
    end
    if #changed > 0 then
      for m = 1, applied, 8 do redis.call('HINCRBY', moves[m], 'm', moves[m + 6]) end
    end
  end
  if #changed == 0 then
    local i = 1
    while i <= #ops do
      local op, key = ops[i], ops[i + 1]
      if op == 'P' then
        redis.call('HSET', key, 'v', ops[i + 2], 'd', ARGV[base + ops[i + 3]])
        i = i + 4
      elseif op == 'B' then
        redis.call('HSET', key, 'v', ops[i + 2], 'w', ops[i + 2], 'd', ARGV[base + ops[i + 3]], 'r', ops[i + 4],
                   's', ops[i + 5], 'm', ops[i + 6])
        i = i + 7
      elseif op == 'Z' then
        redis.call('ZADD', key, ops[i + 2], ops[i + 3])
        i = i + 4
      else
        redis.call('ZREM', key, ops[i + 2])
        i = i + 3
      end
    end
    changed = 0
    if #moves > 0 then
      changed = {0}
      for m = 1, #moves, 8 do
        local key = moves[m]
        redis.call('HINCRBY', key, 'r', moves[m + 3])
        redis.call('HINCRBY', key, 's', moves[m + 4])
        local version = redis.sha1hex(redis.call('HGET', key, 'v') .. moves[m + 2])
        redis.call('HSET', key, 'v', version)
        local now = redis.call('HMGET', key, 'r', 's')
        changed[#changed + 1] = key
        changed[#changed + 1] = version
        changed[#changed + 1] = now[1]
        changed[#changed + 1] = now[2]
      end
    end
  end
  out[p] = changed
end
return cjson.encode(out)
"""

# The sweep lease: take it when free, extend it when ours; 1 when this owner holds it.
LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""
UNLEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

TENANTS = "cycles:tenants"
TURN = ["turn"]  # an answer: another store holds the slot's turn
TURN_MS = 250  # a turn lapses by itself this long after its holder took it (should the holder die)
HOT_S = 0.2  # after a conflict in a slot, a store's batches take its turn up front for this long
CACHE_LIMIT = 50_000  # records remembered; past it, start over (a cache: every record used is checked at commit)
CLOCK_RESAMPLE_S = 5.0


class _Unique:
    """Versions and tokens: unique everywhere, cheaply. A random prefix per process (drawn again in a forked child)
    and a counter within it: no two writes anywhere get the same one, which is all a version has to be (a plain
    counter could meet another writer's same count)."""

    def __init__(self) -> None:
        self.draw()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self.draw)

    def draw(self) -> None:
        self.prefix = os.urandom(6).hex()
        self.count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.count):x}"


_unique = _Unique()


def tag(tenant: str) -> str:
    return "{t:" + tenant + "}"


@functools.lru_cache(maxsize=65536)  # the same keys again and again
def _slot_of(key: str) -> str:
    return key[: key.index("}") + 1]


def _tenant_of_scope(scope: str) -> str:
    return scope.split("/", 1)[0][len("tenant:") :]


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


_BUDGET, _RES, _TENANT, _KEY, _EVENT, _POLICY = map(
    _fields, (BudgetRecord, ReservationRecord, TenantRecord, ApiKeyRecord, EventRecord, PolicyRecord)
)


def _joined(record: str, reserved: Any, spent: Any, static: str) -> str:
    """A budget as the cache holds it: its record, the counters the script moves, the version of the rest."""
    return f"{record}\0{reserved}\0{spent}\0{static}"


_COPY = {cls: operator.attrgetter(*_fields(cls)) for cls in (BudgetRecord, TenantRecord)}  # its fields, in order


def _record(parsed: dict[str, tuple[str, Any]], key: str, data: str, cls: type) -> Any:
    """A new record of `cls` from the data of `key` (a budget's counters apart from its record: they move without
    the record changing), copied from the record parsed from the same text before when there is one."""
    reserved = None
    if cls is BudgetRecord and "\0" in data:
        data, reserved, spent, _static = data.split("\0")
    known = parsed.get(key)
    if known is not None and known[0] == data:
        pristine = known[1]
    else:
        if len(parsed) > CACHE_LIMIT:
            parsed.clear()
        pristine = cls(**from_json(data))
        parsed[key] = (data, pristine)
    record = cls(*_COPY[cls](pristine))
    if reserved is not None:
        record.reserved, record.spent = int(reserved), int(spent)
    return record


_LEVELS = ("workspace", "app", "workflow", "agent", "toolset")


class RedisTransaction:
    """One optimistic transaction (see the module docstring): reads recorded with their versions, writes buffered."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._r = store.redis
        self._read: dict[str, tuple[str, str | None]] = {}  # key -> (version, data) as this transaction saw it
        self._objects: dict[str, Any] = {}  # key -> the record handed out (an identity map)
        self._cached = False  # some record came from the cache: check even a lone read
        self._writes: dict[str, tuple[Any, tuple[str, ...] | None]] = {}  # key -> (record or data, fields), ordered
        self._index: list[tuple[str, ...]] = []  # ('Z', key, score, member) / ('X', key, member)
        self._pointers: dict[str, str] = {}  # global write-once pointers to set before the commit
        self._inserted: set[str] = set()  # keys that must not exist yet (DuplicateKey otherwise)
        self._expired: set[str] = set()  # reservation ids this transaction took off a TTL index
        self._last_slot: str | None = None
        self._changed_slots: set[str] = set()  # slots a change (not only an observability record) is written in
        self._out: dict[str, tuple[str, str]] = {}  # key -> (version, data) its write leaves (see _seal)
        self._moves: dict[str, list[int]] = {}  # budget key -> [reserved, spent] deltas applied by the script
        self._tokens: dict[str, tuple[str, str, str]] = {}  # moved budget key -> (token, its record, static version)
        self._landed: dict[str, tuple[str, str, str]] = {}  # budget key -> (version, reserved, spent) after its move
        batch = store.open_batch
        self._batch = batch if batch is not None and batch.thread == threading.get_ident() else None

    def now_ms(self) -> int:
        return self._store.now_ms()

    # ---------------------------------------------------------------------------------------------- plumbing
    def _get(self, keys: Sequence[str]) -> list[str | None]:
        """The data of each key (None: absent), as first seen by this transaction: what earlier transactions of its
        batch (or batches on their way) wrote, as it will be; else this store's cache; else Redis."""
        read = self._read
        cache = self._store.cache
        batch = self._batch
        pending = self._store.pending
        missing = []
        for k in keys:
            if k in read:
                continue
            seen = None
            if batch is not None:
                seen = batch.overlay.get(k)
                if seen is None:
                    waiting = pending.get(k)
                    seen = None if waiting is None else waiting[0]
            if seen is None:
                seen = cache.get(k)
            if seen is None:
                missing.append(k)
            else:
                read[k] = seen
                self._cached = True
        if missing:
            with self._store.errors():
                pipe = self._r.pipeline(transaction=False)
                for k in missing:
                    pipe.hmget(k, "v", "d", "r", "s", "w")
                for k, (v, d, reserved, spent, static) in zip(missing, pipe.execute(), strict=True):
                    read[k] = cache[k] = (v or "0", d if reserved is None else _joined(d, reserved, spent, static))
        return [read[k][1] for k in keys]

    def _load(self, keys: Sequence[str], make: Any, parse: Callable[[str], Any] = from_json) -> list[Any]:
        """Records for keys (None where absent), the same object each time within this transaction."""
        objects = self._objects
        need = [k for k in keys if k not in objects]
        if need:
            for k, data in zip(need, self._get(need), strict=True):
                objects[k] = None if data is None else make(parse(data))
        return [objects[k] for k in keys]

    def _records(self, keys: Sequence[str], cls: type) -> list[Any]:
        """Records of `cls` (budgets, tenants: read by nearly every operation) for keys (None where absent), like
        `_load`, each built as a copy of the one this store parsed from the same text before (`RedisStore.parsed`):
        the rules change a record's fields, never what they hold (the copy shares nested dicts and lists), so a
        pristine parse can be copied instead of parsed again."""
        objects = self._objects
        need = [k for k in keys if k not in objects]
        if need:
            parsed = self._store.parsed
            for k, data in zip(need, self._get(need), strict=True):
                objects[k] = None if data is None else _record(parsed, k, data, cls)
        return [objects[k] for k in keys]

    def _put(self, key: str, value: Any, names: tuple[str, ...] | None, *, observed: bool = False) -> None:
        """Write a record (`names`: its type's fields, _BUDGET marking a budget) or plain JSON data (names None) at
        commit."""
        self._writes.pop(key, None)  # re-inserted: the order of last writes picks the operation's own slot
        self._moves.pop(key, None)  # a budget written whole: its moves are in the record
        self._writes[key] = (value, names)
        self._objects[key] = value
        self._wrote(key, observed)

    def _zadd(self, key: str, score: int | str, member: str, *, observed: bool = False) -> None:
        self._index.append(("Z", key, str(score), member))
        self._wrote(key, observed)

    def _zrem(self, key: str, member: str) -> None:
        self._index.append(("X", key, member))
        self._wrote(key, False)

    def _wrote(self, key: str, observed: bool) -> None:
        """An observability record (an event, audit entry, new delivery) never makes its slot the operation's
        own: written in another slot than the change, it follows the change's commit (see `_plan`)."""
        slot = _slot_of(key)
        if not observed:
            self._last_slot = slot
            self._changed_slots.add(slot)
        elif self._last_slot is None:
            self._last_slot = slot

    def _pointer(self, pointer: str) -> str | None:
        """The tenant a write-once pointer names (cached: it never changes)."""
        known = self._store.pointers
        if pointer in known:
            return known[pointer]
        with self._store.errors():
            value = self._r.get(pointer)
        if value is not None:
            self._store.remember_pointer(pointer, value)
        return value

    def _set_pointer(self, pointer: str, value: str) -> None:
        self._pointers[pointer] = value

    # ------------------------------------------------------------------------------------------------ commit
    def _parts(self) -> dict[str, _Part]:
        """Per slot: the versions to check and the writes to apply there."""
        parts: dict[str, _Part] = {}

        def part(key: str) -> _Part:
            slot = _slot_of(key)
            found = parts.get(slot)
            if found is None:
                found = parts[slot] = _Part()
            found.keys.append(key)
            return found

        read = self._read
        moves = self._moves
        writes = self._writes
        inserted = self._inserted
        out = self._out
        for key, (version, _data) in read.items():
            if key not in moves:  # a moved budget is checked by its move's condition instead
                part(key).checks += (key, version)
        for key in inserted:
            if key not in read:  # inserted without being read: it must not exist yet
                part(key).checks += (key, "0")
        for key, (value, names) in writes.items():
            target = part(key)
            if key not in read and key not in inserted:  # written without being read: likewise
                target.checks += (key, "0")
            version, data = out[key]
            if names is _BUDGET:
                target.datas.append(data[: data.index("\0")])
                counters = (str(value.reserved), str(value.spent), str(value.remaining))
                target.ops += ("B", key, version, len(target.datas), *counters)
            else:
                target.datas.append(data)
                target.ops += ("P", key, version, len(target.datas))
        for op in self._index:
            part(op[1]).ops += op
        tokens = self._tokens
        for key, (reserved, spent) in moves.items():
            token, _record, static = tokens[key]
            drop = reserved + spent
            lowers = "1" if drop > 0 else "0"
            part(key).moves += (key, static, token, str(reserved), str(spent), str(-drop), str(drop), lowers)
        return parts

    def _seal(self) -> None:
        """Fix what the transaction's writes leave, once it ends (its records no longer change): each key's new
        version and data (`_out`: a budget's as the cache holds it, `_joined`; a moved one's as this transaction
        expects the script to leave it), read by the commit, the batch's later transactions and the cache alike.
        Versions are unique (`_unique`), so a version seen twice is the same write, whoever else wrote meanwhile.

        First, which moves commit as deltas. One does when the budget's static version (everything but reserved and
        spent: status, limits, debt, the over-limit flag) is still the one read and, if it lowers remaining, remaining
        stays above zero: the rules decide on a budget they only move by exactly those facts (allowed: remaining at
        least the amount; no budget.exhausted: remaining after it above zero). A move that leaves remaining at zero
        or below (this transaction's decisions rest on its exact value), or one of a budget stored before the
        counters had fields of their own, writes the record whole and checks its exact version."""
        objects, read, out = self._objects, self._read, self._out
        for key, (reserved, spent) in list(self._moves.items()):
            b = objects[key]
            version, data = read[key]
            if "\0" not in data or (reserved + spent > 0 and b.remaining <= 0):  # type: ignore[operator]
                del self._moves[key]
                self._writes[key] = (b, _BUDGET)
            else:  # the version the script gives it: unique, and foreseeable by the later transactions of a batch
                token = _unique()
                record, _reserved, _spent, static = data.split("\0")  # type: ignore[union-attr]
                self._tokens[key] = (token, record, static)
                landing = hashlib.sha1((version + token).encode()).hexdigest()
                out[key] = (landing, _joined(record, b.reserved, b.spent, static))
        for key, (value, names) in self._writes.items():
            version = _unique()
            data = to_json(value).decode()  # a record: its fields, as a dataclass serialises; or plain JSON data
            out[key] = (version, _joined(data, value.reserved, value.spent, version) if names is _BUDGET else data)

    def _commit(self, *, check_only: bool) -> None:
        plan = self._plan(check_only)
        if plan is None:
            return
        batch = self._batch
        if batch is not None:  # sent with the rest of the batch, which settles it (see _Batch)
            batch.add(plan)
            return
        with self._store.errors():
            (results,) = _send([plan], self._store)
        self._settle(plan, results)
        if plan.followers:
            _send_followers([plan], self._store)

    def _plan(self, check_only: bool) -> _Plan | None:
        """What commits (or only checks) this transaction, per slot; None when it needs nothing."""
        writing = bool(self._writes or self._index or self._moves) and not check_only
        if not writing and (not self._read or (len(self._read) == 1 and not self._cached)):
            return None  # nothing written, and what was read is one record as Redis had it: consistent by itself
        if check_only:
            self._writes, self._index, self._pointers, self._moves = {}, [], {}, {}
        if writing:
            self._seal()
        parts = self._parts()
        primary = self._last_slot if writing else None
        followers: dict[str, _Part] = {}
        if writing:  # a slot only read beside the operation's own is another tenant's sweep that found nothing to do
            parts = {slot: p for slot, p in parts.items() if p.ops or p.moves or slot == primary}
            # a slot holding only new observability records commits after the operation's own, and only once that
            # did: an event or audit entry of another tenant's (or pseudo-tenant's) slot exists only if its change
            # does (a crash in between loses it; it never invents one). Its records are new (random ids): written
            # without a check.
            for slot in [s for s in parts if s != primary and s not in self._changed_slots]:
                written = parts.pop(slot)
                followers[slot] = _Part(ops=written.ops, keys=written.keys, datas=written.datas)
        return _Plan(self, parts, primary, writing, followers=followers)

    def _settle(self, plan: _Plan, answers: dict[str, Any]) -> None:
        """Take the scripts' answers: remember what was written, or raise Conflict (DuplicateKey) with nothing done."""
        store = self._store
        failed = False
        contended: list[str] = []
        for slot, answer in answers.items():
            if answer:
                contended.append(slot)
                changed = {}
                if answer is not TURN:
                    changed = {answer[i]: (answer[i + 1], answer[i + 2] or None) for i in range(0, len(answer), 3)}
                    store.cache.update(changed)
                if plan.primary is None or slot == plan.primary:
                    failed = True
                    # another reserve took this idempotency key first: the rules replay it
                    taken = [k for k in changed if ":rk:" in k and k in self._inserted and changed[k][1] is not None]
                    if taken and plan.writing and self._batch is None:
                        store.forget_pointers(self._pointers)
                        raise DuplicateKey(taken[0])
        plan.contended = contended
        if failed:
            if plan.writing:
                store.forget_pointers(self._pointers)
            conflict = Conflict("records read by this transaction changed before it could commit")
            conflict.take_turn = functools.partial(store.take_turn, contended)  # type: ignore[attr-defined]
            raise conflict
        if plan.writing:
            self._remember_written()

    def _remember_written(self) -> None:
        cache = self._store.cache
        if len(cache) > CACHE_LIMIT:
            cache.clear()
        out = self._out
        for key in self._writes:
            cache[key] = out[key]
        tokens = self._tokens
        for key, (version, reserved, spent) in self._landed.items():  # as the script left them, others' moves too
            _token, record, static = tokens[key]
            cache[key] = (version, _joined(record, reserved, spent, static))

    # ------------------------------------------------------------------------------------------------ idempotency
    def get_idempotent(self, tenant: str, endpoint: str, key: str) -> tuple[str, str] | None:
        (data,) = self._get([f"{tag(tenant)}:i:{endpoint}:{key}"])
        return None if data is None else tuple(from_json(data))  # type: ignore[return-value]

    def put_idempotent(self, tenant: str, endpoint: str, key: str, fingerprint: str, response: str) -> None:
        k = f"{tag(tenant)}:i:{endpoint}:{key}"
        self._inserted.add(k)
        self._put(k, [fingerprint, response], None)

    # ---------------------------------------------------------------------------------------------------- tenants
    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        return self._records([tag(tenant_id) + ":tenant"], TenantRecord)[0]

    def put_tenant(self, t: TenantRecord) -> None:
        self._put(tag(t.tenant_id) + ":tenant", t, _TENANT)

    def _all_tenants(self) -> list[str]:
        with self._store.errors():
            return self._r.zrange(TENANTS, 0, -1)

    def list_tenants(self, after: str | None, limit: int) -> list[TenantRecord]:
        names = [n for n in self._all_tenants() if after is None or n > after]
        found: list[TenantRecord] = []
        for start in range(0, len(names), 200):
            chunk = names[start : start + 200]
            records = self._records([tag(n) + ":tenant" for n in chunk], TenantRecord)
            found += [t for t in records if t is not None]
            if len(found) >= limit:
                break
        return found[:limit]

    # ---------------------------------------------------------------------------------------------------- budgets
    @staticmethod
    @functools.lru_cache(maxsize=4096)  # the same few ledgers again and again
    def _budget_key(unit: str, scope: str) -> str:
        return f"{tag(_tenant_of_scope(scope))}:b:{unit}:{scope}"

    def get_budgets(self, unit: str, scopes: Sequence[str]) -> list[BudgetRecord]:
        found = self._records([self._budget_key(unit, s) for s in scopes], BudgetRecord)
        return [b for b in found if b is not None]

    def _index_members(self, tenants: Iterable[str], index: str) -> list[tuple[str, str]]:
        """(tenant, member) of each tenant's lex index."""
        tenants = list(tenants)
        with self._store.errors():
            pipe = self._r.pipeline(transaction=False)
            for t in tenants:
                pipe.zrange(f"{tag(t)}:{index}", 0, -1)
            return [(t, m) for t, members in zip(tenants, pipe.execute(), strict=True) for m in members]

    def budget_units(self, scopes: Sequence[str]) -> list[str]:
        wanted = set(scopes)
        members = self._index_members({_tenant_of_scope(s) for s in scopes}, "budgets")
        return sorted({m.split("\0")[1] for _t, m in members if m.split("\0")[0] in wanted})

    def insert_budget(self, b: BudgetRecord) -> None:
        key = self._budget_key(b.unit, b.scope)
        self._inserted.add(key)
        self._put(key, b, _BUDGET)
        self._zadd(f"{tag(_tenant_of_scope(b.scope))}:budgets", 0, f"{b.scope}\0{b.unit}")

    def save_budget(self, b: BudgetRecord) -> None:
        self._put(self._budget_key(b.unit, b.scope), b, _BUDGET)

    def move(self, budgets: Sequence[BudgetRecord], *, reserved: int = 0, spent: int = 0, debt: int = 0) -> None:
        """Reserved and spent deltas are applied by the commit script (HINCRBY), not written as the new record: two
        processes moving one budget then do not fail each other's transactions (see `_seal` for the
        condition each move commits under). A debt, or a budget written whole as well, writes the record."""
        for b in budgets:
            b.reserved += reserved
            b.spent += spent
            b.debt += debt
            key = self._budget_key(b.unit, b.scope)
            if debt or key in self._writes:
                self._put(key, b, _BUDGET)
                continue
            moved = self._moves.setdefault(key, [0, 0])
            moved[0] += reserved
            moved[1] += spent
            self._wrote(key, False)

    def set_over_limit(self, unit: str, scopes: Sequence[str], flag: bool) -> None:
        for b in self.get_budgets(unit, scopes):
            b.is_over_limit = flag
            self._put(self._budget_key(b.unit, b.scope), b, _BUDGET)

    def list_budgets(
        self,
        *,
        tenant_id: str | None = None,
        scope: str | None = None,
        children: bool = False,
        scope_prefix: str | None = None,
        unit: str | None = None,
        after: tuple[str, str] | None = None,
        limit: int = 50,
    ) -> list[BudgetRecord]:
        if tenant_id is not None:
            tenants = [tenant_id]
        elif scope is not None:
            tenants = [_tenant_of_scope(scope)]
        else:
            tenants = self._all_tenants()
        rows = []
        for _t, member in self._index_members(tenants, "budgets"):
            s, u = member.split("\0")
            if scope is not None and not (s == scope or (children and s.startswith(scope + "/"))):
                continue
            if scope_prefix and not s.startswith(scope_prefix):
                continue
            if (unit is not None and u != unit) or (after is not None and (s, u) <= after):
                continue
            rows.append((s, u))
        rows.sort()
        keys = [self._budget_key(u, s) for s, u in rows[:limit]]
        found = self._records(keys, BudgetRecord)
        return [b for b in found if b is not None and (tenant_id is None or b.tenant_id == tenant_id)]

    # ----------------------------------------------------------------------------------------------- reservations
    def insert_reservation(self, r: ReservationRecord) -> None:
        t = tag(r.tenant)
        by_key = f"{t}:rk:{r.idempotency_key}"
        self._inserted.add(by_key)
        self._put(by_key, r.reservation_id, None)
        self._put(f"{t}:r:{r.reservation_id}", r, _RES)
        self._zadd(f"{t}:res", r.created_at_ms, r.reservation_id)
        if r.status == "ACTIVE":
            self._zadd(f"{t}:ttl", r.expires_at_ms + r.grace_ms, r.reservation_id)
        self._set_pointer("cycles:rid:" + r.reservation_id, r.tenant)

    def _reservations(self, tenant: str, ids: Sequence[str]) -> list[ReservationRecord]:
        t = tag(tenant)
        found = self._load([f"{t}:r:{i}" for i in ids], lambda d: ReservationRecord(**d))  # read once: not kept
        return [r for r in found if r is not None]

    def get_reservation(self, reservation_id: str) -> ReservationRecord | None:
        tenant = self._pointer("cycles:rid:" + reservation_id)
        if tenant is None:
            return None
        found = self._reservations(tenant, [reservation_id])
        return found[0] if found else None

    def get_reservation_by_key(self, tenant: str, idempotency_key: str) -> ReservationRecord | None:
        (data,) = self._get([f"{tag(tenant)}:rk:{idempotency_key}"])
        if data is None:
            return None
        found = self._reservations(tenant, [from_json(data)])
        return found[0] if found else None

    def save_reservation(self, r: ReservationRecord) -> None:
        t = tag(r.tenant)
        self._put(f"{t}:r:{r.reservation_id}", r, _RES)
        if r.status == "ACTIVE":
            self._zadd(f"{t}:ttl", r.expires_at_ms + r.grace_ms, r.reservation_id)
        else:
            self._zrem(f"{t}:ttl", r.reservation_id)
            self._expired.add(r.reservation_id)

    def _touched_tenants(self) -> set[str]:
        return {_slot_of(k)[3:-1] for k in self._read} | {_slot_of(k)[3:-1] for k in self._writes}

    def due_reservations(self, now_ms: int, limit: int) -> list[ReservationRecord]:
        """Due holds of the tenants this transaction works on; of every tenant when it has touched none yet (a
        read, or the sweeper)."""
        tenants = sorted(self._touched_tenants()) or self._all_tenants()
        skip = len(self._expired)
        with self._store.errors():
            pipe = self._r.pipeline(transaction=False)
            for t in tenants:
                pipe.zrangebyscore(f"{tag(t)}:ttl", "-inf", f"({now_ms}", start=0, num=limit + skip)
            answers = pipe.execute()
        due: list[ReservationRecord] = []
        for t, ids in zip(tenants, answers, strict=True):
            ids = [i for i in ids if i not in self._expired]
            due += [r for r in self._reservations(t, ids) if r.status == "ACTIVE"]
            if len(due) >= limit:
                break
        return due[:limit]

    def active_reservations(self, tenant: str) -> list[ReservationRecord]:
        with self._store.errors():
            ids = self._r.zrange(f"{tag(tenant)}:ttl", 0, -1)
        return [r for r in self._reservations(tenant, ids) if r.status == "ACTIVE"]

    def query_reservations(
        self, flt: ReservationFilter, sort_by: str, descending: bool, after: tuple[Any, str] | None, limit: int
    ) -> list[ReservationRecord]:
        with self._store.errors():
            ids = self._r.zrange(f"{tag(flt.tenant)}:res", 0, -1)
        rows = []
        for start in range(0, len(ids), 500):
            for r in self._reservations(flt.tenant, ids[start : start + 500]):
                if _matches(r, flt):
                    rows.append(r)
        column = "estimate" if sort_by == "reserved" else sort_by
        rows.sort(key=lambda r: (getattr(r, column), r.reservation_id), reverse=descending)
        if after is not None:
            position = tuple(after)
            if descending:
                rows = [r for r in rows if (getattr(r, column), r.reservation_id) < position]
            else:
                rows = [r for r in rows if (getattr(r, column), r.reservation_id) > position]
        return rows[:limit]

    # ----------------------------------------------------------------------------------------------------- events
    def insert_event(self, e: EventRecord) -> None:
        key = f"{tag(e.tenant)}:e:{e.event_id}"
        self._inserted.add(key)
        self._put(key, e, _EVENT)

    # --------------------------------------------------------------------------------------------------- policies
    def policies(self, tenant_id: str) -> list[PolicyRecord]:
        key = tag(tenant_id) + ":policies"
        if key not in self._objects:
            (data,) = self._get([key])
            self._objects[key] = [PolicyRecord(**p) for p in from_json(data)] if data is not None else []
        return self._objects[key]

    def get_policy(self, policy_id: str) -> PolicyRecord | None:
        tenant = self._pointer("cycles:pid:" + policy_id)
        if tenant is None:
            return None
        return next((p for p in self.policies(tenant) if p.policy_id == policy_id), None)

    def put_policy(self, p: PolicyRecord) -> None:
        found = [q for q in self.policies(p.tenant_id) if q.policy_id != p.policy_id] + [p]
        found.sort(key=lambda q: (-q.priority, -q.created_at_ms, q.policy_id))  # SQLite's order
        key = tag(p.tenant_id) + ":policies"
        self._put(key, [{n: getattr(q, n) for n in _POLICY} for q in found], None)
        self._objects[key] = found
        self._set_pointer("cycles:pid:" + p.policy_id, p.tenant_id)

    # --------------------------------------------------------------------------------------------------- api keys
    def insert_key(self, k: ApiKeyRecord) -> None:
        key = f"{tag(k.tenant_id)}:k:{k.key_id}"
        self._inserted.add(key)
        self._put(key, k, _KEY)
        self._zadd(f"{tag(k.tenant_id)}:keys", 0, k.key_id)
        self._set_pointer("cycles:kid:" + k.key_id, k.tenant_id)
        self._set_pointer("cycles:kh:" + k.key_hash, f"{k.tenant_id}\0{k.key_id}")

    def _keys(self, tenant: str, ids: Sequence[str]) -> list[ApiKeyRecord]:
        found = self._load([f"{tag(tenant)}:k:{i}" for i in ids], lambda d: ApiKeyRecord(**d))
        return [k for k in found if k is not None]

    def get_key(self, key_id: str) -> ApiKeyRecord | None:
        tenant = self._pointer("cycles:kid:" + key_id)
        found = self._keys(tenant, [key_id]) if tenant is not None else []
        return found[0] if found else None

    def get_key_by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        pointer = self._pointer("cycles:kh:" + key_hash)
        if pointer is None:
            return None
        tenant, key_id = pointer.split("\0")
        found = self._keys(tenant, [key_id])
        return found[0] if found and found[0].key_hash == key_hash else None

    def save_key(self, k: ApiKeyRecord) -> None:
        self._put(f"{tag(k.tenant_id)}:k:{k.key_id}", k, _KEY)

    def list_keys(self, tenant_id: str | None, after: str | None, limit: int) -> list[ApiKeyRecord]:
        tenants = [tenant_id] if tenant_id is not None else self._all_tenants()
        rows = sorted((m, t) for t, m in self._index_members(tenants, "keys") if after is None or m > after)[:limit]
        found = []
        for key_id, t in rows:
            found += self._keys(t, [key_id])
        return found

    # =================================================================================================================
    # Observability: the outbox, the audit log, webhooks and their deliveries (the contract's issue-14 part).
    #
    #   {t:<tenant>}:o:<event id>    an outbox event        {t:<tenant>}:outbox   index: event ids by created_at_ms
    #   {t:<tenant>}:a:<log id>      an audit entry         {t:<tenant>}:audit    index: log ids by created_at_ms
    #   {t:<owner>}:webhooks         the owner's subscriptions, one record {subscription id: subscription}
    #   {t:<owner>}:d:<delivery id>  a delivery             {t:<owner>}:dl:<subscription id>  index: by created_at_ms
    #                                                       {t:<owner>}:due       index: PENDING/RETRYING ids by the
    #                                                                             time they may next be claimed
    # Events and audit entries live with their tenant (the pseudo-tenants "__system__" and "__admin__" too),
    # subscriptions and their deliveries with the subscription's owner. Pointers: cycles:evid:<event id> and
    # cycles:wid:<subscription id> name the tenant. Events and audit entries never change once written: they are read
    # without a version check (a cache hit is always right), and written in another slot than their change, they
    # follow its commit (see `_plan`). Listings walk the indexes a chunk at a time and filter here, bounded by the page
    # (sorting events by anything but time reads the tenant's events in the time window); cross-tenant listings and
    # claims walk the tenant index.
    # =================================================================================================================
    def _immutable(self, keys: Sequence[str], make: Any) -> list[Any]:
        """Write-once records (None where absent), without a version check: present, they are what they will stay."""
        cache = self._store.cache
        pending = {k: self._writes[k][0] for k in keys if k in self._writes}  # written by this transaction
        missing = [k for k in keys if k not in pending and (k not in cache or cache[k][1] is None)]
        if missing:
            with self._store.errors():
                pipe = self._r.pipeline(transaction=False)
                for k in missing:
                    pipe.hmget(k, "v", "d")
                for k, (v, d) in zip(missing, pipe.execute(), strict=True):
                    if d is not None:
                        cache[k] = (v, d)
        out = []
        for k in keys:
            if k in pending:
                out.append(pending[k])
            else:
                data = cache.get(k, (None, None))[1]
                out.append(None if data is None else make(from_json(data)))
        return out

    def _walk(
        self,
        index: str,
        prefix: str,
        make: Any,
        window: tuple[int | None, int | None],
        descending: bool,
        after: tuple[Any, str] | None,
        limit: int | None,
        match: Callable[[Any], bool],
        *,
        immutable: bool = True,
    ) -> list[Any]:
        """Up to `limit` (None: all) matching records of a sorted-set index, in (score, id) order from `after`."""
        low, high = window
        if after is not None:
            if descending:
                high = after[0] if high is None else min(high, after[0])
            else:
                low = after[0] if low is None else max(low, after[0])
        lo, hi = ("-inf" if low is None else low), ("+inf" if high is None else high)
        chunk = 100 if limit is None else max(limit, 20)
        found: list[Any] = []
        offset = 0
        while limit is None or len(found) < limit:
            with self._store.errors():
                if descending:
                    rows = self._r.zrevrangebyscore(index, hi, lo, start=offset, num=chunk, withscores=True)
                else:
                    rows = self._r.zrangebyscore(index, lo, hi, start=offset, num=chunk, withscores=True)
            fetched = len(rows)
            offset += fetched
            if after is not None:
                position = (after[0], after[1])
                rows = [(m, s) for m, s in rows if ((int(s), m) < position if descending else (int(s), m) > position)]
            keys = [prefix + m for m, _s in rows]
            records = self._immutable(keys, make) if immutable else self._load(keys, make)
            found += [r for r in records if r is not None and match(r)]
            if fetched < chunk:  # the index ends here
                break
        return found if limit is None else found[:limit]

    def _tenants_for(self, tenant_id: str | None) -> list[str]:
        return [tenant_id] if tenant_id is not None else self._all_tenants()

    # ----------------------------------------------------------------------------------------------------- outbox
    def add_event(self, e: OutboxEvent) -> None:
        t = tag(e.tenant_id)
        self._put(f"{t}:o:{e.event_id}", e, _OUTBOX, observed=True)
        self._zadd(f"{t}:outbox", e.created_at_ms, e.event_id, observed=True)
        self._set_pointer("cycles:evid:" + e.event_id, e.tenant_id)

    def get_event(self, event_id: str) -> OutboxEvent | None:
        tenant = self._pointer("cycles:evid:" + event_id)
        if tenant is None:
            return None
        return self._immutable([f"{tag(tenant)}:o:{event_id}"], lambda d: OutboxEvent(**d))[0]

    def list_events(
        self, flt: EventFilter, sort_by: str, descending: bool, after: tuple[Any, str] | None, limit: int
    ) -> list[OutboxEvent]:
        def match(e: OutboxEvent) -> bool:
            return all(
                wanted is None or getattr(e, name) == wanted
                for name, wanted in (
                    ("tenant_id", flt.tenant_id), ("event_type", flt.event_type), ("category", flt.category),
                    ("scope", flt.scope), ("correlation_id", flt.correlation_id), ("request_id", flt.request_id),
                    ("trace_id", flt.trace_id),
                )
            )  # fmt: skip

        by_time = sort_by == "created_at_ms"
        rows: list[OutboxEvent] = []
        for tenant in self._tenants_for(flt.tenant_id):
            t = tag(tenant)
            rows += self._walk(f"{t}:outbox", f"{t}:o:", lambda d: OutboxEvent(**d), flt.created, descending,
                               after if by_time else None, limit if by_time else None, match)  # fmt: skip

        def position(e: OutboxEvent) -> tuple[Any, str]:
            value = e.category if sort_by == "category" else getattr(e, sort_by)
            return (value if value is not None else ""), e.event_id  # SQLite's COALESCE(column, '')

        rows.sort(key=position, reverse=descending)
        if after is not None and not by_time:
            start = (after[0] if after[0] is not None else "", after[1])
            rows = [e for e in rows if (position(e) < start if descending else position(e) > start)]
        return rows[:limit]

    # ------------------------------------------------------------------------------------------------------ audit
    def add_audit(self, a: AuditRecord) -> None:
        t = tag(a.tenant_id)
        self._put(f"{t}:a:{a.log_id}", a, _AUDIT, observed=True)
        self._zadd(f"{t}:audit", a.created_at_ms, a.log_id, observed=True)

    def list_audit(
        self, flt: AuditFilter, descending: bool, after: tuple[int, str] | None, limit: int
    ) -> list[AuditRecord]:
        low, high = flt.status

        def match(a: AuditRecord) -> bool:
            return (
                (flt.key_id is None or a.key_id == flt.key_id)
                and (flt.resource_id is None or a.resource_id == flt.resource_id)
                and (not flt.operations or a.operation in flt.operations)
                and (not flt.resource_types or a.resource_type in flt.resource_types)
                and (low is None or a.status >= low)
                and (high is None or a.status <= high)
            )

        rows: list[AuditRecord] = []
        for tenant in self._tenants_for(flt.tenant_id):
            t = tag(tenant)
            rows += self._walk(f"{t}:audit", f"{t}:a:", lambda d: AuditRecord(**d), flt.created, descending, after,
                               limit, match)  # fmt: skip
        rows.sort(key=lambda a: (a.created_at_ms, a.log_id), reverse=descending)
        return rows[:limit]

    # --------------------------------------------------------------------------------------------------- webhooks
    def _webhooks(self, owner: str) -> dict[str, WebhookRecord]:
        """The owner's subscriptions by id: one record, read (and checked) like any other."""
        key = tag(owner) + ":webhooks"
        if key not in self._objects:
            (data,) = self._get([key])
            found = {} if data is None else {i: WebhookRecord(**w) for i, w in from_json(data).items()}
            self._objects[key] = found
            for sid in found:
                self._store.remember_pointer("cycles:wid:" + sid, owner)
        return self._objects[key]

    def _save_webhooks(self, owner: str, found: dict[str, WebhookRecord]) -> None:
        self._put(tag(owner) + ":webhooks", found, None)  # serialized at commit, as changed until then

    def put_webhook(self, w: WebhookRecord) -> None:
        found = self._webhooks(w.tenant_id)
        found[w.subscription_id] = w
        self._save_webhooks(w.tenant_id, found)
        self._set_pointer("cycles:wid:" + w.subscription_id, w.tenant_id)

    def get_webhook(self, subscription_id: str) -> WebhookRecord | None:
        owner = self._pointer("cycles:wid:" + subscription_id)
        return None if owner is None else self._webhooks(owner).get(subscription_id)

    def delete_webhook(self, subscription_id: str) -> None:
        owner = self._pointer("cycles:wid:" + subscription_id)
        if owner is None:
            return
        found = self._webhooks(owner)
        if found.pop(subscription_id, None) is not None:
            self._save_webhooks(owner, found)
        for d in self._due(owner, "+inf", None):  # what was still to send is given up
            if d.subscription_id == subscription_id:
                d.status = "FAILED"
                self.put_delivery(d)

    def list_webhooks(self, tenant_id: str | None, after: str | None, limit: int) -> list[WebhookRecord]:
        rows = [w for t in self._tenants_for(tenant_id) for w in self._webhooks(t).values()]
        rows = sorted((w for w in rows if after is None or w.subscription_id > after), key=lambda w: w.subscription_id)
        return rows[:limit]

    def webhooks_for(self, tenant_id: str) -> list[WebhookRecord]:
        """Read fresh from Redis and not checked at commit (unless this transaction wrote them): a subscription that
        settles a delivery meanwhile must not make every operation that emits an event run again."""
        owners = list(dict.fromkeys((tenant_id, SYSTEM_TENANT)))
        keys = [tag(o) + ":webhooks" for o in owners]
        memo = self._objects.setdefault("observability:webhooks_for", {})
        unread = [k for k in keys if k not in self._objects and k not in memo]
        if unread:
            with self._store.errors():
                pipe = self._r.pipeline(transaction=False)
                for k in unread:
                    pipe.hget(k, "d")
                for k, data in zip(unread, pipe.execute(), strict=True):
                    memo[k] = {} if data is None else {i: WebhookRecord(**w) for i, w in from_json(data).items()}
        found = []
        for owner, k in zip(owners, keys, strict=True):
            subs = self._objects[k] if k in self._objects else memo[k]
            for sid, w in subs.items():
                self._store.remember_pointer("cycles:wid:" + sid, owner)
                if w.status == "ACTIVE":
                    found.append(w)
        return found

    # ------------------------------------------------------------------------------------------------- deliveries
    def _owner(self, subscription_id: str) -> str:
        owner = self._pointer("cycles:wid:" + subscription_id)
        if owner is None:
            raise InvalidRequest(f"webhook subscription {subscription_id!r} not found")
        return owner

    def put_delivery(self, d: DeliveryRecord) -> None:
        t = tag(self._owner(d.subscription_id))
        key = f"{t}:d:{d.delivery_id}"
        # a delivery just queued (events.queue_delivery) is new; any other was claimed, settled or given up before
        new = (d.status == "PENDING" and d.attempts == 0 and d.lease_until_ms == 0 and d.attempted_at_ms is None
               and d.next_attempt_at_ms == d.created_at_ms and key not in self._read)  # fmt: skip
        if new:
            self._put(key, d, _DELIVERY, observed=True)
            self._zadd(f"{t}:dl:{d.subscription_id}", d.created_at_ms, d.delivery_id, observed=True)
            self._zadd(f"{t}:due", d.next_attempt_at_ms, d.delivery_id, observed=True)
            return
        if key not in self._read:
            self._get([key])  # its version: the commit checks nobody changed it meanwhile
        self._put(key, d, _DELIVERY)
        if d.status in ("PENDING", "RETRYING"):
            self._zadd(f"{t}:due", max(d.next_attempt_at_ms, d.lease_until_ms), d.delivery_id)
        else:
            self._zrem(f"{t}:due", d.delivery_id)

    def _due(self, owner: str, until: int | str, limit: int | None) -> list[DeliveryRecord]:
        """The owner's PENDING / RETRYING deliveries claimable by `until` (read and checked)."""
        t = tag(owner)
        with self._store.errors():
            ids = self._r.zrangebyscore(f"{t}:due", "-inf", until, start=0 if limit else None, num=limit)
        found = self._load([f"{t}:d:{i}" for i in ids], lambda d: DeliveryRecord(**d))
        return [d for d in found if d is not None and d.status in ("PENDING", "RETRYING")]

    def claim_deliveries(self, now_ms: int, lease_ms: int, limit: int) -> list[DeliveryRecord]:
        """The oldest claimable deliveries of every owner (two pipelined reads, only to choose), then one transaction
        per owner leasing its share, committed at once in its own slot (a lease, never a pop; never one script
        across slots)."""
        owners = self._all_tenants()
        with self._store.errors():
            pipe = self._r.pipeline(transaction=False)
            for owner in owners:
                pipe.zrangebyscore(f"{tag(owner)}:due", "-inf", now_ms, start=0, num=limit)
            candidates = [(o, i) for o, ids in zip(owners, pipe.execute(), strict=True) for i in ids]
            pipe = self._r.pipeline(transaction=False)
            for owner, i in candidates:
                pipe.hget(f"{tag(owner)}:d:{i}", "d")
            datas = pipe.execute()
        due = []
        for (owner, _i), data in zip(candidates, datas, strict=True):
            if data is not None:
                d = DeliveryRecord(**from_json(data))
                due.append(((d.next_attempt_at_ms, d.created_at_ms, d.delivery_id), owner))
        shares: dict[str, list[str]] = {}
        for (_at, _created, i), owner in sorted(due)[:limit]:
            shares.setdefault(owner, []).append(i)
        claimed: list[DeliveryRecord] = []
        for owner, ids in shares.items():
            claimed += _claim_share(self._store, owner, ids, now_ms, lease_ms)
        claimed.sort(key=lambda d: (d.next_attempt_at_ms, d.created_at_ms, d.delivery_id))
        return claimed

    def list_deliveries(
        self, subscription_id: str, status: str | None, after: tuple[int, str] | None, limit: int
    ) -> list[DeliveryRecord]:
        owner = self._pointer("cycles:wid:" + subscription_id)
        if owner is None:
            return []
        t = tag(owner)
        return self._walk(f"{t}:dl:{subscription_id}", f"{t}:d:", lambda d: DeliveryRecord(**d), (None, None), True,
                          after, limit, lambda d: status is None or d.status == status, immutable=False)  # fmt: skip


def _claim_share(store: RedisStore, owner: str, ids: list[str], now_ms: int, lease_ms: int) -> list[DeliveryRecord]:
    """Lease those of `ids` still claimable, in one transaction of the owner's slot, committed now: run again on a
    Conflict (another worker claimed or settled one meanwhile); a share that keeps conflicting waits for next time."""
    t = tag(owner)
    for _attempt in range(5):
        tx = RedisTransaction(store)
        tx._batch = None  # committed on its own, inside whatever transaction asked for the claim
        found = tx._load([f"{t}:d:{i}" for i in ids], lambda d: DeliveryRecord(**d))
        mine = [d for d in found if d is not None and d.status in ("PENDING", "RETRYING")
                and d.next_attempt_at_ms <= now_ms and d.lease_until_ms <= now_ms]  # fmt: skip
        for d in mine:
            d.lease_until_ms = now_ms + lease_ms
            tx.put_delivery(d)
        tx._webhooks(owner)  # checked with the claim: the caller reads the subscriptions next, current in the cache
        try:
            tx._commit(check_only=False)
        except Conflict:
            continue
        return mine
    return []


SYSTEM_TENANT = "__system__"  # events.SYSTEM_TENANT: its subscriptions receive every tenant's events
_OUTBOX, _AUDIT, _DELIVERY = map(_fields, (OutboxEvent, AuditRecord, DeliveryRecord))
# ===================================================================================================== observability


@dataclasses.dataclass(slots=True)
class _Part:
    """One slot's part of a transaction, flat as the commit script reads it (see COMMIT): versions to check, writes
    (ops naming their keys and their data by number), budget moves; `keys`, every key they name (the script declares
    them); `datas`, the data written."""

    checks: list[str] = dataclasses.field(default_factory=list)
    ops: list[Any] = dataclasses.field(default_factory=list)
    moves: list[str] = dataclasses.field(default_factory=list)
    keys: list[str] = dataclasses.field(default_factory=list)
    datas: list[str] = dataclasses.field(default_factory=list)  # the records written: op data n is datas[n - 1]


@dataclasses.dataclass(slots=True)
class _Plan:
    tx: RedisTransaction
    parts: dict[str, _Part]  # by slot
    primary: str | None  # the slot whose outcome is the transaction's (None: every slot's)
    writing: bool
    contended: list[str] = dataclasses.field(default_factory=list)  # slots where its scripts met changes
    followers: dict[str, _Part] = dataclasses.field(default_factory=dict)  # sent once `parts` committed


class _Trip:
    """One round trip for plans: their pointers (set first), then one script per slot running that slot's parts of
    every plan in order; `read` turns the scripts' replies into each plan's answer per slot."""

    __slots__ = ("plans", "pointers", "tenants", "slots", "calls")

    def __init__(self, plans: list[_Plan]) -> None:
        self.plans = plans
        self.pointers: dict[str, str] = {}
        self.tenants: set[str] = set()  # tenants written (the tenant index must name them)
        self.slots: dict[str, list[tuple[int, _Part]]] = {}
        for n, plan in enumerate(plans):
            self.pointers.update(plan.tx._pointers)
            for slot, part in plan.parts.items():
                self.slots.setdefault(slot, []).append((n, part))
                if part.ops:
                    self.tenants.add(slot[3:-1])
        self.calls: list[tuple[str, list[str], bytes, list[str]]] = []  # (slot, keys, payload, datas)
        for slot, parts in self.slots.items():
            keys = [slot + ":turn"]
            datas: list[str] = []
            payload = []
            for _n, part in parts:
                keys += part.keys
                payload.append((part.checks, part.ops, part.moves, 2 + len(datas)))  # (ARGV 1, 2: payload, owner)
                datas += part.datas
            self.calls.append((slot, list(dict.fromkeys(keys)), to_json(payload), datas))

    def mset(self) -> tuple[str, ...]:
        """The pointers as one command (a standalone Redis: on one connection, it runs before the scripts)."""
        return ("MSET", *[x for pointer_value in self.pointers.items() for x in pointer_value])

    def scripts(self, store: RedisStore) -> list[tuple[Any, ...]]:
        return [
            ("EVALSHA", store.commit_sha, len(keys), *keys, payload, store.owner, *datas)
            for _s, keys, payload, datas in self.calls
        ]

    def read(self, store: RedisStore, results: Sequence[Any]) -> list[dict[str, Any]]:
        for pointer, value in self.pointers.items():
            store.remember_pointer(pointer, value)
        plans, slots = self.plans, self.slots
        answers: list[dict[str, Any]] = [{} for _ in plans]
        for (slot, _keys, _payload, _datas), result in zip(self.calls, results, strict=True):
            result = from_json(result)
            for n, _part in slots[slot]:
                answers[n][slot] = TURN if result == "turn" else None
            if result != "turn":
                for (n, _part), answer in zip(slots[slot], result, strict=True):
                    if answer and answer[0] == 0:  # committed, with what its moves left (others' moves included)
                        landed = plans[n].tx._landed
                        for i in range(1, len(answer), 4):
                            landed[answer[i]] = (answer[i + 1], answer[i + 2], answer[i + 3])
                        answer = None
                    answers[n][slot] = answer or None
        return answers


def _send(plans: list[_Plan], store: RedisStore) -> list[dict[str, Any]]:
    """Every plan's pointers, then one script per slot running that slot's parts of every plan in order, all in one
    round trip; for each plan, its answer per slot."""
    trip = _Trip(plans)
    store.index_tenants(trip.tenants)
    pointers = trip.pointers
    for attempt in (1, 2):
        pipe = store.redis.pipeline(transaction=False)
        if pointers and store.cluster:  # each in its own slot: set (and answered) before any script runs
            store.set_pointers(pointers)
        elif pointers:  # one connection runs a pipeline in order: the pointers first, in the same round trip
            pipe.execute_command(*trip.mset())
        for command in trip.scripts(store):
            # (a cluster pipeline refuses .evalsha, yet routes EVALSHA by its keys)
            pipe.execute_command(*command)
        try:
            results = pipe.execute()
            break
        except redis.exceptions.NoScriptError:  # Redis restarted (its script cache is not persisted)
            if attempt == 2:
                raise
            store.load_scripts()
    if pointers and not store.cluster:
        results = results[1:]
    return trip.read(store, results)


def _send_followers(plans: list[_Plan], store: RedisStore) -> None:
    """The follower slots of committed plans (new records only, see `_plan`): nothing to conflict with but another
    store's turn of a slot, which lapses by itself: wait it out, bounded."""
    pending = [_Plan(plan.tx, plan.followers, None, True) for plan in plans]
    for plan in pending:
        plan.tx._pointers = {}  # set with the change
    for _attempt in range(20):
        with store.errors():
            answers = _send(pending, store)
        pending = [
            _Plan(plan.tx, {slot: plan.parts[slot] for slot, answer in answer_by_slot.items() if answer}, None, True)
            for plan, answer_by_slot in zip(pending, answers, strict=True)
        ]
        pending = [plan for plan in pending if plan.parts]
        if not pending:
            return
        time.sleep(random.uniform(0.005, 0.02))
    raise StoreUnavailable("observability records could not be written: a Redis slot stayed busy")


class _Batch:
    """`with store.batch() as batch:` the transactions this thread runs inside are sent together at the end, one
    round trip for all. A transaction reads what earlier ones of the batch wrote (`overlay`, with the versions their
    scripts will give it), so each script checks against its predecessors' writes: when one fails, every later one
    that read its writes fails too, and nothing else. The caller tags each piece of work (`current`) and runs again,
    on its own, each one listed in `failed` afterwards.

    A deferred batch (`store.batch(deferred=True)`, the server's) is sent by its caller instead (`send`: written on
    the store's one connection of the event loop, so batches reach Redis in the order they were sent) and settled
    once its answers are back (`settle`, or `abandon` when the round trip failed). Until then its writes stay
    readable to the batches that come after it (`store.pending`), exactly as to its own later transactions: the next
    batch can run while this one is on its way, and what it read is checked like anything else."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.thread = threading.get_ident()
        self.overlay: dict[str, tuple[str, str | None]] = {}
        self.plans: list[tuple[Any, _Plan]] = []
        self.current: Any = None
        self.failed: set[Any] = set()
        self.contended: set[str] = set()  # slots where the failed ones met changes
        self.give_back: Callable[[], None] | None = None  # a deferred batch's turn, given back once it is settled

    def add(self, plan: _Plan) -> None:
        self.plans.append((self.current, plan))
        tx = plan.tx
        if plan.writing:
            self.overlay.update(tx._out)

    def flush(self) -> None:
        if self.plans:
            with self.store.errors():
                answers = _send([plan for _work, plan in self.plans], self.store)
            self.settle(answers)

    def send(self) -> asyncio.Future[list[dict[str, Any]]] | None:
        """A deferred batch's round trip, written on the store's connections of the running event loop (`_Wire`,
        `_ClusterWire`): a future of its answers, which the caller settles it with. None when there is nothing to
        send, or when the store has no such connection (no running loop, a connection they do not speak): then the
        batch was sent and settled here, waited for."""
        if not self.plans:
            self.abandon()
            return None
        store = self.store
        try:
            wire = store.wire()
            if wire is None:
                self.flush()
                return None
        except BaseException:
            self.abandon()  # its turn goes back
            raise
        trip = _Trip([plan for _work, plan in self.plans])
        commands: list[tuple[Any, ...]] = []
        tenants = sorted(trip.tenants - store._indexed)
        if tenants:
            commands.append(("ZADD", TENANTS, *[x for t in tenants for x in ("0", t)]))
        if trip.pointers and store.cluster:  # each pointer in a slot of its own
            commands += [("SET", pointer, value) for pointer, value in trip.pointers.items()]
        elif trip.pointers:
            commands.append(trip.mset())
        first = len(commands)
        commands += trip.scripts(store)
        try:
            with store.errors():
                replies = wire.send(commands, first)  # (the pointers land before the scripts run)
        except BaseException:
            self.abandon()
            raise
        pending = store.pending
        for key, seen in self.overlay.items():
            pending[key] = (seen, self)
        answers: asyncio.Future[list[dict[str, Any]]] = replies.get_loop().create_future()

        def read(replies: asyncio.Future[list[Any]]) -> None:
            try:
                with store.errors():
                    results = replies.result()
                    if any(isinstance(r, redis.exceptions.NoScriptError) for r in results[first:]):
                        store.load_scripts()  # Redis restarted (its script cache is not persisted): once more, waited
                        answers.set_result(_send(trip.plans, store))
                        return
                    failed = next((r for r in results if isinstance(r, Exception)), None)
                    if failed is not None:
                        raise failed
                store._indexed.update(tenants)
                answers.set_result(trip.read(store, results[first:]))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever settles the batch
                answers.set_exception(exc)

        replies.add_done_callback(read)
        return answers

    def settle(self, answers: list[dict[str, Any]]) -> None:
        """Each transaction's outcome from its scripts' answers: committed (remembered), or listed in `failed`."""
        try:
            committed = []
            for (work, plan), results in zip(self.plans, answers, strict=True):
                try:
                    plan.tx._settle(plan, results)
                    if plan.followers:
                        committed.append(plan)
                except Conflict:
                    self.failed.add(work)
                    self.contended.update(plan.contended)
        finally:
            self.abandon()
        if committed:
            _send_followers(committed, self.store)
        if self.contended:  # contended here: for a moment, take these slots' turn before each batch
            until = time.monotonic() + HOT_S
            self.store.hot.update(dict.fromkeys(self.contended, until))

    def abandon(self) -> None:
        """Done with: what it wrote is read from the cache from now on (once settled, as it landed); its turn goes
        back; its transactions go (each holds its batch: kept, they would make every batch cyclic garbage, left to
        the collector)."""
        self.plans = []
        pending = self.store.pending
        for key in self.overlay:
            if pending.get(key, (None, None))[1] is self:  # (not written again by a batch sent after it)
                del pending[key]
        if self.give_back is not None:
            give_back, self.give_back = self.give_back, None
            give_back()

    def retry(self) -> _BatchScope:
        """A batch for running the failed ones again, together, with this store holding the turn of the slots
        where they met changes: other stores' commits there wait meanwhile (see RedisStore.take_turn)."""
        return _BatchScope(self.store, turn=sorted(self.contended))


def _matches(r: ReservationRecord, flt: ReservationFilter) -> bool:
    subject = r.subject
    for level, value in flt.levels.items():
        if level != "tenant" and subject.get(level) != value:
            return False
    if flt.idempotency_key is not None and r.idempotency_key != flt.idempotency_key:
        return False
    if flt.status is not None and r.status != flt.status:
        return False
    for value, (low, high) in (
        (r.created_at_ms, flt.created),
        (r.expires_at_ms, flt.expires),
        (r.finalized_at_ms, flt.finalized),
    ):
        if (low is not None or high is not None) and value is None:
            return False
        if (low is not None and value < low) or (high is not None and value > high):  # type: ignore[operator]
            return False
    return True


class RedisStore:
    """A Redis (or Redis Cluster) keyspace holding every ledger record; see the module docstring.

    `client` is a redis-py `Redis` or `RedisCluster` built with `decode_responses=True`.
    """

    def __init__(self, client: Any, url: str = "redis://") -> None:
        if redis is None:  # pragma: no cover
            raise InvalidRequest("the redis store needs redis-py: pip install 'cycles[redis]'")
        self.redis = client
        self.url = url
        self.cluster = type(client).__name__ == "RedisCluster"
        self.cache: dict[str, tuple[str, str | None]] = {}
        self.parsed: dict[str, tuple[str, Any]] = {}  # key -> (JSON, the record parsed from it): see _records
        self.pointers: dict[str, str] = {}
        self._indexed: set[str] = set()  # tenants known to be in cycles:tenants
        self.open_batch: _Batch | None = None
        # key -> ((version, data), batch): writes of deferred batches sent and not settled yet, newest batch's
        self.pending: dict[str, tuple[tuple[str, str | None], _Batch]] = {}
        self.owner = os.urandom(8).hex()  # this store's token in the slots' turns
        self.hot: dict[str, float] = {}  # slot -> until when this store batches there with the turn held
        self.remote_batches = True  # the server batches its calls on this store: see _Batch
        self._offset_ms = 0.0
        self._sampled = -1e9
        self._lock = threading.Lock()
        self._wire: _Wire | _ClusterWire | None = None
        self.load_scripts()

    # --------------------------------------------------------------------------------------------- connection
    def errors(self) -> _Unavailable:
        return _Unavailable(self)

    def load_scripts(self) -> None:
        with self.errors():  # on a cluster, redis-py loads them on every primary
            self.commit_sha = self.redis.script_load(COMMIT)
            self.lease_sha = self.redis.script_load(LEASE)

    def now_ms(self) -> int:
        """Redis's clock, sampled every few seconds and advanced by the local monotonic clock meanwhile."""
        mono = time.monotonic()
        if mono - self._sampled > CLOCK_RESAMPLE_S:
            with self.errors():
                seconds, micros = self.redis.time()
            after = time.monotonic()
            self._offset_ms = seconds * 1000 + micros / 1000 - (mono + after) * 500
            self._sampled = mono = after
        return int(mono * 1000 + self._offset_ms)

    # ------------------------------------------------------------------------------------------ transactions
    def transaction(self, *, readonly: bool = False) -> _Atomic:
        return _Atomic(self)

    def batch(self, *, deferred: bool = False) -> _BatchScope:
        """`with store.batch() as batch:` the transactions this thread runs inside commit together at the end, in
        one round trip (see _Batch): the server runs each batch of calls this way. Unlike SQLite's, a transaction of
        the batch may fail at the end on its own (`batch.failed`), and is then run again by itself.

        `deferred`: nothing is sent at the end; the caller sends it (`batch.send()`, from the running event loop)
        and settles it (see _Batch)."""
        return _BatchScope(self, turn=self.hot_slots(), deferred=deferred)

    def wire(self) -> _Wire | _ClusterWire | None:
        """This process's connection for deferred batches on the running event loop (a cluster's: one per primary),
        opened on first use (None: no running loop, or a connection it does not speak; those batches are sent by
        redis-py, waited for)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop here: nothing to drive a connection
            return None
        wire = self._wire
        if wire is not None and not wire.closed and wire.loop is loop and wire.pid == os.getpid():
            return wire
        if self.cluster:
            fresh: _Wire | _ClusterWire = _ClusterWire(loop, self.redis)
        else:
            pool = getattr(self.redis, "connection_pool", None)
            options = _wire_options(pool) if pool is not None else None
            if options is None:
                return None
            fresh = _Wire(loop, options)
        if wire is not None:  # (another event loop's, or a closed one)
            wire.close()
        self._wire = fresh
        return fresh

    def close(self) -> None:
        if self._wire is not None and self._wire.pid == os.getpid():
            self._wire.close()
        self.redis.close()

    # -------------------------------------------------------------------------------------------- global keys
    def remember_pointer(self, pointer: str, value: str) -> None:
        if len(self.pointers) > CACHE_LIMIT:
            self.pointers.clear()
        self.pointers[pointer] = value

    def set_pointers(self, pointers: dict[str, str]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for pointer, value in pointers.items():
            pipe.set(pointer, value)
        pipe.execute()
        for pointer, value in pointers.items():
            self.remember_pointer(pointer, value)

    def forget_pointers(self, pointers: dict[str, str]) -> None:
        """A transaction that set them did not commit: drop them (best effort; a pointer to nothing is harmless)."""
        for pointer in pointers:
            self.pointers.pop(pointer, None)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for pointer in pointers:
                pipe.delete(pointer)
            pipe.execute()
        except redis.exceptions.RedisError:
            pass

    def index_tenants(self, tenants: set[str]) -> None:
        new = tenants - self._indexed
        if new:
            self.redis.zadd(TENANTS, {t: 0 for t in new})
            self._indexed |= new

    def ping(self) -> None:
        with self.errors():
            self.redis.ping()

    # -------------------------------------------------------------------------------------------------- lease
    def hold_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take or extend the lease `name` for `owner`; True while this owner holds it."""
        with self.errors():
            try:
                return bool(self.redis.evalsha(self.lease_sha, 1, "cycles:lease:" + name, owner, ttl_ms))
            except redis.exceptions.NoScriptError:  # Redis restarted (its script cache is not persisted)
                self.load_scripts()
                return bool(self.redis.evalsha(self.lease_sha, 1, "cycles:lease:" + name, owner, ttl_ms))

    def take_turn(self, slots: list[str], timeout: float = 2.0) -> Callable[[], None]:
        """Hold the turn of these slots: while it is held, other stores' commits there fail at once (and wait for
        their turn in their own retries). `retrying` takes it after a second conflict in a row, and a batch takes
        it up front in slots contended lately (`hot_slots`), so that processes busy on the same records take turns
        instead of failing each other; returns the function that gives it back."""
        keys = sorted(slot + ":turn" for slot in slots)
        deadline = time.monotonic() + timeout
        taken: list[str] = []
        with self.errors():
            while True:  # all of them at once, in one round trip, or none (no holding one while waiting for another)
                pipe = self.redis.pipeline(transaction=False)
                for key in keys:
                    pipe.set(key, self.owner, nx=True, px=TURN_MS, get=True)  # the holder, or None: now ours
                holders = pipe.execute()
                taken = [k for k, holder in zip(keys, holders, strict=True) if holder is None]  # (ours already: kept)
                if all(holder in (None, self.owner) for holder in holders) or time.monotonic() > deadline:
                    break  # past the deadline, go on without it: the commit's own check still holds
                self._give_back(taken)
                time.sleep(random.uniform(0.0005, 0.002))

        def give_back() -> None:
            self._give_back(taken)

        return give_back

    def _give_back(self, keys: list[str]) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.execute_command("EVAL", UNLEASE, 1, key, self.owner)
            pipe.execute()
        except redis.exceptions.RedisError:
            pass  # it lapses by itself

    def hot_slots(self) -> list[str]:
        """Slots where this store met another's changes lately: its next batches take their turn up front."""
        now = time.monotonic()
        return [slot for slot, until in self.hot.items() if until > now]

    def drop_lease(self, name: str, owner: str) -> None:
        with self.errors():
            self.redis.eval(UNLEASE, 1, "cycles:lease:" + name, owner)


class _Unavailable:
    """Redis unreachable or too slow: StoreUnavailable (503), and forget what may have changed meanwhile."""

    __slots__ = ("_store",)

    def __init__(self, store: RedisStore) -> None:
        self._store = store

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and isinstance(exc, RedisConnectionError | RedisTimeoutError):
            self._store.cache.clear()
            self._store._indexed.clear()
            raise StoreUnavailable(f"the Redis store is unavailable: {type(exc).__name__}: {exc}") from exc
        if exc is not None and isinstance(exc, redis.exceptions.TryAgainError | redis.exceptions.ClusterDownError):
            raise StoreUnavailable(f"the Redis store is not ready: {exc}") from exc


class _Atomic:
    __slots__ = ("_store", "_tx")

    def __init__(self, store: RedisStore) -> None:
        self._store = store

    def __enter__(self) -> RedisTransaction:
        self._tx = RedisTransaction(self._store)
        return self._tx

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self._tx._commit(check_only=False)
        elif issubclass(exc_type, CyclesError) and not isinstance(exc, StoreUnavailable):
            self._tx._commit(check_only=True)  # a refusal resting on a stale record is no refusal: run again


class _BatchScope:
    __slots__ = ("_store", "_batch", "_turn", "_give_back", "_deferred")

    def __init__(self, store: RedisStore, turn: list[str] | None = None, deferred: bool = False) -> None:
        self._store = store
        self._turn = turn
        self._give_back: Callable[[], None] | None = None
        self._deferred = deferred

    def __enter__(self) -> _Batch:
        if self._store.open_batch is not None:
            raise RuntimeError("batches do not nest")
        if self._turn:
            self._give_back = self._store.take_turn(self._turn)
        self._batch = self._store.open_batch = _Batch(self._store)
        return self._batch

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._store.open_batch = None
        if exc_type is None and self._deferred:  # the caller sends it; its turn is held until it is settled
            self._batch.give_back = self._give_back
            return
        try:
            if exc_type is None:
                self._batch.flush()
        finally:
            if self._give_back is not None:
                self._give_back()


def _wire_options(pool: Any) -> dict[str, Any] | None:
    """How `_Wire` connects where redis-py's pool does: TCP, a Unix socket, or TLS (rediss://) with the SSL context
    redis-py itself would build from the same settings; None for what it does not do (OCSP checks, a custom
    connection class): those batches go through redis-py."""
    options = dict(pool.connection_kwargs)
    kind = pool.connection_class
    if kind in (redis.Connection, redis.UnixDomainSocketConnection):
        return options
    if kind is not redis.SSLConnection or options.get("ssl_validate_ocsp") or options.get("ssl_validate_ocsp_stapled"):
        return None
    try:
        options["ssl"] = kind(**pool.connection_kwargs)._build_ssl_context()
    except AttributeError:  # a redis-py without it: its own connections only
        return None
    return options


class _Wire(asyncio.Protocol):
    """A connection (TCP, Unix socket or TLS) to a standalone Redis, driven by the event loop: `send` writes a
    batch's commands and returns at once, a future of their replies; the loop reads them as they come. The server's
    batches go this way, so that its event loop goes on serving requests (and runs the next batch) during a batch's
    round trip instead of waiting, blocked, in redis-py. It speaks only what batches send (RESP2: simple, error,
    integer and bulk replies), answers in order, and fails everything on its way when the connection drops or a
    reply is late (redis-py's socket timeout, as the URL sets it): StoreUnavailable, as redis-py's errors are.

    Why not redis.asyncio: measured on batches of 16 EVALSHA (client CPU per command, same Redis), this connection
    6.2 µs, redis-py's blocking pipeline 14.0 µs, redis.asyncio's pipeline 26.6 µs (without hiredis); at two
    operations per reserve+commit pair that difference alone is a tenth of what a server spends per pair."""

    TIMEOUT_S = 5.0

    def __init__(self, loop: asyncio.AbstractEventLoop, options: dict[str, Any]) -> None:
        self.loop = loop
        self.pid = os.getpid()
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self.unsent: list[bytes] = []  # written before the connection is made
        self.buffer = b""
        self.waiting: deque[tuple[int, list[Any], asyncio.Future[list[Any]]]] = deque()  # (replies due, got, future)
        self.timer: asyncio.TimerHandle | None = None
        self.timeout = options.get("socket_timeout") or self.TIMEOUT_S  # redis-py's, as the store's URL set it
        hello: list[tuple[Any, ...]] = []
        if options.get("password"):
            hello.append(("AUTH", *([options["username"]] if options.get("username") else []), options["password"]))
        if options.get("db"):
            hello.append(("SELECT", options["db"]))
        if hello:
            self.send(hello).add_done_callback(self._greeted)
        self.connecting = loop.create_task(self._connect(options))

    async def _connect(self, options: dict[str, Any]) -> None:
        try:
            connect = (
                self.loop.create_unix_connection(lambda: self, options["path"])
                if options.get("path")
                else self.loop.create_connection(
                    lambda: self,
                    options.get("host", "localhost"),
                    options.get("port", 6379),
                    **({"ssl": options["ssl"], "server_hostname": options.get("host")} if "ssl" in options else {}),
                )
            )
            await asyncio.wait_for(connect, options.get("socket_connect_timeout") or self.TIMEOUT_S)
        except (TimeoutError, OSError) as exc:
            self._fail(RedisConnectionError(f"cannot connect to Redis: {exc}"))

    def _greeted(self, replies: asyncio.Future[list[Any]]) -> None:
        if not replies.cancelled() and replies.exception() is None:
            failed = next((r for r in replies.result() if isinstance(r, Exception)), None)
            if failed is not None:
                self._fail(RedisConnectionError(f"Redis refused the connection: {failed}"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.unsent:
            self.transport.write(b"".join(self.unsent))  # type: ignore[union-attr]
            self.unsent = []

    def send(self, commands: Sequence[tuple[Any, ...]], first: int = 0) -> asyncio.Future[list[Any]]:
        """Write `commands`, a future of their replies. (`first`: the commands to be answered before the rest run;
        on one connection Redis runs them in order anyway.)"""
        if self.closed:
            raise RedisConnectionError("the connection to Redis was closed")
        parts = []
        for command in commands:
            parts.append(b"*%d\r\n" % len(command))
            for arg in command:
                data = arg if isinstance(arg, bytes) else (arg if isinstance(arg, str) else str(arg)).encode()
                parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        replies: asyncio.Future[list[Any]] = self.loop.create_future()
        self.waiting.append((len(commands), [], replies))
        if self.transport is not None:
            self.transport.write(b"".join(parts))
        else:
            self.unsent += parts
        if self.timer is None:
            self.timer = self.loop.call_later(self.timeout, self._late, replies)
        return replies

    def _late(self, replies: asyncio.Future[list[Any]]) -> None:
        self.timer = None
        if self.waiting and self.waiting[0][2] is replies:  # the same round trip is still not answered
            self._fail(RedisTimeoutError(f"Redis did not answer within {self.timeout:g} s"))
        elif self.waiting:
            self.timer = self.loop.call_later(self.timeout, self._late, self.waiting[0][2])

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        at = 0
        waiting = self.waiting
        while waiting:
            due, got, replies = waiting[0]
            while len(got) < due:
                found = _reply(buffer, at)
                if found is None:
                    self.buffer = buffer[at:]
                    return
                reply, at = found
                got.append(reply)
            waiting.popleft()
            if not replies.done():
                replies.set_result(got)
            if self.timer is not None:
                self.timer.cancel()
                self.timer = self.loop.call_later(self.timeout, self._late, waiting[0][2]) if waiting else None
        self.buffer = buffer[at:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"the connection to Redis was lost: {exc or 'closed'}"))

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.waiting:
            replies = self.waiting.popleft()[2]
            if not replies.done():
                replies.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self.closed = True
        if self.loop.is_closed():  # nothing to close it on any more: its socket goes with the transport
            return
        if self.transport is not None:
            self.transport.close()
        elif not self.connecting.done():
            self.connecting.cancel()


_REDIRECTS = ("MOVED", "ASK", "TRYAGAIN")  # a cluster's answers to a command that ran nowhere: it may run elsewhere


class _ClusterWire:
    """A Redis Cluster's connections driven by the event loop: a `_Wire` to each primary, each command written to
    the one that owns its key's slot as redis-py last mapped the cluster. `send(commands, first)`: the first `first`
    commands (write-once pointers, the tenant index) are answered before the rest (the commit scripts) are written,
    as on one connection. A command the cluster redirects (MOVED or ASK: its slot is moving; TRYAGAIN) ran nowhere:
    it is sent again through redis-py, which follows the cluster, waited for (rare: a resharding). A connection
    lost makes the next batch map the cluster again first."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Any) -> None:
        self.loop = loop
        self.pid = os.getpid()
        self.client = client
        self.wires: dict[str, _Wire] = {}
        self.closed = False
        self.tail: asyncio.Future[None] = loop.create_future()  # the last batch's scripts are written
        self.tail.set_result(None)

    def _wire_for(self, command: tuple[Any, ...]) -> _Wire:
        key = command[3] if command[0] == "EVALSHA" else command[1]  # (EVALSHA sha numkeys key ...)
        node = self.client.get_node_from_key(key)
        wire = self.wires.get(node.name)
        if wire is None or wire.closed:
            if any(w.closed for w in self.wires.values()):  # a node went away: the map may be stale
                self.client.nodes_manager.initialize()
                node = self.client.get_node_from_key(key)
                self.wires = {name: w for name, w in self.wires.items() if not w.closed}
            pool = getattr(node.redis_connection, "connection_pool", None)
            options = _wire_options(pool) if pool is not None else None
            if options is None:
                raise RedisConnectionError(f"no connection to the cluster node {node.name}")
            wire = self.wires[node.name] = _Wire(self.loop, options)
        return wire

    def send(self, commands: Sequence[tuple[Any, ...]], first: int = 0) -> asyncio.Future[list[Any]]:
        answers: asyncio.Future[list[Any]] = self.loop.create_future()
        replies: list[Any] = [None] * len(commands)
        # a batch's scripts are written after the previous batch's (each node's connection keeps that order), as on
        # one connection: a batch reads what the one before it wrote, so it must run after it
        prior = self.tail
        self.tail = written = self.loop.create_future()

        def failed(exc: BaseException) -> None:
            if not written.done():
                written.set_result(None)
            if not answers.done():
                answers.set_exception(exc)

        def scripts(_prior: Any = None) -> None:
            if not prior.done():
                prior.add_done_callback(scripts)
                return
            try:
                self._write(commands, range(first, len(commands)), replies, answers, finish, failed)
            finally:
                if not written.done():
                    written.set_result(None)

        def finish() -> None:
            answers.set_result(replies)

        if first:
            self._write(commands, range(first), replies, answers, scripts, failed)
        else:
            scripts()
        return answers

    def _write(
        self,
        commands: Sequence[tuple[Any, ...]],
        at: range,
        replies: list[Any],
        answers: asyncio.Future[list[Any]],
        then: Callable[[], None],
        failed: Callable[[BaseException], None],
    ) -> None:
        """Write commands `at` to their nodes; once every reply is in (redirected ones followed), `then()`, unless
        the batch failed meanwhile."""
        try:
            by_wire: dict[_Wire, list[int]] = {}
            for i in at:
                by_wire.setdefault(self._wire_for(commands[i]), []).append(i)
            sent = [(wire.send([commands[i] for i in indexes]), indexes) for wire, indexes in by_wire.items()]
        except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the replies
            failed(exc)
            return
        left = [len(sent)]

        def landed(got: asyncio.Future[list[Any]], indexes: list[int]) -> None:
            if answers.done():  # failed already (another node's connection)
                return
            try:
                for i, reply in zip(indexes, got.result(), strict=True):
                    replies[i] = reply
                left[0] -= 1
                if left[0] == 0:
                    self._follow(commands, replies, at)
                    then()
            except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the replies
                failed(exc)

        for got, indexes in sent:
            got.add_done_callback(functools.partial(landed, indexes=indexes))

    def _follow(self, commands: Sequence[tuple[Any, ...]], replies: list[Any], phase: range) -> None:
        for i in phase:
            reply = replies[i]
            if isinstance(reply, redis.exceptions.ResponseError) and str(reply).startswith(_REDIRECTS):
                try:
                    replies[i] = self.client.execute_command(*commands[i])
                except redis.exceptions.ResponseError as exc:  # the command's own error, as from the node
                    replies[i] = exc

    def close(self) -> None:
        self.closed = True
        for wire in self.wires.values():
            wire.close()


_ERRORS: dict[str, type[Exception]] = {}  # error replies redis-py has a class of its own for, told apart here
if redis is not None:
    _ERRORS.update(
        NOSCRIPT=redis.exceptions.NoScriptError,
        TRYAGAIN=redis.exceptions.TryAgainError,
        CLUSTERDOWN=redis.exceptions.ClusterDownError,
    )


def _reply(buffer: bytes, at: int) -> tuple[Any, int] | None:
    """One RESP2 reply at `at` and where the next begins; None if it has not all arrived. A bulk string stays bytes
    (JSON, parsed by its reader), an error reply becomes redis-py's exception for it."""
    end = buffer.find(b"\r\n", at)
    if end < 0:
        return None
    kind, line = buffer[at], buffer[at + 1 : end]
    if kind == 36:  # $ bulk string
        size = int(line)
        if size < 0:
            return None, end + 2
        if len(buffer) < end + 4 + size:
            return None
        return buffer[end + 2 : end + 2 + size], end + 4 + size
    if kind == 43:  # + simple string
        return line.decode(), end + 2
    if kind == 58:  # : integer
        return int(line), end + 2
    if kind == 45:  # - error
        message = line.decode()
        return _ERRORS.get(message.split(" ", 1)[0], redis.exceptions.ResponseError)(message), end + 2
    if kind == 42:  # * array
        items, at = [], end + 2
        for _ in range(int(line)):
            found = _reply(buffer, at)
            if found is None:
                return None
            item, at = found
            items.append(item)
        return items, at
    raise RedisConnectionError(f"unexpected reply from Redis: {bytes(buffer[at : at + 40])!r}")


def open_redis(url: str) -> RedisStore:
    """`redis://host:port/0` (also rediss:// and unix://); `redis+cluster://host:port` for a Redis Cluster."""
    if redis is None:
        raise InvalidRequest("the redis store needs redis-py: pip install 'cycles[redis]'")
    options = {"decode_responses": True, "socket_timeout": 5.0, "socket_connect_timeout": 5.0}
    if url.startswith("redis+cluster://"):
        from redis.cluster import RedisCluster

        client = RedisCluster.from_url("redis://" + url[len("redis+cluster://") :], **options)
    else:
        client = redis.Redis.from_url(url, health_check_interval=30, **options)
    return RedisStore(client, url)
