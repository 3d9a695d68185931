"""Run the real `cycles` command in a subprocess, each test on its own SQLite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def error_line(self) -> str:
        """The one-line error a failed command prints (asserting it is exactly one line, and no traceback)."""
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, f"expected one stderr line, got:\n{self.err}"
        assert lines[0].startswith("error: "), lines[0]
        assert "Traceback" not in self.err
        return lines[0]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYCLES_") and k != "COLUMNS"}
    env.update(extra)
    return env


class Cli:
    """`cli("budget", "set", ...)` runs `python -m cycles.cli --store sqlite:///<tmp>/c.db budget set ...`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.db = tmp / "c.db"
        self.store = f"sqlite:///{self.db}"

    def run(self, *args: str, store: bool = True, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
        argv = [sys.executable, "-m", "cycles.cli"] + (["--store", self.store] if store else []) + list(args)
        proc = subprocess.run(
            argv, capture_output=True, text=True, cwd=self.tmp, env=env or clean_env(), timeout=timeout
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def __call__(self, *args: str, **kwargs: Any) -> Result:
        """Run and expect success."""
        result = self.run(*args, **kwargs)
        assert result.code == 0, (
            f"cycles {' '.join(args)} -> {result.code}\nstdout:\n{result.out}\nstderr:\n{result.err}"
        )
        return result

    def json(self, *args: str, **kwargs: Any) -> Any:
        return self(*args, "--json", **kwargs).json()


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)
