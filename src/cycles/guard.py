"""Reserve -> run -> commit or release, on every path.

`Reservation` is one guarded call (a sync and async context manager); `guard` decorates functions, coroutines and
generators with it; `Run` is a budget envelope for a whole agent run. Lifecycle (DESIGN.md):

- success commits the actual (explicit, recorded, computed from the result, or the estimate);
- an exception, cancellation, KeyboardInterrupt or an early-closed generator releases the hold, or commits the
  usage recorded so far; then the exception propagates;
- commit failures that may be transient retry with the same idempotency key; a commit answered 410 (the hold
  expired) is settled as a direct-debit event with that key, so known spend is never lost;
- a long call is kept alive by the heartbeat (heartbeat.py);
- nested guards never double-count: a guard entered inside another guard (or a run budget) of the same client
  and unit does not reserve again. It draws its estimate from the enclosing hold, in process, and reports its actual
  back; the outer commits the sum of its inner calls' actuals unless given an actual of its own.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from . import context, telemetry
from .amounts import format_amount
from .errors import (
    BudgetExceeded,
    CyclesError,
    InternalError,
    LimitExceeded,
    ReservationExpired,
    StoreBusy,
    ToolNotAllowed,
    TransportError,
)
from .ids import new_key
from .journal import TERMINAL_CODES, Journal
from .models import (
    Action,
    Amount,
    Caps,
    CommitRequest,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    StandardMetrics,
    Subject,
    parse,
)

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("cycles")
F = TypeVar("F", bound=Callable[..., Any])

EstimateArg = Amount | Callable[..., Amount]
ActionArg = Action | tuple[str, str] | dict[str, Any] | str | None

# Guards the in-process accounts of envelopes (a reservation inner calls draw from): one lock for all, held for a few
# additions, rather than one built for every guarded call.
_envelope_lock = threading.Lock()

RESERVE_ATTEMPTS = 3
COMMIT_ATTEMPTS = 5
COMMIT_BACKOFF_S = 0.05


def _transient(exc: BaseException) -> bool:
    """Worth retrying with the same key: unreachable, throttled, locked, or a server fault."""
    return isinstance(exc, TransportError | LimitExceeded | StoreBusy | InternalError) or (
        isinstance(exc, CyclesError) and exc.status >= 500
    )


# Validated subjects by their fields: a process sends the same few subjects again and again, and validating one (six
# patterns) costs more than the rest of a reserve request. Only subjects that passed validation are kept, and they are
# never mutated, so requests can share them.
MAX_SUBJECTS = 1024
_subjects: dict[tuple[Any, ...], Subject] = {}


def _cached_subject(subject: dict[str, Any]) -> tuple[tuple[Any, ...] | None, Subject | None]:
    """The subject's cache key (None when it cannot have one) and its validated Subject if already known."""
    if "dimensions" in subject:  # a dict: not hashable, and dimensions vary (a run's id)
        return None, None
    key = tuple(subject.items())
    try:
        return key, _subjects.get(key)
    except TypeError:  # an unhashable value: validation will say what is wrong with it
        return None, None


def as_action(action: ActionArg, default_name: str = "call") -> Action:
    if action is None:
        return Action(kind="call", name=default_name)
    if isinstance(action, Action):
        return action
    if isinstance(action, tuple):
        return Action(kind=action[0], name=action[1])
    if isinstance(action, str):
        kind, _, name = action.partition(":")
        return Action(kind=kind, name=name or kind)
    return Action.model_validate(action)


def as_amount(value: Any, what: str) -> Amount:
    if isinstance(value, Amount):
        return value
    if isinstance(value, dict):
        return parse(Amount, value)
    raise TypeError(
        f"{what} must be an Amount such as cycles.usd(0.05) or cycles.tokens(4000), not {type(value).__name__}"
    )


class Envelope(Protocol):
    """A hold that inner guarded calls draw from in process (an outer reservation, a run budget)."""

    client: Client
    unit: str
    active: bool
    decision: str | None
    caps: Caps | None

    def draw(self, amount: int, child: Reservation) -> None: ...
    def settle(self, held: int, used: int) -> None: ...


class Reservation:
    """One guarded call. Reserve on enter; commit or release on exit.

    Inside the block: `caps` (ALLOW_WITH_CAPS limits to apply), `record(amount)` (usage so far, committed even if the
    call then fails), `commit(actual)` / `release()` to settle early, `extend(ms)`.
    """

    # Defaults at class level: one is built per guarded call, so the constructor sets only what varies.
    status = "PENDING"  # ACTIVE | NESTED | SHADOW | UNGUARDED | COMMITTED | RELEASED
    id: str | None = None
    decision: str | None = None
    reason_code: str | None = None
    caps: Caps | None = None
    expires_at_ms: int | None = None
    estimate: Amount | None = None
    charged: Amount | None = None
    metrics: StandardMetrics | None = None
    commit_metadata: dict[str, Any] | None = None
    scope_path: str | None = None
    # the cycles.calls.ModelCall this guards, if any (its model and usage go on spans), held weakly: the call holds
    # this reservation, and a cycle between them would leave every finished call to the garbage collector
    _model_call: weakref.ref[Any] | None = None
    _recorded: int | None = None
    _parent: Envelope | None = None
    _run: Run | None = None
    _drawn = 0  # estimates of inner calls in flight
    _inner_used = 0  # actuals of inner calls that finished
    _inner_calls = 0
    _token: Any = None

    def __init__(
        self,
        client: Client,
        estimate: EstimateArg,
        *,
        action: ActionArg = None,
        subject: dict[str, Any] | None = None,
        actual: Amount | Callable[[], Amount] | None = None,
        ttl_ms: int | None = None,
        grace_period_ms: int | None = None,
        overage_policy: str | None = None,
        dry_run: bool | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        self.client = client
        self._estimate_arg = estimate
        self.action = action if isinstance(action, Action) else as_action(action)
        self._subject = subject or {}
        self._actual_arg = actual
        self.ttl_ms = ttl_ms
        self.grace_period_ms = grace_period_ms
        self.overage_policy = overage_policy
        self.dry_run = client.shadow if dry_run is None else dry_run
        self.metadata = metadata
        self.key = idempotency_key or ""  # made when the reserve is sent (a call drawn in process sends nothing)
        self.subject: dict[str, Any] = {}

    # -------------------------------------------------------------------------------------------------- state
    @property
    def model_call(self) -> Any:
        """The `cycles.calls.ModelCall` this reservation guards, if any."""
        ref = self._model_call
        return ref() if ref is not None else None

    @model_call.setter
    def model_call(self, call: Any) -> None:
        self._model_call = weakref.ref(call) if call is not None else None

    @property
    def unit(self) -> str:
        assert self.estimate is not None
        return self.estimate.unit

    @property
    def active(self) -> bool:
        return self.status in ("ACTIVE", "NESTED")

    def record(self, actual: Amount | int) -> None:
        """Usage so far (replaces the previous figure): committed at exit, even if the call then fails."""
        self._recorded = actual if isinstance(actual, int) else self._same_unit(actual).amount

    def allows_tool(self, name: str) -> bool:
        """False when ALLOW_WITH_CAPS caps deny this tool."""
        return self.caps is None or self.caps.allows_tool(name)

    def __repr__(self) -> str:
        est = format_amount(self.estimate.unit, self.estimate.amount) if self.estimate else "?"
        return f"<Reservation {self.id or '-'} {self.status} {self.action.kind}:{self.action.name} est={est}>"

    def _same_unit(self, amount: Amount) -> Amount:
        if self.estimate is not None and amount.unit != self.estimate.unit:
            raise TypeError(f"actual is in {amount.unit}, the reservation in {self.estimate.unit}")
        return amount

    # --------------------------------------------------------------------------------------------- envelope
    def draw(self, amount: int, child: Reservation) -> None:
        assert self.estimate is not None
        with _envelope_lock:
            available = self.estimate.amount - self._drawn - self._inner_used
            if amount > available:
                unit = self.estimate.unit
                raise BudgetExceeded(
                    f"BUDGET_EXCEEDED in enclosing {self.action.kind}:{self.action.name}: requested "
                    f"{format_amount(unit, amount)}, remaining {format_amount(unit, available)}",
                    details={"scope": self._scope_label(), "unit": unit, "requested": amount, "remaining": available},
                )
            self._drawn += amount

    def settle(self, held: int, used: int) -> None:
        with _envelope_lock:
            self._drawn -= held
            self._inner_used += used
            self._inner_calls += 1

    def _scope_label(self) -> str:
        return f"reservation:{self.id}" if self.id else f"{self.action.kind}:{self.action.name}"

    # ------------------------------------------------------------------------------------------------- enter
    def _prepare(
        self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> ReservationCreateRequest | None:
        """Resolve the estimate; draw from an enclosing envelope (returns None) or build the reserve request."""
        est = self._estimate_arg
        if not isinstance(est, Amount):
            est = as_amount(est(*args, **(kwargs or {})) if callable(est) else est, "estimate")
        estimate = self.estimate = est
        self._run = context.run.get()
        parent: Envelope | None = context.reservation.get()
        if (
            parent is not None
            and parent.client is self.client
            and parent.active
            and not self.dry_run
            and parent.unit == estimate.unit
        ):
            parent.draw(estimate.amount, self)
            self._parent, self.status = parent, "NESTED"
            self.decision, self.caps = parent.decision, parent.caps  # the enclosing hold's caps apply inside it
            self._check_tool_caps()
            return None
        if not self.key:
            self.key = new_key()
        self.subject = subject = self.client.subject(self._subject)
        key, validated = _cached_subject(subject)
        body: dict[str, Any] = {
            "idempotency_key": self.key,
            "subject": subject if validated is None else validated,
            "action": self.action,
            "estimate": self.estimate,
        }
        if self.dry_run:
            body["dry_run"] = True
        for name in ("ttl_ms", "grace_period_ms", "overage_policy", "metadata"):
            if (value := getattr(self, name)) is not None:
                body[name] = value
        request = parse(ReservationCreateRequest, body)
        if validated is None and key is not None:
            if len(_subjects) >= MAX_SUBJECTS:
                _subjects.clear()
            _subjects[key] = request.subject
        return request

    def _admitted(self, response: Any, rtt_s: float) -> None:
        self.decision = response.decision
        self.caps = response.caps
        if self.dry_run:
            self.status, self.reason_code = "SHADOW", response.reason_code
            if response.decision == "DENY":
                self.client.stats.shadow_denied += 1
                log.warning("cycles shadow mode: %s would be denied (%s)", self, response.reason_code)
            return
        self.status, self.id, self.expires_at_ms = "ACTIVE", response.reservation_id, response.expires_at_ms
        self.scope_path = response.scope_path
        if self.caps is not None:
            self._check_tool_caps()
        if response.remaining_ttl_ms:
            self.client.heartbeat.watch(self, response.remaining_ttl_ms, rtt_s)

    def _check_tool_caps(self) -> None:
        """ALLOW_WITH_CAPS applies to tools: a tool action the caps exclude is given back and refused."""
        caps = self.caps
        if caps is None or not self.action.kind.startswith("tool") or caps.allows_tool(self.action.name):
            return
        self.release(reason="tool not allowed by caps")
        raise ToolNotAllowed.for_tool(self.action.name, caps.tool_allowlist, caps.tool_denylist)

    def _unreachable(self, exc: CyclesError) -> None:
        """Fail closed (re-raise) unless the client is configured to fail open on an unreachable authority."""
        if not (self.client.fail_open and _transient(exc)):
            raise exc
        self.status = "UNGUARDED"
        self.client.stats.fail_open += 1
        log.warning("cycles: budget authority unreachable (%s); running %s unguarded (fail_open)", exc, self)

    def _enter_context(self) -> None:
        if self.status in ("ACTIVE", "NESTED"):
            self._token = context.reservation.set(self)

    def _exit_context(self) -> None:
        token = self._token
        if token is not None:
            self._token = None
            try:
                context.reservation.reset(token)
            except ValueError:  # exited in another context (e.g. a generator finalised elsewhere): nothing to undo
                pass

    @contextmanager
    def entered(self) -> Iterator[Reservation]:
        """This reservation is the current one (and the envelope of inner calls) only inside the block: guarded
        generators use it around each step, so nothing leaks to the consumer between yields."""
        self._enter_context()
        try:
            yield self
        finally:
            self._exit_context()

    def start(self, *args: Any, **kwargs: Any) -> Reservation:
        """Reserve and make this the current reservation (what `with` does on enter)."""
        self.begin(*args, **kwargs)
        self._enter_context()
        return self

    async def astart(self, *args: Any, **kwargs: Any) -> Reservation:
        await self.abegin(*args, **kwargs)
        self._enter_context()
        return self

    def begin(self, *args: Any, **kwargs: Any) -> Reservation:
        """Reserve (or draw from the enclosing envelope); the estimate callable gets these arguments.

        A transient failure (unreachable, throttled, 5xx) is retried with the same idempotency key, so a reserve
        whose answer was lost is not held twice; then the client fails closed, or open when configured."""
        request = self._prepare(args, kwargs)
        if request is None:
            return self
        span = telemetry.start("reserve")
        for attempt in range(RESERVE_ATTEMPTS):
            began = time.monotonic()
            try:
                response = self.client.transport.reserve(request)
            except CyclesError as exc:
                if _transient(exc) and attempt < RESERVE_ATTEMPTS - 1:
                    time.sleep(self._backoff(exc, attempt))
                    continue
                telemetry.end(span, self, exc)
                self._unreachable(exc)
                return self
            self._admitted(response, time.monotonic() - began)
            telemetry.end(span, self)
            return self
        return self

    async def abegin(self, *args: Any, **kwargs: Any) -> Reservation:
        request = self._prepare(args, kwargs)
        if request is None:
            return self
        span = telemetry.start("reserve")
        for attempt in range(RESERVE_ATTEMPTS):
            began = time.monotonic()
            try:
                response = await self.client.transport.areserve(request)
            except CyclesError as exc:
                if _transient(exc) and attempt < RESERVE_ATTEMPTS - 1:
                    await asyncio.sleep(self._backoff(exc, attempt))
                    continue
                telemetry.end(span, self, exc)
                self._unreachable(exc)
                return self
            self._admitted(response, time.monotonic() - began)
            telemetry.end(span, self)
            return self
        return self

    # -------------------------------------------------------------------------------------------------- exit
    def _outcome(self, failed: bool, result: Any = None) -> int | None:
        """What to commit at exit (None = release)."""
        if self._recorded is not None:
            return self._recorded
        if not failed and self._actual_arg is not None:
            actual = self._actual_arg
            if callable(actual):
                actual = actual(result) if _takes_argument(actual) else actual()
            return self._same_unit(as_amount(actual, "actual")).amount
        if self._inner_calls:
            return self._inner_used
        if failed:
            return None
        assert self.estimate is not None
        return self.estimate.amount

    def _finish_nested(self, used: int | None, charged: Amount | None = None) -> None:
        estimate = self.estimate
        assert self._parent is not None and estimate is not None
        self._parent.settle(estimate.amount, used or 0)
        if used is None:
            self.status = "RELEASED"
        else:
            self.status = "COMMITTED"
            if charged is None:
                charged = estimate if used == estimate.amount else Amount(unit=estimate.unit, amount=used)
            self.charged = charged
        self._report(used or 0)

    def _report(self, used: int) -> None:
        """Count this call's spend into the run it belongs to (once, by the guard that owns the spend)."""
        run = self._run
        if run is not None and (self._parent is None or self._parent is run.reservation):
            run.record(used, self.estimate.unit if self.estimate is not None else run.unit)

    def finish(self, exc: BaseException | None = None, result: Any = None) -> None:
        self._exit_context()
        if self.status not in ("ACTIVE", "NESTED"):
            return
        try:
            used = self._outcome(exc is not None, result)
        except BaseException:  # the actual could not be worked out: give the hold back, then let it propagate
            self.release(reason="actual could not be computed")
            raise
        if self.status == "NESTED":
            self._finish_nested(used)
        elif used is None:
            self.release(reason=f"call failed: {type(exc).__name__}" if exc else None)
        else:
            self.commit(used)

    async def afinish(self, exc: BaseException | None = None, result: Any = None) -> None:
        self._exit_context()
        if self.status not in ("ACTIVE", "NESTED"):
            return
        try:
            used = self._outcome(exc is not None, result)
        except BaseException:
            await self.arelease(reason="actual could not be computed")
            raise
        if self.status == "NESTED":
            self._finish_nested(used)
        elif used is None:
            await self.arelease(reason=f"call failed: {type(exc).__name__}" if exc else None)
        else:
            await self.acommit(used)

    def __enter__(self) -> Reservation:
        return self.start()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.finish(exc)

    async def __aenter__(self) -> Reservation:
        return await self.astart()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        await self.afinish(exc)

    # ------------------------------------------------------------------------------------------------ settle
    def _commit_request(
        self, actual: Amount | int | None, metrics: Any, metadata: dict[str, Any] | None
    ) -> CommitRequest:
        estimate = self.estimate
        assert estimate is not None
        if actual is None:
            actual = estimate
        elif isinstance(actual, int):  # validated with the request (one pass through pydantic, not two)
            actual = {"unit": estimate.unit, "amount": actual}  # type: ignore[assignment]
        else:
            self._same_unit(actual)
        body: dict[str, Any] = {"idempotency_key": self.key + ":commit", "actual": actual}
        if metrics is not None or self.metrics is not None:
            body["metrics"] = metrics if metrics is not None else self.metrics
        if metadata is not None:
            self.commit_metadata = metadata
        if self.commit_metadata is not None:
            body["metadata"] = self.commit_metadata
        request = parse(CommitRequest, body)
        self.metrics = request.metrics
        return request

    def _settlement_event(self, request: CommitRequest) -> EventCreateRequest:
        """After 410 the hold is gone but the spend happened: debit it directly, keyed like the commit."""
        body: dict[str, Any] = {
            "idempotency_key": request.idempotency_key,
            "subject": self.subject,
            "action": self.action,
            "actual": request.actual,
        }
        if request.metrics is not None:
            body["metrics"] = request.metrics
        if request.metadata is not None:
            body["metadata"] = request.metadata
        return parse(EventCreateRequest, body)

    def _committed(self, charged: Amount) -> None:
        self.status, self.charged = "COMMITTED", charged
        self.client.heartbeat.forget(self)
        self._report(charged.amount)

    def commit(
        self,
        actual: Amount | int | None = None,
        *,
        metrics: StandardMetrics | dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Amount | None:
        """Settle now with the real cost (default: the estimate). Returns what was charged."""
        if self.status == "NESTED":
            if actual is not None:
                self.record(actual)
            self._finish_nested(self._outcome(False), actual if isinstance(actual, Amount) else None)
            return self.charged
        if self.status != "ACTIVE":
            return self.charged
        request = self._commit_request(actual, metrics, metadata)
        journal = self._journal_write(request)
        span = telemetry.start("commit")
        try:
            for attempt in range(COMMIT_ATTEMPTS):
                try:
                    self._committed(self.client.transport.commit(self.id, request).charged)  # type: ignore[arg-type]
                    break
                except ReservationExpired:
                    event = self._expired(request, journal)
                    self._committed(self.client.transport.event(event).charged or request.actual)
                    break
                except CyclesError as exc:
                    if not _transient(exc) or attempt == COMMIT_ATTEMPTS - 1:
                        raise
                    self.client.stats.commit_retries += 1
                    time.sleep(self._backoff(exc, attempt))
        except CyclesError as exc:
            self._settle_failed(exc, journal)
            telemetry.end(span, self, exc, actual=request.actual.amount)
            raise
        telemetry.end(span, self)
        if journal is not None:
            journal.remove(self.id)  # type: ignore[arg-type]
        return self.charged

    async def acommit(
        self,
        actual: Amount | int | None = None,
        *,
        metrics: StandardMetrics | dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Amount | None:
        if self.status != "ACTIVE":
            return self.commit(actual, metrics=metrics, metadata=metadata)
        request = self._commit_request(actual, metrics, metadata)
        journal = self._journal_write(request)
        span = telemetry.start("commit")
        try:
            for attempt in range(COMMIT_ATTEMPTS):
                try:
                    response = await self.client.transport.acommit(self.id, request)  # type: ignore[arg-type]
                    self._committed(response.charged)
                    break
                except ReservationExpired:
                    event = self._expired(request, journal)
                    self._committed((await self.client.transport.aevent(event)).charged or request.actual)
                    break
                except CyclesError as exc:
                    if not _transient(exc) or attempt == COMMIT_ATTEMPTS - 1:
                        raise
                    self.client.stats.commit_retries += 1
                    await asyncio.sleep(self._backoff(exc, attempt))
        except CyclesError as exc:
            self._settle_failed(exc, journal)
            telemetry.end(span, self, exc, actual=request.actual.amount)
            raise
        telemetry.end(span, self)
        if journal is not None:
            journal.remove(self.id)  # type: ignore[arg-type]
        return self.charged

    # the commit journal: written before the first commit leaves, removed on a definite answer (journal.py)
    def _journal_write(self, request: CommitRequest) -> Journal | None:
        journal = self.client.journal
        if journal is not None:
            journal.write(self.id, request, self._settlement_event(request))  # type: ignore[arg-type]
        return journal

    def _expired(self, request: CommitRequest, journal: Journal | None) -> EventCreateRequest:
        self.client.stats.expired_settled += 1
        if journal is not None:
            journal.update(self.id, mode="event")  # type: ignore[arg-type]
        return self._settlement_event(request)

    def _settle_failed(self, exc: CyclesError, journal: Journal | None) -> None:
        self.client.heartbeat.forget(self)
        if journal is not None and exc.code in TERMINAL_CODES:
            journal.remove(self.id)  # type: ignore[arg-type]
        # otherwise the record stays: client.recover() (and the next client start) sends it again, same key

    @staticmethod
    def _backoff(exc: CyclesError, attempt: int) -> float:
        retry_after = exc.details.get("retry_after_ms") if isinstance(exc, LimitExceeded) else None
        if isinstance(retry_after, int):
            return retry_after / 1000
        return COMMIT_BACKOFF_S * 2**attempt

    def _release_request(self, reason: str | None) -> ReleaseRequest:
        body: dict[str, Any] = {"idempotency_key": self.key + ":release"}
        if reason:
            body["reason"] = reason[:256]
        return parse(ReleaseRequest, body)

    def release(self, reason: str | None = None) -> None:
        """Give the hold back (the call did not spend)."""
        if self.status == "NESTED":
            self._finish_nested(None)
            return
        if self.status != "ACTIVE":
            return
        request = self._release_request(reason)
        self.client.heartbeat.forget(self)
        span = telemetry.start("release")
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                self.client.transport.release(self.id, request)  # type: ignore[arg-type]
                break
            except ReservationExpired:
                break  # the hold already went back to the budget
            except CyclesError as exc:
                if not _transient(exc) or attempt == COMMIT_ATTEMPTS - 1:
                    telemetry.end(span, self, exc)
                    raise
                time.sleep(COMMIT_BACKOFF_S * 2**attempt)
        self.status = "RELEASED"
        telemetry.end(span, self, actual=0)
        self._report(0)

    async def arelease(self, reason: str | None = None) -> None:
        if self.status != "ACTIVE":
            return self.release(reason)
        request = self._release_request(reason)
        self.client.heartbeat.forget(self)
        span = telemetry.start("release")
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                await self.client.transport.arelease(self.id, request)  # type: ignore[arg-type]
                break
            except ReservationExpired:
                break
            except CyclesError as exc:
                if not _transient(exc) or attempt == COMMIT_ATTEMPTS - 1:
                    telemetry.end(span, self, exc)
                    raise
                await asyncio.sleep(COMMIT_BACKOFF_S * 2**attempt)
        self.status = "RELEASED"
        telemetry.end(span, self, actual=0)
        self._report(0)

    def extend(self, by_ms: int) -> int | None:
        """Push the expiry out by `by_ms`; returns the new expires_at_ms."""
        if self.status != "ACTIVE":
            return self.expires_at_ms
        from .models import ReservationExtendRequest

        response = self.client.transport.extend(
            self.id,  # type: ignore[arg-type]
            parse(
                ReservationExtendRequest,
                {"idempotency_key": f"{self.key}:extend:{os.urandom(6).hex()}", "extend_by_ms": by_ms},
            ),
        )
        self.expires_at_ms = response.expires_at_ms
        return self.expires_at_ms


def _default_client() -> Client:
    from .client import default_client  # the client module imports this one: resolved at call time

    return default_client()


def _takes_argument(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


class Run:
    """A budget envelope for one agent run: `with cycles.run(limit=cycles.usd(2)) as run:`.

    With a limit, the limit is reserved once; every guarded call inside draws its estimate from it in process (no
    round trip), a call whose estimate no longer fits is denied with BudgetExceeded, and the sum of the actuals is
    committed once at the end. Without a limit the run only attributes: calls reserve as usual, tagged with the
    run_id dimension, and the run counts them. `spent`, `remaining` and `calls` are live.
    """

    def __init__(
        self,
        limit: Amount | None = None,
        *,
        run_id: str | None = None,
        client: Client | None = None,
        action: ActionArg = None,
        **subject: Any,
    ) -> None:
        self.client = client or _default_client()
        self.limit = limit
        self.run_id = run_id or "run_" + os.urandom(8).hex()
        self.action = (
            as_action(action, default_name=self.run_id) if action else Action(kind="agent.run", name=self.run_id)
        )
        self._subject = subject
        self.reservation: Reservation | None = None
        self.unit = limit.unit if limit is not None else "USD_MICROCENTS"
        self._lock = threading.Lock()
        self._spent: dict[str, int] = {}
        self._calls = 0
        self._scope: Any = None
        self._token: Any = None

    @property
    def spent(self) -> int:
        """Spent so far in the run's unit (the limit's unit; USD_MICROCENTS without a limit)."""
        return self._spent.get(self.unit, 0)

    @property
    def spent_by_unit(self) -> dict[str, int]:
        return dict(self._spent)

    @property
    def calls(self) -> int:
        return self._calls

    @property
    def remaining(self) -> int | None:
        if self.limit is None:
            return None
        r = self.reservation
        in_flight = r._drawn if r is not None else 0
        return self.limit.amount - self.spent - in_flight

    def record(self, used: int, unit: str) -> None:
        with self._lock:
            self._spent[unit] = self._spent.get(unit, 0) + used
            self._calls += 1

    def _open(self) -> None:
        self._scope = context.scope(dimensions={"run_id": self.run_id}, **self._subject)
        self._scope.__enter__()
        self._token = context.run.set(self)
        if self.limit is not None:
            self.reservation = Reservation(self.client, self.limit, action=self.action)

    def _close(self) -> None:
        context.run.reset(self._token)
        self._scope.__exit__(None, None, None)

    def __enter__(self) -> Run:
        self._open()
        try:
            if self.reservation is not None:
                self.reservation.start()
                self.reservation._run = None  # the envelope itself is not one of the run's calls
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if self.reservation is not None:
                self.reservation._recorded = self._spent_in_envelope()
                self.reservation.finish(exc)
        finally:
            self._close()

    async def __aenter__(self) -> Run:
        self._open()
        try:
            if self.reservation is not None:
                await self.reservation.astart()
                self.reservation._run = None
        except BaseException:
            self._close()
            raise
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if self.reservation is not None:
                self.reservation._recorded = self._spent_in_envelope()
                await self.reservation.afinish(exc)
        finally:
            self._close()

    def _spent_in_envelope(self) -> int:
        r = self.reservation
        assert r is not None
        return r._inner_used

    def __repr__(self) -> str:
        limit = format_amount(self.unit, self.limit.amount) if self.limit else "none"
        return f"<Run {self.run_id} spent={format_amount(self.unit, self.spent)} calls={self._calls} limit={limit}>"


def run(limit: Amount | None = None, **kwargs: Any) -> Run:
    """`with cycles.run(limit=cycles.usd(2)) as run:` (see Run)."""
    return Run(limit, **kwargs)


def guard(
    estimate: EstimateArg,
    *,
    action: ActionArg = None,
    actual: Callable[..., Amount] | Amount | None = None,
    client: Client | None = None,
    dry_run: bool | None = None,
    ttl_ms: int | None = None,
    overage_policy: str | None = None,
    **subject: Any,
) -> Callable[[F], F]:
    """Decorate a function, coroutine function, generator or async generator so every call is guarded.

    `estimate` is an Amount or a callable taking the call's arguments; `actual` an Amount or a callable taking the
    result (functions and coroutines). Generators reserve at their first step and commit what they `record()`
    (through `cycles.current_reservation()`), else the estimate; closing one early settles it too.
    """

    def decorate(fn: F) -> F:
        name = getattr(fn, "__qualname__", getattr(fn, "__name__", "call"))
        act = as_action(action, default_name=name) if action is not None else Action(kind="function", name=name)

        def make() -> Reservation:
            return Reservation(
                client or _default_client(),
                estimate,
                action=act,
                subject=subject,
                actual=actual,
                dry_run=dry_run,
                ttl_ms=ttl_ms,
                overage_policy=overage_policy,
            )

        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def agen_wrapper(*args: Any, **kwargs: Any) -> Any:
                r = make()
                await r.abegin(*args, **kwargs)
                agen = fn(*args, **kwargs)
                failure: BaseException | None = None
                try:
                    step, value = agen.asend, None
                    while True:
                        with r.entered():
                            try:
                                item = await step(value)
                            except StopAsyncIteration:
                                return
                        step = agen.asend
                        try:
                            value = yield item
                        except GeneratorExit:
                            raise
                        except BaseException as exc:  # thrown in by the consumer: pass it on to the generator
                            step, value = agen.athrow, exc
                except BaseException as exc:  # includes GeneratorExit on early close and CancelledError
                    failure = exc
                    raise
                finally:
                    with r.entered():
                        await agen.aclose()
                    await r.afinish(failure)

            return agen_wrapper  # type: ignore[return-value]

        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
                r = make()
                r.begin(*args, **kwargs)
                gen = fn(*args, **kwargs)
                failure: BaseException | None = None
                try:
                    step, value = gen.send, None
                    while True:
                        with r.entered():
                            try:
                                item = step(value)
                            except StopIteration as stop:
                                return stop.value
                        step = gen.send
                        try:
                            value = yield item
                        except GeneratorExit:
                            raise
                        except BaseException as exc:
                            step, value = gen.throw, exc
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    with r.entered():
                        gen.close()
                    r.finish(failure)

            return gen_wrapper  # type: ignore[return-value]

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                r = make()
                await r.astart(*args, **kwargs)
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    await r.afinish(exc)
                    raise
                await r.afinish(None, result)
                return result

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            r = make()
            r.start(*args, **kwargs)
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                r.finish(exc)
                raise
            r.finish(None, result)
            return result

        return wrapper  # type: ignore[return-value]

    return decorate
