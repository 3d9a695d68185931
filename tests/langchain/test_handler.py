"""CyclesCallbackHandler on real langchain-core runnables: one reservation per model call, committed at the priced
usage, settled on every path (invoke, batch, stream, ainvoke, abatch, astream, errors, streams closed early)."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import pytest
from cycles_langchain import CyclesCallbackHandler
from langchain_core.messages import HumanMessage
from langchain_core.messages.ai import add_usage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

import cycles
from cycles.pricing import default_pricing, prompt_text

from ..integrations import active, spent
from .fakes import MODEL, FailingChatModel, NoUsageChatModel, UsageChatModel, UsageLLM

PRICING = default_pricing()
PROMPT = ChatPromptTemplate.from_messages([("system", "You are terse."), ("human", "Tell me about {topic}.")])


def cost(usage: Any) -> int:
    return PRICING.cost(MODEL, usage).amount


def billed(model: UsageChatModel) -> int:
    """What the provider billed: every completed call's reported usage, priced."""
    return sum(cost(u) for u in model.usages)


def chain_for(model: Any) -> Any:
    return PROMPT | model | StrOutputParser()


# ------------------------------------------------------------------------------------------------- invoke


def test_chain_invoke_commits_priced_usage(funded: cycles.Client) -> None:
    model = UsageChatModel()
    handler = CyclesCallbackHandler(funded, agent="bot")
    out = chain_for(model).invoke({"topic": "budgets"}, config={"callbacks": [handler]})

    assert out.startswith("word")
    [r] = funded.reservations()
    assert r.status == "COMMITTED"
    assert r.action.kind == "llm.completion" and r.action.name == MODEL
    assert r.scope_path == "tenant:acme/agent:bot"
    assert r.committed is not None and r.committed.amount == billed(model) > 0
    assert spent(funded) == spent(funded, "tenant:acme/agent:bot") == billed(model)
    # the hold was the priced worst case: the prompt's tokens plus the default max output tokens
    messages = PROMPT.invoke({"topic": "budgets"}).to_messages()
    assert r.reserved == PRICING.estimate(MODEL, prompt=messages, max_output_tokens=None)
    assert handler.in_flight() == 0


def test_max_tokens_of_the_request_bounds_the_estimate(funded: cycles.Client) -> None:
    model = UsageChatModel()
    handler = CyclesCallbackHandler(funded, agent="bot")
    (PROMPT | model.bind(max_tokens=40)).invoke({"topic": "x"}, config={"callbacks": [handler]})
    [r] = funded.reservations()
    messages = PROMPT.invoke({"topic": "x"}).to_messages()
    assert r.reserved == PRICING.estimate(MODEL, prompt=messages, max_output_tokens=40)


def test_commit_carries_metrics(recording_client: Any) -> None:
    client, transport = recording_client
    client.budgets.set("tenant:acme", cycles.usd(1))
    model = UsageChatModel()
    model.invoke("hello there", config={"callbacks": [CyclesCallbackHandler(client)]})
    [commit] = transport.commits
    [usage] = model.usages
    assert commit.actual.amount == cost(usage)
    assert commit.metrics is not None
    assert (commit.metrics.tokens_input, commit.metrics.tokens_output) == (
        usage["input_tokens"],
        usage["output_tokens"],
    )
    assert commit.metrics.model_version == f"{MODEL}-2024-07-18"
    assert commit.metrics.latency_ms is not None


def test_one_reservation_per_model_call_in_a_multi_step_chain(funded: cycles.Client) -> None:
    model = UsageChatModel()
    second = ChatPromptTemplate.from_messages([("human", "Summarise: {text}")])
    chain = chain_for(model) | (lambda text: {"text": text}) | second | model | StrOutputParser()
    chain.invoke({"topic": "two calls"}, config={"callbacks": [CyclesCallbackHandler(funded, agent="bot")]})
    reservations = funded.reservations()
    assert model.calls == len(reservations) == 2
    assert {r.status for r in reservations} == {"COMMITTED"}
    assert spent(funded) == billed(model)


def test_usage_missing_is_counted_from_the_text(funded: cycles.Client) -> None:
    model = NoUsageChatModel()
    out = model.invoke("count me please", config={"callbacks": [CyclesCallbackHandler(funded)]})
    [r] = funded.reservations()
    expected = PRICING.estimate(
        MODEL, prompt=prompt_text(["count me please"]), max_output_tokens=PRICING.count_tokens(str(out.content))
    )
    assert r.committed == expected
    assert r.committed.amount < r.reserved.amount


def test_fixed_estimate_in_a_unit_pricing_cannot_produce_commits_the_estimate(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.credits(100))
    model = UsageChatModel()
    model.invoke("hi", config={"callbacks": [CyclesCallbackHandler(client, estimate=cycles.credits(7))]})
    [r] = client.reservations()
    assert r.status == "COMMITTED" and r.committed == cycles.credits(7)


def test_cache_hit_commits_nothing(funded: cycles.Client) -> None:
    from langchain_core.caches import InMemoryCache

    model = UsageChatModel(cache=InMemoryCache())
    handler = CyclesCallbackHandler(funded)
    model.invoke("same question", config={"callbacks": [handler]})
    model.invoke("same question", config={"callbacks": [handler]})  # LangChain answers from its cache
    assert model.calls == 1
    first, second = reversed(funded.reservations())
    assert first.committed.amount == billed(model) > 0
    assert second.status == "COMMITTED" and second.committed.amount == 0
    assert spent(funded) == billed(model)


def test_provider_error_releases(funded: cycles.Client) -> None:
    model = FailingChatModel()
    with pytest.raises(ConnectionError):
        model.invoke("hi", config={"callbacks": [CyclesCallbackHandler(funded)]})
    [r] = funded.reservations()
    assert model.calls == 1
    assert r.status == "RELEASED"
    assert spent(funded) == 0


def test_legacy_llm_priced_from_llm_output(funded: cycles.Client) -> None:
    llm = UsageLLM()
    llm.invoke("complete this prompt", config={"callbacks": [CyclesCallbackHandler(funded, agent="bot")]})
    [r] = funded.reservations()
    assert r.status == "COMMITTED"
    assert r.committed == PRICING.cost(MODEL, llm.usage("complete this prompt"))


# ------------------------------------------------------------------------------------- batch and parallel


@pytest.mark.parametrize("n", [8])
def test_batch_no_key_collisions_exact_spend(funded: cycles.Client, n: int) -> None:
    model = UsageChatModel()
    handler = CyclesCallbackHandler(funded, agent="bot")
    inputs = [{"topic": "topic " + "x " * i} for i in range(n)]
    outs = chain_for(model).batch(inputs, config={"callbacks": [handler], "max_concurrency": n})
    assert len(outs) == n
    reservations = funded.reservations()
    assert len(reservations) == n == model.calls
    assert len({r.reservation_id for r in reservations}) == len({r.idempotency_key for r in reservations}) == n
    assert {r.status for r in reservations} == {"COMMITTED"}
    assert sum(r.committed.amount for r in reservations) == spent(funded) == billed(model)
    assert active(funded) == [] and handler.in_flight() == 0


async def test_concurrent_ainvoke_no_key_collisions_exact_spend(funded: cycles.Client) -> None:
    model = UsageChatModel()
    handler = CyclesCallbackHandler(funded, agent="bot")
    chain = chain_for(model)
    outs = await asyncio.gather(
        *(chain.ainvoke({"topic": "t " * i}, config={"callbacks": [handler]}) for i in range(16))
    )
    assert len(outs) == 16
    reservations = funded.reservations()
    assert len(reservations) == 16 == model.calls
    assert len({r.idempotency_key for r in reservations}) == 16
    assert {r.status for r in reservations} == {"COMMITTED"}
    assert spent(funded) == billed(model)
    assert active(funded) == [] and handler.in_flight() == 0


async def test_abatch_exact_spend(funded: cycles.Client) -> None:
    model = UsageChatModel()
    handler = CyclesCallbackHandler(funded, agent="bot")
    await chain_for(model).abatch([{"topic": str(i)} for i in range(8)], config={"callbacks": [handler]})
    assert len(funded.reservations(status="COMMITTED")) == 8 == model.calls
    assert spent(funded) == billed(model)


# ------------------------------------------------------------------------------------------------ streams


def test_stream_commits_merged_usage(funded: cycles.Client) -> None:
    model = UsageChatModel()
    chunks = list(chain_for(model).stream({"topic": "streams"}, config={"callbacks": [CyclesCallbackHandler(funded)]}))
    assert "".join(chunks).startswith("word")
    [r] = funded.reservations()
    assert r.status == "COMMITTED" and r.committed.amount == billed(model) > 0
    assert active(funded) == []


async def test_astream_commits_merged_usage(funded: cycles.Client) -> None:
    model = UsageChatModel()
    handler = CyclesCallbackHandler(funded)
    chunks = [c async for c in chain_for(model).astream({"topic": "streams"}, config={"callbacks": [handler]})]
    assert chunks
    [r] = funded.reservations()
    assert r.status == "COMMITTED" and r.committed.amount == billed(model) > 0
    assert active(funded) == [] and handler.in_flight() == 0


def test_model_stream_abandoned_after_two_chunks_commits_partial_usage(funded: cycles.Client) -> None:
    model = UsageChatModel()
    handler = CyclesCallbackHandler(funded)
    stream = model.stream("a long question " * 5, config={"callbacks": [handler]})
    received = [next(stream), next(stream)]
    stream.close()
    [r] = funded.reservations()
    partial = add_usage(received[0].usage_metadata, received[1].usage_metadata)
    assert r.status == "COMMITTED"
    assert r.committed.amount == cost(partial) > 0
    assert model.usages == []  # the provider never finished
    assert active(funded) == [] and handler.in_flight() == 0


async def test_model_astream_abandoned_after_two_chunks_commits_partial_usage(funded: cycles.Client) -> None:
    model = UsageChatModel()
    handler = CyclesCallbackHandler(funded)
    stream = model.astream("a long question " * 5, config={"callbacks": [handler]})
    received = [await stream.__anext__(), await stream.__anext__()]
    await stream.aclose()
    [r] = funded.reservations()
    partial = add_usage(received[0].usage_metadata, received[1].usage_metadata)
    assert r.status == "COMMITTED" and r.committed.amount == cost(partial)
    assert active(funded) == [] and handler.in_flight() == 0


def test_chain_stream_abandoned_after_two_chunks_is_settled(funded: cycles.Client) -> None:
    """Closing a RunnableSequence stream early makes langchain-core drain the upstream steps (for tracing), so the
    model's stream runs to its end: the full usage is committed, and nothing is left open."""
    model = UsageChatModel()
    handler = CyclesCallbackHandler(funded)
    stream = chain_for(model).stream({"topic": "abandon"}, config={"callbacks": [handler]})
    next(stream), next(stream)
    stream.close()
    [r] = funded.reservations()
    assert r.status == "COMMITTED" and r.committed.amount == billed(model) > 0
    assert active(funded) == [] and handler.in_flight() == 0


async def test_chain_astream_abandoned_after_two_chunks_is_settled(funded: cycles.Client) -> None:
    """`aclose()` on a RunnableSequence astream does not close the steps' async generators (langchain-core 1.7
    iterates them with `async for`): the model's stream is closed, and LangChain calls on_llm_error with the
    partial usage, only when Python finalises those generators (garbage collection, then a few loop iterations; at
    the latest when the event loop shuts down). Until then its hold stays ACTIVE; then it is settled."""
    model = UsageChatModel()
    handler = CyclesCallbackHandler(funded)
    stream = chain_for(model).astream({"topic": "abandon"}, config={"callbacks": [handler]})
    await stream.__anext__(), await stream.__anext__()
    await stream.aclose()
    del stream
    for _ in range(200):  # let the finalisers of LangChain's nested async generators run
        if handler.in_flight() == 0:
            break
        gc.collect()
        await asyncio.sleep(0)
    assert handler.in_flight() == 0
    [r] = funded.reservations()
    assert r.status == "COMMITTED" and 0 < r.committed.amount < r.reserved.amount
    assert model.usages == []  # the provider's stream was cut, not finished
    assert active(funded) == []


def test_stream_without_usage_abandoned_commits_the_estimate(funded: cycles.Client) -> None:
    class NoUsageStream(UsageChatModel):
        def _stream(self, *args: Any, **kwargs: Any) -> Any:
            for chunk in super()._stream(*args, **kwargs):
                chunk.message.usage_metadata = None
                yield chunk

    stream = NoUsageStream().stream("hello world", config={"callbacks": [CyclesCallbackHandler(funded)]})
    next(stream), next(stream)
    stream.close()
    [r] = funded.reservations()
    assert r.status == "COMMITTED" and r.committed == r.reserved


def test_stream_failing_before_any_chunk_releases(funded: cycles.Client) -> None:
    model = FailingChatModel()
    with pytest.raises(ConnectionError):
        list(model.stream("hi", config={"callbacks": [CyclesCallbackHandler(funded)]}))
    [r] = funded.reservations()
    assert r.status == "RELEASED" and active(funded) == []


# ---------------------------------------------------------------------------------- denial on every path


def _starved(client: cycles.Client) -> cycles.Client:
    client.budgets.set("tenant:acme", cycles.usd(0.000001))  # 100 microcents: less than any estimate
    return client


def test_denial_stops_sync_paths_before_the_call(client: cycles.Client) -> None:
    _starved(client)
    model = UsageChatModel()
    config = {"callbacks": [CyclesCallbackHandler(client)]}
    chain = chain_for(model)
    with pytest.raises(cycles.BudgetExceeded):
        chain.invoke({"topic": "x"}, config=config)
    with pytest.raises(cycles.BudgetExceeded):
        chain.batch([{"topic": "x"}, {"topic": "y"}], config=config)
    with pytest.raises(cycles.BudgetExceeded):
        list(chain.stream({"topic": "x"}, config=config))
    assert model.calls == 0
    assert client.reservations() == []


async def test_denial_stops_async_paths_before_the_call(client: cycles.Client) -> None:
    _starved(client)
    model = UsageChatModel()
    config = {"callbacks": [CyclesCallbackHandler(client)]}
    chain = chain_for(model)
    with pytest.raises(cycles.BudgetExceeded):
        await chain.ainvoke({"topic": "x"}, config=config)
    with pytest.raises(cycles.BudgetExceeded):
        await chain.abatch([{"topic": "x"}, {"topic": "y"}], config=config)
    with pytest.raises(cycles.BudgetExceeded):
        [c async for c in chain.astream({"topic": "x"}, config=config)]
    assert model.calls == 0
    assert client.reservations() == []


def test_denial_names_scope_and_amounts(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    client.budgets.set("tenant:acme/agent:bot", cycles.usd(0.000001))
    with pytest.raises(cycles.BudgetExceeded) as denied:
        UsageChatModel().invoke("hi", config={"callbacks": [CyclesCallbackHandler(client, agent="bot")]})
    assert denied.value.scope == "tenant:acme/agent:bot"
    assert denied.value.requested is not None and denied.value.remaining == 100


def test_legacy_llm_batch_denied_mid_batch_releases_the_others(funded: cycles.Client) -> None:
    """A legacy LLM batches in one generate(): LangChain starts the prompts one by one and never ends the ones
    started before a denial, so the handler gives their holds back."""
    llm = UsageLLM()
    handler = CyclesCallbackHandler(funded, estimate=cycles.usd(0.4))
    funded.budgets.set("tenant:acme", cycles.usd(1))  # room for two estimates, not three
    with pytest.raises(cycles.BudgetExceeded):
        llm.batch(["one", "two", "three"], config={"callbacks": [handler]})
    assert llm.calls == 0
    assert sorted(r.status for r in funded.reservations()) == ["RELEASED", "RELEASED"]
    assert active(funded) == [] and handler.in_flight() == 0


async def test_legacy_llm_abatch_denied_mid_batch_releases_the_others(funded: cycles.Client) -> None:
    llm = UsageLLM()
    handler = CyclesCallbackHandler(funded, estimate=cycles.usd(0.4))
    funded.budgets.set("tenant:acme", cycles.usd(1))
    with pytest.raises(cycles.BudgetExceeded):
        await llm.abatch(["one", "two", "three", "four"], config={"callbacks": [handler]})
    assert llm.calls == 0
    assert active(funded) == [] and handler.in_flight() == 0
    assert {r.status for r in funded.reservations()} == {"RELEASED"}


def test_legacy_llm_batch_within_budget(funded: cycles.Client) -> None:
    llm = UsageLLM()
    handler = CyclesCallbackHandler(funded)
    assert len(llm.batch(["one", "two", "three"], config={"callbacks": [handler]})) == 3
    assert len(funded.reservations(status="COMMITTED")) == 3 and handler.in_flight() == 0


def test_sync_invoke_inside_a_running_event_loop_is_denied(client: cycles.Client) -> None:
    """Sync invoke from async code (a notebook cell, a sync tool in an async app) still stops the call."""
    _starved(client)
    model = UsageChatModel()

    async def main() -> None:
        with pytest.raises(cycles.BudgetExceeded):
            model.invoke("hi", config={"callbacks": [CyclesCallbackHandler(client)]})

    asyncio.run(main())
    assert model.calls == 0


# ---------------------------------------------------------------------------------------------- subjects


def test_subject_from_metadata_scope_and_handler(funded: cycles.Client) -> None:
    funded.budgets.set("tenant:acme/workspace:prod", cycles.usd(1))
    handler = CyclesCallbackHandler(funded, agent="bot")
    model = UsageChatModel()
    with cycles.scope(workspace="prod", agent="ambient"):
        model.invoke("a", config={"callbacks": [handler]})  # the handler's agent wins over the ambient one
        model.invoke("b", config={"callbacks": [handler], "metadata": {"cycles_agent": "planner"}})
        model.invoke(
            "c",
            config={"callbacks": [handler], "metadata": {"cycles_scope": "workflow:refund/agent:critic",
                                                          "cycles_dimensions": {"customer": "c-42"}}},
        )  # fmt: skip
    paths = [r.scope_path for r in reversed(funded.reservations())]
    assert paths == [
        "tenant:acme/workspace:prod/agent:bot",
        "tenant:acme/workspace:prod/agent:planner",
        "tenant:acme/workspace:prod/workflow:refund/agent:critic",
    ]
    assert funded.reservations()[0].subject.dimensions == {"customer": "c-42"}


def test_unknown_subject_argument_is_rejected() -> None:
    with pytest.raises(TypeError):
        CyclesCallbackHandler(team="x")


def test_default_client_is_used_when_none_given(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    default = cycles.Client(store=f"sqlite:///{tmp_path / 'default.db'}", tenant="acme")
    cycles.set_default_client(default)
    try:
        default.budgets.set("tenant:acme", cycles.usd(1))
        UsageChatModel().invoke("hi", config={"callbacks": [CyclesCallbackHandler()]})
        assert len(default.reservations(status="COMMITTED")) == 1
    finally:
        cycles.set_default_client(None)
        default.close()


# -------------------------------------------------------------------------------------------- run budgets


def test_calls_inside_a_run_draw_from_the_run(funded: cycles.Client) -> None:
    model = UsageChatModel()
    handler = CyclesCallbackHandler(funded, agent="bot")
    chain = chain_for(model)
    with cycles.run(limit=cycles.usd(0.05), client=funded, agent="bot") as run:
        chain.invoke({"topic": "one"}, config={"callbacks": [handler]})
        chain.batch([{"topic": "two"}, {"topic": "three"}], config={"callbacks": [handler]})
        [held] = active(funded)  # only the run's hold: the calls drew from it in process
        assert held.action.kind == "agent.run"
        assert run.calls == 3 and run.spent == billed(model)
    [r] = funded.reservations()
    assert r.status == "COMMITTED" and r.committed.amount == billed(model)
    assert spent(funded, "tenant:acme/agent:bot") == billed(model)
    assert handler.in_flight() == 0


async def test_async_calls_inside_a_run_draw_from_the_run(funded: cycles.Client) -> None:
    model = UsageChatModel()
    handler = CyclesCallbackHandler(funded)
    async with cycles.run(limit=cycles.usd(0.05), client=funded) as run:
        await asyncio.gather(
            *(chain_for(model).ainvoke({"topic": str(i)}, config={"callbacks": [handler]}) for i in range(6))
        )
        [c async for c in chain_for(model).astream({"topic": "s"}, config={"callbacks": [handler]})]
    assert run.calls == 7 and run.spent == billed(model)
    [r] = funded.reservations()
    assert r.committed.amount == billed(model)


def test_run_limit_denies_the_call_before_it_is_made(funded: cycles.Client) -> None:
    model = UsageChatModel()
    estimate = cycles.usd(0.001)
    handler = CyclesCallbackHandler(funded, estimate=estimate)
    messages = [HumanMessage("same prompt")]
    per_call = cost(model.usage_for(messages, model.reply(messages)))
    limit = 3 * per_call + estimate.amount - 1  # three calls fit; then less than one estimate is left
    with cycles.run(limit=cycles.Amount(unit="USD_MICROCENTS", amount=limit), client=funded) as run:
        with pytest.raises(cycles.BudgetExceeded):
            for _ in range(10):
                model.invoke(messages, config={"callbacks": [handler]})
        assert run.remaining == estimate.amount - 1
    assert model.calls == run.calls == 3
    assert run.spent == 3 * per_call == spent(funded)
    assert handler.in_flight() == 0


def test_caps_max_tokens_is_exposed_and_warned(
    client: cycles.Client, caplog: pytest.LogCaptureFixture, set_caps: Any
) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    set_caps(client, max_tokens=64)
    handler = CyclesCallbackHandler(client)
    seen: list[Any] = []

    class Peek(UsageChatModel):
        def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
            seen.append(handler.caps_for(run_manager.run_id))
            return super()._generate(messages, stop, run_manager, **kwargs)

    with caplog.at_level(logging.WARNING, logger="cycles.langchain"):
        Peek().invoke("hi", config={"callbacks": [handler]})
    assert seen == [cycles.Caps(max_tokens=64)]
    assert "guard_model" in caplog.text
