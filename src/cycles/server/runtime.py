"""The nine runtime endpoints of Cycles protocol v0, under /v1.

Each handler authenticates and parses, and returns the ledger call to make, with the key's tenant as the effective
tenant; dispatch.py runs it under the workers' write lock (writelock.py) and turns exceptions into protocol error
bodies. The ledger runs on the event loop's thread: a ledger operation is one short SQLite transaction, cheaper than
the hop to a worker thread and back (that hop cost a fifth of the server's CPU per request).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import InvalidRequest
from ..ledger import Ledger
from ..ledger.events import Actor, current_actor
from ..models import (
    LEVELS,
    BudgetLedger,
    CommitRequest,
    DecisionRequest,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationExtendRequest,
    parse,
)
from .auth import Authenticator
from .dispatch import Call, Endpoint
from .wire import check_timestamps, parse_json, query_dict, query_int
from .writelock import WriteLock, lock_file_for

LedgerWork = Callable[[], BaseModel]
M = TypeVar("M", bound=BaseModel)


class RuntimeAPI:
    def __init__(self, ledger: Ledger, auth: Authenticator) -> None:
        self.ledger = ledger
        self.auth = auth
        # taken by the dispatcher around the ledger work, a batch of calls at a time, each batch one store transaction
        path = lock_file_for(ledger, "write")
        if path:
            self.write_lock = WriteLock(path, ledger.store.batch)
        elif getattr(ledger.store, "remote_batches", False):  # Redis: no lock, one round trip per batch, off the loop
            self.write_lock = WriteLock(None, functools.partial(ledger.store.batch, deferred=True), batch_only=True)
        else:
            self.write_lock = WriteLock(None)

    def _post(
        self,
        call: Call,
        permission: str,
        model: type[M],
        operation: Callable[[M, str | None], BaseModel],
        *,
        admin: bool = False,
    ) -> LedgerWork:
        """Authenticate, parse and validate the body here, outside the write lock (bad input never takes it)."""
        headers = call.headers
        principal = self.auth.either(headers, permission) if admin else self.auth.tenant(headers, permission)
        call.seen(principal)
        request = parse(model, parse_json(headers, call.body))
        tenant = principal.tenant
        # events the operation writes (a denial, an exhausted budget) name the caller and this request
        actor = Actor("admin" if tenant is None else "api_key", key_id=principal.key_id, source_ip=call.client,
                      request_id=call.request_id, trace_id=call.trace_id)  # fmt: skip

        def work() -> BaseModel:
            token = current_actor.set(actor)
            try:
                return operation(request, tenant)
            finally:
                current_actor.reset(token)

        return work

    # ---------------------------------------------------------------------------------------------- mutations
    def reserve(self, call: Call) -> LedgerWork:
        ledger = self.ledger
        return self._post(
            call, "reservations:create", ReservationCreateRequest, lambda r, t: ledger.reserve(r, tenant=t)
        )

    def commit(self, call: Call) -> LedgerWork:
        ledger, rid = self.ledger, call.reservation_id
        return self._post(call, "reservations:commit", CommitRequest, lambda r, t: ledger.commit(rid, r, tenant=t))

    def release(self, call: Call) -> LedgerWork:
        ledger, rid = self.ledger, call.reservation_id

        def release(r: ReleaseRequest, tenant: str | None) -> BaseModel:
            if tenant is not None:
                return ledger.release(rid, r, tenant=tenant)
            # the admin key releasing someone's hold: in the audit log, with who and from where
            actor = Actor("admin", source_ip=call.client, user_agent=call.headers.get("user-agent"),
                          request_id=call.request_id, trace_id=call.trace_id)  # fmt: skip
            return ledger.release(rid, r, audited=actor)

        return self._post(call, "reservations:release", ReleaseRequest, release, admin=True)

    def extend(self, call: Call) -> LedgerWork:
        ledger, rid = self.ledger, call.reservation_id
        return self._post(
            call, "reservations:extend", ReservationExtendRequest, lambda r, t: ledger.extend(rid, r, tenant=t)
        )

    def decide(self, call: Call) -> LedgerWork:
        ledger = self.ledger
        return self._post(call, "reservations:create", DecisionRequest, lambda r, t: ledger.decide(r, tenant=t))

    def event(self, call: Call) -> LedgerWork:
        ledger = self.ledger
        return self._post(call, "reservations:create", EventCreateRequest, lambda r, t: ledger.event(r, tenant=t))

    # -------------------------------------------------------------------------------------------------- reads
    # reads take the write lock too: they sweep expired holds first, which writes
    def get_reservation(self, call: Call) -> LedgerWork:
        principal = call.seen(self.auth.either(call.headers, "reservations:list"))
        return lambda: self.ledger.get_reservation(call.reservation_id, tenant=principal.tenant)

    def list_reservations(self, call: Call) -> LedgerWork:
        query = query_dict(call.query_string)
        principal = call.seen(self.auth.either(call.headers, "reservations:list"))
        check_timestamps(query, *_WINDOWS)
        if principal.is_admin and not query.get("tenant"):
            raise InvalidRequest("tenant query parameter is required when using admin key authentication")
        return lambda: self.ledger.list_reservations(query, tenant=principal.tenant)

    def balances(self, call: Call) -> LedgerWork:
        """Runtime shape (subject levels) -> Balance items; admin shape (tenant_id / scope_prefix / unit, no subject
        level) -> the admin plane's BudgetLedger items, as the governance spec declares for this path."""
        query = query_dict(call.query_string)
        principal = call.seen(self.auth.tenant(call.headers, "balances:read"))
        admin_shape = not any(query.get(level) for level in LEVELS) and any(
            query.get(name) for name in ("tenant_id", "scope_prefix", "unit")
        )
        if not admin_shape:
            return lambda: self.ledger.balances(query, tenant=principal.tenant)
        limit = query_int(query, "limit", 50)

        def admin_balances() -> BaseModel:
            page = self.ledger.admin.list_budgets(
                tenant=principal.tenant,
                tenant_id=query.get("tenant_id") or None,
                scope_prefix=query.get("scope_prefix") or None,
                unit=query.get("unit") or None,
                cursor=query.get("cursor") or None,
                limit=limit,
            )
            return _BalanceList(balances=page.ledgers, next_cursor=page.next_cursor, has_more=page.has_more)

        return admin_balances

    def endpoints(self) -> list[Endpoint]:
        """Served by dispatch.RuntimeDispatcher."""
        rid = "/v1/reservations/{reservation_id}"
        return [
            Endpoint("POST", "/v1/reservations", self.reserve),
            Endpoint("GET", "/v1/reservations", self.list_reservations),
            Endpoint("GET", rid, self.get_reservation),
            Endpoint("POST", rid + "/commit", self.commit),
            Endpoint("POST", rid + "/release", self.release),
            Endpoint("POST", rid + "/extend", self.extend),
            Endpoint("POST", "/v1/decide", self.decide),
            Endpoint("GET", "/v1/balances", self.balances),
            Endpoint("POST", "/v1/events", self.event, status=201),
        ]

    def routes(self) -> list[Route]:
        """The same paths for the Starlette app, only so that it answers wrong methods (405 with Allow) and trailing
        slashes (redirect) on them as on every other route: requests that match are served by the dispatcher."""
        return [Route(e.path, _served_by_dispatcher, methods=[e.method]) for e in self.endpoints()]


async def _served_by_dispatcher(request: Request) -> Response:
    raise RuntimeError(f"{request.method} {request.url.path} should have been served by RuntimeDispatcher")


_WINDOWS = ("from", "to", "expires_from", "expires_to", "finalized_from", "finalized_to")


class _BalanceList(BaseModel):
    """GET /v1/balances in the admin shape: the governance spec's BalanceListResponse (BudgetLedger items)."""

    balances: list[BudgetLedger]
    next_cursor: str | None = None
    has_more: bool | None = None
