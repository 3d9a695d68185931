"""The observability routes: events, the audit log and webhook subscriptions (admin spec paths).

Admin key: GET /v1/admin/events[/{event_id}], GET /v1/admin/audit/logs, and /v1/admin/webhooks[/{id}[/test,
/deliveries]] (`tenant_id` names the owner of a new subscription; omitted, it is `__system__`, which receives every
tenant's events). Tenant key: GET /v1/events (events:read) and /v1/webhooks[...] (webhooks:read / webhooks:write),
confined to the key's own tenant.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..ledger import events
from ..ledger.webhooks import Webhooks, delivery_body
from .admin import AdminAPI
from .auth import Principal
from .webhooks import send
from .wire import json_response, path_id


class ObservabilityAPI:
    def __init__(self, admin: AdminAPI, webhooks: Webhooks) -> None:
        self.api = admin
        self.ledger = admin.ledger
        self.webhooks = webhooks

    def _principal(self, request: Request, permission: str, admin: bool) -> Callable[[], Principal]:
        """The admin key on the /v1/admin paths; a tenant key holding `permission` on the others."""
        if admin:
            return self.api._admin(request)
        return lambda: self.api.auth.tenant(request.headers, permission)

    # ------------------------------------------------------------------------------------------------- events
    async def list_events(self, request: Request, admin: bool) -> Response:
        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> dict[str, Any]:
            return events.list_events(self.ledger, q, tenant=p.tenant)

        return json_response(await self.api._run(request, self._principal(request, "events:read", admin), op))

    async def get_event(self, request: Request, admin: bool) -> Response:
        event_id = path_id(request.path_params["event_id"], "event_id")

        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> dict[str, Any]:
            return events.get_event(self.ledger, event_id, tenant=p.tenant)

        return json_response(await self.api._run(request, self._principal(request, "events:read", admin), op))

    async def audit_logs(self, request: Request) -> Response:
        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> dict[str, Any]:
            return events.list_audit_logs(self.ledger, q)

        return json_response(await self.api._run(request, self.api._admin(request), op))

    # ----------------------------------------------------------------------------------------------- webhooks
    async def create_webhook(self, request: Request, admin: bool) -> Response:
        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> dict[str, Any]:
            return self.webhooks.create(b, tenant=p.tenant, tenant_id=q.get("tenant_id") or None)

        principal = self._principal(request, "webhooks:write", admin)
        audit = ("createWebhookSubscription", "webhook")
        return json_response(await self.api._run(request, principal, op, body=True, audit=audit), 201)

    async def list_webhooks(self, request: Request, admin: bool) -> Response:
        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> dict[str, Any]:
            return self.webhooks.list(q, tenant=p.tenant)

        return json_response(await self.api._run(request, self._principal(request, "webhooks:read", admin), op))

    async def get_webhook(self, request: Request, admin: bool) -> Response:
        sid = path_id(request.path_params["subscription_id"], "subscription_id")

        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> dict[str, Any]:
            return self.webhooks.get(sid, tenant=p.tenant)

        return json_response(await self.api._run(request, self._principal(request, "webhooks:read", admin), op))

    async def update_webhook(self, request: Request, admin: bool) -> Response:
        sid = path_id(request.path_params["subscription_id"], "subscription_id")

        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> dict[str, Any]:
            return self.webhooks.update(sid, b, tenant=p.tenant)

        principal = self._principal(request, "webhooks:write", admin)
        audit = ("updateWebhookSubscription", "webhook")
        return json_response(await self.api._run(request, principal, op, body=True, audit=audit))

    async def delete_webhook(self, request: Request, admin: bool) -> Response:
        sid = path_id(request.path_params["subscription_id"], "subscription_id")

        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> None:
            self.webhooks.delete(sid, tenant=p.tenant)

        principal = self._principal(request, "webhooks:write", admin)
        await self.api._run(request, principal, op, audit=("deleteWebhookSubscription", "webhook"))
        return Response(status_code=204)

    async def deliveries(self, request: Request, admin: bool) -> Response:
        sid = path_id(request.path_params["subscription_id"], "subscription_id")

        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> dict[str, Any]:
            return self.webhooks.deliveries(sid, q, tenant=p.tenant)

        return json_response(await self.api._run(request, self._principal(request, "webhooks:read", admin), op))

    async def test_webhook(self, request: Request, admin: bool) -> Response:
        """Send a system.webhook_test event now and report how the endpoint answered (WebhookTestResponse)."""
        sid = path_id(request.path_params["subscription_id"], "subscription_id")

        def op(p: Principal, b: dict[str, Any], q: dict[str, str]) -> Any:
            return self.webhooks.test_event(sid, tenant=p.tenant)

        principal = self._principal(request, "webhooks:write", admin)
        sub, event = await self.api._run(request, principal, op, audit=("testWebhookSubscription", "webhook"))
        async with httpx.AsyncClient(timeout=10.0, follow_redirects=False) as client:
            status, elapsed, error = await send(client, sub, event, allow_private=self.webhooks.allow_private)
        body: dict[str, Any] = {"success": error is None, "response_time_ms": elapsed, "event_id": event.event_id}
        if status is not None:
            body["response_status"] = status
        if error is not None:
            body["error_message"] = error
        return json_response(body)

    def routes(self, *, admin: bool) -> list[Route]:
        """The tenant-key routes; with `admin`, the /v1/admin ones too."""
        planes = [("/v1", False)] + ([("/v1/admin", True)] if admin else [])
        routes = []
        for prefix, is_admin in planes:
            base, one = prefix + "/webhooks", prefix + "/webhooks/{subscription_id}"
            routes += [
                Route(base, partial(self.create_webhook, admin=is_admin), methods=["POST"]),
                Route(base, partial(self.list_webhooks, admin=is_admin), methods=["GET"]),
                Route(one, partial(self.get_webhook, admin=is_admin), methods=["GET"]),
                Route(one, partial(self.update_webhook, admin=is_admin), methods=["PATCH"]),
                Route(one, partial(self.delete_webhook, admin=is_admin), methods=["DELETE"]),
                Route(one + "/test", partial(self.test_webhook, admin=is_admin), methods=["POST"]),
                Route(one + "/deliveries", partial(self.deliveries, admin=is_admin), methods=["GET"]),
            ]
        routes.append(Route("/v1/events", partial(self.list_events, admin=False), methods=["GET"]))  # POST: runtime
        if admin:
            routes += [
                Route("/v1/admin/events", partial(self.list_events, admin=True), methods=["GET"]),
                Route("/v1/admin/events/{event_id}", partial(self.get_event, admin=True), methods=["GET"]),
                Route("/v1/admin/audit/logs", self.audit_logs, methods=["GET"]),
            ]
        return routes


__all__ = ["ObservabilityAPI", "delivery_body"]
