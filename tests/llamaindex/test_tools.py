"""guard_tool on real LlamaIndex tools (FunctionTool, a plain BaseTool) and guard_embedding on a real embedding model
in a real VectorStoreIndex: one reservation per run / provider call, settled on every path."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cycles_llamaindex import CyclesCallbackHandler, GuardedTool, ToolNotAllowed, guard_embedding, guard_tool
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.callbacks import CallbackManager
from llama_index.core.llms import ChatMessage
from llama_index.core.storage.kvstore import SimpleKVStore
from llama_index.core.tools import BaseTool, FunctionTool, ToolMetadata, ToolOutput

import cycles
from cycles.pricing import Pricing, TokenUsage

from .fakes import EMBEDDING_MODEL, MODEL, CountingEmbedding, UsageLLM

T = cycles.usd(0.001)


@pytest.fixture
def funded(client: cycles.Client) -> cycles.Client:
    client.budgets.set("tenant:acme", cycles.usd(1))
    return client


def search_tool(runs: list[str]) -> FunctionTool:
    def search(query: str, limit: int = 3) -> str:
        """Search the web."""
        runs.append(query)
        if query == "boom":
            raise RuntimeError("search backend down")
        return f"{limit} results for {query}"

    return FunctionTool.from_defaults(search)


class Lookup(BaseTool):
    """A plain synchronous BaseTool (not a FunctionTool)."""

    def __init__(self) -> None:
        self.inputs: list[Any] = []

    @property
    def metadata(self) -> ToolMetadata:
        return ToolMetadata(name="lookup", description="Look a word up.")

    def __call__(self, input: Any) -> ToolOutput:
        self.inputs.append(input)
        return ToolOutput(
            content=f"{input} means something", tool_name="lookup", raw_input={"input": input}, raw_output=input
        )


def tool_reservations(client: cycles.Client) -> list[Any]:
    return [r for r in client.reservations() if r.action.kind == "tool.call"]


# ------------------------------------------------------------------------------------------------ guard_tool


def test_guarded_function_tool_looks_the_same_to_the_model() -> None:
    tool = search_tool([])
    guarded = guard_tool(tool, estimate=T)
    assert isinstance(guarded, FunctionTool)
    assert guarded.metadata is tool.metadata
    assert guarded.metadata.to_openai_tool() == tool.metadata.to_openai_tool()
    lookup = guard_tool(Lookup(), estimate=T)
    assert isinstance(lookup, GuardedTool) and lookup.metadata.name == "lookup"


def test_each_run_is_reserved_in_the_toolset_scope(funded: cycles.Client) -> None:
    runs: list[str] = []
    guarded = guard_tool(search_tool(runs), estimate=T, client=funded, agent="bot")
    out = guarded.call(query="budgets")
    assert out.content == "3 results for budgets" and runs == ["budgets"]
    assert asyncio.run(guarded.acall(query="again", limit=1)).content == "1 results for again"
    assert guarded(query="third").content == "3 results for third"
    reservations = tool_reservations(funded)
    assert len(reservations) == 3
    assert {(r.scope_path, r.action.name, r.status) for r in reservations} == {
        ("tenant:acme/agent:bot/toolset:search", "search", "COMMITTED")
    }
    assert sum(r.committed.amount for r in reservations) == 3 * T.amount


def test_a_plain_base_tool_is_guarded_sync_and_async(funded: cycles.Client) -> None:
    lookup = Lookup()
    guarded = guard_tool(lookup, estimate=T, client=funded)
    assert guarded.call("cycles").content == "cycles means something"
    assert asyncio.run(guarded.acall("budget")).content == "budget means something"
    assert lookup.inputs == ["cycles", "budget"]
    assert {r.scope_path for r in tool_reservations(funded)} == {"tenant:acme/toolset:lookup"}


def test_estimate_and_actual_callables(funded: cycles.Client) -> None:
    guarded = guard_tool(
        search_tool([]),
        estimate=lambda args: cycles.usd(0.001 * args.get("limit", 3)),
        actual=lambda output: cycles.usd(0.0001 * len(output.content.split())),
        client=funded,
    )
    guarded.call(query="x", limit=5)
    [r] = tool_reservations(funded)
    assert r.reserved == cycles.usd(0.005)
    assert r.committed == cycles.usd(0.0004)  # "5 results for x"


def test_tool_error_releases_and_propagates(funded: cycles.Client) -> None:
    guarded = guard_tool(search_tool([]), estimate=T, client=funded)
    with pytest.raises(RuntimeError, match="backend down"):
        guarded.call(query="boom")
    with pytest.raises(RuntimeError, match="backend down"):
        asyncio.run(guarded.acall(query="boom"))
    assert [r.status for r in tool_reservations(funded)] == ["RELEASED", "RELEASED"]


@pytest.mark.parametrize("on_denied", ["stop", "message", "raise"])
def test_denial(client: cycles.Client, on_denied: str) -> None:
    client.budgets.set("tenant:acme", cycles.usd(0.0001))
    runs: list[str] = []
    guarded = guard_tool(search_tool(runs), estimate=T, client=client, on_denied=on_denied)  # type: ignore[arg-type]
    if on_denied == "raise":
        with pytest.raises(cycles.BudgetExceeded):
            guarded.call(query="x")
    else:
        out = guarded.call(query="x")
        assert out.is_error and isinstance(out.exception, cycles.BudgetExceeded)
        assert out.content.startswith("Budget exhausted: the tool 'search' was not run")
        assert ("[cycles stop " in out.content) == (on_denied == "stop")
    assert runs == [] and client.reservations() == []


def test_caps_exclude_a_guarded_tool(client: cycles.Client, set_caps: Any) -> None:
    client.budgets.set("tenant:acme", cycles.usd(1))
    set_caps(client, tool_denylist=["search"])
    runs: list[str] = []
    guarded = guard_tool(search_tool(runs), estimate=T, client=client, on_denied="raise")
    with pytest.raises(ToolNotAllowed):
        guarded.call(query="x")
    assert runs == [] and [r.status for r in client.reservations()] == ["RELEASED"]


def test_unknown_on_denied_is_rejected() -> None:
    with pytest.raises(ValueError):
        guard_tool(search_tool([]), estimate=T, on_denied="ignore")  # type: ignore[arg-type]


def test_model_call_inside_a_guarded_tool_draws_from_its_hold(funded: cycles.Client) -> None:
    llm = UsageLLM(callback_manager=CallbackManager([CyclesCallbackHandler(funded)]))

    def ask(question: str) -> str:
        """Ask the model."""
        return str(llm.chat([ChatMessage(role="user", content=question)]))

    guarded = guard_tool(FunctionTool.from_defaults(ask), estimate=cycles.usd(0.05), client=funded)
    guarded.call(question="what now")
    [r] = funded.reservations()  # the model call drew from the tool's hold in process
    assert r.action.kind == "tool.call"
    [usage] = llm.usages
    assert r.committed.amount == Pricing().cost(MODEL, usage).amount  # the tool commits what ran inside it


# ------------------------------------------------------------------------------------------- guard_embedding

EMBED_PRICING = Pricing({EMBEDDING_MODEL: (0.02, 0)})  # $0.02 per million input tokens: the catalog's price too


def embed_cost(tokens: int) -> int:
    return EMBED_PRICING.cost(EMBEDDING_MODEL, TokenUsage(input_tokens=tokens)).amount


DOCS = [Document(text=t) for t in ("Budgets bound agents.", "Reserve before a call.", "Commit the real cost.")]


def test_index_build_and_query_are_reserved_and_committed_at_the_reported_tokens(funded: cycles.Client) -> None:
    model = CountingEmbedding(embed_dim=8)
    embed = guard_embedding(model, client=funded, tokens=model.tokens, agent="bot")  # priced from the catalog
    index = VectorStoreIndex.from_documents(DOCS, embed_model=embed)
    index.as_retriever(similarity_top_k=1).retrieve("what bounds agents?")
    reservations = funded.reservations()
    assert len(reservations) == len(model.batches) == 2  # one batch of documents, one query
    assert {(r.action.kind, r.action.name, r.status) for r in reservations} == {
        ("llm.embedding", EMBEDDING_MODEL, "COMMITTED")
    }
    assert {r.scope_path for r in reservations} == {"tenant:acme/agent:bot"}
    assert sorted(r.committed.amount for r in reservations) == sorted(
        embed_cost(model.tokens(b)) for b in model.batches
    )


async def test_async_embeddings_are_reserved(funded: cycles.Client) -> None:
    model = CountingEmbedding(embed_dim=8)
    embed = guard_embedding(model, client=funded, pricing=EMBED_PRICING, tokens=model.tokens)
    await embed.aget_query_embedding("a question")
    await embed.aget_text_embedding_batch(["one text", "two texts here"])
    reservations = funded.reservations()
    assert len(reservations) == 2 and {r.status for r in reservations} == {"COMMITTED"}
    total = sum(r.committed.amount for r in reservations)
    assert total == sum(embed_cost(model.tokens(b)) for b in model.batches)


def test_embedding_estimate_is_the_texts_and_commits_the_count_without_a_reporter(funded: cycles.Client) -> None:
    embed = guard_embedding(CountingEmbedding(embed_dim=8), client=funded, pricing=EMBED_PRICING)
    embed.get_text_embedding("count these tokens please")
    [r] = funded.reservations()
    counted = EMBED_PRICING.count_tokens("count these tokens please", EMBEDDING_MODEL)
    assert r.reserved.amount == r.committed.amount == embed_cost(counted)


def test_embedding_denied_before_the_provider_and_failures_release(client: cycles.Client) -> None:
    client.budgets.set("tenant:acme", cycles.Amount(unit="TOKENS", amount=3))
    model = CountingEmbedding(embed_dim=8)
    embed = guard_embedding(model, client=client, unit="TOKENS", tokens=model.tokens)
    with pytest.raises(cycles.BudgetExceeded):
        embed.get_text_embedding("far too many tokens for a budget of three")
    assert model.batches == [] and client.reservations() == []

    class Broken(CountingEmbedding):
        def _get_query_embedding(self, query: str) -> list[float]:
            raise ConnectionError("embedding provider down")

    with pytest.raises(ConnectionError):
        guard_embedding(Broken(embed_dim=8), client=client, unit="TOKENS").get_query_embedding("hi")
    assert [r.status for r in client.reservations()] == ["RELEASED"]


def test_a_cached_embedding_is_neither_embedded_nor_reserved(funded: cycles.Client) -> None:
    model = CountingEmbedding(embed_dim=8, embeddings_cache=SimpleKVStore())
    embed = guard_embedding(model, client=funded, pricing=EMBED_PRICING, tokens=model.tokens)
    first = embed.get_query_embedding("the same question")
    assert embed.get_query_embedding("the same question") == first
    assert len(model.batches) == len(funded.reservations()) == 1
