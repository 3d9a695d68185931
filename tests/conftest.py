"""Shared fixtures: a movable clock for the ledger."""

from __future__ import annotations

import time

import pytest


class Clock:
    """Epoch milliseconds that only move when a test says so."""

    def __init__(self, start_ms: int | None = None) -> None:
        self.now = start_ms if start_ms is not None else (int(time.time()) // 1000) * 1_000_000

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="session")
def redis_session():
    """One redis-server for the whole session (no persistence: fast); skipped when the binary is absent."""
    from .redis_server import redis_server

    with redis_server("--appendonly", "no") as server:
        yield server


def emptied(server) -> str:
    """A session redis-server's URL, its database emptied first."""
    import redis

    client = redis.Redis.from_url(server.url)
    client.flushdb()
    client.close()
    return server.url


@pytest.fixture
def redis_url(redis_session) -> str:
    """The session's redis-server, emptied for this test."""
    return emptied(redis_session)


@pytest.fixture(scope="session")
def redis_tls_session():
    """One redis-server speaking TLS only, for the whole session; skipped when redis-server or openssl is absent."""
    from .redis_server import redis_tls_server

    with redis_tls_server("--appendonly", "no") as server:
        yield server


@pytest.fixture
def redis_tls_url(redis_tls_session) -> str:
    """The TLS session server, emptied for this test: `rediss://...?ssl_ca_certs=<its certificate>`."""
    return emptied(redis_tls_session)


@pytest.fixture(params=["redis", "rediss", "cluster"])
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """Each kind of Redis the store speaks, emptied for this test: standalone over TCP, over TLS (rediss://, the
    server's certificate verified) and a 3-node Redis Cluster (redis+cluster://)."""
    kinds = {"redis": "redis_url", "rediss": "redis_tls_url", "cluster": "redis_cluster_url"}
    return request.getfixturevalue(kinds[request.param])


@pytest.fixture(scope="session")
def redis_cluster_session():
    """A 3-node Redis Cluster (3 masters, no replicas) for the whole session; skipped when redis-server is absent."""
    from .redis_server import redis_cluster

    with redis_cluster(3) as nodes:
        yield nodes


@pytest.fixture
def redis_cluster_url(redis_cluster_session) -> str:
    """The session's cluster, every node emptied for this test: `redis+cluster://` one of its nodes."""
    import redis

    for node in redis_cluster_session:
        client = redis.Redis(port=node.port)
        client.flushall()
        client.close()
    return f"redis+cluster://127.0.0.1:{redis_cluster_session[0].port}"
