"""Interoperability: the official Python client `runcycles` (PyPI), unmodified, against `cycles serve` on loopback.

Its programmatic client (sync and async) and its `@cycles` decorator / `stream_reservation` cover reserve, commit,
release, extend, decide, events, balances and list/get of reservations; a denial surfaces as its
BudgetExceededError. After each step the ledger state is checked through our own `cycles.Client` over HTTP, and
every response body is parsed with runcycles' own (extra="forbid") models.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

runcycles = pytest.importorskip("runcycles")

from runcycles import (  # noqa: E402
    Action,
    Amount,
    AsyncCyclesClient,
    BalanceResponse,
    BudgetExceededError,
    CommitResponse,
    CyclesClient,
    CyclesConfig,
    CyclesProtocolError,
    Decision,
    DecisionResponse,
    DryRunResult,
    EventCreateResponse,
    ReleaseResponse,
    ReservationCreateRequest,
    ReservationCreateResponse,
    ReservationDetail,
    ReservationExtendResponse,
    ReservationListResponse,
    ReservationStatus,
    Subject,
    Unit,
    cycles,
    get_cycles_context,
)
from runcycles.models import ErrorResponse  # noqa: E402

import cycles as ours  # noqa: E402

from ._server import CyclesServe  # noqa: E402

pytestmark = pytest.mark.slow

TENANT = "interop"
USD = "USD_MICROCENTS"
TENANT_BUDGET = 10**12
WORKSPACE_BUDGET = 1_000_000
_counter = itertools.count()


def usd(n: int) -> dict[str, Any]:
    return {"unit": USD, "amount": n}


class World:
    """The running server, its admin key, an API key of tenant `interop`, and our own client for checking state."""

    def __init__(self, server: CyclesServe, api_key: str) -> None:
        self.server = server
        self.url = server.url
        self.api_key = api_key
        self.ours = ours.Client(server.url, api_key=api_key, admin_api_key=server.admin_key, journal=False,
                                tenant=TENANT)  # fmt: skip

    def budget(self, workspace: str) -> tuple[int, int, int, int]:
        """(allocated, spent, reserved, remaining) of tenant:interop/workspace:<workspace>, read through our client."""
        b = self.ours.budgets.get(f"tenant:{TENANT}/workspace:{workspace}", USD)
        assert b.remaining.amount == b.allocated.amount - b.spent.amount - b.reserved.amount - b.debt.amount
        return b.allocated.amount, b.spent.amount, b.reserved.amount, b.remaining.amount

    def status(self, reservation_id: str) -> str:
        return self.ours.get_reservation(reservation_id).status


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("interop")
    with CyclesServe(directory, workers=1) as server:
        admin = ours.Client(server.url, admin_api_key=server.admin_key, journal=False)
        admin.tenants.create(TENANT, "Interop")
        admin.budgets.set(f"tenant:{TENANT}", ours.Amount(unit=USD, amount=TENANT_BUDGET))
        api_key = admin.keys.create(TENANT, "runcycles").key_secret
        admin.close()
        w = World(server, api_key)
        yield w
        w.ours.close()


@pytest.fixture
def workspace(world: World) -> str:
    """A fresh workspace budget of WORKSPACE_BUDGET for this test (the tenant budget is shared and large)."""
    name = f"ws{next(_counter)}"
    world.ours.budgets.set(f"tenant:{TENANT}/workspace:{name}", ours.Amount(unit=USD, amount=WORKSPACE_BUDGET))
    return name


def config(world: World, workspace: str, **extra: Any) -> CyclesConfig:
    """runcycles config: no commit journal on disk, no background retries (a failure must show, not be retried)."""
    return CyclesConfig(
        base_url=world.url, api_key=world.api_key, tenant=TENANT, workspace=workspace,
        journal_enabled=False, retry_enabled=False, **extra,
    )  # fmt: skip


@pytest.fixture
def client(world: World, workspace: str) -> Iterator[CyclesClient]:
    with CyclesClient(config(world, workspace)) as c:
        yield c


def key() -> str:
    return str(uuid.uuid4())


def reserve_request(workspace: str, amount: int, **extra: Any) -> ReservationCreateRequest:
    return ReservationCreateRequest(
        idempotency_key=key(),
        subject=Subject(tenant=TENANT, workspace=workspace, agent="bot"),
        action=Action(kind="llm.completion", name="gpt-4o", tags=["interop"]),
        estimate=Amount(unit=Unit.USD_MICROCENTS, amount=amount),
        ttl_ms=60_000,
        **extra,
    )


def error_of(response: Any) -> ErrorResponse:
    """The error body, parsed with runcycles' model. That model (0.5.3) forbids extra fields and lacks `trace_id`,
    which the runtime spec's ErrorResponse defines and the protocol says a server MUST populate: drop it first."""
    body = dict(response.body)
    assert len(body.pop("trace_id")) == 32
    return ErrorResponse.model_validate(body)


# ------------------------------------------------------------------------------------------- programmatic client


def test_reserve_get_list_commit(world: World, client: CyclesClient, workspace: str) -> None:
    scope = f"tenant:{TENANT}/workspace:{workspace}"
    created = client.create_reservation(reserve_request(workspace, 40_000))
    assert created.status == 200 and created.request_id and created.cycles_tenant == TENANT
    reservation = ReservationCreateResponse.model_validate(created.body)
    assert reservation.decision is Decision.ALLOW and reservation.reservation_id
    assert reservation.affected_scopes == [f"tenant:{TENANT}", scope, f"{scope}/agent:bot"]
    assert reservation.reserved == Amount(unit=Unit.USD_MICROCENTS, amount=40_000)
    rid = reservation.reservation_id
    assert world.budget(workspace) == (WORKSPACE_BUDGET, 0, 40_000, WORKSPACE_BUDGET - 40_000)
    assert world.status(rid) == "ACTIVE"

    detail = ReservationDetail.model_validate(client.get_reservation(rid).body)
    assert detail.status is ReservationStatus.ACTIVE and detail.reserved.amount == 40_000
    assert detail.subject.workspace == workspace and detail.scope_path == f"{scope}/agent:bot"

    listed = client.list_reservations(tenant=TENANT, workspace=workspace, status="ACTIVE")
    page = ReservationListResponse.model_validate(listed.body)
    assert [r.reservation_id for r in page.reservations] == [rid]

    committed = client.commit_reservation(rid, {"idempotency_key": key(), "actual": usd(31_000),
                                                "metrics": {"tokens_input": 10, "tokens_output": 20}})  # fmt: skip
    assert committed.status == 200, committed.body
    commit = CommitResponse.model_validate(committed.body)
    assert commit.status.value == "COMMITTED" and commit.charged.amount == 31_000
    assert commit.released is not None and commit.released.amount == 9_000
    assert world.budget(workspace) == (WORKSPACE_BUDGET, 31_000, 0, WORKSPACE_BUDGET - 31_000)
    assert world.status(rid) == "COMMITTED"

    detail = ReservationDetail.model_validate(client.get_reservation(rid).body)
    assert detail.is_committed() and detail.committed is not None and detail.committed.amount == 31_000
    assert detail.finalized_at_ms is not None
    assert (
        ReservationListResponse.model_validate(
            client.list_reservations(tenant=TENANT, workspace=workspace, status="ACTIVE").body
        ).reservations
        == []
    )

    again = client.commit_reservation(rid, {"idempotency_key": key(), "actual": usd(1)})  # a second, different commit
    assert again.status == 409 and error_of(again).error == "RESERVATION_FINALIZED"
    assert world.budget(workspace)[1] == 31_000


def test_release(world: World, client: CyclesClient, workspace: str) -> None:
    rid = client.create_reservation(reserve_request(workspace, 25_000)).body["reservation_id"]
    assert world.budget(workspace)[2] == 25_000
    released = client.release_reservation(rid, {"idempotency_key": key(), "reason": "not needed"})
    assert released.status == 200
    release = ReleaseResponse.model_validate(released.body)
    assert release.status.value == "RELEASED" and release.released.amount == 25_000
    assert world.budget(workspace) == (WORKSPACE_BUDGET, 0, 0, WORKSPACE_BUDGET)
    assert world.status(rid) == "RELEASED"


def test_extend(world: World, client: CyclesClient, workspace: str) -> None:
    created = ReservationCreateResponse.model_validate(client.create_reservation(reserve_request(workspace, 5)).body)
    rid = created.reservation_id
    assert rid and created.expires_at_ms and created.remaining_ttl_ms is not None
    extended = client.extend_reservation(rid, {"idempotency_key": key(), "extend_by_ms": 30_000})
    assert extended.status == 200
    extension = ReservationExtendResponse.model_validate(extended.body)
    assert extension.status.value == "ACTIVE" and extension.expires_at_ms == created.expires_at_ms + 30_000
    assert world.ours.get_reservation(rid).expires_at_ms == extension.expires_at_ms
    assert world.budget(workspace)[2] == 5  # extending moves no money
    client.release_reservation(rid, {"idempotency_key": key()})


def test_decide_allows_and_denies_without_moving_money(world: World, client: CyclesClient, workspace: str) -> None:
    request = {
        "subject": {"tenant": TENANT, "workspace": workspace},
        "action": {"kind": "tool.search", "name": "web"},
    }
    allowed = client.decide({"idempotency_key": key(), **request, "estimate": usd(1_000)})
    assert allowed.status == 200
    assert DecisionResponse.model_validate(allowed.body).decision is Decision.ALLOW
    denied = client.decide({"idempotency_key": key(), **request, "estimate": usd(WORKSPACE_BUDGET + 1)})
    assert denied.status == 200
    decision = DecisionResponse.model_validate(denied.body)
    assert decision.is_denied() and decision.reason_code == "BUDGET_EXCEEDED"
    assert world.budget(workspace) == (WORKSPACE_BUDGET, 0, 0, WORKSPACE_BUDGET)


def test_events_and_balances(world: World, client: CyclesClient, workspace: str) -> None:
    created = client.create_event({
        "idempotency_key": key(),
        "subject": {"tenant": TENANT, "workspace": workspace},
        "action": {"kind": "tool.search", "name": "web"},
        "actual": usd(12_345),
        "metrics": {"latency_ms": 12},
    })  # fmt: skip
    assert created.status == 201, created.body
    event = EventCreateResponse.model_validate(created.body)
    assert event.status.value == "APPLIED" and event.event_id
    assert world.budget(workspace) == (WORKSPACE_BUDGET, 12_345, 0, WORKSPACE_BUDGET - 12_345)

    balances = BalanceResponse.model_validate(client.get_balances(tenant=TENANT, workspace=workspace).body)
    mine = {b.scope: b for b in balances.balances}
    ws = mine[f"tenant:{TENANT}/workspace:{workspace}"]
    assert ws.spent is not None and ws.spent.amount == 12_345
    assert ws.remaining.amount == WORKSPACE_BUDGET - 12_345
    ours_view = {b.scope: b for b in world.ours.balances(f"tenant:{TENANT}/workspace:{workspace}")}
    assert ours_view[ws.scope].remaining.amount == ws.remaining.amount


def test_over_budget_reserve_is_409_budget_exceeded(world: World, client: CyclesClient, workspace: str) -> None:
    response = client.create_reservation(reserve_request(workspace, WORKSPACE_BUDGET + 1))
    assert response.status == 409 and error_of(response).error == "BUDGET_EXCEEDED"
    assert world.budget(workspace) == (WORKSPACE_BUDGET, 0, 0, WORKSPACE_BUDGET)


def test_async_client(world: World, workspace: str) -> None:
    async def scenario() -> None:
        async with AsyncCyclesClient(config(world, workspace)) as client:
            rid = (await client.create_reservation(reserve_request(workspace, 7_000))).body["reservation_id"]
            assert (await client.get_reservation(rid)).body["status"] == "ACTIVE"
            assert (await client.extend_reservation(rid, {"idempotency_key": key(), "extend_by_ms": 1_000})).is_success
            committed = await client.commit_reservation(rid, {"idempotency_key": key(), "actual": usd(6_000)})
            assert CommitResponse.model_validate(committed.body).charged.amount == 6_000
            balances = await client.get_balances(tenant=TENANT, workspace=workspace)
            assert BalanceResponse.model_validate(balances.body).balances

    asyncio.run(scenario())
    assert world.budget(workspace) == (WORKSPACE_BUDGET, 6_000, 0, WORKSPACE_BUDGET - 6_000)


# ------------------------------------------------------------------------------------------- decorator and stream


def test_decorator_reserves_runs_and_commits(world: World, client: CyclesClient, workspace: str) -> None:
    seen: dict[str, Any] = {}

    @cycles(estimate=lambda prompt: 50_000, actual=lambda result: len(result) * 1_000, action_kind="llm.completion",
            action_name="gpt-4o", agent="writer", client=client)  # fmt: skip
    def call_llm(prompt: str) -> str:
        ctx = get_cycles_context()
        assert ctx is not None and ctx.decision is Decision.ALLOW
        seen["rid"] = ctx.reservation_id
        seen["during"] = world.budget(workspace)  # the reservation holds the estimate while the call runs
        return prompt.upper()

    assert call_llm("hello") == "HELLO"
    assert seen["during"] == (WORKSPACE_BUDGET, 0, 50_000, WORKSPACE_BUDGET - 50_000)
    assert world.budget(workspace) == (WORKSPACE_BUDGET, 5_000, 0, WORKSPACE_BUDGET - 5_000)
    detail = world.ours.get_reservation(seen["rid"])
    assert detail.status == "COMMITTED" and detail.committed is not None and detail.committed.amount == 5_000
    assert detail.scope_path == f"tenant:{TENANT}/workspace:{workspace}/agent:writer"


def test_decorator_denial_raises_budget_exceeded(world: World, client: CyclesClient, workspace: str) -> None:
    ran = []

    @cycles(estimate=WORKSPACE_BUDGET + 1, action_kind="llm.completion", action_name="gpt-4o", client=client)
    def expensive() -> None:
        ran.append(True)

    with pytest.raises(BudgetExceededError) as denied:
        expensive()
    assert denied.value.status == 409 and denied.value.error_code == "BUDGET_EXCEEDED"
    assert denied.value.is_budget_exceeded()
    assert ran == []
    assert world.budget(workspace) == (WORKSPACE_BUDGET, 0, 0, WORKSPACE_BUDGET)
    assert world.ours.reservations(workspace=workspace) == []


def test_decorator_releases_when_the_call_fails(world: World, client: CyclesClient, workspace: str) -> None:
    seen: dict[str, str] = {}

    @cycles(estimate=30_000, action_kind="tool.call", action_name="flaky", client=client)
    def flaky() -> None:
        ctx = get_cycles_context()
        assert ctx is not None
        seen["rid"] = ctx.reservation_id
        raise RuntimeError("tool failed")

    with pytest.raises(RuntimeError, match="tool failed"):
        flaky()
    assert world.status(seen["rid"]) == "RELEASED"
    assert world.budget(workspace) == (WORKSPACE_BUDGET, 0, 0, WORKSPACE_BUDGET)


def test_decorator_dry_run(world: World, client: CyclesClient, workspace: str) -> None:
    @cycles(estimate=10_000, dry_run=True, action_kind="llm.completion", action_name="gpt-4o", client=client)
    def shadow() -> str:
        return "not run"

    result = shadow()
    assert isinstance(result, DryRunResult) and result.decision is Decision.ALLOW
    assert world.budget(workspace) == (WORKSPACE_BUDGET, 0, 0, WORKSPACE_BUDGET)
    assert world.ours.reservations(workspace=workspace) == []

    @cycles(estimate=WORKSPACE_BUDGET + 1, dry_run=True, action_kind="llm.completion", action_name="x",
            client=client)  # fmt: skip
    def shadow_denied() -> str:
        return "not run"

    # a dry run is answered 200 DENY with a reason_code: runcycles picks its exception class from the error code of
    # error bodies only, so this is its base CyclesProtocolError carrying the reason
    with pytest.raises(CyclesProtocolError) as denied:
        shadow_denied()
    assert denied.value.reason_code == "BUDGET_EXCEEDED" and denied.value.status == 200


def test_async_decorator(world: World, workspace: str) -> None:
    async def scenario() -> str:
        async with AsyncCyclesClient(config(world, workspace)) as client:

            @cycles(estimate=20_000, actual=12_000, action_kind="llm.completion", action_name="gpt-4o", client=client)
            async def call() -> str:
                ctx = get_cycles_context()
                assert ctx is not None
                assert world.budget(workspace)[2] == 20_000
                return ctx.reservation_id

            return await call()

    rid = asyncio.run(scenario())
    assert world.status(rid) == "COMMITTED"
    assert world.budget(workspace) == (WORKSPACE_BUDGET, 12_000, 0, WORKSPACE_BUDGET - 12_000)


def test_stream_reservation(world: World, client: CyclesClient, workspace: str) -> None:
    with client.stream_reservation(
        action=Action(kind="llm.completion", name="gpt-4o"),
        estimate=Amount(unit=Unit.USD_MICROCENTS, amount=80_000),
        cost_fn=lambda u: u.tokens_input * 10 + u.tokens_output * 30,
    ) as stream:
        assert world.budget(workspace)[2] == 80_000
        stream.usage.tokens_input = 100
        stream.usage.tokens_output = 200
        rid = stream.reservation_id
    assert world.status(rid) == "COMMITTED"
    assert world.budget(workspace) == (WORKSPACE_BUDGET, 7_000, 0, WORKSPACE_BUDGET - 7_000)

    with pytest.raises(BudgetExceededError):
        with client.stream_reservation(
            action=Action(kind="llm.completion", name="gpt-4o"),
            estimate=Amount(unit=Unit.USD_MICROCENTS, amount=WORKSPACE_BUDGET),
        ):
            pytest.fail("a denied stream must not start")
    assert world.budget(workspace)[2] == 0


def test_errors_parse_with_runcycles_models(world: World, client: CyclesClient, workspace: str) -> None:
    missing = client.get_reservation("res_does_not_exist")
    assert missing.status == 404 and error_of(missing).error == "NOT_FOUND"
    with CyclesClient(CyclesConfig(base_url=world.url, api_key="cyc_live_wrong", journal_enabled=False)) as bad:
        unauthorized = bad.get_balances(tenant=TENANT)
    assert unauthorized.status == 401 and error_of(unauthorized).error == "UNAUTHORIZED"
    foreign = client.get_balances(tenant="someone-else")
    assert foreign.status == 403 and error_of(foreign).error == "FORBIDDEN"
    window = {"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}  # lower bound after the upper one
    bad_window = client.list_reservations(tenant=TENANT, **window)
    assert bad_window.status == 400 and error_of(bad_window).error == "INVALID_REQUEST"
