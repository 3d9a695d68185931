"""`cycles serve --workers N` on Linux: N worker processes, each listening on a socket of its own bound with
SO_REUSEPORT, so the kernel spreads new connections over them evenly (by a hash of their addresses).

Why not uvicorn's own `--workers`: its workers share one listening socket, and whichever wakes first accepts a whole
burst of connections (asyncio accepts up to a hundred per wake-up). Measured with 32 keep-alive clients on 2 workers,
one worker often served every connection while the other idled, so a second process added nothing.

The supervisor starts the workers, replaces one that dies (unless it died starting: then the app cannot start and
the supervisor stops), and on SIGINT or SIGTERM stops them all, each finishing its requests first (uvicorn's graceful
shutdown). It holds the port itself (bound, never listening), after making sure nobody else had it: a second server
started on the same port fails instead of sharing the connections.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from typing import Any

from uvicorn.config import STARTUP_FAILURE  # the exit code of a worker whose app failed to start

log = logging.getLogger("cycles.serve")


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT: the kernel balances connections over every socket of
    the group that listens (uvicorn makes a worker's listen)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def claim_port(host: str, port: int) -> socket.socket:
    """The supervisor's hold on the port: fails (OSError: address in use) when anything else has it, a server of
    ours included; port 0 picks a free one."""
    if port:
        probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind((host, port))  # without SO_REUSEPORT: refused while any socket holds the port
        finally:
            probe.close()
    return reuseport_socket(host, port)


def serve(config: dict[str, Any], workers: int, graceful_timeout: float) -> int:
    """Run `workers` processes serving uvicorn.Config(**config) until SIGINT/SIGTERM; the exit code."""
    anchor = claim_port(config["host"], config["port"])
    config = {**config, "port": anchor.getsockname()[1]}
    spawn = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())

    def start() -> multiprocessing.process.BaseProcess:
        process = spawn.Process(target=_worker, args=(config,), name="cycles-worker")
        process.start()
        return process

    processes = [start() for _ in range(workers)]
    log.info("serving on %s:%s with %d workers [%s]", config["host"], config["port"], workers,
             ", ".join(str(p.pid) for p in processes))  # fmt: skip
    code = 0
    while not stopping.wait(0.5):
        for i, process in enumerate(processes):
            if process.is_alive():
                continue
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                log.error("worker %s failed to start: stopping", process.pid)
                stopping.set()
                code = STARTUP_FAILURE
                break
            processes[i] = start()
            log.warning("worker %s exited (%s): replaced by %s", process.pid, process.exitcode, processes[i].pid)
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)  # type: ignore[arg-type]
    for process in processes:
        process.join(graceful_timeout + 5)
        if process.is_alive():
            process.kill()
            process.join()
    anchor.close()
    return code


def _worker(config: dict[str, Any]) -> None:  # pragma: no cover - runs in the worker processes
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(**config))
    server.run(sockets=[reuseport_socket(config["host"], config["port"])])
