"""Who is calling: a tenant API key (`X-Cycles-API-Key`) or the server's admin key (`X-Admin-API-Key`).

A tenant key is checked by the ledger (unknown, revoked, expired, or of a tenant that is not ACTIVE: 401) and its
tenant becomes the effective tenant of the call. Each route names the permission it needs (403 when the key lacks
it); `admin:read` / `admin:write` satisfy any `*:read` / `*:write`. The admin key is compared in constant time and
has no effective tenant. Secrets are never logged or echoed.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from starlette.datastructures import Headers
from starlette.requests import Request

from ..errors import Forbidden, Unauthorized
from ..ledger import Ledger

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
    def __init__(self, ledger: Ledger, admin_api_key: str | None) -> None:
        self.ledger = ledger
        self._admin_key = admin_api_key.encode() if admin_api_key else None

    @property
    def admin_enabled(self) -> bool:
        return self._admin_key is not None

    def is_admin_key(self, secret: str) -> bool:
        if self._admin_key is None:
            return False
        return hmac.compare_digest(secret.encode("latin-1", "replace"), self._admin_key)  # header bytes as sent

    def admin(self, headers: Headers) -> Principal:
        """The admin, or 401. A tenant key alone does not open an admin-only route."""
        secret = headers.get(ADMIN_HEADER)
        if secret is None:
            raise Unauthorized("this endpoint requires the X-Admin-API-Key header")
        if not self.is_admin_key(secret):
            raise Unauthorized("invalid admin API key")
        return ADMIN

    def tenant(self, headers: Headers, permission: str | None) -> Principal:
        """The tenant of a valid X-Cycles-API-Key holding `permission` (None: any key); 401 / 403 otherwise."""
        secret = headers.get(TENANT_HEADER)
        if not secret:
            raise Unauthorized("the X-Cycles-API-Key header is required")
        record = self.ledger.admin.authenticate(secret)
        permissions = frozenset(record.permissions)
        if permission is not None and not allows(permissions, permission):
            raise Forbidden(f"this API key lacks the {permission} permission", details={"required": permission})
        return Principal(
            tenant=record.tenant_id,
            permissions=permissions,
            key_id=record.key_id,
            scope_filter=tuple(record.scope_filter) if record.scope_filter else None,
        )

    def either(self, headers: Headers, permission: str | None) -> Principal:
        """The admin when X-Admin-API-Key is sent (and the server has one), else a tenant key holding `permission`."""
        if ADMIN_HEADER in headers and self._admin_key is not None:
            return self.admin(headers)
        if ADMIN_HEADER in headers and TENANT_HEADER not in headers:
            raise Unauthorized("admin API key authentication is not enabled on this server")
        return self.tenant(headers, permission)
