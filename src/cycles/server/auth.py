"""Who is calling: a tenant API key (`X-Cycles-API-Key`) or the server's admin key (`X-Admin-API-Key`).

A tenant key is checked by the ledger (unknown, revoked, expired, or of a tenant that is not ACTIVE: 401) and its
tenant becomes the effective tenant of the call. Each route names the permission it needs (403 when the key lacks
it); `admin:read` / `admin:write` satisfy any `*:read` / `*:write`. The admin key is compared in constant time and
has no effective tenant. Secrets are never logged or echoed.

A key that authenticated is remembered (by its SHA-256, never the secret) for KEY_CACHE_SECONDS, sparing every
runtime call the store transaction of the lookup, as the governance spec suggests for key validation ("cached with
short TTL", its example 60 s; "invalidate cache on key revocation"). Staleness is bounded: this process forgets
every remembered key as soon as it revokes or changes a key or changes a tenant's status, and a key's own expiry is
checked on every call; a change made elsewhere (another worker of `cycles serve --workers N`, the CLI on the same
file) takes effect here within KEY_CACHE_SECONDS. Failures are never remembered.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from starlette.requests import Request

from ..errors import Forbidden, Unauthorized
from ..ledger import Ledger

KEY_CACHE_SECONDS = 1.0
KEY_CACHE_LIMIT = 10_000  # remembered keys; past it, start over

TENANT_HEADER = "x-cycles-api-key"
ADMIN_HEADER = "x-admin-api-key"


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller. `tenant` is None for the admin."""

    tenant: str | None
    permissions: frozenset[str] = field(default_factory=frozenset)
    key_id: str | None = None
    scope_filter: tuple[str, ...] | None = None

    @property
    def is_admin(self) -> bool:
        return self.tenant is None


ADMIN = Principal(tenant=None, permissions=frozenset({"*"}))


def allows(permissions: frozenset[str], needed: str) -> bool:
    """Whether a key's permissions cover `needed` (admin:read ⊇ *:read, admin:write ⊇ *:write, admin:<x> ⊇ <x>)."""
    if needed in permissions or "*" in permissions or f"admin:{needed}" in permissions:
        return True
    verb = needed.rsplit(":", 1)[-1]
    return verb in ("read", "write") and f"admin:{verb}" in permissions


def seen(request: Request, principal: Principal) -> Principal:
    """Note the caller's tenant for the X-Cycles-Tenant response header (errors after authentication included)."""
    if principal.tenant is not None:
        request.state.tenant = principal.tenant
    return principal


class Authenticator:
    def __init__(
        self, ledger: Ledger, admin_api_key: str | None, *, key_cache_seconds: float = KEY_CACHE_SECONDS
    ) -> None:
        self.ledger = ledger
        self._admin_key = admin_api_key.encode() if admin_api_key else None
        self.key_cache_seconds = key_cache_seconds
        self._keys: dict[bytes, tuple[Principal, int, float]] = {}  # digest -> (principal, expires_at_ms, until)
        self._generation = 0  # bumped by forget_keys: a lookup that raced a change is not remembered

    def forget_keys(self) -> None:
        """Call after any change to a key or a tenant's status: the next call of every key asks the store again."""
        self._generation += 1
        self._keys.clear()

    @property
    def admin_enabled(self) -> bool:
        return self._admin_key is not None

    def is_admin_key(self, secret: str) -> bool:
        if self._admin_key is None:
            return False
        return hmac.compare_digest(secret.encode("latin-1", "replace"), self._admin_key)  # header bytes as sent

    def admin(self, headers: Mapping[str, str]) -> Principal:
        """The admin, or 401. A tenant key alone does not open an admin-only route."""
        secret = headers.get(ADMIN_HEADER)
        if secret is None:
            raise Unauthorized("this endpoint requires the X-Admin-API-Key header")
        if not self.is_admin_key(secret):
            raise Unauthorized("invalid admin API key")
        return ADMIN

    def tenant(self, headers: Mapping[str, str], permission: str | None) -> Principal:
        """The tenant of a valid X-Cycles-API-Key holding `permission` (None: any key); 401 / 403 otherwise."""
        secret = headers.get(TENANT_HEADER)
        if not secret:
            raise Unauthorized("the X-Cycles-API-Key header is required")
        principal = self._key_principal(secret)
        if permission is not None and not allows(principal.permissions, permission):
            raise Forbidden(f"this API key lacks the {permission} permission", details={"required": permission})
        return principal

    def _key_principal(self, secret: str) -> Principal:
        """The principal of a valid tenant key: remembered (see the module docstring) or asked of the ledger."""
        digest = hashlib.sha256(secret.encode()).digest()
        now = time.monotonic()
        remembered = self._keys.get(digest)
        if remembered is not None:
            principal, expires_at_ms, until = remembered
            if now < until and self._now_ms() <= expires_at_ms:
                return principal
        generation = self._generation
        record = self.ledger.admin.authenticate(secret)  # Unauthorized: unknown, revoked, expired, tenant not active
        principal = Principal(
            tenant=record.tenant_id,
            permissions=frozenset(record.permissions),
            key_id=record.key_id,
            scope_filter=tuple(record.scope_filter) if record.scope_filter else None,
        )
        if self.key_cache_seconds > 0 and generation == self._generation:
            if len(self._keys) >= KEY_CACHE_LIMIT:
                self._keys.clear()
            self._keys[digest] = (principal, record.expires_at_ms, now + self.key_cache_seconds)
        return principal

    def _now_ms(self) -> int:
        """The ledger's clock (a test clock when it has one), as the ledger checks expiry."""
        clock = self.ledger.clock
        return clock() if clock is not None else time.time_ns() // 1_000_000

    def either(self, headers: Mapping[str, str], permission: str | None) -> Principal:
        """The admin when X-Admin-API-Key is sent (and the server has one), else a tenant key holding `permission`."""
        if ADMIN_HEADER in headers and self._admin_key is not None:
            return self.admin(headers)
        if ADMIN_HEADER in headers and TENANT_HEADER not in headers:
            raise Unauthorized("admin API key authentication is not enabled on this server")
        return self.tenant(headers, permission)
