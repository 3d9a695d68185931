"""The conformance suite runs, unchanged, against every budget authority: one fixture per kind.

A test sees `authority` (the Ledger API: runtime operations with the effective `tenant=`, and `.admin`) and the
`clock` it runs on. Adding a store or a transport (Redis, HTTP) means adding a parameter here, not tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cycles.ledger import Ledger, SQLiteStore

AUTHORITIES = ["sqlite-file", "sqlite-memory"]


@pytest.fixture(params=AUTHORITIES)
def authority(request: pytest.FixtureRequest, tmp_path, clock) -> Iterator[Ledger]:
    if request.param == "sqlite-file":
        store = SQLiteStore(tmp_path / "cycles.db")
    else:
        store = SQLiteStore(":memory:")
    yield Ledger(store, clock=clock)
    store.close()
