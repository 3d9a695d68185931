"""The webhook delivery worker of `cycles serve`: events from the outbox, POSTed to their subscriptions.

Every interval the worker claims due deliveries with a lease (a claim, not a pop: the delivery stays in the store,
leased until now + lease), sends each one, then records the outcome (ledger/webhooks.py: success, retry with
exponential backoff, failure, auto-disable). A worker that dies between claim and send leaves its deliveries to be
claimed again when the lease runs out, so every delivery is sent at least once; receivers deduplicate on
`X-Cycles-Event-Id`. Every worker process runs one: claims are transactions, so two never hold the same delivery.

Each request carries `X-Cycles-Signature: sha256=<hex HMAC-SHA256 of the body under the subscription's signing
secret>`, `X-Cycles-Event-Id`, `X-Cycles-Event-Type` and `X-Cycles-Delivery-Id`. Redirects are not followed, and a
target resolving to a private or loopback address is refused at send time too unless allowed.

`CYCLES_WEBHOOK_STALL_AFTER_CLAIM=<seconds>` (tests only) makes the worker wait that long between claim and send,
so a test can kill the process at exactly that point.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time

import httpx
from starlette.concurrency import run_in_threadpool

from ..errors import CyclesError
from ..ledger import Ledger
from ..ledger.events import event_body
from ..ledger.store import OutboxEvent, WebhookRecord
from ..ledger.webhooks import Webhooks, check_target

log = logging.getLogger("cycles.server")

USER_AGENT = "cycles-webhooks/0.1"
HOLD_MS = 60_000  # a paused or disabled subscription's deliveries wait this long between looks


def sign(secret: str, body: bytes) -> str:
    """The X-Cycles-Signature value of `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """For receivers: does `signature` (the X-Cycles-Signature header) sign `body`?"""
    return hmac.compare_digest(sign(secret, body), signature)


async def send(
    client: httpx.AsyncClient, sub: WebhookRecord, event: OutboxEvent, *, allow_private: bool, delivery_id: str = ""
) -> tuple[int | None, int, str | None]:
    """POST one event; (HTTP status or None, elapsed ms, error message or None). Never raises."""
    body = json.dumps(event_body(event), separators=(",", ":")).encode()
    headers = {
        **(sub.headers or {}),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "x-cycles-signature": sign(sub.signing_secret, body),
        "x-cycles-event-id": event.event_id,
        "x-cycles-event-type": event.event_type,
    }
    if delivery_id:
        headers["x-cycles-delivery-id"] = delivery_id
    started = time.perf_counter()
    try:
        if not allow_private:  # resolved again here: an address may have changed since the subscription was made
            await run_in_threadpool(check_target, sub.url, allow_private=False)
        response = await client.post(sub.url, content=body, headers=headers)
    except CyclesError as exc:
        return None, _ms(started), exc.message
    except httpx.HTTPError as exc:
        return None, _ms(started), f"{type(exc).__name__}: {exc}"[:512]
    error = None if response.is_success else f"HTTP {response.status_code}"
    return response.status_code, _ms(started), error


def _ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


class WebhookWorker:
    def __init__(
        self,
        ledger: Ledger,
        webhooks: Webhooks,
        *,
        interval: float = 0.5,
        lease_ms: int = 30_000,
        batch: int = 20,
        timeout: float = 10.0,
    ) -> None:
        self.ledger = ledger
        self.webhooks = webhooks
        self.interval = interval
        self.lease_ms = lease_ms
        self.batch = batch
        self.timeout = timeout
        self.sent = 0  # attempts made by this worker
        # fault injection, for proving a delivery survives a worker killed between claim and send (the crash test)
        self.stall = float(os.environ.get("CYCLES_WEBHOOK_STALL_AFTER_CLAIM") or 0)
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> int:
        """Claim, send and settle one batch; returns how many deliveries were attempted."""
        try:
            claimed = await run_in_threadpool(self.webhooks.claim, self.lease_ms, self.batch)
        except CyclesError as exc:  # a busy store: try again next interval
            log.warning("webhook claim failed: %s", exc.message)
            return 0
        if not claimed:
            return 0
        if self.stall:
            log.warning("CYCLES_WEBHOOK_STALL_AFTER_CLAIM: holding %d claimed deliveries", len(claimed))
            await asyncio.sleep(self.stall)
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        attempted = 0
        for delivery, sub, event in claimed:
            settle = self.webhooks.settle
            if sub is None or event is None:
                await run_in_threadpool(settle, delivery, status=None, elapsed_ms=0)
                continue
            if sub.status != "ACTIVE":
                await run_in_threadpool(settle, delivery, status=None, elapsed_ms=0, hold_ms=HOLD_MS)
                continue
            allow = self.webhooks.allow_private
            status, elapsed, error = await send(self._client, sub, event, allow_private=allow,
                                                delivery_id=delivery.delivery_id)  # fmt: skip
            attempted += 1
            self.sent += 1
            try:
                await run_in_threadpool(settle, delivery, status=status, elapsed_ms=elapsed, error=error)
            except CyclesError as exc:  # the lease runs out and the delivery is sent again: at least once
                log.warning("could not record webhook delivery %s: %s", delivery.delivery_id, exc.message)
        return attempted

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # never let one bad delivery stop the worker
                log.exception("webhook worker step failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="cycles-webhooks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
