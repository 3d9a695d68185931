"""CyclesCallbackHandler on real llama-index-core LLM objects: one reservation per call, committed at the priced
usage, settled on every path (chat, complete, their streams, sync and async, errors, streams closed early or never
iterated), keyed by event id under concurrency, on the embedded ledger and over HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from cycles_llamaindex import CyclesCallbackHandler, callbacks
from llama_index.core import Settings
from llama_index.core.callbacks import CallbackManager
from llama_index.core.instrumentation.dispatcher import instrument_tags
from llama_index.core.llms import ChatMessage

import cycles
from cycles.ledger import Ledger
from cycles.models import ReservationCreateRequest
from cycles.pricing import default_pricing, prompt_text

from ..integrations import active, spent
from .fakes import MODEL, DelegatingLLM, UsageLLM

PRICING = default_pricing()
GRACE_MS = ReservationCreateRequest.model_fields["grace_period_ms"].default  # the protocol's default grace
QUESTION = [ChatMessage(role="system", content="You are terse."), ChatMessage(role="user", content="Tell me more.")]


def cost(usage: Any) -> int:
    return PRICING.cost(MODEL, usage).amount


def billed(llm: UsageLLM) -> int:
    """What the provider billed: every completed call's reported usage, priced."""
    return sum(cost(u) for u in llm.usages)


def guarded(client: cycles.Client, llm: Any = None, **handler: Any) -> tuple[Any, CyclesCallbackHandler]:
    h = CyclesCallbackHandler(client, **handler)
    llm = llm if llm is not None else UsageLLM()
    llm.callback_manager = CallbackManager([h])
    return llm, h


# -------------------------------------------------------------------------------------- every call shape


def _drain(gen: Any) -> str:
    return "".join(r.delta for r in gen)


async def _adrain(gen: Any) -> str:
    return "".join([r.delta async for r in gen])


SYNC: dict[str, Callable[[Any], Any]] = {
    "chat": lambda llm: llm.chat(QUESTION),
    "complete": lambda llm: llm.complete("Tell me more."),
    "stream_chat": lambda llm: _drain(llm.stream_chat(QUESTION)),
    "stream_complete": lambda llm: _drain(llm.stream_complete("Tell me more.")),
}
ASYNC: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "achat": lambda llm: llm.achat(QUESTION),
    "acomplete": lambda llm: llm.acomplete("Tell me more."),
    "astream_chat": lambda llm: _astream(llm.astream_chat(QUESTION)),
    "astream_complete": lambda llm: _astream(llm.astream_complete("Tell me more.")),
}


async def _astream(started: Awaitable[Any]) -> str:
    return await _adrain(await started)


def _prompt_of(name: str) -> Any:
    return "Tell me more." if "complete" in name else QUESTION


def _check_one_commit(client: cycles.Client, llm: UsageLLM, h: CyclesCallbackHandler, name: str) -> None:
    [r] = client.reservations()
    assert r.status == "COMMITTED"
    assert r.action.kind == "llm.completion" and r.action.name == MODEL
    assert r.scope_path == "tenant:acme/agent:bot"
    assert llm.calls == 1
    assert r.committed is not None and r.committed.amount == billed(llm) > 0
    assert spent(client) == spent(client, "tenant:acme/agent:bot") == billed(llm)
    # the hold was the priced worst case: the prompt's tokens plus the LLM's num_output
    assert r.reserved == PRICING.estimate(MODEL, prompt=_prompt_of(name), max_output_tokens=llm.num_output)
    assert h.in_flight() == 0


@pytest.mark.parametrize("name", list(SYNC))
def test_sync_calls_commit_the_priced_usage(funded: cycles.Client, name: str) -> None:
    llm, h = guarded(funded, agent="bot")
    assert SYNC[name](llm)
    _check_one_commit(funded, llm, h, name)


@pytest.mark.parametrize("name", list(ASYNC))
async def test_async_calls_commit_the_priced_usage(funded: cycles.Client, name: str) -> None:
    llm, h = guarded(funded, agent="bot")
    assert await ASYNC[name](llm)
    _check_one_commit(funded, llm, h, name)


def test_per_call_max_tokens_bounds_the_estimate(funded: cycles.Client) -> None:
    llm, _ = guarded(funded)
    llm.chat(QUESTION, max_tokens=40)
    [r] = funded.reservations()
    assert r.reserved == PRICING.estimate(MODEL, prompt=QUESTION, max_output_tokens=40)


def test_commit_carries_metrics(recording_client: Any) -> None:
    client, transport = recording_client
    client.budgets.set("tenant:acme", cycles.usd(1))
    llm, _ = guarded(client)
    llm.chat(QUESTION)
    [commit] = transport.commits
    [usage] = llm.usages
    assert commit.actual.amount == cost(usage)
    assert commit.metrics is not None
    assert (commit.metrics.tokens_input, commit.metrics.tokens_output) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert commit.metrics.model_version == f"{MODEL}-2024-07-18"


def test_usage_missing_is_counted_from_the_text(funded: cycles.Client) -> None:
    llm, _ = guarded(funded, UsageLLM(report=False))
    out = llm.chat(QUESTION)
    [r] = funded.reservations()
    expected = PRICING.estimate(
        MODEL, prompt=prompt_text(QUESTION), max_output_tokens=PRICING.count_tokens(out.message.content)
    )
    assert r.committed == expected
    assert r.committed.amount < r.reserved.amount


def test_a_custom_llm_calling_itself_is_reserved_once(funded: cycles.Client) -> None:
    """A stock CustomLLM's chat goes through its own complete, its astream_chat through its stream_chat (lazily,
    once iterated): two or three LLM events for one provider call."""
    llm, h = guarded(funded, DelegatingLLM())
    llm.chat(QUESTION)
    _drain(llm.stream_chat(QUESTION))
    asyncio.run(llm.achat(QUESTION))
    asyncio.run(_astream(llm.astream_chat(QUESTION)))
    asyncio.run(_astream(llm.astream_complete("Tell me more.")))
    reservations = funded.reservations()
    assert llm.inner.calls == len(reservations) == 5
    assert {r.status for r in reservations} == {"COMMITTED"}
    assert spent(funded) == billed(llm.inner)
    assert h.in_flight() == 0


@pytest.mark.parametrize("llm", [UsageLLM, DelegatingLLM])
def test_streams_started_before_any_is_iterated_are_each_reserved(funded: cycles.Client, llm: Any) -> None:
    """Fan-out: every stream is started, then they are read; none of them is taken for another's inner call."""
    model, h = guarded(funded, llm())
    streams = [model.stream_chat([ChatMessage(role="user", content="part " + "z " * i)]) for i in range(4)]
    assert len(active(funded)) == 4
    for stream in streams:
        _drain(stream)
    provider = model.inner if isinstance(model, DelegatingLLM) else model
    assert provider.calls == len(funded.reservations()) == 4
    assert spent(funded) == billed(provider) and h.in_flight() == 0


def test_a_call_from_another_thread_during_a_stream_is_reserved(funded: cycles.Client) -> None:
    """A stream waiting for its first chunk in one thread does not make another thread's call look like its own."""
    model, h = guarded(funded, UsageLLM(delay=0.5))
    reader = threading.Thread(target=lambda: _drain(model.stream_chat(QUESTION)))
    reader.start()
    while model.calls == 0:  # the stream is running, waiting on the provider
        time.sleep(0.01)
    model.delay = 0
    model.chat(QUESTION)
    reader.join()
    assert model.calls == len(funded.reservations()) == 2
    assert spent(funded) == billed(model) and h.in_flight() == 0


async def test_astreams_started_before_any_is_iterated_are_each_reserved(funded: cycles.Client) -> None:
    model, h = guarded(funded, DelegatingLLM())
    streams = [await model.astream_chat([ChatMessage(role="user", content="part " + "z " * i)]) for i in range(3)]
    assert len(active(funded)) == 3
    for stream in streams:
        await _adrain(stream)
    assert model.inner.calls == len(funded.reservations()) == 3
    assert spent(funded) == billed(model.inner) and h.in_flight() == 0


# ------------------------------------------------------------------------------------------------ failures


def test_provider_error_releases(funded: cycles.Client) -> None:
    llm, h = guarded(funded, UsageLLM(fail=True))
    with pytest.raises(ConnectionError):
        llm.chat(QUESTION)
    with pytest.raises(ConnectionError):
        _drain(llm.stream_chat(QUESTION))
    assert [r.status for r in funded.reservations()] == ["RELEASED", "RELEASED"]
    assert llm.calls == 2 and spent(funded) == 0 and h.in_flight() == 0


async def test_async_provider_error_releases(funded: cycles.Client) -> None:
    llm, _ = guarded(funded, UsageLLM(fail=True))
    with pytest.raises(ConnectionError):
        await llm.achat(QUESTION)
    with pytest.raises(ConnectionError):
        await _astream(llm.astream_chat(QUESTION))
    assert [r.status for r in funded.reservations()] == ["RELEASED", "RELEASED"]
    assert spent(funded) == 0


def _partial(llm: UsageLLM, chunks: int) -> int:
    """What the first `chunks` chunks of the one call reported so far, priced."""
    prompt_tokens = 2 * len(prompt_text(QUESTION).split()) + 5
    return cost({"prompt_tokens": prompt_tokens, "completion_tokens": chunks})


def test_stream_abandoned_after_two_chunks_commits_the_partial_usage(funded: cycles.Client) -> None:
    llm, h = guarded(funded)
    stream = llm.stream_chat(QUESTION)
    assert [next(stream).delta, next(stream).delta] == ["word", " word"]
    stream.close()
    [r] = funded.reservations()
    assert r.status == "COMMITTED" and r.committed.amount == _partial(llm, 2)
    assert active(funded) == [] and h.in_flight() == 0


async def test_astream_abandoned_after_two_chunks_commits_the_partial_usage(funded: cycles.Client) -> None:
    llm, h = guarded(funded)
    stream = await llm.astream_chat(QUESTION)
    assert [(await stream.__anext__()).delta, (await stream.__anext__()).delta] == ["word", " word"]
    await stream.aclose()
    [r] = funded.reservations()
    assert r.status == "COMMITTED" and r.committed.amount == _partial(llm, 2)
    assert active(funded) == [] and h.in_flight() == 0


def test_stream_without_usage_abandoned_commits_the_estimate(funded: cycles.Client) -> None:
    llm, _ = guarded(funded, UsageLLM(report=False))
    stream = llm.stream_chat(QUESTION)
    next(stream)
    stream.close()
    [r] = funded.reservations()
    assert r.status == "COMMITTED" and r.committed == r.reserved  # the provider may bill up to the estimate


def test_stream_never_iterated_expires_with_its_ttl(funded: cycles.Client, ledger: Ledger, clock: Any) -> None:
    """LlamaIndex sends no end event for a stream nobody iterates: the hold's TTL covers it."""
    llm, _ = guarded(funded)
    stream = llm.stream_chat(QUESTION)
    [held] = active(funded)
    assert held.reserved.amount > 0 and spent(funded) == 0
    del stream
    clock.advance(held.expires_at_ms - clock() + GRACE_MS + 1)
    ledger.sweep()
    assert active(funded) == []
    [r] = funded.reservations()
    assert r.status == "EXPIRED"
    assert funded.balances("tenant:acme")[0].reserved.amount == 0
    assert llm.calls == 0  # like most providers, the fake sends its request at the first chunk


async def test_cancelled_achat_releases(funded: cycles.Client) -> None:
    llm, h = guarded(funded, UsageLLM(delay=30))
    task = asyncio.create_task(llm.achat(QUESTION))
    while not active(funded):  # reserved, waiting on the provider
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [r] = funded.reservations()
    assert r.status == "RELEASED" and spent(funded) == 0 and h.in_flight() == 0


def test_streams_nobody_iterates_are_forgotten_once_their_hold_lapsed(
    funded: cycles.Client, ledger: Ledger, clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-lived handler does not keep calls that will never end: past their hold's expiry they are dropped."""
    monkeypatch.setattr(callbacks, "MAX_OPEN", 2)
    llm, h = guarded(funded)
    clock.now = time.time_ns() // 1_000_000 - 600_000  # holds taken now expire (by the wall clock) 9 minutes ago
    abandoned = [llm.stream_chat(QUESTION) for _ in range(2)]
    assert h.in_flight() == 2
    clock.now += 600_000
    live = llm.stream_chat(QUESTION)  # the handler is full: it drops the lapsed ones
    assert h.in_flight() == 1
    _drain(live)
    assert h.in_flight() == 0
    clock.advance(60_000 + GRACE_MS + 1)
    ledger.sweep()
    assert sorted(r.status for r in funded.reservations()) == ["COMMITTED", "EXPIRED", "EXPIRED"]
    assert len(abandoned) == 2


# ---------------------------------------------------------------------------------------------- concurrency


async def test_16_concurrent_achat_no_collisions_exact_spend(funded: cycles.Client) -> None:
    llm, h = guarded(funded)
    prompts = [[ChatMessage(role="user", content="question " + "x " * i)] for i in range(16)]
    await asyncio.gather(*(llm.achat(p) for p in prompts))
    reservations = funded.reservations()
    assert len(reservations) == llm.calls == 16
    assert len({r.reservation_id for r in reservations}) == 16
    assert {r.status for r in reservations} == {"COMMITTED"}
    assert sorted(r.committed.amount for r in reservations) == sorted(cost(u) for u in llm.usages)
    assert spent(funded) == billed(llm)
    assert h.in_flight() == 0


def test_16_calls_from_threads_no_collisions_exact_spend(funded: cycles.Client) -> None:
    llm, h = guarded(funded)
    prompts = [[ChatMessage(role="user", content="threaded " + "w " * i)] for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: _drain(llm.stream_chat(p)) if len(p[0].content) % 2 else llm.chat(p), prompts))
    reservations = funded.reservations()
    assert len(reservations) == llm.calls == 16 and {r.status for r in reservations} == {"COMMITTED"}
    assert spent(funded) == billed(llm) and h.in_flight() == 0


async def test_concurrent_astreams_are_settled_each_with_its_own_usage(funded: cycles.Client) -> None:
    llm, h = guarded(funded)
    prompts = [[ChatMessage(role="user", content="stream " + "y " * i)] for i in range(8)]
    await asyncio.gather(*(_astream(llm.astream_chat(p)) for p in prompts))
    assert spent(funded) == billed(llm) and len(llm.usages) == 8
    assert h.in_flight() == 0


# ---------------------------------------------------------------------------------------------- denials


def test_denial_stops_every_path_before_the_call(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.usd(0.0001))  # below one call's worst case
    llm, h = guarded(client)
    for call in SYNC.values():
        with pytest.raises(cycles.BudgetExceeded):
            call(llm)
    for acall in ASYNC.values():
        with pytest.raises(cycles.BudgetExceeded):
            asyncio.run(acall(llm))
    assert llm.calls == 0 and client.reservations() == [] and h.in_flight() == 0


def test_denial_names_scope_and_amounts(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    client.budgets.set("tenant:acme/agent:bot", cycles.usd(0.0001))
    llm, _ = guarded(client, agent="bot")
    with pytest.raises(cycles.BudgetExceeded) as denied:
        llm.chat(QUESTION)
    assert denied.value.scope == "tenant:acme/agent:bot"
    assert denied.value.remaining == cycles.usd(0.0001).amount
    assert denied.value.requested == PRICING.estimate(MODEL, prompt=QUESTION, max_output_tokens=256).amount


# ------------------------------------------------------------------------------------------------ subjects


def test_subject_from_handler_scope_and_instrument_tags(funded: cycles.Client) -> None:
    llm, _ = guarded(funded, workflow="support")
    with cycles.scope(agent="bot"):
        llm.chat(QUESTION)
        with instrument_tags({"cycles_agent": "planner", "cycles_dimensions": {"customer": "c-42"}}):
            llm.chat(QUESTION)
    first, second = sorted(funded.reservations(), key=lambda r: r.scope_path)
    assert first.scope_path == "tenant:acme/workflow:support/agent:bot"
    assert second.scope_path == "tenant:acme/workflow:support/agent:planner"


def test_bad_subject_is_rejected_and_nothing_is_held(funded: cycles.Client) -> None:
    with pytest.raises(TypeError):
        CyclesCallbackHandler(agnet="bot")
    llm, h = guarded(funded, agent="not a scope value")
    with pytest.raises(cycles.InvalidRequest):
        llm.chat(QUESTION)
    assert llm.calls == 0 and funded.reservations() == [] and h.in_flight() == 0


def test_settings_callback_manager_reaches_llms_built_after_and_settings_llm(funded: cycles.Client) -> None:
    h = CyclesCallbackHandler(funded)
    before = UsageLLM()  # built with its own (empty) callback manager: Settings does not reach it...
    settings_llm = UsageLLM()  # ...unless it is taken from Settings.llm
    saved = Settings._callback_manager, Settings._llm
    try:
        Settings.callback_manager = CallbackManager([h])
        Settings.llm = settings_llm
        after = UsageLLM()  # a CallbackManager without handlers copies Settings'
        after.chat(QUESTION)
        Settings.llm.chat(QUESTION)
        before.chat(QUESTION)
    finally:
        Settings._callback_manager, Settings._llm = saved
    assert after.calls == settings_llm.calls == before.calls == 1
    assert len(funded.reservations()) == 2
    assert spent(funded) == billed(after) + billed(settings_llm)


# -------------------------------------------------------------------------------------------- run budgets


def test_calls_inside_a_run_draw_from_the_run(funded: cycles.Client) -> None:
    llm, h = guarded(funded, agent="bot")
    with cycles.run(limit=cycles.usd(0.05), client=funded, agent="bot") as run:
        for call in SYNC.values():
            call(llm)
        [held] = active(funded)  # only the run's hold: the calls drew from it in process
        assert held.action.kind == "agent.run"
        assert run.calls == 4 and run.spent == billed(llm)
    [r] = funded.reservations()
    assert r.status == "COMMITTED" and r.committed.amount == billed(llm)
    assert spent(funded, "tenant:acme/agent:bot") == billed(llm)
    assert h.in_flight() == 0


async def test_async_calls_inside_a_run_draw_from_the_run(funded: cycles.Client) -> None:
    llm, _ = guarded(funded)
    async with cycles.run(limit=cycles.usd(0.05), client=funded) as run:
        await asyncio.gather(*(llm.achat([ChatMessage(role="user", content=f"q {i}")]) for i in range(16)))
        for acall in ASYNC.values():
            await acall(llm)
    assert run.calls == 20 and run.spent == billed(llm)
    [r] = funded.reservations()
    assert r.committed.amount == billed(llm)


def test_run_limit_denies_the_call_before_it_is_made(funded: cycles.Client) -> None:
    estimate = cycles.usd(0.001)
    llm, h = guarded(funded, UsageLLM(fixed_usage={"prompt_tokens": 100, "completion_tokens": 10}), estimate=estimate)
    per_call = cost({"prompt_tokens": 100, "completion_tokens": 10})
    limit = 3 * per_call + estimate.amount - 1  # three calls fit; then less than one estimate is left
    with cycles.run(limit=cycles.Amount(unit="USD_MICROCENTS", amount=limit), client=funded) as run:
        with pytest.raises(cycles.BudgetExceeded):
            for _ in range(10):
                llm.chat(QUESTION)
        assert run.remaining == estimate.amount - 1
    assert llm.calls == run.calls == 3
    assert run.spent == 3 * per_call == spent(funded)
    assert h.in_flight() == 0


def test_stream_abandoned_inside_a_run_is_settled_into_it(funded: cycles.Client) -> None:
    llm, _ = guarded(funded)
    with cycles.run(limit=cycles.usd(0.05), client=funded) as run:
        stream = llm.stream_chat(QUESTION)
        next(stream), next(stream)
        stream.close()
        assert run.calls == 1 and run.spent == _partial(llm, 2)
    assert spent(funded) == _partial(llm, 2)


# ------------------------------------------------------------------------------------------------------ caps


def test_caps_max_tokens_is_applied_to_the_request(client: cycles.Client, set_caps: Any) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    set_caps(client, max_tokens=64)
    llm, h = guarded(client)
    llm.chat(QUESTION)  # the LLM's num_output is 256: the provider is asked for 64 at most
    llm.chat(QUESTION, max_tokens=32)  # already below the cap: left alone
    assert [kw.get("max_tokens") for kw in llm.call_kwargs] == [64, 32]
    first, second = sorted(client.reservations(), key=lambda r: r.reserved.amount, reverse=True)
    assert first.reserved == PRICING.estimate(MODEL, prompt=QUESTION, max_output_tokens=256)


def test_caps_take_excluded_tools_out_of_the_request(client: cycles.Client, set_caps: Any) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    set_caps(client, tool_denylist=["delete_everything"])
    llm, _ = guarded(client)
    schemas = [{"type": "function", "function": {"name": n}} for n in ("search", "delete_everything")]
    llm.chat(QUESTION, tools=schemas)
    [kwargs] = llm.call_kwargs
    assert [t["function"]["name"] for t in kwargs["tools"]] == ["search"]
