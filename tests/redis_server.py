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

import pytest

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
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


def wait_ready(port: int, timeout: float = 10.0) -> None:
    import redis

    client = redis.Redis(port=port, socket_connect_timeout=0.5)
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
        wait_ready(self.port)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        self.kill()


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
def redis_cluster(nodes: int = 3) -> Iterator[list[RedisProcess]]:
    """`nodes` masters (no replicas) joined with `redis-cli --cluster create`."""
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
                                 "--appendonly", "no", port=free_port(below=55_536)).start()
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
