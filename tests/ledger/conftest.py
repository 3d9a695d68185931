"""Fixtures of the ledger suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cycles.ledger import Ledger

from ._two_stores import two_ledgers


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Ledger, Ledger]]:
    """Two ledgers on one SQLite file, each with its own connection (two processes); budgets at three levels."""
    with two_ledgers(tmp_path / "ledger.db") as ledgers:
        yield ledgers
