"""The admin plane under /v1/admin (governance spec shapes): tenants, budgets and their funding, policies, API keys,
and GET /v1/auth/introspect.

Admin-only routes need `X-Admin-API-Key`. Budget create, fund, list and lookup also take a tenant key holding
budgets:write / budgets:read, and policies a tenant key holding policies:write / policies:read, confined to that
key's own tenant. With the admin key, creating a budget needs `tenant_id` in the body and funding needs the
`tenant_id` query parameter (as the spec says); both must name the scope's tenant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import CyclesError, Forbidden, InvalidRequest, Unauthorized
from ..ledger import Ledger, events
from ..ledger.events import Actor, current_actor
from ..ledger.rules import iso
from ..scopes import tenant_of
from .auth import Authenticator, Principal, seen
from .wire import (
    check_timestamps,
    json_response,
    model_response,
    parse_json,
    path_id,
    query_dict,
    query_int,
    read_body,
    required_query,
)

# AuthIntrospectResponse.capabilities under auth_type=tenant (normative derivation table of the governance spec)
_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "view_budgets": ("budgets:read", "admin:read", "admin:budgets:read"),
    "view_policies": ("policies:read", "admin:read", "admin:policies:read"),
    "view_webhooks": ("webhooks:read", "admin:read", "admin:webhooks:read"),
    "view_events": ("events:read", "admin:read", "admin:events:read"),
    "view_reservations": (
        "reservations:list", "reservations:create", "reservations:commit", "reservations:release",
        "reservations:extend", "admin:read",
    ),
    "manage_budgets": ("budgets:write", "admin:write", "admin:budgets:write"),
    "manage_policies": ("policies:write", "admin:write", "admin:policies:write"),
    "manage_webhooks": ("webhooks:write", "admin:write", "admin:webhooks:write"),
    "manage_reservations": (
        "reservations:create", "reservations:commit", "reservations:release", "reservations:extend", "admin:write",
    ),
}  # fmt: skip
_ADMIN_ONLY_CAPABILITIES = (
    "view_overview", "view_audit", "view_tenants", "view_api_keys", "manage_tenants", "manage_api_keys",
)  # fmt: skip


def capabilities(principal: Principal) -> dict[str, bool]:
    if principal.is_admin:
        return {name: True for name in (*_CAPABILITIES, *_ADMIN_ONLY_CAPABILITIES)}
    caps = {name: any(p in principal.permissions for p in perms) for name, perms in _CAPABILITIES.items()}
    caps.update({name: False for name in _ADMIN_ONLY_CAPABILITIES})
    return caps


log = logging.getLogger("cycles.server")


def actor_of(request: Request, principal: Principal) -> Actor:
    """The caller as events and the audit log name it."""
    state = request.scope.get("state", {})
    return Actor(
        "admin" if principal.is_admin else "api_key",
        key_id=principal.key_id,
        source_ip=request.client.host if request.client else None,
        user_agent=request.headers.get("user-agent"),
        request_id=state.get("request_id"),
        trace_id=state.get("trace_id"),
    )


class AdminAPI:
    def __init__(self, ledger: Ledger, auth: Authenticator) -> None:
        self.ledger = ledger
        self.admin = ledger.admin
        self.auth = auth

    async def _run(
        self,
        request: Request,
        principal_of: Callable[[], Principal],
        operation: Callable[[Principal, dict[str, Any], dict[str, str]], Any],
        *,
        body: bool = False,
        optional_body: bool = False,
        audit: tuple[str, str] | None = None,
    ) -> Any:
        """Authenticate, parse, run `operation` as the caller (events.current_actor). `audit`: (operation id,
        resource type) of a change; the change audits itself when it succeeds, a refusal is audited here."""
        raw = await read_body(request.receive, request.headers) if body or optional_body else b""
        query = query_dict(request.scope["query_string"])

        def work() -> Any:
            principal = seen(request, principal_of())
            token = current_actor.set(actor_of(request, principal))
            try:
                data = parse_json(request.headers, raw, required=not optional_body) if body or optional_body else {}
                return operation(principal, data, query)
            except CyclesError as exc:
                if audit is not None:
                    self._refused(audit, principal, exc, request)
                raise
            finally:
                current_actor.reset(token)

        return await run_in_threadpool(work)

    def _refused(self, audit: tuple[str, str], principal: Principal, exc: CyclesError, request: Request) -> None:
        """Audit a refused change in a transaction of its own (the change's rolled back)."""
        resource_id = next(iter(request.path_params.values()), None) or request.query_params.get("scope")
        try:
            with self.ledger.store.transaction() as tx:
                events.audit(
                    tx, self.ledger._now(tx), audit[0], tenant_id=principal.tenant, resource_type=audit[1],
                    resource_id=resource_id, before=None, after=None, status=exc.status, error_code=exc.code,
                )  # fmt: skip
        except CyclesError:  # the store is busy: the refusal itself still reaches the caller
            log.warning("could not audit the refused %s", audit[0])

    @contextmanager
    def _changing_keys(self) -> Iterator[None]:
        """Around a change that may stop keys authenticating: this process forgets the keys it remembers (auth.py),
        also when the change fails half-way."""
        try:
            yield
        finally:
            self.auth.forget_keys()

    def _admin(self, request: Request) -> Callable[[], Principal]:
        return lambda: self.auth.admin(request.headers)

    def _either(self, request: Request, permission: str) -> Callable[[], Principal]:
        return lambda: self.auth.either(request.headers, permission)

    # ---------------------------------------------------------------------------------------------------- tenants
    async def create_tenant(self, request: Request) -> Response:
        tenant, created = await self._run(
            request,
            self._admin(request),
            lambda p, b, q: self.admin.create_tenant(b),
            body=True,
            audit=("createTenant", "tenant"),
        )
        return model_response(tenant, 201 if created else 200)

    async def list_tenants(self, request: Request) -> Response:
        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> BaseModel:
            return self.admin.list_tenants(cursor=q.get("cursor") or None, limit=query_int(q, "limit", 50))

        return model_response(await self._run(request, self._admin(request), op))

    async def get_tenant(self, request: Request) -> Response:
        tenant_id = path_id(request.path_params["tenant_id"], "tenant_id")
        result = await self._run(request, self._admin(request), lambda p, b, q: self.admin.get_tenant(tenant_id))
        return model_response(result)

    async def update_tenant(self, request: Request) -> Response:
        tenant_id = path_id(request.path_params["tenant_id"], "tenant_id")
        with self._changing_keys():  # a tenant's status decides whether its keys authenticate
            result = await self._run(
                request,
                self._admin(request),
                lambda p, b, q: self.admin.update_tenant(tenant_id, b),
                body=True,
                audit=("updateTenant", "tenant"),
            )
        return model_response(result)

    # ---------------------------------------------------------------------------------------------------- budgets
    async def create_budget(self, request: Request) -> Response:
        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> BaseModel:
            if p.is_admin and not b.get("tenant_id"):
                raise InvalidRequest("tenant_id is required in the body when using admin key authentication")
            return self.admin.create_budget(b, tenant=p.tenant)

        result = await self._run(
            request, self._either(request, "budgets:write"), op, body=True, audit=("createBudget", "budget")
        )
        return model_response(result, 201)

    async def list_budgets(self, request: Request) -> Response:
        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> BaseModel:
            return self.admin.list_budgets(
                tenant=p.tenant,
                tenant_id=q.get("tenant_id") or None,
                scope_prefix=q.get("scope_prefix") or None,
                unit=q.get("unit") or None,
                cursor=q.get("cursor") or None,
                limit=query_int(q, "limit", 50),
            )

        return model_response(await self._run(request, self._either(request, "budgets:read"), op))

    async def lookup_budget(self, request: Request) -> Response:
        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> BaseModel:
            scope, unit = required_query(q, "scope", "unit")
            return self.admin.get_budget(scope, unit, tenant=p.tenant)

        return model_response(await self._run(request, self._either(request, "budgets:read"), op))

    async def update_budget(self, request: Request) -> Response:
        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> BaseModel:
            scope, unit = required_query(q, "scope", "unit")
            return self.admin.update_budget(scope, unit, b)

        return model_response(
            await self._run(request, self._admin(request), op, body=True, audit=("updateBudget", "budget"))
        )

    async def fund(self, request: Request) -> Response:
        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> BaseModel:
            scope, unit = required_query(q, "scope", "unit")
            if p.is_admin:
                owner = tenant_of(scope)  # a malformed scope is reported as such first
                (tenant_id,) = required_query(q, "tenant_id")
                if owner != tenant_id:
                    raise InvalidRequest(f"scope {scope!r} is not under tenant_id {tenant_id!r}")
            elif q.get("tenant_id") and q["tenant_id"] != p.tenant:
                raise Forbidden(f"tenant_id {q['tenant_id']!r} is not the authenticated tenant")
            return self.admin.fund(scope, unit, b, tenant=p.tenant)

        result = await self._run(
            request, self._either(request, "budgets:write"), op, body=True, audit=("fundBudget", "budget")
        )
        return model_response(result)

    async def freeze(self, request: Request) -> Response:
        return await self._status(request, self.admin.freeze, "freezeBudget")

    async def unfreeze(self, request: Request) -> Response:
        return await self._status(request, self.admin.unfreeze, "unfreezeBudget")

    async def _status(self, request: Request, change: Callable[..., BaseModel], operation: str) -> Response:
        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> BaseModel:
            scope, unit = required_query(q, "scope", "unit")
            return change(scope, unit)

        # the optional body ({reason}) is accepted and checked to be a JSON object, not stored
        return model_response(
            await self._run(request, self._admin(request), op, optional_body=True, audit=(operation, "budget"))
        )

    # --------------------------------------------------------------------------------------------------- policies
    async def create_policy(self, request: Request) -> Response:
        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> BaseModel:
            check_timestamps(b, "effective_from", "effective_until")
            return self.admin.create_policy(b, tenant=p.tenant)

        result = await self._run(
            request, self._either(request, "policies:write"), op, body=True, audit=("createPolicy", "policy")
        )
        return model_response(result, 201)

    async def list_policies(self, request: Request) -> Response:
        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> BaseModel:
            return self.admin.list_policies(tenant=p.tenant, tenant_id=q.get("tenant_id") or None)

        return model_response(await self._run(request, self._either(request, "policies:read"), op))

    async def update_policy(self, request: Request) -> Response:
        policy_id = path_id(request.path_params["policy_id"], "policy_id")

        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> BaseModel:
            check_timestamps(b, "effective_from", "effective_until")
            return self.admin.update_policy(policy_id, b, tenant=p.tenant)

        result = await self._run(
            request, self._either(request, "policies:write"), op, body=True, audit=("updatePolicy", "policy")
        )
        return model_response(result)

    # --------------------------------------------------------------------------------------------------- api keys
    async def create_api_key(self, request: Request) -> Response:
        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> BaseModel:
            check_timestamps(b, "expires_at")
            return self.admin.create_api_key(b)

        result = await self._run(request, self._admin(request), op, body=True, audit=("createApiKey", "api_key"))
        return model_response(result, 201)

    async def list_api_keys(self, request: Request) -> Response:
        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> BaseModel:
            return self.admin.list_api_keys(
                tenant_id=q.get("tenant_id") or None, cursor=q.get("cursor") or None, limit=query_int(q, "limit", 50)
            )

        return model_response(await self._run(request, self._admin(request), op))

    async def update_api_key(self, request: Request) -> Response:
        key_id = path_id(request.path_params["key_id"], "key_id")
        with self._changing_keys():
            result = await self._run(
                request,
                self._admin(request),
                lambda p, b, q: self.admin.update_api_key(key_id, b),
                body=True,
                audit=("updateApiKey", "api_key"),
            )
        return model_response(result)

    async def revoke_api_key(self, request: Request) -> Response:
        key_id = path_id(request.path_params["key_id"], "key_id")

        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> BaseModel:
            reason = q.get("reason") or None
            if reason is not None and len(reason) > 512:
                raise InvalidRequest("reason must be at most 512 characters")
            return self.admin.revoke_api_key(key_id, reason)

        with self._changing_keys():
            return model_response(await self._run(request, self._admin(request), op, audit=("revokeApiKey", "api_key")))

    # ----------------------------------------------------------------------------------------------- validation
    async def validate(self, request: Request) -> Response:
        """POST /v1/auth/validate (admin): is this key secret valid, and whose is it? Never echoes the secret."""

        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> dict[str, Any]:
            secret = b.get("key_secret")
            if not isinstance(secret, str):
                raise InvalidRequest("key_secret (string) is required")
            try:
                k = self.admin.authenticate(secret)
            except Unauthorized as exc:
                return {"valid": False, "tenant_id": "", "reason": exc.message}
            body: dict[str, Any] = {
                "valid": True, "tenant_id": k.tenant_id, "key_id": k.key_id, "permissions": list(k.permissions),
                "expires_at": iso(k.expires_at_ms),
            }  # fmt: skip
            if k.scope_filter:
                body["scope_filter"] = list(k.scope_filter)
            return body

        return json_response(await self._run(request, self._admin(request), op, body=True))

    # ----------------------------------------------------------------------------------------------- introspect
    async def introspect(self, request: Request) -> Response:
        def work() -> Principal:
            return self.auth.either(request.headers, None)

        principal = await run_in_threadpool(work)
        body: dict[str, Any] = {
            "authenticated": True,
            "auth_type": "admin" if principal.is_admin else "tenant",
            "permissions": ["*"] if principal.is_admin else sorted(principal.permissions),
            "capabilities": capabilities(principal),
        }
        if not principal.is_admin:
            request.state.tenant = principal.tenant
            body["tenant_id"] = principal.tenant
            if principal.scope_filter:
                body["scope_filter"] = list(principal.scope_filter)
        return json_response(body)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/admin/tenants", self.create_tenant, methods=["POST"]),
            Route("/v1/admin/tenants", self.list_tenants, methods=["GET"]),
            Route("/v1/admin/tenants/{tenant_id}", self.get_tenant, methods=["GET"]),
            Route("/v1/admin/tenants/{tenant_id}", self.update_tenant, methods=["PATCH"]),
            Route("/v1/admin/budgets", self.create_budget, methods=["POST"]),
            Route("/v1/admin/budgets", self.list_budgets, methods=["GET"]),
            Route("/v1/admin/budgets", self.update_budget, methods=["PATCH"]),
            Route("/v1/admin/budgets/lookup", self.lookup_budget, methods=["GET"]),
            Route("/v1/admin/budgets/fund", self.fund, methods=["POST"]),
            Route("/v1/admin/budgets/freeze", self.freeze, methods=["POST"]),
            Route("/v1/admin/budgets/unfreeze", self.unfreeze, methods=["POST"]),
            Route("/v1/admin/policies", self.create_policy, methods=["POST"]),
            Route("/v1/admin/policies", self.list_policies, methods=["GET"]),
            Route("/v1/admin/policies/{policy_id}", self.update_policy, methods=["PATCH"]),
            Route("/v1/admin/api-keys", self.create_api_key, methods=["POST"]),
            Route("/v1/admin/api-keys", self.list_api_keys, methods=["GET"]),
            Route("/v1/admin/api-keys/{key_id}", self.update_api_key, methods=["PATCH"]),
            Route("/v1/admin/api-keys/{key_id}", self.revoke_api_key, methods=["DELETE"]),
            Route("/v1/auth/validate", self.validate, methods=["POST"]),
        ]


__all__ = ["AdminAPI", "capabilities"]
