"""The HTTP transport: the Cycles protocol v0 over httpx, sync and async, against any Cycles server.

Protocol error bodies become the very exceptions the embedded ledger raises (cycles.errors, with the server's
request_id, trace_id and details); a network error, a timeout or an answer that is not the protocol becomes
`TransportError` (status 0, the "ambiguous, retry with the same key" signal); a 5xx without a protocol body becomes
`InternalError`. Connections are pooled per client; the clients are created on first use.

    transport = HttpTransport("http://localhost:7878", api_key="cyc_live_...")
    transport.reserve(ReservationCreateRequest(...))
    transport.admin.create_budget({...})       # X-Admin-API-Key (admin_api_key, else env CYCLES_ADMIN_API_KEY)
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from ..errors import CyclesError, InternalError, TransportError, Unauthorized, error_for_code
from ..models import (
    ApiKey,
    ApiKeyCreateResponse,
    ApiKeyListResponse,
    BalanceResponse,
    BudgetFundingResponse,
    BudgetLedger,
    BudgetListResponse,
    CommitRequest,
    CommitResponse,
    DecisionRequest,
    DecisionResponse,
    EventCreateRequest,
    EventCreateResponse,
    Policy,
    PolicyListResponse,
    ReleaseRequest,
    ReleaseResponse,
    ReservationCreateRequest,
    ReservationCreateResponse,
    ReservationDetail,
    ReservationExtendRequest,
    ReservationExtendResponse,
    ReservationListResponse,
    Tenant,
    TenantListResponse,
)

__all__ = ["HttpTransport", "HttpAdmin", "AuthenticatedKey"]

M = TypeVar("M", bound=BaseModel)
Body = BaseModel | Mapping[str, Any]

TENANT_HEADER = "X-Cycles-API-Key"
ADMIN_HEADER = "X-Admin-API-Key"
USER_AGENT = "cycles-python"


def _json(body: Any) -> Any:
    """A request body as JSON data. Models send only the fields that were set: the server applies its own (and the
    tenant's) defaults to the rest, exactly as the embedded ledger does. Plain data passes through as given."""
    if isinstance(body, BaseModel):
        return body.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    if isinstance(body, Mapping):
        return {str(k): _json(v) for k, v in body.items()}
    if isinstance(body, list | tuple):
        return [_json(v) for v in body]
    if body is None or isinstance(body, str | int | float | bool):
        return body
    return to_jsonable_python(body)


def _params(query: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in (query or {}).items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, list | tuple | set | frozenset):
            out[name] = ",".join(str(v) for v in value)
        elif isinstance(value, Enum):
            out[name] = str(value.value)
        else:
            out[name] = str(value)
    return out


def _segment(value: str) -> str:
    return quote(str(value), safe="")


def _error(response: httpx.Response) -> CyclesError:
    """The typed exception for an error answer."""
    request_id = response.headers.get("x-request-id")
    trace_id = response.headers.get("x-cycles-trace-id")
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("message"), str):
        details = body.get("details") if isinstance(body.get("details"), dict) else {}
        retry_after = response.headers.get("retry-after")
        if status == 429 and retry_after and retry_after.isdigit() and "retry_after_ms" not in details:
            details = {**details, "retry_after_ms": int(retry_after) * 1000}
        return error_for_code(
            body["error"],
            body["message"],
            status=status,
            details=details,
            request_id=body.get("request_id") if isinstance(body.get("request_id"), str) else request_id,
            trace_id=body.get("trace_id") if isinstance(body.get("trace_id"), str) else trace_id,
        )
    where = f"{response.request.method} {response.request.url}"
    if status >= 500:
        return InternalError(
            f"HTTP {status} without a protocol error body from {where}", request_id=request_id, trace_id=trace_id
        )
    return TransportError(
        f"HTTP {status} from {where} is not a Cycles protocol answer", request_id=request_id, trace_id=trace_id
    )


def _parse(response: httpx.Response, model: type[M]) -> M:
    if response.status_code >= 300:
        raise _error(response)
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise TransportError(
            f"HTTP {response.status_code} from {response.request.method} {response.request.url} is not a valid "
            f"{model.__name__}: {exc.error_count()} problem(s)",
            request_id=response.headers.get("x-request-id"),
            trace_id=response.headers.get("x-cycles-trace-id"),
        ) from None


class HttpTransport:
    """The `Transport` of a Cycles server at `base_url`: runtime calls with `api_key` (X-Cycles-API-Key), the
    admin plane (`.admin`) with `admin_api_key` (X-Admin-API-Key; default env CYCLES_ADMIN_API_KEY)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        admin_api_key: str | None = None,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 100,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.url = self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.admin_api_key = admin_api_key if admin_api_key is not None else os.environ.get("CYCLES_ADMIN_API_KEY")
        self.timeout = timeout
        self._headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **(headers or {})}
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )
        self.admin = HttpAdmin(self)

    # ------------------------------------------------------------------------------------------------ plumbing
    def _sync(self) -> httpx.Client:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = httpx.Client(
                        base_url=self.base_url, headers=self._headers, timeout=self.timeout, limits=self._limits
                    )
                client = self._client
        return client

    def _async(self) -> httpx.AsyncClient:
        """One AsyncClient per event loop (a client's connections belong to the loop that opened them)."""
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            with self._lock:
                client = self._aclients.get(loop)
                if client is None:
                    client = self._aclients[loop] = httpx.AsyncClient(
                        base_url=self.base_url, headers=self._headers, timeout=self.timeout, limits=self._limits
                    )
        return client

    def auth_headers(self, *, admin: bool = False, api_key: str | None = None) -> dict[str, str]:
        if api_key is not None:
            return {TENANT_HEADER: api_key}
        if admin:
            return {ADMIN_HEADER: self.admin_api_key} if self.admin_api_key else {}
        return {TENANT_HEADER: self.api_key} if self.api_key else {}

    @staticmethod
    def _request_kwargs(body: Body | None, query: Mapping[str, Any] | None, headers: dict[str, str]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs["json"] = _json(body)
        if query:
            kwargs["params"] = _params(query)
        return kwargs

    def request(
        self,
        method: str,
        path: str,
        model: type[M],
        *,
        body: Body | None = None,
        query: Mapping[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[M, int]:
        """One call: (parsed model, HTTP status). Raises the protocol's typed errors or TransportError."""
        kwargs = self._request_kwargs(body, query, headers if headers is not None else self.auth_headers())
        try:
            response = self._sync().request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise TransportError(f"{method} {path}: timed out after {self.timeout}s ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise TransportError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        return _parse(response, model), response.status_code

    async def arequest(
        self,
        method: str,
        path: str,
        model: type[M],
        *,
        body: Body | None = None,
        query: Mapping[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[M, int]:
        kwargs = self._request_kwargs(body, query, headers if headers is not None else self.auth_headers())
        try:
            response = await self._async().request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise TransportError(f"{method} {path}: timed out after {self.timeout}s ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise TransportError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        return _parse(response, model), response.status_code

    # --------------------------------------------------------------------------------------------- runtime, sync
    def reserve(self, request: ReservationCreateRequest | Body) -> ReservationCreateResponse:
        return self.request("POST", "/v1/reservations", ReservationCreateResponse, body=request)[0]

    def commit(self, reservation_id: str, request: CommitRequest | Body) -> CommitResponse:
        path = f"/v1/reservations/{_segment(reservation_id)}/commit"
        return self.request("POST", path, CommitResponse, body=request)[0]

    def release(self, reservation_id: str, request: ReleaseRequest | Body) -> ReleaseResponse:
        path = f"/v1/reservations/{_segment(reservation_id)}/release"
        return self.request("POST", path, ReleaseResponse, body=request)[0]

    def extend(self, reservation_id: str, request: ReservationExtendRequest | Body) -> ReservationExtendResponse:
        path = f"/v1/reservations/{_segment(reservation_id)}/extend"
        return self.request("POST", path, ReservationExtendResponse, body=request)[0]

    def decide(self, request: DecisionRequest | Body) -> DecisionResponse:
        return self.request("POST", "/v1/decide", DecisionResponse, body=request)[0]

    def event(self, request: EventCreateRequest | Body) -> EventCreateResponse:
        return self.request("POST", "/v1/events", EventCreateResponse, body=request)[0]

    def get_reservation(self, reservation_id: str) -> ReservationDetail:
        return self.request("GET", f"/v1/reservations/{_segment(reservation_id)}", ReservationDetail)[0]

    def list_reservations(self, query: Mapping[str, Any] | None = None) -> ReservationListResponse:
        return self.request("GET", "/v1/reservations", ReservationListResponse, query=query)[0]

    def balances(self, query: Mapping[str, Any] | None = None) -> BalanceResponse:
        return self.request("GET", "/v1/balances", BalanceResponse, query=query)[0]

    # -------------------------------------------------------------------------------------------- runtime, async
    async def areserve(self, request: ReservationCreateRequest | Body) -> ReservationCreateResponse:
        return (await self.arequest("POST", "/v1/reservations", ReservationCreateResponse, body=request))[0]

    async def acommit(self, reservation_id: str, request: CommitRequest | Body) -> CommitResponse:
        path = f"/v1/reservations/{_segment(reservation_id)}/commit"
        return (await self.arequest("POST", path, CommitResponse, body=request))[0]

    async def arelease(self, reservation_id: str, request: ReleaseRequest | Body) -> ReleaseResponse:
        path = f"/v1/reservations/{_segment(reservation_id)}/release"
        return (await self.arequest("POST", path, ReleaseResponse, body=request))[0]

    async def aextend(self, reservation_id: str, request: ReservationExtendRequest | Body) -> ReservationExtendResponse:
        path = f"/v1/reservations/{_segment(reservation_id)}/extend"
        return (await self.arequest("POST", path, ReservationExtendResponse, body=request))[0]

    async def adecide(self, request: DecisionRequest | Body) -> DecisionResponse:
        return (await self.arequest("POST", "/v1/decide", DecisionResponse, body=request))[0]

    async def aevent(self, request: EventCreateRequest | Body) -> EventCreateResponse:
        return (await self.arequest("POST", "/v1/events", EventCreateResponse, body=request))[0]

    async def aget_reservation(self, reservation_id: str) -> ReservationDetail:
        return (await self.arequest("GET", f"/v1/reservations/{_segment(reservation_id)}", ReservationDetail))[0]

    async def alist_reservations(self, query: Mapping[str, Any] | None = None) -> ReservationListResponse:
        return (await self.arequest("GET", "/v1/reservations", ReservationListResponse, query=query))[0]

    async def abalances(self, query: Mapping[str, Any] | None = None) -> BalanceResponse:
        return (await self.arequest("GET", "/v1/balances", BalanceResponse, query=query))[0]

    # ------------------------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the pooled connections. Async clients are closed on their own loop when it is the running one or
        an idle one; a closed loop already took its connections down with it."""
        with self._lock:
            client, self._client = self._client, None
            aclients = list(self._aclients.items())
            self._aclients.clear()
        if client is not None:
            client.close()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, aclient in aclients:
            if loop is running:
                loop.create_task(aclient.aclose())
            elif not loop.is_closed() and not loop.is_running():
                try:
                    loop.run_until_complete(aclient.aclose())
                except Exception:  # pragma: no cover - best effort on shutdown
                    pass

    async def aclose(self) -> None:
        """Close the pooled connections, from async code (this loop's client is awaited)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            mine = self._aclients.pop(loop, None)
        if mine is not None:
            await mine.aclose()
        self.close()

    def __enter__(self) -> HttpTransport:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<HttpTransport {self.base_url}>"


def _tenant_of(scope: str) -> str | None:
    from ..scopes import parse_scope

    try:
        return parse_scope(scope).get("tenant")
    except CyclesError:
        return None


class HttpAdmin:
    """The admin plane over HTTP, with the method names, arguments and return types of `cycles.ledger.Admin`.

    Credentials per call: `tenant=X` (the Admin API's "authenticated tenant") uses `key_for(X)` (by default the
    transport's api_key) as X-Cycles-API-Key; otherwise the admin key when there is one, else the transport's
    tenant key (enough for budget create/fund/list/lookup with budgets:* permissions).
    """

    def __init__(self, transport: HttpTransport, key_for: Callable[[str], str] | None = None) -> None:
        self.transport = transport
        self.key_for = key_for

    def _headers(self, tenant: str | None) -> dict[str, str]:
        t = self.transport
        if tenant is not None:
            key = self.key_for(tenant) if self.key_for is not None else t.api_key
            return t.auth_headers(api_key=key) if key else {}
        if t.admin_api_key:
            return t.auth_headers(admin=True)
        return t.auth_headers()

    def _uses_admin_key(self, tenant: str | None) -> bool:
        return tenant is None and bool(self.transport.admin_api_key)

    def _call(
        self,
        method: str,
        path: str,
        model: type[M],
        tenant: str | None = None,
        *,
        body: Body | None = None,
        query: Mapping[str, Any] | None = None,
    ) -> tuple[M, int]:
        return self.transport.request(method, path, model, body=body, query=query, headers=self._headers(tenant))

    # ---------------------------------------------------------------------------------------------------- tenants
    def create_tenant(self, request: Body) -> tuple[Tenant, bool]:
        tenant, status = self._call("POST", "/v1/admin/tenants", Tenant, body=request)
        return tenant, status == 201

    def get_tenant(self, tenant_id: str) -> Tenant:
        return self._call("GET", f"/v1/admin/tenants/{_segment(tenant_id)}", Tenant)[0]

    def list_tenants(self, *, cursor: str | None = None, limit: int = 50) -> TenantListResponse:
        query = {"cursor": cursor, "limit": limit}
        return self._call("GET", "/v1/admin/tenants", TenantListResponse, query=query)[0]

    def update_tenant(self, tenant_id: str, request: Body) -> Tenant:
        return self._call("PATCH", f"/v1/admin/tenants/{_segment(tenant_id)}", Tenant, body=request)[0]

    # ---------------------------------------------------------------------------------------------------- budgets
    def create_budget(self, request: Body, *, tenant: str | None = None) -> BudgetLedger:
        body = _json(request)
        if self._uses_admin_key(tenant) and isinstance(body, dict) and not body.get("tenant_id"):
            owner = _tenant_of(body.get("scope", ""))  # the admin names the tenant (the spec requires it)
            if owner:
                body["tenant_id"] = owner
        return self._call("POST", "/v1/admin/budgets", BudgetLedger, tenant, body=body)[0]

    def get_budget(self, scope: str, unit: Any, *, tenant: str | None = None) -> BudgetLedger:
        query = {"scope": scope, "unit": unit}
        return self._call("GET", "/v1/admin/budgets/lookup", BudgetLedger, tenant, query=query)[0]

    def list_budgets(
        self,
        *,
        tenant: str | None = None,
        tenant_id: str | None = None,
        scope_prefix: str | None = None,
        unit: Any = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> BudgetListResponse:
        query = {"tenant_id": tenant_id, "scope_prefix": scope_prefix, "unit": unit, "cursor": cursor, "limit": limit}
        return self._call("GET", "/v1/admin/budgets", BudgetListResponse, tenant, query=query)[0]

    def update_budget(self, scope: str, unit: Any, request: Body, *, tenant: str | None = None) -> BudgetLedger:
        query = {"scope": scope, "unit": unit}
        return self._call("PATCH", "/v1/admin/budgets", BudgetLedger, tenant, body=request, query=query)[0]

    def freeze(self, scope: str, unit: Any, *, tenant: str | None = None) -> BudgetLedger:
        query = {"scope": scope, "unit": unit}
        return self._call("POST", "/v1/admin/budgets/freeze", BudgetLedger, tenant, query=query)[0]

    def unfreeze(self, scope: str, unit: Any, *, tenant: str | None = None) -> BudgetLedger:
        query = {"scope": scope, "unit": unit}
        return self._call("POST", "/v1/admin/budgets/unfreeze", BudgetLedger, tenant, query=query)[0]

    def fund(self, scope: str, unit: Any, request: Body, *, tenant: str | None = None) -> BudgetFundingResponse:
        query: dict[str, Any] = {"scope": scope, "unit": unit}
        if self._uses_admin_key(tenant):
            query["tenant_id"] = _tenant_of(scope)  # required with the admin key
        return self._call("POST", "/v1/admin/budgets/fund", BudgetFundingResponse, tenant, body=request, query=query)[0]

    # --------------------------------------------------------------------------------------------------- policies
    def create_policy(self, request: Body, *, tenant: str | None = None) -> Policy:
        return self._call("POST", "/v1/admin/policies", Policy, tenant, body=request)[0]

    def list_policies(self, *, tenant: str | None = None, tenant_id: str | None = None) -> PolicyListResponse:
        return self._call("GET", "/v1/admin/policies", PolicyListResponse, tenant, query={"tenant_id": tenant_id})[0]

    def update_policy(self, policy_id: str, request: Body, *, tenant: str | None = None) -> Policy:
        return self._call("PATCH", f"/v1/admin/policies/{_segment(policy_id)}", Policy, tenant, body=request)[0]

    # --------------------------------------------------------------------------------------------------- api keys
    def create_api_key(self, request: Body, *, tenant: str | None = None) -> ApiKeyCreateResponse:
        return self._call("POST", "/v1/admin/api-keys", ApiKeyCreateResponse, tenant, body=request)[0]

    def list_api_keys(
        self, *, tenant: str | None = None, tenant_id: str | None = None, cursor: str | None = None, limit: int = 50
    ) -> ApiKeyListResponse:
        query = {"tenant_id": tenant_id, "cursor": cursor, "limit": limit}
        return self._call("GET", "/v1/admin/api-keys", ApiKeyListResponse, tenant, query=query)[0]

    def update_api_key(self, key_id: str, request: Body, *, tenant: str | None = None) -> ApiKey:
        return self._call("PATCH", f"/v1/admin/api-keys/{_segment(key_id)}", ApiKey, tenant, body=request)[0]

    def revoke_api_key(self, key_id: str, reason: str | None = None, *, tenant: str | None = None) -> ApiKey:
        path = f"/v1/admin/api-keys/{_segment(key_id)}"
        return self._call("DELETE", path, ApiKey, tenant, query={"reason": reason})[0]

    # ------------------------------------------------------------------------------------------------- identity
    def authenticate(self, secret: str) -> AuthenticatedKey:
        """POST /v1/auth/validate (admin key): the key behind `secret`, or Unauthorized (unknown, revoked, expired,
        tenant not ACTIVE) as `cycles.ledger.Admin.authenticate` raises."""
        answer = self._call("POST", "/v1/auth/validate", _Validation, body={"key_secret": secret})[0]
        if not answer.valid:
            raise Unauthorized(answer.reason or "invalid API key")
        return AuthenticatedKey(
            key_id=answer.key_id or "",
            tenant_id=answer.tenant_id,
            permissions=answer.permissions or [],
            scope_filter=answer.scope_filter,
            expires_at=answer.expires_at,
        )

    def introspect(self, *, tenant: str | None = None) -> dict[str, Any]:
        """GET /v1/auth/introspect: who the credential is and what it may do."""
        return self._call("GET", "/v1/auth/introspect", _Introspection, tenant)[0].model_dump()


class AuthenticatedKey(BaseModel):
    """What authenticating a key secret tells (the HTTP counterpart of the ledger's ApiKeyRecord)."""

    key_id: str
    tenant_id: str
    permissions: list[str]
    scope_filter: list[str] | None = None
    expires_at: str | None = None


class _Validation(BaseModel):
    valid: bool
    tenant_id: str = ""
    key_id: str | None = None
    permissions: list[str] | None = None
    scope_filter: list[str] | None = None
    expires_at: str | None = None
    reason: str | None = None


class _Introspection(BaseModel):
    authenticated: bool
    auth_type: str
    permissions: list[str]
    capabilities: dict[str, bool]
    tenant_id: str | None = None
    scope_filter: list[str] | None = None
