"""Webhook subscriptions and their deliveries, as ledger operations (the admin spec's /v1/admin/webhooks and the
tenant's /v1/webhooks). Sending is the server's job (cycles.server.webhooks); this module decides what is sent,
and records what happened.

A subscription selects events by type and by category (additive) and optionally by scope. Its owner is a tenant or
`__system__` (every tenant's events); a tenant-owned subscription may only select budget, reservation and tenant
events (the spec's TENANT-ACCESSIBLE BOUNDARY). Targets on private, loopback or link-local addresses are refused
unless the server allows them (`allow_private`): a webhook must not become a way to reach the server's own network.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import secrets
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from ..errors import Forbidden, InvalidRequest, NotFound
from . import events
from .rules import decode_cursor, encode_cursor, iso, new_id, parse
from .store import DeliveryRecord, OutboxEvent, Transaction, WebhookRecord, retrying_methods

if TYPE_CHECKING:
    from .rules import Ledger

EVENT_TYPES = frozenset(
    f"{category}.{action}"
    for category, actions in {
        "budget": "created updated funded debited reset reset_spent debt_repaid frozen unfrozen closed "
        "closed_via_tenant_cascade threshold_crossed exhausted over_limit_entered over_limit_exited debt_incurred "
        "burn_rate_anomaly",
        "reservation": "denied denial_rate_spike expired expiry_rate_spike commit_overage released_via_tenant_cascade",
        "tenant": "created updated suspended reactivated closed settings_changed",
        "webhook": "created updated paused resumed disabled deleted disabled_via_tenant_cascade",
        "api_key": "created revoked revoked_via_tenant_cascade expired permissions_changed auth_failed "
        "auth_failure_rate_spike",
        "policy": "created updated deleted",
        "system": "store_connection_lost store_connection_restored high_latency webhook_delivery_failed webhook_test",
    }.items()
    for action in actions.split()
)
RETRY_DEFAULTS = {"max_retries": 5, "initial_delay_ms": 1000, "backoff_multiplier": 2.0, "max_delay_ms": 60_000}


class RetryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_retries: int = Field(5, ge=0, le=10)
    initial_delay_ms: int = Field(1000, ge=100, le=60_000)
    backoff_multiplier: float = Field(2.0, ge=1.0, le=10.0)
    max_delay_ms: int = Field(60_000, ge=1000, le=3_600_000)


class _Selector(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=256)
    description: str | None = Field(None, max_length=1024)
    url: str | None = Field(None, max_length=2048)
    event_types: list[str] | None = None
    event_categories: list[str] | None = None
    scope_filter: str | None = Field(None, max_length=512)
    thresholds: dict[str, Any] | None = None
    signing_secret: str | None = Field(None, min_length=16, max_length=256)
    headers: dict[str, str] | None = None
    retry_policy: RetryPolicy | None = None
    disable_after_failures: int | None = Field(None, ge=1, le=1000)
    metadata: dict[str, Any] | None = None


class WebhookCreateRequest(_Selector):
    url: str = Field(max_length=2048)
    event_types: list[str] = Field(min_length=1)


class WebhookUpdateRequest(_Selector):
    status: str | None = Field(None, pattern="^(ACTIVE|PAUSED)$")


def check_target(url: str, *, allow_private: bool) -> None:
    """Refuse (400) a URL that is not http(s), or whose host is (or resolves to) a private, loopback, link-local
    or otherwise non-global address, unless `allow_private`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"webhook url must be an http(s) URL with a host, got {url!r}")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise InvalidRequest(f"webhook host {parts.hostname!r} does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise InvalidRequest(
                f"webhook url {url!r} points at a non-public address ({address}); the server refuses private and "
                "loopback targets unless started with --webhook-allow-private",
                details={"url": url, "address": str(address)},
            )


def subscription_body(w: WebhookRecord) -> dict[str, Any]:
    """The spec's WebhookSubscription, without the signing secret (it is shown once, at creation)."""
    body: dict[str, Any] = {
        "subscription_id": w.subscription_id,
        "tenant_id": w.tenant_id,
        "url": w.url,
        "event_types": w.event_types,
        "event_categories": w.event_categories,
        "status": w.status,
        "retry_policy": {**RETRY_DEFAULTS, **w.retry_policy},
        "disable_after_failures": w.disable_after_failures,
        "consecutive_failures": w.consecutive_failures,
        "created_at": iso(w.created_at_ms),
        "updated_at": iso(w.updated_at_ms),
    }
    for name in ("name", "description", "scope_filter", "headers", "metadata"):
        if (value := getattr(w, name)) is not None:
            body[name] = value
    for name in ("last_triggered_at", "last_success_at", "last_failure_at"):
        if (ms := getattr(w, name + "_ms")) is not None:
            body[name] = iso(ms)
    return body


def delivery_body(d: DeliveryRecord) -> dict[str, Any]:
    body: dict[str, Any] = {
        "delivery_id": d.delivery_id,
        "subscription_id": d.subscription_id,
        "event_id": d.event_id,
        "event_type": d.event_type,
        "status": d.status,
        "attempted_at": iso(d.attempted_at_ms if d.attempted_at_ms is not None else d.created_at_ms),
        "attempts": d.attempts,
    }
    if d.completed_at_ms is not None:
        body["completed_at"] = iso(d.completed_at_ms)
    if d.status == "RETRYING":
        body["next_retry_at"] = iso(d.next_attempt_at_ms)
    for name in ("response_status", "response_time_ms", "error_message"):
        if (value := getattr(d, name)) is not None:
            body[name] = value
    return body


@retrying_methods  # each public method is one operation, run again on a store.Conflict (an optimistic store)
class Webhooks:
    """`tenant` on a call is the authenticated tenant (a tenant key: its own subscriptions only); None is the admin,
    which names the owner with `tenant_id` (omitted: `__system__`)."""

    def __init__(self, ledger: Ledger, *, allow_private: bool = False) -> None:
        self.ledger = ledger
        self.allow_private = allow_private

    # ------------------------------------------------------------------------------------------- subscriptions
    def _check_selectors(self, owner: str, types: list[str], categories: list[str]) -> None:
        for t in types:
            if t not in EVENT_TYPES and not t.startswith("custom."):
                raise InvalidRequest(f"unknown event type {t!r}", details={"event_type": t})
        for c in categories:
            if c not in events.CATEGORIES:
                raise InvalidRequest(f"unknown event category {c!r}", details={"event_category": c})
        if owner != events.SYSTEM_TENANT:
            restricted = [t for t in types if t.split(".", 1)[0] not in events.TENANT_CATEGORIES]
            restricted += [c for c in categories if c not in events.TENANT_CATEGORIES]
            if restricted:
                raise InvalidRequest(
                    f"a tenant's subscription may only select budget, reservation and tenant events, not "
                    f"{', '.join(restricted)}",
                    details={"restricted": restricted},
                )
        if not types and not categories:
            raise InvalidRequest("a subscription needs at least one event type or event category")

    def create(
        self, request: WebhookCreateRequest | Mapping[str, Any], *, tenant: str | None, tenant_id: str | None = None
    ) -> dict[str, Any]:
        """The spec's WebhookCreateResponse: the subscription and its signing secret (shown only here)."""
        req = parse(WebhookCreateRequest, request)
        owner = tenant or tenant_id or events.SYSTEM_TENANT
        self._check_selectors(owner, req.event_types, req.event_categories or [])
        check_target(req.url, allow_private=self.allow_private)
        secret = req.signing_secret or "whsec_" + secrets.token_urlsafe(32)
        with self.ledger.begin(sweep=False) as (tx, now):
            events.require_events(tx)
            if owner != events.SYSTEM_TENANT and tenant is None and tx.get_tenant(owner) is None:
                raise NotFound(f"tenant {owner!r} not found", details={"tenant_id": owner})
            w = WebhookRecord(
                subscription_id=new_id("whsub_"),
                tenant_id=owner,
                url=req.url,
                signing_secret=secret,
                event_types=list(req.event_types),
                event_categories=list(req.event_categories or []),
                created_at_ms=now,
                updated_at_ms=now,
                name=req.name,
                description=req.description,
                scope_filter=req.scope_filter,
                headers=req.headers,
                retry_policy=req.retry_policy.model_dump() if req.retry_policy else {},
                disable_after_failures=req.disable_after_failures or 10,
                metadata=req.metadata,
            )
            tx.put_webhook(w)
            body = subscription_body(w)
            self._changed(tx, now, "createWebhookSubscription", w, None, body, "webhook.created", tenant, status=201)
        return {"subscription": body, "signing_secret": secret}

    def _owned(self, tx: Transaction, subscription_id: str, tenant: str | None) -> WebhookRecord:
        events.require_events(tx)
        w = tx.get_webhook(subscription_id)
        if w is None or (tenant is not None and w.tenant_id != tenant):
            raise NotFound(f"webhook subscription {subscription_id!r} not found",
                           details={"subscription_id": subscription_id})  # fmt: skip
        return w

    def get(self, subscription_id: str, *, tenant: str | None) -> dict[str, Any]:
        with self.ledger.store.transaction(readonly=True) as tx:
            return subscription_body(self._owned(tx, subscription_id, tenant))

    def list(self, query: Mapping[str, str], *, tenant: str | None) -> dict[str, Any]:
        """WebhookListResponse, by subscription id; filters: tenant_id (admin), status, event_type."""
        if tenant is not None and query.get("tenant_id") not in (None, "", tenant):
            raise Forbidden(f"tenant_id {query['tenant_id']!r} is not the authenticated tenant")
        owner = tenant or query.get("tenant_id") or None
        status, event_type = query.get("status") or None, query.get("event_type") or None
        text = query.get("limit") or "50"
        if not text.isdigit() or not 1 <= int(text) <= 100:
            raise InvalidRequest("limit must be an integer between 1 and 100")
        limit, query_hash = int(text), f"webhooks:{owner}:{status}:{event_type}"
        after = decode_cursor(query["cursor"], query_hash)[0] if query.get("cursor") else None
        found: list[WebhookRecord] = []
        with self.ledger.store.transaction(readonly=True) as tx:
            events.require_events(tx)
            while len(found) <= limit:  # filtered after the read: subscriptions are few
                rows = tx.list_webhooks(owner, after, 200)
                found += [w for w in rows if (status is None or w.status == status)
                          and (event_type is None or event_type in w.event_types)]  # fmt: skip
                if len(rows) < 200:
                    break
                after = rows[-1].subscription_id
        more, page = len(found) > limit, found[:limit]
        body: dict[str, Any] = {"subscriptions": [subscription_body(w) for w in page], "has_more": more}
        if more:
            body["next_cursor"] = encode_cursor([page[-1].subscription_id], query_hash)
        return body

    def update(
        self, subscription_id: str, request: WebhookUpdateRequest | Mapping[str, Any], *, tenant: str | None
    ) -> dict[str, Any]:
        req = parse(WebhookUpdateRequest, request)
        if req.url is not None:
            check_target(req.url, allow_private=self.allow_private)
        with self.ledger.begin(sweep=False) as (tx, now):
            w = self._owned(tx, subscription_id, tenant)
            before = subscription_body(w)
            changes = req.model_dump(exclude_none=True)
            types = changes.get("event_types", w.event_types) or []
            categories = changes.get("event_categories", w.event_categories) or []
            self._check_selectors(w.tenant_id, types, categories)
            previous_status = w.status
            for name, value in changes.items():
                setattr(w, name, value)
            if changes.get("status") == "ACTIVE":
                w.consecutive_failures = 0  # re-enabled: a fresh start
            w.updated_at_ms = now
            tx.put_webhook(w)
            after = subscription_body(w)
            kind = "webhook.updated"
            if w.status != previous_status:
                kind = "webhook.paused" if w.status == "PAUSED" else "webhook.resumed"
            self._changed(tx, now, "updateWebhookSubscription", w, before, after, kind, tenant,
                          changed=sorted(changes), previous_status=previous_status)  # fmt: skip
        return after

    def delete(self, subscription_id: str, *, tenant: str | None) -> None:
        with self.ledger.begin(sweep=False) as (tx, now):
            w = self._owned(tx, subscription_id, tenant)
            before = subscription_body(w)
            tx.delete_webhook(subscription_id)
            self._changed(tx, now, "deleteWebhookSubscription", w, before, None, "webhook.deleted", tenant,
                          status=204)  # fmt: skip

    @staticmethod
    def _changed(
        tx: Transaction,
        now: int,
        operation: str,
        w: WebhookRecord,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        event_type: str,
        tenant: str | None,
        *,
        status: int = 200,
        changed: list[str] | None = None,
        previous_status: str | None = None,
    ) -> None:
        events.audit(tx, now, operation, tenant_id=tenant, resource_type="webhook", resource_id=w.subscription_id,
                     before=before, after=after, status=status)  # fmt: skip
        data: dict[str, Any] = {"subscription_id": w.subscription_id, "tenant_id": w.tenant_id,
                                "new_status": w.status if after is not None else "DELETED"}  # fmt: skip
        if previous_status is not None:
            data["previous_status"] = previous_status
        if changed:
            data["changed_fields"] = changed
        # webhook.* events are admin telemetry: they go to __system__ subscriptions only
        events.emit(tx, now, event_type, events.SYSTEM_TENANT, data)

    # ------------------------------------------------------------------------------------------------ deliveries
    def deliveries(self, subscription_id: str, query: Mapping[str, str], *, tenant: str | None) -> dict[str, Any]:
        status = query.get("status") or None
        if status is not None and status not in ("PENDING", "SUCCESS", "FAILED", "RETRYING"):
            raise InvalidRequest(f"status must be PENDING, SUCCESS, FAILED or RETRYING, got {status!r}")
        text = query.get("limit") or "50"
        if not text.isdigit() or not 1 <= int(text) <= 100:
            raise InvalidRequest("limit must be an integer between 1 and 100")
        limit, query_hash = int(text), f"deliveries:{subscription_id}:{status}"
        after = tuple(decode_cursor(query["cursor"], query_hash)) if query.get("cursor") else None
        with self.ledger.store.transaction(readonly=True) as tx:
            self._owned(tx, subscription_id, tenant)
            rows = tx.list_deliveries(subscription_id, status, after, limit + 1)  # type: ignore[arg-type]
        more, rows = len(rows) > limit, rows[:limit]
        body: dict[str, Any] = {"deliveries": [delivery_body(d) for d in rows], "has_more": more}
        if more:
            body["next_cursor"] = encode_cursor([rows[-1].created_at_ms, rows[-1].delivery_id], query_hash)
        return body

    def test_event(self, subscription_id: str, *, tenant: str | None) -> tuple[WebhookRecord, OutboxEvent]:
        """A system.webhook_test event for this subscription (in the outbox; the caller sends it at once)."""
        with self.ledger.begin(sweep=False) as (tx, now):
            w = self._owned(tx, subscription_id, tenant)
            event = OutboxEvent(
                event_id=new_id("evt_"), event_type="system.webhook_test", tenant_id=w.tenant_id, created_at_ms=now,
                data={"subscription_id": w.subscription_id, "message": "a test event from cycles"},
                actor=(events.current_actor.get() or events.SYSTEM).body(),
            )  # fmt: skip
            tx.add_event(event)
            events.audit(tx, now, "testWebhookSubscription", tenant_id=tenant, resource_type="webhook",
                         resource_id=w.subscription_id, before=None, after=None)  # fmt: skip
        return w, event

    # ------------------------------------------------------------------------------------------------ the worker
    def claim(self, lease_ms: int, limit: int) -> list[tuple[DeliveryRecord, WebhookRecord | None, OutboxEvent | None]]:
        """Lease up to `limit` due deliveries, with their subscription and event (None when since deleted)."""
        with self.ledger.store.transaction() as tx:
            if not events.keeps_events(tx):  # nothing was ever queued
                return []
            now = self.ledger._now(tx)
            claimed = tx.claim_deliveries(now, lease_ms, limit)
            return [(d, tx.get_webhook(d.subscription_id), tx.get_event(d.event_id)) for d in claimed]

    def settle(
        self,
        delivery: DeliveryRecord,
        *,
        status: int | None,
        elapsed_ms: int,
        error: str | None = None,
        hold_ms: int = 0,
    ) -> DeliveryRecord:
        """Record one attempt: a 2xx `status` is SUCCESS; anything else is RETRYING with exponential backoff, or
        FAILED after max_retries (a system.webhook_delivery_failed event). Consecutive failures past the
        subscription's disable_after_failures disable it (a webhook.disabled event). `hold_ms` > 0: not attempted
        (the subscription is paused or disabled), try again that much later."""
        with self.ledger.store.transaction() as tx:
            now = self.ledger._now(tx)
            d = dataclasses.replace(delivery)  # leased to this worker; a copy, should the operation run again
            w = tx.get_webhook(d.subscription_id)
            d.lease_until_ms = 0
            if hold_ms:
                d.next_attempt_at_ms = now + hold_ms
                tx.put_delivery(d)
                return d
            d.attempts += 1
            d.attempted_at_ms = now
            d.response_status, d.response_time_ms, d.error_message = status, elapsed_ms, error
            ok = status is not None and 200 <= status < 300
            if w is None:
                d.status, d.completed_at_ms = "FAILED", now
                d.error_message = "the subscription was deleted"
                tx.put_delivery(d)
                return d
            w.last_triggered_at_ms = now
            policy = {**RETRY_DEFAULTS, **w.retry_policy}
            if ok:
                d.status, d.completed_at_ms, d.error_message = "SUCCESS", now, None
                w.consecutive_failures, w.last_success_at_ms = 0, now
            else:
                w.consecutive_failures += 1
                w.last_failure_at_ms = now
                if d.attempts > policy["max_retries"]:
                    d.status, d.completed_at_ms = "FAILED", now
                    events.emit(
                        tx, now, "system.webhook_delivery_failed", events.SYSTEM_TENANT,
                        {"subscription_id": w.subscription_id, "tenant_id": w.tenant_id, "event_id": d.event_id,
                         "delivery_id": d.delivery_id, "attempts": d.attempts, "error": d.error_message or ""},
                        actor=events.SYSTEM, source="webhook-dispatcher",
                    )  # fmt: skip
                else:
                    delay = policy["initial_delay_ms"] * policy["backoff_multiplier"] ** (d.attempts - 1)
                    d.status, d.next_attempt_at_ms = "RETRYING", now + int(min(delay, policy["max_delay_ms"]))
                if w.status == "ACTIVE" and w.consecutive_failures >= w.disable_after_failures:
                    w.status = "DISABLED"
                    events.emit(
                        tx, now, "webhook.disabled", events.SYSTEM_TENANT,
                        {"subscription_id": w.subscription_id, "tenant_id": w.tenant_id, "previous_status": "ACTIVE",
                         "new_status": "DISABLED", "disable_reason": "consecutive_failures_exceeded_threshold"},
                        actor=events.SYSTEM, source="webhook-dispatcher",
                        correlation_id=f"webhook_auto_disable:{w.subscription_id}:{d.delivery_id}",
                    )  # fmt: skip
            w.updated_at_ms = now
            tx.put_webhook(w)
            tx.put_delivery(d)
            return d
