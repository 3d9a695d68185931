"""The nine runtime endpoints of Cycles protocol v0, under /v1.

Each handler authenticates, parses and calls the ledger with the key's tenant as the effective tenant, inline on the
event loop: a ledger operation is one short SQLite transaction, cheaper than the hop to a worker thread and back
(that hop cost a fifth of the server's CPU per request), and made by one worker process at a time (writelock.py).
The handlers are synchronous functions of a `Call`; dispatch.py serves them (reading the body first) and turns their
exceptions into protocol error bodies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import InvalidRequest
from ..ledger import Ledger
from ..models import LEVELS, BudgetLedger
from .auth import Authenticator
from .dispatch import Call, Endpoint
from .wire import check_timestamps, parse_json, query_dict, query_int
from .writelock import WriteLock, write_lock_path_for


class RuntimeAPI:
    def __init__(self, ledger: Ledger, auth: Authenticator) -> None:
        self.ledger = ledger
        self.auth = auth
        self.serialized = WriteLock(write_lock_path_for(ledger))  # around each ledger call: see writelock.py

    def _post(
        self,
        call: Call,
        permission: str,
        operation: Callable[[dict[str, Any], str | None], BaseModel],
        *,
        admin: bool = False,
    ) -> BaseModel:
        headers = call.headers
        principal = self.auth.either(headers, permission) if admin else self.auth.tenant(headers, permission)
        call.seen(principal)
        data = parse_json(headers, call.body)
        with self.serialized:
            return operation(data, principal.tenant)

    # ---------------------------------------------------------------------------------------------- mutations
    def reserve(self, call: Call) -> BaseModel:
        return self._post(call, "reservations:create", lambda b, t: self.ledger.reserve(b, tenant=t))

    def commit(self, call: Call) -> BaseModel:
        rid = call.reservation_id
        return self._post(call, "reservations:commit", lambda b, t: self.ledger.commit(rid, b, tenant=t))

    def release(self, call: Call) -> BaseModel:
        rid = call.reservation_id
        return self._post(call, "reservations:release", lambda b, t: self.ledger.release(rid, b, tenant=t), admin=True)

    def extend(self, call: Call) -> BaseModel:
        rid = call.reservation_id
        return self._post(call, "reservations:extend", lambda b, t: self.ledger.extend(rid, b, tenant=t))

    def decide(self, call: Call) -> BaseModel:
        return self._post(call, "reservations:create", lambda b, t: self.ledger.decide(b, tenant=t))

    def event(self, call: Call) -> BaseModel:
        return self._post(call, "reservations:create", lambda b, t: self.ledger.event(b, tenant=t))

    # -------------------------------------------------------------------------------------------------- reads
    def get_reservation(self, call: Call) -> BaseModel:
        principal = call.seen(self.auth.either(call.headers, "reservations:list"))
        with self.serialized:  # reads sweep expired holds first: they write too
            return self.ledger.get_reservation(call.reservation_id, tenant=principal.tenant)

    def list_reservations(self, call: Call) -> BaseModel:
        query = query_dict(call.query_string)
        principal = call.seen(self.auth.either(call.headers, "reservations:list"))
        check_timestamps(query, *_WINDOWS)
        if principal.is_admin and not query.get("tenant"):
            raise InvalidRequest("tenant query parameter is required when using admin key authentication")
        with self.serialized:
            return self.ledger.list_reservations(query, tenant=principal.tenant)

    def balances(self, call: Call) -> BaseModel:
        """Runtime shape (subject levels) -> Balance items; admin shape (tenant_id / scope_prefix / unit, no subject
        level) -> the admin plane's BudgetLedger items, as the governance spec declares for this path."""
        query = query_dict(call.query_string)
        principal = call.seen(self.auth.tenant(call.headers, "balances:read"))
        admin_shape = not any(query.get(level) for level in LEVELS) and any(
            query.get(name) for name in ("tenant_id", "scope_prefix", "unit")
        )
        if not admin_shape:
            with self.serialized:
                return self.ledger.balances(query, tenant=principal.tenant)
        limit = query_int(query, "limit", 50)
        with self.serialized:
            page = self.ledger.admin.list_budgets(
                tenant=principal.tenant,
                tenant_id=query.get("tenant_id") or None,
                scope_prefix=query.get("scope_prefix") or None,
                unit=query.get("unit") or None,
                cursor=query.get("cursor") or None,
                limit=limit,
            )
        return _BalanceList(balances=page.ledgers, next_cursor=page.next_cursor, has_more=page.has_more)

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
