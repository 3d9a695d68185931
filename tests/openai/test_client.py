"""guard(OpenAI(...)) on real `openai` clients over httpx2.MockTransport: one reservation per request (not per SDK
retry), committed at the priced usage, denial before any byte is sent, caps applied to the JSON actually sent."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import openai
import pytest
from cycles_openai import AsyncOpenAI, OpenAI, Settings, guard
from pydantic import BaseModel

import cycles
from cycles.pricing import Pricing, UnknownModelPrice

from ..integrations import active, spent
from .fakes import EMBEDDING_MODEL, MODEL, FakeOpenAI

PRICING = Pricing(provider="openai")  # what guarded clients price with by default
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about budgets."}]


def cost(usage: dict[str, int], model: str = MODEL, cached: int = 0) -> int:
    return PRICING.cost(
        model,
        {
            "prompt_tokens": usage["input"],
            "completion_tokens": usage["output"],
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    ).amount


def billed(fake: FakeOpenAI, model: str = MODEL) -> int:
    return sum(cost(u, model, min(fake.cached, u["input"])) for u in fake.billed)


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


def one_committed(client: cycles.Client) -> Any:
    [r] = client.reservations()
    assert r.status == "COMMITTED"
    return r


# ------------------------------------------------------------------------------------------------ chat


def test_chat_create_commits_priced_usage(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.client(), funded, agent="bot")
    answer = llm.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert answer.choices[0].message.content == fake.reply
    r = one_committed(funded)
    assert r.action.kind == "llm.completion" and r.action.name == MODEL
    assert r.scope_path == "tenant:acme/agent:bot"
    assert r.committed.amount == billed(fake) > 0
    assert spent(funded) == spent(funded, "tenant:acme/agent:bot") == billed(fake)
    # the hold was the worst case: the messages' tokens plus the default max output tokens
    assert r.reserved == PRICING.estimate(MODEL, prompt=MESSAGES, max_output_tokens=None)


def test_output_limit_bounds_the_estimate_and_cached_tokens_are_priced(funded: cycles.Client) -> None:
    fake = FakeOpenAI(cached=8, reasoning=3)
    llm = guard(fake.client(), funded)
    llm.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=40)
    r = one_committed(funded)
    assert r.reserved == PRICING.estimate(MODEL, prompt=MESSAGES, max_output_tokens=40)
    assert r.committed.amount == billed(fake)
    # cached input is cheaper than plain input
    [usage] = fake.billed
    assert billed(fake) < cost(usage)


def test_one_hold_covers_the_sdk_retries(funded: cycles.Client, fake: FakeOpenAI) -> None:
    fake.fail(1, status=500)
    llm = guard(fake.client(max_retries=2), funded)
    llm.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert fake.calls == 2  # the 500, then the 200
    r = one_committed(funded)  # one reservation for both attempts
    assert r.committed.amount == billed(fake) == spent(funded)


def test_a_failed_call_releases(funded: cycles.Client, fake: FakeOpenAI) -> None:
    fake.fail(3, status=500)
    llm = guard(fake.client(max_retries=2), funded)
    with pytest.raises(openai.InternalServerError):
        llm.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert fake.calls == 3
    [r] = funded.reservations()
    assert r.status == "RELEASED"
    assert spent(funded) == 0


def test_denial_raises_before_anything_is_sent(funded: cycles.Client, fake: FakeOpenAI) -> None:
    funded.budgets.set("tenant:acme/agent:poor", cycles.usd(0.000001))
    llm = guard(fake.client(), funded, agent="poor")
    with pytest.raises(cycles.BudgetExceeded):
        llm.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert fake.calls == 0
    assert funded.reservations() == []


class Answer(BaseModel):
    topic: str
    verdict: str


def test_chat_parse_sync_and_async(funded: cycles.Client) -> None:
    fake = FakeOpenAI(reply='{"topic": "budgets", "verdict": "good"}')
    parsed = guard(fake.client(), funded).chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Answer)
    assert parsed.choices[0].message.parsed == Answer(topic="budgets", verdict="good")

    async def go() -> Any:
        return await guard(fake.async_client(), funded).chat.completions.parse(
            model=MODEL, messages=MESSAGES, response_format=Answer
        )

    parsed = asyncio.run(go())
    assert parsed.choices[0].message.parsed.verdict == "good"
    rs = funded.reservations()
    assert [r.status for r in rs] == ["COMMITTED", "COMMITTED"]
    assert sum(r.committed.amount for r in rs) == billed(fake) == spent(funded)
    assert fake.calls == 2


def test_async_chat_create_and_denial(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.async_client(), funded, agent="bot")

    async def go() -> Any:
        return await llm.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert asyncio.run(go()).choices[0].message.content == fake.reply
    assert one_committed(funded).committed.amount == billed(fake)

    funded.budgets.set("tenant:acme/agent:bot", cycles.usd(0.000001))
    with pytest.raises(cycles.BudgetExceeded):
        asyncio.run(go())
    assert fake.calls == 1


def test_sixteen_concurrent_async_calls_spend_exactly(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.async_client(), funded, agent="bot")

    async def go() -> list[Any]:
        return await asyncio.gather(
            *(
                llm.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * i}])
                for i in range(16)
            )
        )

    assert len(asyncio.run(go())) == 16
    rs = funded.reservations()
    assert len(rs) == 16 and {r.status for r in rs} == {"COMMITTED"}
    assert len(fake.billed) == 16
    assert spent(funded) == billed(fake) == sum(r.committed.amount for r in rs)


# --------------------------------------------------------------------------------------------- streams


def test_chat_stream_injects_include_usage_and_hides_its_chunk(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.client(), funded)
    chunks = list(llm.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))

    assert fake.requests[0]["stream_options"] == {"include_usage": True}  # asked for on the wire
    assert all(c.usage is None and c.choices for c in chunks)  # and never shown to the caller
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == fake.reply
    assert one_committed(funded).committed.amount == billed(fake) == spent(funded)


def test_chat_stream_asked_for_usage_keeps_its_chunk(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.client(), funded)
    stream = llm.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    assert isinstance(stream, openai.Stream)
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert one_committed(funded).committed.amount == billed(fake)


def test_chat_stream_without_usage_commits_its_text(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.client(), funded)
    stream = llm.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": False}
    )
    list(stream)
    r = one_committed(funded)
    out = PRICING.count_tokens(fake.reply, MODEL)  # the chunks' text, counted
    assert r.committed.amount == PRICING.estimate(MODEL, prompt=MESSAGES, max_output_tokens=out).amount


def test_stream_closed_after_two_chunks_settles(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.client(), funded)
    stream = llm.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    with stream:
        for i, _ in enumerate(stream):
            if i == 1:
                break
    assert active(funded) == []
    r = one_committed(funded)  # output was produced, no usage seen: the estimate
    assert r.committed.amount == r.reserved.amount


def test_stream_dropped_after_two_chunks_settles(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.client(), funded)
    stream = llm.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    next(stream), next(stream)
    del stream  # abandoned: settled when Python collects it (the SDK's stream is a reference cycle)
    gc.collect()
    assert active(funded) == []
    assert one_committed(funded)


def test_stream_closed_unread_releases(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.client(), funded)
    llm.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True).close()
    [r] = funded.reservations()
    assert r.status == "RELEASED"


def test_chat_stream_helper_sync(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.client(), funded)
    with llm.chat.completions.stream(model=MODEL, messages=MESSAGES) as stream:
        text = "".join(e.delta for e in stream if e.type == "content.delta")
        final = stream.get_final_completion()
    assert text == fake.reply and final.choices[0].message.content == fake.reply
    assert one_committed(funded).committed.amount == billed(fake)


def test_async_streams_exhausted_and_closed_early(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.async_client(), funded)

    async def go() -> str:
        async with llm.chat.completions.stream(model=MODEL, messages=MESSAGES) as stream:
            text = "".join([e.delta async for e in stream if e.type == "content.delta"])
        cut = await llm.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        async for _ in cut:
            break
        await cut.close()
        return text

    assert asyncio.run(go()) == fake.reply
    rs = funded.reservations()
    assert {r.status for r in rs} == {"COMMITTED"} and len(rs) == 2
    # the full stream at its usage; the cut one (output produced, no usage yet) at its estimate
    assert sorted(r.committed.amount for r in rs) == sorted([billed(fake), rs[0].reserved.amount])
    assert active(funded) == []


# ------------------------------------------------------------------------------------- responses, embeddings


def test_responses_create_and_stream(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.client(), funded)
    answer = llm.responses.create(model=MODEL, instructions="Be terse.", input="Tell me about budgets.")
    assert answer.output_text == fake.reply
    first = one_committed(funded)
    assert first.committed.amount == billed(fake)
    assert first.reserved == PRICING.estimate(MODEL, prompt=["Be terse.", "Tell me about budgets."])

    with llm.responses.stream(model=MODEL, input="Tell me about budgets.", max_output_tokens=50) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == fake.reply
    events = list(llm.responses.create(model=MODEL, input="Tell me about budgets.", stream=True))
    assert events[-1].type == "response.completed"
    rs = funded.reservations()
    assert [r.status for r in rs] == ["COMMITTED"] * 3
    assert PRICING.estimate(MODEL, prompt=["Tell me about budgets."], max_output_tokens=50) in [r.reserved for r in rs]
    assert sum(r.committed.amount for r in rs) == billed(fake) == spent(funded)


def test_async_responses_and_embeddings(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.async_client(), funded)

    async def go() -> None:
        await llm.responses.create(model=MODEL, input=[{"role": "user", "content": "Tell me about budgets."}])
        async with llm.responses.stream(model=MODEL, input="Tell me about budgets.") as stream:
            await stream.get_final_response()
        await llm.embeddings.create(model=EMBEDDING_MODEL, input=["one two", "three"])

    asyncio.run(go())
    rs = funded.reservations()
    assert [r.status for r in rs] == ["COMMITTED"] * 3
    [embedding] = [r for r in rs if r.action.kind == "llm.embedding"]
    assert embedding.committed.amount == cost(fake.billed[2], EMBEDDING_MODEL)
    assert sum(r.committed.amount for r in rs if r is not embedding) == sum(cost(u) for u in fake.billed[:2])


def test_embeddings_reserve_their_input_only(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.client(), funded)
    llm.embeddings.create(model=EMBEDDING_MODEL, input="budgets for agents")
    r = one_committed(funded)
    assert r.action.kind == "llm.embedding"
    assert r.reserved == PRICING.estimate(EMBEDDING_MODEL, prompt="budgets for agents", max_output_tokens=0)
    assert r.committed.amount == billed(fake, EMBEDDING_MODEL) > 0
    llm.embeddings.create(model=EMBEDDING_MODEL, input=[[1, 2, 3, 4], [5, 6]])  # token ids count as they are
    assert PRICING.estimate(EMBEDDING_MODEL, prompt_tokens=6, max_output_tokens=0) in [
        r.reserved for r in funded.reservations()
    ]


def test_background_responses_commit_the_estimate(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.client(), funded)
    answer = llm.responses.create(model=MODEL, input="Write a report.", background=True, max_output_tokens=300)
    assert answer.status == "queued"
    r = one_committed(funded)
    assert (
        r.committed.amount
        == r.reserved.amount
        == PRICING.estimate(MODEL, prompt=["Write a report."], max_output_tokens=300).amount
    )


# ------------------------------------------------------------------------------------------------- caps


def test_caps_clamp_max_tokens_and_strip_tools_in_the_json_sent(
    funded: cycles.Client, fake: FakeOpenAI, set_caps: Callable[..., None]
) -> None:
    set_caps(funded, max_tokens=64, tool_denylist=["delete_everything"])
    tools = [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
        for name in ("search", "delete_everything")
    ]
    llm = guard(fake.client(), funded)
    llm.chat.completions.create(model=MODEL, messages=MESSAGES, tools=tools, max_tokens=500)
    llm.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=tools[1:],
        tool_choice={"type": "function", "function": {"name": "delete_everything"}},
    )
    llm.responses.create(model=MODEL, input="hi", tools=[{"type": "function", "name": "delete_everything"}])

    first, second, third = fake.requests
    assert first["max_tokens"] == 64 and [t["function"]["name"] for t in first["tools"]] == ["search"]
    assert second["max_completion_tokens"] == 64  # no limit asked for: the cap is sent
    assert "tools" not in second and "tool_choice" not in second
    assert third["max_output_tokens"] == 64 and "tools" not in third
    assert all(r.status == "COMMITTED" for r in funded.reservations())


def test_caps_of_an_enclosing_run_apply(funded: cycles.Client, fake: FakeOpenAI, set_caps: Callable[..., None]) -> None:
    set_caps(funded, max_tokens=32)
    llm = guard(fake.client(), funded)
    with cycles.run(client=funded, limit=cycles.usd(1)):
        llm.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=100)
    assert fake.requests[0]["max_completion_tokens"] == 32


# ------------------------------------------------------------------------------------------------- runs


def tool_loop(llm: Any, steps: int) -> int:
    """A tool-calling agent loop: the model asks for `search` every time; the loop answers and asks again."""
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}]
    messages: list[Any] = [{"role": "user", "content": "Research budgets."}]
    done = 0
    for _ in range(steps):
        answer = llm.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_completion_tokens=100)
        [call] = answer.choices[0].message.tool_calls
        messages += [answer.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "found it"}]
        done += 1
    return done


def test_calls_inside_a_run_draw_from_its_limit(funded: cycles.Client, fake: FakeOpenAI) -> None:
    fake.tool_call = "search"
    llm = guard(fake.client(), funded)
    with cycles.run(client=funded, limit=cycles.usd(0.05)) as run:
        assert tool_loop(llm, 3) == 3
    assert run.spent == billed(fake) == spent(funded)
    assert active(funded) == []

    fake.billed.clear()
    with pytest.raises(cycles.BudgetExceeded), cycles.run(client=funded, limit=cycles.usd(0.0003)) as run:
        tool_loop(llm, 50)  # stopped at its budget
    assert 0 < len(fake.billed) < 50 and fake.calls == 3 + len(fake.billed)  # the denied call was never sent
    assert run.spent == billed(fake) <= cycles.usd(0.0003).amount
    assert active(funded) == []


# ---------------------------------------------------------------------------------------- client surface


def test_with_options_raw_and_streaming_responses_stay_guarded(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.client(), funded)
    assert isinstance(llm, openai.OpenAI)
    seen: set[str] = set()

    def settled() -> Any:
        """The reservation the last call made: settled, nothing left ACTIVE."""
        [r] = [r for r in funded.reservations() if r.reservation_id not in seen]
        seen.add(r.reservation_id)
        assert r.status == "COMMITTED" and active(funded) == []
        return r

    llm.with_options(timeout=5, max_retries=0).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert settled().committed.amount == cost(fake.billed[-1])

    raw = llm.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    assert settled().committed.amount == cost(fake.billed[-1])  # from the raw JSON, before it is parsed
    assert raw.parse().choices[0].message.content == fake.reply

    with llm.chat.completions.with_streaming_response.create(model=MODEL, messages=MESSAGES) as response:
        assert response.parse().usage is not None
    assert settled().committed.amount == cost(fake.billed[-1])

    with llm.chat.completions.with_streaming_response.create(model=MODEL, messages=MESSAGES) as response:
        response.read()  # read as bytes, never parsed
    r = settled()
    assert r.committed.amount == r.reserved.amount  # the estimate

    raw_stream = llm.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, stream=True)
    assert all(c.usage is None for c in raw_stream.parse())  # the injected usage chunk hidden here too
    assert settled().committed.amount == cost(fake.billed[-1])


def test_drop_in_classes(funded: cycles.Client, fake: FakeOpenAI) -> None:
    import httpx2

    sync = OpenAI(
        api_key="sk-test",
        base_url="https://api.openai.test/v1",
        http_client=httpx2.Client(transport=fake.transport()),
        cycles=Settings(funded, agent="bot"),
    )
    sync.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert sync.with_options(timeout=1).cycles is sync.cycles

    async def go() -> None:
        client = AsyncOpenAI(
            api_key="sk-test",
            base_url="https://api.openai.test/v1",
            http_client=httpx2.AsyncClient(transport=fake.transport()),
            cycles=Settings(funded, agent="bot"),
        )
        await client.embeddings.create(model=EMBEDDING_MODEL, input="x")

    asyncio.run(go())
    rs = funded.reservations()
    assert [r.scope_path for r in rs] == ["tenant:acme/agent:bot"] * 2
    assert sum(r.committed.amount for r in rs) == spent(funded)


def test_unguarded_routes_pass_through(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.client(max_retries=0), funded)
    with pytest.raises(openai.NotFoundError):
        llm.models.list()
    assert funded.reservations() == []


def test_unknown_model_behind_base_url_fallback_or_clear_error(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.client(), funded)
    with pytest.raises(UnknownModelPrice, match="local-llama"):
        llm.chat.completions.create(model="local-llama", messages=MESSAGES)
    assert fake.calls == 0

    priced = guard(fake.client(), funded, pricing=Pricing(fallback=(1, 2)))
    priced.chat.completions.create(model="local-llama", messages=MESSAGES)
    r = one_committed(funded)
    [usage] = fake.billed
    assert (
        r.committed.amount
        == Pricing(fallback=(1, 2))
        .cost("local-llama", {"prompt_tokens": usage["input"], "completion_tokens": usage["output"]})
        .amount
    )


def test_guard_rejects_what_is_not_an_openai_client() -> None:
    with pytest.raises(TypeError, match="openai.OpenAI"):
        guard(object())
    with pytest.raises(TypeError):
        guard(openai.OpenAI(api_key="x"), planet="mars")


# ------------------------------------------------------------------------------------- streams that end badly


@pytest.mark.parametrize("ending", ["incomplete", "failed"])
def test_responses_stream_settles_on_its_terminal_event(funded: cycles.Client, fake: FakeOpenAI, ending: str) -> None:
    fake.ending = ending
    llm = guard(fake.client(), funded)
    with llm.responses.create(model=MODEL, input="Tell me about budgets.", stream=True) as stream:
        for event in stream:
            if event.type.startswith("response.") and event.type.endswith(ending):
                r = one_committed(funded)  # settled at the event, before the caller reads on
    assert r.committed.amount == billed(fake) > 0


def test_responses_stream_failed_without_usage_commits_the_estimate(funded: cycles.Client, fake: FakeOpenAI) -> None:
    fake.ending, fake.failed_usage = "failed", False
    llm = guard(fake.client(), funded)
    events = list(llm.responses.create(model=MODEL, input="Tell me about budgets.", stream=True))
    assert events[-1].type == "response.failed"
    r = one_committed(funded)  # it produced output before failing: the provider may bill up to the estimate
    assert r.committed.amount == r.reserved.amount


def test_stream_cut_by_the_provider_commits_the_estimate(funded: cycles.Client, fake: FakeOpenAI) -> None:
    fake.cut_after = 3
    llm = guard(fake.client(), funded)
    seen = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in llm.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
            seen.append(chunk)
    assert len(seen) == 3
    r = one_committed(funded)
    assert r.committed.amount == r.reserved.amount
    assert active(funded) == []


def test_async_stream_cut_and_cancelled_calls_settle(funded: cycles.Client, fake: FakeOpenAI) -> None:
    import httpx2

    started = asyncio.Event()

    async def hangs(request: httpx2.Request) -> httpx2.Response:
        started.set()
        await asyncio.Event().wait()  # a provider that never answers
        raise AssertionError("unreachable")

    fake.cut_after = 2
    llm = guard(fake.async_client(), funded)
    stuck = guard(
        openai.AsyncOpenAI(api_key="sk-test", http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(hangs))),
        funded,
    )

    async def go() -> None:
        with pytest.raises(openai.APIConnectionError):
            async for _ in await llm.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
                pass
        task = asyncio.create_task(stuck.chat.completions.create(model=MODEL, messages=MESSAGES))
        await started.wait()
        assert len(active(funded)) == 1  # held while the request is in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    cut, cancelled = sorted(funded.reservations(), key=lambda r: r.status)
    assert cut.status == "COMMITTED" and cut.committed.amount == cut.reserved.amount
    assert cancelled.status == "RELEASED"


def test_async_raw_and_streaming_responses(funded: cycles.Client, fake: FakeOpenAI) -> None:
    llm = guard(fake.async_client(), funded)

    async def go() -> None:
        raw = await llm.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
        assert raw.parse().choices[0].message.content == fake.reply
        raw = await llm.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, stream=True)
        assert [c.usage async for c in raw.parse()][-1] is None
        async with llm.chat.completions.with_streaming_response.create(model=MODEL, messages=MESSAGES) as response:
            assert (await response.parse()).usage is not None
        async with llm.responses.with_streaming_response.create(model=MODEL, input="hi", stream=True) as response:
            async for _ in await response.parse():
                pass

    asyncio.run(go())
    rs = funded.reservations()
    assert [r.status for r in rs] == ["COMMITTED"] * 4
    assert sum(r.committed.amount for r in rs) == billed(fake) == spent(funded)


def test_azure_clients_are_guarded_too(funded: cycles.Client, fake: FakeOpenAI) -> None:
    import httpx2

    azure = openai.AzureOpenAI(
        api_key="az-test",
        api_version="2024-10-21",
        azure_endpoint="https://example.openai.azure.com",
        http_client=httpx2.Client(transport=fake.transport()),
    )
    llm = guard(azure, funded)
    assert isinstance(llm, openai.AzureOpenAI)
    llm.with_options(timeout=3).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert one_committed(funded).committed.amount == billed(fake)


def test_async_retries_hold_once_and_the_original_client_stays_unguarded(
    funded: cycles.Client, fake: FakeOpenAI
) -> None:
    plain = fake.async_client(max_retries=2)
    llm = guard(plain, funded)
    fake.fail(1, status=503)

    async def go() -> None:
        await llm.chat.completions.create(model=MODEL, messages=MESSAGES)
        await plain.chat.completions.create(model=MODEL, messages=MESSAGES)  # not guarded: no reservation

    asyncio.run(go())
    assert fake.calls == 3
    r = one_committed(funded)
    assert r.committed.amount == cost(fake.billed[0]) == spent(funded)


def test_responses_parse_and_legacy_completions(funded: cycles.Client) -> None:
    fake = FakeOpenAI(reply='{"topic": "budgets", "verdict": "good"}')
    llm = guard(fake.client(), funded)
    parsed = llm.responses.parse(model=MODEL, input="Judge budgets.", text_format=Answer)
    assert parsed.output_parsed == Answer(topic="budgets", verdict="good")
    done = llm.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say it.", max_tokens=20)
    assert done.choices[0].text == fake.reply
    rs = funded.reservations()
    assert [r.status for r in rs] == ["COMMITTED"] * 2
    [legacy] = [r for r in rs if r.action.name == "gpt-3.5-turbo-instruct"]
    assert legacy.reserved == PRICING.estimate("gpt-3.5-turbo-instruct", prompt="Say it.", max_output_tokens=20)
    assert legacy.committed.amount == cost(fake.billed[1], "gpt-3.5-turbo-instruct")
    assert sum(r.committed.amount for r in rs) == spent(funded)


def test_shadow_mode_sends_the_call_and_holds_nothing(tmp_path: Any, fake: FakeOpenAI) -> None:
    store = f"sqlite:///{tmp_path / 'shadow.db'}"
    admin = cycles.Client(store=store, tenant="acme")
    admin.budgets.set("tenant:acme", cycles.usd(0.000001))  # far too little
    shadow = cycles.Client(store=store, tenant="acme", shadow=True)
    try:
        answer = guard(fake.client(), shadow).chat.completions.create(model=MODEL, messages=MESSAGES)
        assert answer.choices[0].message.content == fake.reply  # observed, not enforced: the call ran
        assert fake.calls == 1
        assert shadow.stats.shadow_denied == 1
        assert admin.reservations() == [] and spent(admin) == 0
    finally:
        shadow.close()
        admin.close()


def test_sixteen_concurrent_calls_over_a_small_budget_deny_before_sending(
    funded: cycles.Client, fake: FakeOpenAI
) -> None:
    one = PRICING.estimate(MODEL, prompt=MESSAGES).amount
    funded.budgets.set("tenant:acme/agent:tight", cycles.Amount(unit="USD_MICROCENTS", amount=one + one // 20))
    llm = guard(fake.async_client(), funded, agent="tight")

    async def go() -> list[Any]:
        calls = [llm.chat.completions.create(model=MODEL, messages=MESSAGES) for _ in range(16)]
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(go())
    denied = [o for o in outcomes if isinstance(o, cycles.BudgetExceeded)]
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(denied) + len(answered) == 16 and denied and answered
    assert fake.calls == len(answered)  # a denied call never reached the provider
    assert spent(funded, "tenant:acme/agent:tight") == billed(fake) == spent(funded)
    assert active(funded) == []


def test_commits_carry_tokens_and_the_model_version(recording_client: Any, fake: FakeOpenAI) -> None:
    client, transport = recording_client
    client.budgets.set("tenant:acme", cycles.usd(1))
    llm = guard(fake.client(), client)
    llm.chat.completions.create(model=MODEL, messages=MESSAGES)
    list(llm.responses.create(model=MODEL, input="Tell me about budgets.", stream=True))
    for commit, usage in zip(transport.commits, fake.billed, strict=True):
        assert commit.metrics is not None
        assert (commit.metrics.tokens_input, commit.metrics.tokens_output) == (usage["input"], usage["output"])
        assert commit.metrics.model_version == f"{MODEL}-2024-07-18"  # the model the provider says answered
        assert commit.metrics.latency_ms is not None
