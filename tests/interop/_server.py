"""`cycles serve` as a real subprocess on a free loopback port, for tests that must go through the shipped command
(interoperability, worker processes, shutdown). Always killed at exit, workers included:

    with CyclesServe(tmp_path, workers=2) as server:
        httpx.get(server.url + "/readyz")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ADMIN_KEY = "interop-admin-secret-7d3a91"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cycles_command() -> list[str]:
    """The installed `cycles` entry point next to this interpreter (else the module)."""
    script = Path(sys.executable).with_name("cycles")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from cycles.cli import main; main()"]


class CyclesServe:
    """`cycles serve --store sqlite:///<dir>/cycles.db --port <free> --workers N`, admin key from the environment.

    The process runs in its own session (process group), so stop() reaches the uvicorn supervisor and its worker
    processes; `log` holds its stdout+stderr."""

    def __init__(
        self,
        directory: Path,
        *,
        workers: int = 1,
        admin_key: str = ADMIN_KEY,
        sweep_interval: float = 1.0,
        graceful_timeout: float = 10.0,
        log_level: str = "warning",
        extra_args: tuple[str, ...] = (),
        store: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.db = self.directory / "cycles.db"
        self.store = store or f"sqlite:///{self.db}"  # or a redis:// URL
        self.workers = workers
        self.admin_key = admin_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.directory / "cycles-serve.log"
        self.args = [
            *cycles_command(), "serve", "--store", self.store, "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", str(workers), "--sweep-interval", str(sweep_interval), "--log-level", log_level,
            "--graceful-timeout", str(graceful_timeout), *extra_args,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 60.0) -> CyclesServe:
        env = {**os.environ, "CYCLES_ADMIN_API_KEY": self.admin_key, "PYTHONUNBUFFERED": "1"}
        for name in ("CYCLES_BASE_URL", "CYCLES_STORE", "CYCLES_API_KEY"):
            env.pop(name, None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=self.directory, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cycles serve exited with {self.proc.returncode} during startup:\n{self.log}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"cycles serve did not become ready within {timeout}s:\n{self.log}")
            time.sleep(0.05)
        if self.workers > 1:
            self._wait_for_workers(deadline)
        return self

    def _wait_for_workers(self, deadline: float) -> None:
        """/readyz answers as soon as one worker serves. Wait until every worker process has built its app (it holds
        the store file open: the factory opens it, the worker serves right after), so load reaches all of them."""
        db = str(self.db)
        while time.monotonic() < deadline:
            pids = self.worker_pids()
            if not self.store.startswith("sqlite:"):  # a network store: no file to watch; give them a moment
                if len(pids) >= self.workers:
                    time.sleep(1.0)
                    return
            elif len(pids) >= self.workers and all(_has_open(pid, db) for pid in pids):
                time.sleep(0.3)  # lifespan startup and the listen loop, after the store is open
                return
            time.sleep(0.05)
        raise RuntimeError(f"the {self.workers} workers of cycles serve did not all start:\n{self.log}")

    def worker_pids(self) -> list[int]:
        """Child processes of the supervisor that are uvicorn workers (not multiprocessing's resource tracker)."""
        if self.proc is None:
            return []
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and b"spawn_main" in cmdline:
                out.append(int(entry.name))
        return out

    def terminate(self) -> None:
        """SIGTERM to the supervisor only (what a process manager sends)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left of it (workers that outlived the supervisor)."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group is ours alone
        if self.proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None or _group_members(pgid):
            _signal_group(pgid, signal.SIGKILL)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> CyclesServe:
        try:
            return self.start()
        except BaseException:
            self.kill()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.kill()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _has_open(pid: int, path: str) -> bool:
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == path:
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False
