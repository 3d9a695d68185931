"""The nine runtime endpoints of Cycles protocol v0, under /v1.

Each handler reads the (bounded) body, then authenticates, parses and calls the ledger with the key's tenant as the
effective tenant, inline on the event loop: a ledger operation is one short SQLite transaction, cheaper than the hop
to a worker thread and back (that hop cost a fifth of the server's CPU per request). A worker whose store is locked
by another process waits up to the store's busy timeout. Ledger exceptions become protocol error bodies in app.py's
handlers.
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
from .auth import Authenticator, seen
from .wire import check_timestamps, model_response, parse_json, path_id, query_dict, query_int, read_body


class RuntimeAPI:
    def __init__(self, ledger: Ledger, auth: Authenticator) -> None:
        self.ledger = ledger
        self.auth = auth

    async def _post(
        self,
        request: Request,
        permission: str,
        operation: Callable[[dict[str, Any], str | None], BaseModel],
        *,
        admin: bool = False,
        status: int = 200,
    ) -> Response:
        raw = await read_body(request)

        def work() -> BaseModel:
            headers = request.headers
            principal = self.auth.either(headers, permission) if admin else self.auth.tenant(headers, permission)
            seen(request, principal)
            return operation(parse_json(request, raw), principal.tenant)

        return model_response(work(), status)

    # ---------------------------------------------------------------------------------------------- mutations
    async def reserve(self, request: Request) -> Response:
        return await self._post(request, "reservations:create", lambda b, t: self.ledger.reserve(b, tenant=t))

    async def commit(self, request: Request) -> Response:
        rid = path_id(request, "reservation_id")
        return await self._post(request, "reservations:commit", lambda b, t: self.ledger.commit(rid, b, tenant=t))

    async def release(self, request: Request) -> Response:
        rid = path_id(request, "reservation_id")
        return await self._post(
            request, "reservations:release", lambda b, t: self.ledger.release(rid, b, tenant=t), admin=True
        )

    async def extend(self, request: Request) -> Response:
        rid = path_id(request, "reservation_id")
        return await self._post(request, "reservations:extend", lambda b, t: self.ledger.extend(rid, b, tenant=t))

    async def decide(self, request: Request) -> Response:
        return await self._post(request, "reservations:create", lambda b, t: self.ledger.decide(b, tenant=t))

    async def event(self, request: Request) -> Response:
        return await self._post(request, "reservations:create", lambda b, t: self.ledger.event(b, tenant=t), status=201)

    # -------------------------------------------------------------------------------------------------- reads
    async def get_reservation(self, request: Request) -> Response:
        rid = path_id(request, "reservation_id")

        def work() -> BaseModel:
            principal = seen(request, self.auth.either(request.headers, "reservations:list"))
            return self.ledger.get_reservation(rid, tenant=principal.tenant)

        return model_response(work())

    async def list_reservations(self, request: Request) -> Response:
        query = query_dict(request)

        def work() -> BaseModel:
            principal = seen(request, self.auth.either(request.headers, "reservations:list"))
            check_timestamps(query, *_WINDOWS)
            if principal.is_admin and not query.get("tenant"):
                raise InvalidRequest("tenant query parameter is required when using admin key authentication")
            return self.ledger.list_reservations(query, tenant=principal.tenant)

        return model_response(work())

    async def balances(self, request: Request) -> Response:
        """Runtime shape (subject levels) -> Balance items; admin shape (tenant_id / scope_prefix / unit, no subject
        level) -> the admin plane's BudgetLedger items, as the governance spec declares for this path."""
        query = query_dict(request)

        def work() -> BaseModel:
            principal = seen(request, self.auth.tenant(request.headers, "balances:read"))
            admin_shape = not any(query.get(level) for level in LEVELS) and any(
                query.get(name) for name in ("tenant_id", "scope_prefix", "unit")
            )
            if not admin_shape:
                return self.ledger.balances(query, tenant=principal.tenant)
            page = self.ledger.admin.list_budgets(
                tenant=principal.tenant,
                tenant_id=query.get("tenant_id") or None,
                scope_prefix=query.get("scope_prefix") or None,
                unit=query.get("unit") or None,
                cursor=query.get("cursor") or None,
                limit=query_int(query, "limit", 50),
            )
            return _BalanceList(balances=page.ledgers, next_cursor=page.next_cursor, has_more=page.has_more)

        return model_response(work())

    def routes(self) -> list[Route]:
        return [
            Route("/v1/reservations", self.reserve, methods=["POST"]),
            Route("/v1/reservations", self.list_reservations, methods=["GET"]),
            Route("/v1/reservations/{reservation_id}", self.get_reservation, methods=["GET"]),
            Route("/v1/reservations/{reservation_id}/commit", self.commit, methods=["POST"]),
            Route("/v1/reservations/{reservation_id}/release", self.release, methods=["POST"]),
            Route("/v1/reservations/{reservation_id}/extend", self.extend, methods=["POST"]),
            Route("/v1/decide", self.decide, methods=["POST"]),
            Route("/v1/balances", self.balances, methods=["GET"]),
            Route("/v1/events", self.event, methods=["POST"]),
        ]


_WINDOWS = ("from", "to", "expires_from", "expires_to", "finalized_from", "finalized_to")


class _BalanceList(BaseModel):
    """GET /v1/balances in the admin shape: the governance spec's BalanceListResponse (BudgetLedger items)."""

    balances: list[BudgetLedger]
    next_cursor: str | None = None
    has_more: bool | None = None
