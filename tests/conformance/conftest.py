"""The conformance suite runs, unchanged, against every budget authority: one fixture per kind.

A test sees `authority` (the Ledger API: runtime operations with the effective `tenant=`, and `.admin`) and the
`clock` it runs on. Adding a store or a transport means adding a parameter here, not tests:
- sqlite-file, sqlite-memory: the embedded ledger;
- redis, redis-cluster: the embedded ledger on a Redis store (a real redis-server of the session, emptied per test)
  and on a 3-node Redis Cluster (tenants' keys spread over its slots);
- http: the same ledger behind `cycles serve`'s app on loopback, driven through cycles.client.http (a tenant's
  calls carry an API key of that tenant; admin calls the admin key).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cycles.ledger import Ledger, SQLiteStore

AUTHORITIES = ["sqlite-file", "sqlite-memory", "redis", "redis-cluster", "http"]

# Where the HTTP surface deliberately answers otherwise than the ledger (tests marked embedded_only(reason)):
TENANT_KEYS = (
    "over HTTP the API keys of a SUSPENDED or CLOSED tenant fail authentication (401, PROTOCOL.md section 9), so "
    "its calls never reach the ledger rules tested here"
)
ADMIN_ONLY = "budget updates, freezes and API keys are admin-key operations on the wire (admin spec)"


@pytest.fixture(params=AUTHORITIES)
def authority(request: pytest.FixtureRequest, tmp_path, clock) -> Iterator[Ledger]:
    if request.param == "sqlite-memory":
        store = SQLiteStore(":memory:")
    elif request.param == "redis":
        from cycles.ledger.redis import open_redis

        store = open_redis(request.getfixturevalue("redis_url"))
    elif request.param == "redis-cluster":
        from cycles.ledger.redis import open_redis

        store = open_redis(request.getfixturevalue("redis_cluster_url"))
    else:
        store = SQLiteStore(tmp_path / "cycles.db")
    ledger = Ledger(store, clock=clock)
    if request.param == "http":
        if request.node.get_closest_marker("embedded_only"):
            pytest.skip(request.node.get_closest_marker("embedded_only").args[0])
        from cycles.server.testing import serve_authority

        from ..server.conftest import Recorder, check_exchanges

        recorders: list[Recorder] = []
        with serve_authority(ledger, wrap=lambda app: recorders.append(Recorder(app)) or recorders[-1]) as authority:
            yield authority  # type: ignore[misc]
        # every response the suite received: correlation headers, no 5xx, the official schema (when present)
        problems = check_exchanges(recorders[0].exchanges)
        assert not problems, "responses off the protocol:\n" + "\n".join(problems)
    else:
        yield ledger
    store.close()
