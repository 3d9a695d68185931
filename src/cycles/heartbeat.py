"""Keep long calls' reservations alive (PROTOCOL.md section 4, "Heartbeat").

One daemon thread per client holds a heap of due times, so watching a reservation costs a heap push, not a thread.
Most calls end long before their first extension is due (49 s into a default 60 s hold), so a watch whose first beat
is at least LAZY_MS away is only queued, without taking the lock; the thread, which looks at the queue at least every
TICK_S while calls come in, moves the reservations still running onto its heap. Forgetting one drops it from a dict
and lets go of the reservation at once: a queued watch holding it until the next tick would keep every settled call's
objects alive for a second, through the garbage collector's older generations (measured: a tenth of a guarded call's
CPU time went to collections).

From each successful reserve or extend: lead_floor = max(0, remaining_ttl - rtt); attempt_budget = max(timeout,
1000, 2 max_rtt); safety = max(1000, 2 max_rtt); the next extend is due after max(0, lead_floor - (2 attempt_budget
+ safety)). Transient failures retry with the same idempotency key while the window lasts; terminal answers stop.
Failures are reported (log warning, client.stats.heartbeat_failures), never swallowed, and the call goes on.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from .errors import CyclesError, LimitExceeded
from .models import ReservationExtendRequest

if TYPE_CHECKING:
    from .client import Client
    from .guard import Reservation

log = logging.getLogger("cycles")

TICK_S = 1.0  # while calls come in, the thread takes in queued watches at least this often
LAZY_MS = 10_000.0  # a first beat due at least this far ahead is queued, not pushed (far more than a tick)


def next_delay_ms(remaining_ttl_ms: int, rtt_ms: float, max_rtt_ms: float, timeout_ms: float) -> float:
    lead_floor = max(0.0, remaining_ttl_ms - rtt_ms)
    attempt_budget = max(timeout_ms, 1000.0, 2 * max_rtt_ms)
    safety = max(1000.0, 2 * max_rtt_ms)
    return max(0.0, lead_floor - (2 * attempt_budget + safety))


class _Watch:
    __slots__ = ("reservation", "extend_by_ms", "key", "max_rtt_ms", "zero_delays", "deadline", "lead_floor_ms")

    def __init__(self, reservation: Reservation, extend_by_ms: int) -> None:
        self.reservation: Reservation | None = reservation  # None once forgotten
        self.extend_by_ms = extend_by_ms
        self.key = ""
        self.max_rtt_ms = 0.0
        self.zero_delays = 0
        self.deadline = 0.0  # monotonic seconds by which the current hold lapses (lead floor)
        self.lead_floor_ms = 0.0


class Heartbeat:
    def __init__(self, client: Client) -> None:
        self.client = client
        self._heap: list[tuple[float, int, _Watch]] = []
        self._watches: dict[int, _Watch] = {}  # the reservations kept alive (dict operations need no lock)
        self._queued: deque[tuple[float, _Watch]] = deque()  # watched without the lock, not yet on the heap
        self._seq = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._ticking = False  # the thread will look at the queue within a tick
        self._closed = False

    @property
    def timeout_ms(self) -> float:
        return self.client.timeout * 1000

    def watch(self, reservation: Reservation, remaining_ttl_ms: int, rtt_s: float) -> None:
        if remaining_ttl_ms <= 0 or self._closed:  # nothing left to keep alive (e.g. a replayed settled reserve)
            return
        w = _Watch(reservation, max(1000, reservation.ttl_ms or remaining_ttl_ms))
        self._watches[id(reservation)] = w
        self._schedule(w, remaining_ttl_ms, rtt_s * 1000)

    def forget(self, reservation: Reservation | None) -> None:
        w = self._watches.pop(id(reservation), None)  # its queue or heap entry is dropped when the thread meets it
        if w is not None:
            w.reservation = None  # no longer reachable from that entry (see the module docstring)

    def _schedule(self, w: _Watch, remaining_ttl_ms: int, rtt_ms: float) -> None:
        w.max_rtt_ms = max(w.max_rtt_ms, rtt_ms)
        delay = next_delay_ms(remaining_ttl_ms, rtt_ms, w.max_rtt_ms, self.timeout_ms)
        w.zero_delays = w.zero_delays + 1 if delay == 0 else 0
        if w.zero_delays >= 2:  # the TTL is too short to keep alive safely: stop, as the protocol says
            self.forget(w.reservation)
            return
        now = time.monotonic()
        w.lead_floor_ms = max(0.0, remaining_ttl_ms - rtt_ms)
        w.deadline = now + w.lead_floor_ms / 1000
        w.key = ""  # the next extension gets a new key when it is sent (its retries reuse it)
        if delay < LAZY_MS:
            self._push(now + delay / 1000, w)
            return
        self._queued.append((now + delay / 1000, w))
        if not self._ticking:  # read after the append: _next_due lowers the flag before it looks at the queue
            with self._cond:
                self._wake()

    def _push(self, due: float, w: _Watch) -> None:
        with self._cond:
            if self._closed or self._watches.get(id(w.reservation)) is not w:
                return
            heapq.heappush(self._heap, (due, next(self._seq), w))
            if self._thread is None or self._heap[0][2] is w:
                self._wake()

    def _wake(self) -> None:  # with the lock held
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._loop, name="cycles-heartbeat", daemon=True)
            self._thread.start()
        self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._watches.clear()
            self._queued.clear()
            self._cond.notify()

    def _take_queued(self) -> int:
        """Move the queued watches still running onto the heap (with the lock held); how many were queued."""
        watches, taken = self._watches, len(self._queued)
        for _ in range(taken):
            due, w = self._queued.popleft()
            if watches.get(id(w.reservation)) is w:
                heapq.heappush(self._heap, (due, next(self._seq), w))
        if len(self._heap) > 1024 + 2 * len(watches):  # drop entries of settled reservations
            self._heap = [e for e in self._heap if watches.get(id(e[2].reservation)) is e[2]]
            heapq.heapify(self._heap)
        return taken

    def _next_due(self) -> _Watch | None:
        """Wait (with the lock held) for the next beat due; None once closed."""
        while not self._closed:
            taken = self._take_queued()
            if not self._watches:  # whatever is left on the heap belongs to settled reservations
                self._heap.clear()
            if self._heap:
                wait = self._heap[0][0] - time.monotonic()
                if wait <= 0:
                    w = heapq.heappop(self._heap)[2]
                    if self._watches.get(id(w.reservation)) is w:
                        return w
                    continue
                self._ticking = True
                self._cond.wait(min(wait, TICK_S))
            elif taken:  # calls are coming in: look at the queue again in a tick
                self._ticking = True
                self._cond.wait(TICK_S)
            else:  # idle: lower the flag, then look once more, so a watch queued meanwhile wakes us (_schedule)
                self._ticking = False
                if not self._queued:
                    self._cond.wait()
        return None

    def _loop(self) -> None:
        while True:
            with self._cond:
                w = self._next_due()
            if w is None:
                return
            try:
                self._beat(w)
            except Exception:  # never let one reservation stop the keep-alive of all the others
                r = w.reservation
                log.exception("cycles heartbeat: unexpected failure for reservation %s", getattr(r, "id", None))
                self.forget(r)

    def _beat(self, w: _Watch) -> None:
        r = w.reservation
        if r is None:  # forgotten meanwhile
            return
        if r.status != "ACTIVE" or r.id is None:
            self.forget(r)
            return
        if not w.key:
            w.key = f"{r.key}:hb:{os.urandom(6).hex()}"
        began = time.monotonic()
        try:
            response = self.client.transport.extend(
                r.id, ReservationExtendRequest(idempotency_key=w.key, extend_by_ms=w.extend_by_ms)
            )
        except CyclesError as exc:
            self._failed(w, r, exc, began)
            return
        r.expires_at_ms = response.expires_at_ms
        self.client.stats.heartbeats += 1
        remaining = response.remaining_ttl_ms
        if remaining is None:
            remaining = 0
        self._schedule(w, remaining, (time.monotonic() - began) * 1000)

    def _failed(self, w: _Watch, r: Reservation, exc: CyclesError, began: float) -> None:
        self.client.stats.heartbeat_failures += 1
        transient = exc.status == 0 or exc.status == 429 or exc.status >= 500
        log.warning("cycles heartbeat: extending reservation %s failed (%s: %s)", r.id, exc.code, exc.message)
        if not transient:
            self.forget(r)  # expired, finalized, max extensions, closed tenant, not found: stop
            return
        attempt_budget = max(self.timeout_ms, 1000.0, 2 * w.max_rtt_ms)
        safety = max(1000.0, 2 * w.max_rtt_ms)
        window_ms = (w.deadline - time.monotonic()) * 1000 - attempt_budget - safety
        if window_ms < 0:
            self.forget(r)
            return
        wait_ms = min(30_000.0, w.lead_floor_ms / 4, window_ms)
        if isinstance(exc, LimitExceeded):
            retry_after = exc.details.get("retry_after_ms")
            if isinstance(retry_after, int) and retry_after <= window_ms:
                wait_ms = max(wait_ms, float(retry_after))
        self._push(time.monotonic() + wait_ms / 1000, w)  # same key: a retry, not a new extension
