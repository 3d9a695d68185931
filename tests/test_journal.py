"""The commit journal (PROTOCOL.md section 6, durable profile), on a real SQLite ledger.

Faults are injected by a transport of our own that wraps the embedded one: it can lose a response after the ledger
applied the request, refuse to answer, or throttle. The restart is a new Client on the same store and journal.
"""

from __future__ import annotations

import importlib
import json
import threading

import pytest

import cycles
from cycles.client.local import LocalTransport
from cycles.errors import LimitExceeded, TransportError
from cycles.journal import Journal, record_name

USD = "USD_MICROCENTS"
guard_module = importlib.import_module("cycles.guard")  # `cycles.guard` is the decorator


class FaultyTransport(LocalTransport):
    """The embedded transport, with faults on commit/event and a log of the idempotency keys it was sent."""

    def __init__(self, inner: LocalTransport, *, commit_fault: str | None = None, event_fault: str | None = None):
        super().__init__(inner.ledger)
        self.commit_fault, self.event_fault = commit_fault, event_fault
        self.sent: list[tuple[str, str]] = []
        self.journal_seen_before_send: list[bool] = []
        self.journal: Journal | None = None

    def _fault(self, fault: str | None, apply):  # noqa: ANN001
        if fault == "unreachable":
            raise TransportError("connection refused")
        if fault == "throttled":
            raise LimitExceeded("slow down", details={"retry_after_ms": 60_000})
        result = apply()
        if fault == "response_lost":
            raise TransportError("connection reset after the request was sent")
        return result

    def commit(self, reservation_id, request):  # noqa: ANN001
        self.sent.append(("commit", request.idempotency_key))
        if self.journal is not None:
            self.journal_seen_before_send.append(self.journal.path(reservation_id).exists())
        return self._fault(self.commit_fault, lambda: super(FaultyTransport, self).commit(reservation_id, request))

    def event(self, request):  # noqa: ANN001
        self.sent.append(("event", request.idempotency_key))
        return self._fault(self.event_fault, lambda: super(FaultyTransport, self).event(request))


@pytest.fixture
def setup(tmp_path, clock):
    store = f"sqlite:///{tmp_path / 'ledger.db'}"
    journal_dir = tmp_path / "journal"

    def client(transport_faults: dict | None = None, **kwargs) -> tuple[cycles.Client, FaultyTransport]:
        base = cycles.Client(store=store, tenant="acme", clock=clock, journal=False)
        transport = FaultyTransport(base.transport, **(transport_faults or {}))  # type: ignore[arg-type]
        c = cycles.Client(transport=transport, tenant="acme", journal=journal_dir, **kwargs)
        transport.journal = c.journal
        return c, transport

    admin, _ = client()
    admin.budgets.set("tenant:acme", cycles.usd(1))
    return client, journal_dir


def stranded(client, used: int | None = None, **reserve_kwargs) -> tuple[cycles.Client, cycles.Reservation]:
    """A guarded call whose commit never gets through (the authority is unreachable): its record stays behind."""
    c, _ = client({"commit_fault": "unreachable"})
    with pytest.raises(TransportError):
        with c.reserve(cycles.usd(0.10), **reserve_kwargs) as r:
            if used is not None:
                r.record(used)
    return c, r


def spent(c: cycles.Client) -> int:
    return next(b.spent.amount for b in c.balances("tenant:acme") if b.scope == "tenant:acme")


def active(c: cycles.Client) -> list:
    return c.reservations(status="ACTIVE")


def test_journal_is_written_before_the_first_commit_and_replayed_after_a_crash(setup, monkeypatch):
    client, journal_dir = setup
    monkeypatch.setattr(guard_module, "COMMIT_BACKOFF_S", 0)
    c, transport = client({"commit_fault": "response_lost"})
    with pytest.raises(TransportError):
        with c.reserve(cycles.usd(0.10)) as r:
            r.record(cycles.usd(0.04))
    assert transport.journal_seen_before_send and all(transport.journal_seen_before_send)
    keys = {key for op, key in transport.sent if op == "commit"}
    assert keys == {r.key + ":commit"}  # every retry reused the original key
    assert c.journal.path(r.id).exists()  # the record survives retry exhaustion
    assert spent(c) == 4_000_000  # the ledger applied it once, although no answer came back

    restarted, transport2 = client()  # a new process: recover() runs on start
    assert transport2.sent == [("commit", r.key + ":commit")]
    assert not restarted.journal.path(r.id).exists()
    assert spent(restarted) == 4_000_000  # replay is answered from idempotency, not applied twice
    assert active(restarted) == []


def test_expired_commit_switches_durably_to_event_mode(setup, clock, monkeypatch):
    client, _ = setup
    monkeypatch.setattr(guard_module, "COMMIT_BACKOFF_S", 0)
    c, r = stranded(client, 7_000_000, ttl_ms=1_000, grace_period_ms=0)
    record = json.loads(c.journal.path(r.id).read_text())
    assert record["mode"] == "commit"
    clock.advance(5_000)  # the hold expires while the process is down

    # restart: commit meets 410, the record switches to event mode, then the event is lost too
    _, transport2 = client({"event_fault": "unreachable"}, recover=True)
    assert [op for op, _ in transport2.sent] == ["commit", "event"]
    assert json.loads(c.journal.path(r.id).read_text())["mode"] == "event"

    restarted, transport3 = client()  # the next start sends only the event, same key, with the original subject
    assert transport3.sent == [("event", r.key + ":commit")]
    assert not restarted.journal.path(r.id).exists()
    assert spent(restarted) == 7_000_000
    event = json.loads(json.dumps(record["event"]))
    assert event["subject"]["tenant"] == "acme" and event["actual"] == {"unit": USD, "amount": 7_000_000}


def test_rate_limit_floor_survives_restart(setup, monkeypatch):
    client, _ = setup
    monkeypatch.setattr(guard_module, "COMMIT_ATTEMPTS", 1)
    c, r = stranded(client)
    throttled, transport2 = client({"commit_fault": "throttled"})
    assert transport2.sent == [("commit", r.key + ":commit")]
    floor = json.loads(throttled.journal.path(r.id).read_text())["not_before_ms"]
    assert floor is not None

    early, transport3 = client()  # restarted before the floor: nothing is sent
    assert transport3.sent == []
    assert early.journal.path(r.id).exists()

    later, transport4 = client(recover=False)
    later.journal.update(r.id, not_before_ms=0)  # the floor has passed
    later.recover()
    assert transport4.sent == [("commit", r.key + ":commit")]
    assert not later.journal.path(r.id).exists()


def test_records_hold_no_credentials_and_partition_by_authority_and_tenant(tmp_path):
    a = Journal(tmp_path, authority="https://cycles.example", principal="acme")
    b = Journal(tmp_path, authority="https://cycles.example", principal="other")
    assert a.dir != b.dir
    assert Journal(tmp_path, authority="https://cycles.example", principal="acme").dir == a.dir
    assert a.path("res_1").name == record_name("res_1") and len(a.path("res_1").name) == len("v2-.json") + 64


def test_corrupt_records_are_quarantined_and_the_rest_replay(setup, monkeypatch):
    client, _ = setup
    monkeypatch.setattr(guard_module, "COMMIT_ATTEMPTS", 1)
    c, r = stranded(client)
    bad = c.journal.dir / record_name("res_corrupt")
    bad.write_text("{not json")
    unsupported = c.journal.dir / record_name("res_v1")
    unsupported.write_text(json.dumps({"version": 1, "reservation_id": "res_v1"}))

    restarted, transport = client(recover=False)
    report = restarted.recover()
    assert sorted(report.quarantined) == sorted([bad.name, unsupported.name])
    assert report.settled == [r.id]
    assert transport.sent == [("commit", r.key + ":commit")]
    assert (bad.parent / (bad.name + ".quarantined")).exists()


def test_two_workers_replaying_one_record_settle_it_once(setup, monkeypatch):
    client, _ = setup
    monkeypatch.setattr(guard_module, "COMMIT_ATTEMPTS", 1)
    c, r = stranded(client, 2_000_000)
    workers = [client(recover=False) for _ in range(2)]
    barrier = threading.Barrier(2)

    def replay(worker: cycles.Client) -> None:
        barrier.wait()
        worker.recover()

    threads = [threading.Thread(target=replay, args=(w,)) for w, _ in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert spent(c) == 2_000_000
    assert not c.journal.path(r.id).exists()
    assert active(c) == []


def test_understood_rejection_removes_the_record(setup, monkeypatch):
    client, _ = setup
    monkeypatch.setattr(guard_module, "COMMIT_ATTEMPTS", 1)
    c, r = stranded(client)
    plain, _ = client(recover=False)
    plain.transport.ledger.release(r.id, {"idempotency_key": "ops-release"})  # settled another way meanwhile
    report = plain.recover()
    assert report.dropped == [r.id]  # RESERVATION_FINALIZED: sending again can never succeed
    assert not plain.journal.path(r.id).exists()


def test_embedded_client_journals_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("CYCLES_JOURNAL", raising=False)
    assert cycles.Client(store="sqlite://:memory:").journal is None
    monkeypatch.setenv("CYCLES_JOURNAL", str(tmp_path / "j"))
    assert cycles.Client(store="sqlite://:memory:").journal is not None
