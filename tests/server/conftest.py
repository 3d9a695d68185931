"""Real HTTP on loopback: each test gets a fresh app (own SQLite file, the test's clock) served by one uvicorn
thread, HttpTransport clients, and every JSON response the app sends checked against the official OpenAPI schemas
(when ../shared/spec is present).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from cycles.client.http import HttpTransport
from cycles.ledger import Ledger, SQLiteStore
from cycles.server import create_app
from cycles.server.testing import HttpAuthority, serve_authority, shared_server

SPEC_DIR = Path(__file__).parents[2].parent / "shared" / "spec"
RUNTIME_SPEC = SPEC_DIR / "cycles-protocol-v0.yaml"
ADMIN_SPEC = SPEC_DIR / "cycles-governance-admin-v0.1.25.yaml"
ADMIN_KEY = "test-admin-secret-5b1f0c2e"
USD = "USD_MICROCENTS"


def usd(n: int) -> dict[str, Any]:
    return {"unit": USD, "amount": n}


# --------------------------------------------------------------------------------------------- schema validation


class Schemas:
    """`check(body, "Name")` validates against components.schemas.Name of the runtime spec (admin=True: the
    governance spec), resolving $ref within the document."""

    def __init__(self) -> None:
        import jsonschema
        import yaml

        self._validators: dict[tuple[str, str], Any] = {}
        self._docs = {
            "runtime": yaml.safe_load(RUNTIME_SPEC.read_text()),
            "admin": yaml.safe_load(ADMIN_SPEC.read_text()) if ADMIN_SPEC.exists() else None,
        }
        self._jsonschema = jsonschema

    def validator(self, name: str, plane: str = "runtime") -> Any:
        key = (plane, name)
        if key not in self._validators:
            doc = self._docs[plane]
            if doc is None:
                pytest.skip(f"{plane} spec not available")
            assert name in doc["components"]["schemas"], f"{name} is not a schema of the {plane} spec"
            schema = {**doc, "$ref": f"#/components/schemas/{name}"}  # the whole document: local $refs resolve
            cls = self._jsonschema.Draft202012Validator
            self._validators[key] = cls(schema)
        return self._validators[key]

    def errors(self, body: Any, name: str, plane: str = "runtime") -> list[str]:
        return [
            f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in self.validator(name, plane).iter_errors(body)
        ]

    def check(self, body: Any, name: str, plane: str = "runtime") -> None:
        problems = self.errors(body, name, plane)
        assert not problems, f"{plane} {name} schema violations: {problems} in {body}"


_session_schemas: Schemas | None = None


def _maybe_schemas() -> Schemas | None:
    """The schemas, loaded once per session; None without the spec files or jsonschema/PyYAML."""
    global _session_schemas
    if _session_schemas is None and RUNTIME_SPEC.exists():
        try:
            _session_schemas = Schemas()
        except ImportError:
            return None
    return _session_schemas


@pytest.fixture(scope="session")
def schemas() -> Schemas:
    if not RUNTIME_SPEC.exists():
        pytest.skip(f"official spec not found at {SPEC_DIR}")
    pytest.importorskip("jsonschema")
    pytest.importorskip("yaml")
    loaded = _maybe_schemas()
    assert loaded is not None
    return loaded


def response_schema(method: str, path: str, status: int, body: Any) -> tuple[str, str] | None:
    """(plane, schema name) a response must satisfy, from the operation and status."""
    parts = path.strip("/").split("/")
    if parts[:1] != ["v1"]:
        return None
    admin = parts[1:2] == ["admin"] or parts[1:2] == ["auth"]
    if status >= 400:
        return ("admin" if admin else "runtime", "ErrorResponse")
    if admin:
        kind = parts[2] if len(parts) > 2 else ""
        if parts[1] == "auth":
            return ("admin", "ApiKeyValidationResponse" if parts[2:] == ["validate"] else "AuthIntrospectResponse")
        if kind == "tenants":
            return ("admin", "TenantListResponse" if method == "GET" and len(parts) == 3 else "Tenant")
        if kind == "budgets":
            if len(parts) == 4 and parts[3] == "fund":
                return ("admin", "BudgetFundingResponse")
            if method == "GET" and len(parts) == 3:
                return ("admin", "BudgetListResponse")
            return ("admin", "BudgetLedger")
        if kind == "policies":
            return ("admin", "PolicyListResponse" if method == "GET" else "Policy")
        if kind == "api-keys":
            if method == "POST":
                return ("admin", "ApiKeyCreateResponse")
            return ("admin", "ApiKeyListResponse" if method == "GET" else "ApiKey")
        return None
    resource = parts[1]
    if resource == "reservations":
        if len(parts) == 2:
            return ("runtime", "ReservationCreateResponse" if method == "POST" else "ReservationListResponse")
        if len(parts) == 3:
            return ("runtime", "ReservationDetail")
        return ("runtime", {"commit": "CommitResponse", "release": "ReleaseResponse",
                            "extend": "ReservationExtendResponse"}[parts[3]])  # fmt: skip
    if resource == "decide":
        return ("runtime", "DecisionResponse")
    if resource == "events":  # GET /v1/events is the admin spec's tenant event listing (tests/observability)
        return ("runtime", "EventCreateResponse") if method == "POST" else None
    if resource == "balances":
        items = body.get("balances") if isinstance(body, dict) else None
        if items and "ledger_id" in items[0]:
            return ("admin", "BalanceListResponse")
        return ("runtime", "BalanceResponse")
    return None


@dataclass
class Exchange:
    method: str
    path: str
    status: int
    headers: dict[str, str]
    body: bytes


class Recorder:
    """ASGI wrapper keeping every response the app sends (status, headers, body)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.exchanges: list[Exchange] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def record(message: Any) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
                    root = scope.get("root_path", "")
                    path = scope["path"][len(root) :] if scope["path"].startswith(root) else scope["path"]
                    self.exchanges.append(Exchange(scope["method"], path, start["status"], headers, b"".join(chunks)))
            await send(message)

        await self.app(scope, receive, record)


def check_exchanges(exchanges: list[Exchange]) -> list[str]:
    """Every response: correlation headers; every JSON body of a /v1 route: its official schema."""
    problems = []
    schemas = _maybe_schemas()
    for x in exchanges:
        where = f"{x.method} {x.path} -> {x.status}"
        if not x.headers.get("x-request-id"):
            problems.append(f"{where}: no X-Request-Id")
        trace = x.headers.get("x-cycles-trace-id", "")
        if len(trace) != 32 or any(c not in "0123456789abcdef" for c in trace):
            problems.append(f"{where}: bad X-Cycles-Trace-Id {trace!r}")
        if x.status >= 500:
            problems.append(f"{where}: server error {x.body[:200]!r}")
        if not x.headers.get("content-type", "").startswith("application/json"):
            continue
        body = json.loads(x.body)
        if x.status >= 400 and isinstance(body, dict):
            if body.get("request_id") != x.headers.get("x-request-id"):
                problems.append(f"{where}: error body request_id differs from X-Request-Id")
            if body.get("trace_id") != trace:
                problems.append(f"{where}: error body trace_id differs from X-Cycles-Trace-Id")
        target = response_schema(x.method, x.path, x.status, body)
        if schemas is None or target is None:
            continue
        plane, name = target
        if plane == "admin" and schemas._docs["admin"] is None:
            continue
        for problem in schemas.errors(body, name, plane):
            problems.append(f"{where}: {plane} {name}: {problem}")
    return problems


# ------------------------------------------------------------------------------------------------------ serving


@dataclass
class Served:
    url: str
    ledger: Ledger
    recorder: Recorder
    transports: list[HttpTransport] = field(default_factory=list)

    def transport(self, **kwargs: Any) -> HttpTransport:
        t = HttpTransport(self.url, **kwargs)
        self.transports.append(t)
        return t


@pytest.fixture
def ledger(tmp_path: Path, clock: Any) -> Iterator[Ledger]:
    store = SQLiteStore(tmp_path / "cycles.db")
    yield Ledger(store, clock=clock)
    store.close()


@pytest.fixture
def server(ledger: Ledger) -> Iterator[Served]:
    """A fresh app on the shared live server. At teardown every recorded response is checked (headers, schema)."""
    recorder = Recorder(create_app(ledger, admin_api_key=ADMIN_KEY, sweep_interval=None))
    live, dispatcher = shared_server()
    prefix = dispatcher.add(recorder)
    served = Served(live.url + prefix, ledger, recorder)
    yield served
    dispatcher.remove(prefix)
    for t in served.transports:
        t.close()
    problems = check_exchanges(recorder.exchanges)
    assert not problems, "responses off the protocol:\n" + "\n".join(problems)


@pytest.fixture
def admin(server: Served) -> HttpTransport:
    """A transport holding only the admin key."""
    return server.transport(admin_api_key=ADMIN_KEY)


def make_key(admin: HttpTransport, tenant: str, **fields: Any) -> str:
    admin.admin.create_tenant({"tenant_id": tenant, "name": tenant.title()})
    return admin.admin.create_api_key({"tenant_id": tenant, "name": f"{tenant} key", **fields}).key_secret


@pytest.fixture
def acme_key(admin: HttpTransport) -> str:
    return make_key(admin, "acme")


@pytest.fixture
def acme(server: Served, acme_key: str) -> HttpTransport:
    """A transport holding tenant acme's key (default permissions) and no admin key."""
    return server.transport(api_key=acme_key, admin_api_key="")


@pytest.fixture
def raw(server: Served) -> Iterator[httpx.Client]:
    """Plain httpx on the app's base URL."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


# ------------------------------------------------------------------------------------- the Ledger API over HTTP


@pytest.fixture
def http_authority(clock: Any, tmp_path: Path) -> Iterator[HttpAuthority]:
    """The cycles.ledger.Ledger interface (runtime calls with tenant=, .admin, .sweep()) over a live loopback
    server whose ledger runs on the test's clock. tenant=X uses an API key of tenant X (tenant record and key made
    on first use through the admin API, every permission). For tests/conformance:

        with serve_authority(Ledger(store, clock=clock)) as authority: yield authority
    """
    store = SQLiteStore(tmp_path / "http-authority.db")
    with serve_authority(Ledger(store, clock=clock)) as authority:
        yield authority
    store.close()
