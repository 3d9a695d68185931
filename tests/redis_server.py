"""Real redis-server processes for the tests: one standalone server per session (FLUSHDB between tests), or a
small Redis Cluster. Each listens on a free loopback port in a temporary directory and is killed at the end."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
OPENSSL = shutil.which("openssl")
MISSING = "redis-server is not installed (apt-get install redis-server; .ci/run does it)"


def free_port(below: int = 65536) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < below and (below == 65536 or _free(port + 10_000)):
            return port


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def require_redis() -> None:
    if REDIS_SERVER is None:
        pytest.skip(MISSING)
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.skip("redis-py is not installed (pip install 'cycles[redis]')")


def redis_client(url: str, **options: Any) -> Any:
    """A plain redis-py client of a store URL's Redis: a `RedisCluster` for `redis+cluster://`."""
    import redis

    if url.startswith("redis+cluster://"):
        return redis.RedisCluster.from_url("redis://" + url[len("redis+cluster://") :], **options)
    return redis.Redis.from_url(url, **options)


def wait_ready(url: str, timeout: float = 10.0) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.ping():
                client.close()
                return
        except redis.exceptions.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class RedisProcess:
    """redis-server on 127.0.0.1:<port> in `directory`; `start`, `kill` (SIGKILL) and `start` again keep the port
    and the directory, so an append-only file survives a restart."""

    def __init__(self, directory: Path, *args: str, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        assert REDIS_SERVER is not None
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--protected-mode", "no", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_ready(self.url)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        self.kill()


class TLSRedisProcess(RedisProcess):
    """redis-server speaking only TLS on its port, with a self-signed certificate for 127.0.0.1 (made by openssl);
    its URL names the certificate as the one CA to trust, so clients verify the server as in production."""

    def __init__(self, directory: Path, *args: str) -> None:
        super().__init__(directory)
        self.cert, key = directory / "cert.pem", directory / "key.pem"
        subprocess.run(
            [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(self.cert),
             "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        self.args = ("--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no",
                     *args)  # fmt: skip

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.cert}"


@contextmanager
def redis_tls_server(*args: str) -> Iterator[RedisProcess]:
    require_redis()
    if OPENSSL is None:
        pytest.skip("openssl is not installed (it makes the test certificate): apt-get install openssl")
    with tempfile.TemporaryDirectory(prefix="cycles-redis-tls-") as directory:
        server = TLSRedisProcess(Path(directory), *args)
        try:
            server.start()
        except Exception as exc:  # noqa: BLE001 - a redis-server built without TLS
            server.stop()
            pytest.skip(f"redis-server did not start with TLS (built without it?): {exc}")
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def redis_server(*args: str) -> Iterator[RedisProcess]:
    require_redis()
    with tempfile.TemporaryDirectory(prefix="cycles-redis-") as directory:
        server = RedisProcess(Path(directory), *args).start()
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def redis_cluster(nodes: int = 3, *args: str) -> Iterator[list[RedisProcess]]:
    """`nodes` masters (no replicas) joined with `redis-cli --cluster create`; `args` for every node's redis-server
    (after the defaults: they win)."""
    require_redis()
    if REDIS_CLI is None:
        pytest.skip("redis-cli is not installed (it comes with redis-server)")
    with tempfile.TemporaryDirectory(prefix="cycles-cluster-") as directory:
        servers = []
        try:
            for i in range(nodes):
                path = Path(directory) / str(i)
                path.mkdir()
                # a cluster node also listens on its port + 10000 (the cluster bus)
                servers.append(
                    RedisProcess(path, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                 "--appendonly", "no", *args, port=free_port(below=55_536)).start()
                )  # fmt: skip
            subprocess.run(
                [REDIS_CLI, "--cluster", "create", *[f"127.0.0.1:{s.port}" for s in servers],
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
            )  # fmt: skip
            _wait_cluster_ok(servers[0].port)
            yield servers
        finally:
            for s in servers:
                s.stop()


def _wait_cluster_ok(port: int, timeout: float = 30.0) -> None:
    import redis

    client = redis.Redis(port=port, decode_responses=True)
    deadline = time.monotonic() + timeout
    while client.cluster("info").get("cluster_state") != "ok":
        if time.monotonic() > deadline:
            raise RuntimeError("the test cluster did not become ready")
        time.sleep(0.1)
    client.close()
