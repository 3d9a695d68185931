"""The read-only web page of `cycles serve`, loaded in a real headless Chromium (Debian's): its DOM is read back and
its numbers compared with the ledger's; a screenshot is taken. Skipped when chromium is not installed."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from cycles.server import create_app
from cycles.server.testing import LiveServer

from .conftest import ADMIN_KEY, USD, tenant_key, usd
from .test_admin_api import reserve_body

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "chromium-profile"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.fixture
def store_kind() -> str:
    return "sqlite"  # one browser run: the page reads the store through the same listings on every store


class Cells(HTMLParser):
    """Rows of the page's tables: balances by (scope, unit) -> {column: data-amount}, events as data-event-id."""

    COLUMNS = ("allocated", "spent", "reserved", "debt", "remaining")

    def __init__(self) -> None:
        super().__init__()
        self.balances: dict[tuple[str, str], dict[str, int]] = {}
        self.events: list[str] = []
        self._row: tuple[str, str] | None = None
        self._amounts: list[int] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and "data-scope" in a:
            self._row, self._amounts = (a["data-scope"] or "", a["data-unit"] or ""), []
        elif tag == "tr" and "data-event-id" in a:
            self.events.append(a["data-event-id"] or "")
        elif tag == "td" and self._row is not None and "data-amount" in a:
            self._amounts.append(int(a["data-amount"] or 0))

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._row is not None:
            self.balances[self._row] = dict(zip(self.COLUMNS, self._amounts, strict=True))
            self._row = None


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it with apt-get)")
def test_the_page_shows_the_ledger(tmp_path, ledger):
    app = create_app(ledger, admin_api_key=ADMIN_KEY, sweep_interval=None, webhook_interval=None)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, headers={"X-Admin-API-Key": ADMIN_KEY}) as admin:
        key = tenant_key(admin, "acme")
        tenant_key(admin, "beta")
        for scope, tenant, amount in (("tenant:acme", "acme", 1_000_000), ("tenant:acme/agent:bot", "acme", 250_000),
                                      ("tenant:beta", "beta", 77)):  # fmt: skip
            admin.post("/v1/admin/budgets", json={"scope": scope, "unit": USD, "allocated": usd(amount),
                                                  "tenant_id": tenant}).raise_for_status()  # fmt: skip
        with httpx.Client(base_url=live.url, headers={"X-Cycles-API-Key": key}) as acme:
            rid = acme.post("/v1/reservations", json=reserve_body("a", 120_000)).json()["reservation_id"]
            acme.post(f"/v1/reservations/{rid}/commit", json={"idempotency_key": "c", "actual": usd(99_999)})
            acme.post("/v1/reservations", json=reserve_body("b", 30_000)).raise_for_status()  # held
            assert acme.post("/v1/reservations", json=reserve_body("c", 10**9)).status_code == 409  # an event
        assert httpx.get(live.url + "/dashboard").status_code == 401  # the page wants the admin key

        url = live.url.replace("http://", f"http://admin:{ADMIN_KEY}@") + "/dashboard"
        dom = chromium(tmp_path, "--dump-dom", url)
        assert dom.returncode == 0, dom.stderr[-2000:]
        shot = tmp_path / "dashboard.png"
        taken = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,900", url)
        assert taken.returncode == 0, taken.stderr[-2000:]

    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5_000
    page = Cells()
    page.feed(dom.stdout)
    with ledger.store.transaction(readonly=True) as tx:
        expected = {(b.scope, b.unit): {"allocated": b.allocated, "spent": b.spent, "reserved": b.reserved,
                                        "debt": b.debt, "remaining": b.remaining}
                    for b in tx.list_budgets(limit=100)}  # fmt: skip
    assert page.balances == expected
    assert page.balances[("tenant:acme/agent:bot", USD)] == {
        "allocated": 250_000, "spent": 99_999, "reserved": 30_000, "debt": 0, "remaining": 120_001,
    }  # fmt: skip
    latest = admin_events(ledger)
    assert page.events == latest[: len(page.events)] and "reservation.denied" in dom.stdout


def admin_events(ledger: Any) -> list[str]:
    from cycles.ledger.store import EventFilter

    with ledger.store.transaction(readonly=True) as tx:
        return [e.event_id for e in tx.list_events(EventFilter(), "created_at_ms", True, None, 100)]
