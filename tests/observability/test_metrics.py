"""GET /metrics scraped and parsed: in process, and summed over the workers of `cycles serve --workers 2`."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..interop._server import CyclesServe
from .conftest import USD, tenant_key, usd
from .test_admin_api import reserve_body


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_the_server_decided(served, admin, clock):
    acme = served.client(**{"X-Cycles-API-Key": tenant_key(admin, "acme")})
    admin.post("/v1/admin/budgets", json={"scope": "tenant:acme", "unit": USD, "allocated": usd(100),
                                          "tenant_id": "acme"}).raise_for_status()  # fmt: skip
    before = scrape(admin)
    ids = [acme.post("/v1/reservations", json=reserve_body(f"r{i}", 10)).json()["reservation_id"] for i in range(3)]
    assert acme.post("/v1/reservations", json=reserve_body("big", 1_000)).status_code == 409
    assert acme.post(f"/v1/reservations/{ids[0]}/commit", json={"idempotency_key": "c", "actual": usd(5)}).is_success
    assert acme.post(f"/v1/reservations/{ids[1]}/release", json={"idempotency_key": "x"}).is_success
    again = acme.post(f"/v1/reservations/{ids[1]}/release", json={"idempotency_key": "y"})
    assert again.status_code == 409  # already released
    short = acme.post("/v1/reservations", json={**reserve_body("short", 10), "ttl_ms": 1000, "grace_period_ms": 0})
    assert short.is_success
    clock.advance(10_000)
    assert served.ledger.sweep() == 1  # "short"; ids[2] holds the default 60 s
    after = scrape(admin)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("cycles_reservations_total", decision="ALLOW", reason_code="") == 4
    assert delta("cycles_reservations_total", decision="DENY", reason_code="BUDGET_EXCEEDED") == 1
    assert delta("cycles_commits_total", outcome="committed") == 1
    assert delta("cycles_releases_total", outcome="released") == 1
    assert delta("cycles_releases_total", outcome="RESERVATION_FINALIZED") == 1
    assert delta("cycles_expirations_total") == 1
    assert delta("cycles_request_duration_seconds_count", method="POST", route="/v1/reservations") == 5
    assert delta("cycles_request_duration_seconds_count", method="GET", route="/v1/admin/budgets") == 0
    assert delta("cycles_batch_size_count") >= 8  # every runtime call ran in some batch
    assert value(after, "cycles_request_duration_seconds_count", method="POST", route="/v1/admin/budgets") >= 1
    for i in range(3):  # unknown paths and methods do not make new series
        admin.request("BREW" if i else "GET", f"/v1/nothing-{i}/here")
    labels = {dict(k[1]).get("route") for k in scrape(admin) if k[0] == "cycles_request_duration_seconds_count"}
    assert "unmatched" in labels and not any("nothing" in (x or "") for x in labels)


@pytest.mark.slow
def test_every_worker_is_counted(tmp_path):
    with CyclesServe(tmp_path, workers=2, sweep_interval=0) as server:
        with httpx.Client(base_url=server.url, headers={"X-Admin-API-Key": server.admin_key}) as admin:
            key = tenant_key(admin, "acme")
            admin.post("/v1/admin/budgets", json={"scope": "tenant:acme", "unit": USD, "allocated": usd(10_000),
                                                  "tenant_id": "acme"}).raise_for_status()  # fmt: skip
            # new connections each: both workers answer some of them
            for i in range(40):
                with httpx.Client(base_url=server.url, headers={"X-Cycles-API-Key": key}) as one:
                    assert one.post("/v1/reservations", json=reserve_body(f"k{i}", 1)).is_success
            counts = []
            for _ in range(6):
                with httpx.Client(base_url=server.url) as one:
                    counts.append(value(scrape(one), "cycles_reservations_total", decision="ALLOW", reason_code=""))
    assert counts == [40.0] * 6  # whichever worker answered, it reported both workers' counts
