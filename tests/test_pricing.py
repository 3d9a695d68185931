"""cycles.pricing: catalog prices (genai-prices, offline), overrides, the rounding rule, usage shapes, estimates."""

from __future__ import annotations

from decimal import Decimal
from types import SimpleNamespace

import pytest

from cycles import usd
from cycles.pricing import ModelPrice, Pricing, TokenUsage, UnknownModelPrice, normalize_usage


def test_catalog_price_matches_genai_prices_exactly():
    from genai_prices import Usage, calc_price

    usage = TokenUsage(input_tokens=1234, output_tokens=567, cached_input_tokens=200)
    expected = calc_price(Usage(input_tokens=1234, output_tokens=567, cache_read_tokens=200), "gpt-4o").total_price
    assert Pricing().cost("gpt-4o", usage).amount == int(expected * 100_000_000)


def test_rounding_is_up_to_the_next_microcent_once_per_call():
    price = ModelPrice(Decimal("0.075"), Decimal("0.3"))  # 7.5 and 30 microcents a token
    assert price.cost_microcents(TokenUsage(input_tokens=1)) == 8  # 7.5 -> 8
    assert price.cost_microcents(TokenUsage(input_tokens=2)) == 15  # exact: no rounding
    assert price.cost_microcents(TokenUsage(input_tokens=1, output_tokens=1)) == 38  # 37.5 -> 38, not 8 + 30


def test_cached_input_and_cache_writes_use_their_own_prices():
    price = ModelPrice(Decimal(2), Decimal(8), cached_input_per_mtok=Decimal("0.5"), cache_write_per_mtok=Decimal(3))
    usage = TokenUsage(input_tokens=1000, output_tokens=100, cached_input_tokens=400, cache_write_tokens=100)
    # 500 plain x 200 + 400 cached x 50 + 100 written x 300 + 100 out x 800 (microcents per token)
    assert price.cost_microcents(usage) == 500 * 200 + 400 * 50 + 100 * 300 + 100 * 800


def test_overrides_win_and_accept_pairs_and_mappings():
    pricing = Pricing({"gpt-4o": (1, 2), "my-ft": {"input_per_mtok": "3", "output_per_mtok": "4"}})
    assert pricing.cost("gpt-4o", TokenUsage(1_000_000, 1_000_000)).amount == 300_000_000  # $1 + $2
    assert pricing.cost("my-ft", TokenUsage(1_000_000, 0)).amount == 300_000_000
    pricing.set_price("late", ModelPrice(Decimal(1), Decimal(1)))
    assert pricing.cost("late", TokenUsage(0, 1_000_000)).amount == 100_000_000


def test_catalog_models_outside_the_name_patterns_are_priced_too():
    # genai-prices' provider inference misses embedding models; the catalog still lists them
    pricing = Pricing()
    assert pricing.price("text-embedding-3-small").input_per_mtok == Decimal("0.02")
    assert pricing.estimate("text-embedding-3-small", prompt_tokens=1_000_000, max_output_tokens=0) == usd(0.02)


def test_unknown_model_needs_a_fallback():
    with pytest.raises(UnknownModelPrice, match="no-such-model"):
        Pricing().cost("no-such-model", TokenUsage(10, 10))
    assert Pricing(fallback=(10, 10)).cost("no-such-model", TokenUsage(1_000_000, 0)).amount == 1_000_000_000


def test_tokens_budgets_need_no_price():
    cost = Pricing().cost("no-such-model", TokenUsage(input_tokens=120, output_tokens=30), unit="TOKENS")
    assert (cost.unit, cost.amount) == ("TOKENS", 150)
    with pytest.raises(ValueError):
        Pricing().cost("gpt-4o", TokenUsage(1, 1), unit="CREDITS")


@pytest.mark.parametrize(
    ("shape", "usage"),
    [
        (  # LangChain usage_metadata
            {"input_tokens": 100, "output_tokens": 20, "total_tokens": 120,
             "input_token_details": {"cache_read": 30, "cache_creation": 5}, "output_token_details": {"reasoning": 7}},
            TokenUsage(100, 20, cached_input_tokens=30, cache_write_tokens=5, reasoning_tokens=7),
        ),
        (  # OpenAI chat completions usage
            {"prompt_tokens": 100, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": 30},
             "completion_tokens_details": {"reasoning_tokens": 7}},
            TokenUsage(100, 20, cached_input_tokens=30, reasoning_tokens=7),
        ),
        (  # OpenAI responses usage, as an object
            SimpleNamespace(input_tokens=100, output_tokens=20, input_tokens_details=SimpleNamespace(cached_tokens=30),
                            output_tokens_details=SimpleNamespace(reasoning_tokens=7)),
            TokenUsage(100, 20, cached_input_tokens=30, reasoning_tokens=7),
        ),
        (  # an AIMessage-like object carrying usage_metadata
            SimpleNamespace(usage_metadata={"input_tokens": 9, "output_tokens": 3}),
            TokenUsage(9, 3),
        ),
        (  # a LlamaIndex ChatResponse whose raw is an OpenAI completion
            SimpleNamespace(raw={"usage": {"prompt_tokens": 11, "completion_tokens": 4}}, additional_kwargs={}),
            TokenUsage(11, 4),
        ),
        (  # LlamaIndex additional_kwargs
            SimpleNamespace(raw=None, additional_kwargs={"prompt_tokens": 5, "completion_tokens": 6}),
            TokenUsage(5, 6),
        ),
        ({"prompt_llm_token_count": 8, "completion_llm_token_count": 2}, TokenUsage(8, 2)),  # TokenCountingHandler
        (None, TokenUsage()),
        ({"something": "else"}, TokenUsage()),
    ],
)  # fmt: skip
def test_usage_shapes(shape, usage):
    assert normalize_usage(shape) == usage


def test_estimate_is_prompt_plus_max_output_priced():
    pricing = Pricing({"m": (1, 2)}, default_max_output_tokens=100)
    prompt = [{"role": "user", "content": "x" * 400}]  # 400 characters: 100 tokens at 4 a token
    assert pricing.estimate("m", prompt=prompt).amount == 100 * 100 + 100 * 200
    assert pricing.estimate("m", prompt=prompt, max_output_tokens=10).amount == 100 * 100 + 10 * 200
    assert pricing.estimate("m", prompt_tokens=0, max_output_tokens=0).amount == 0
    assert pricing.estimate("m", prompt="abc", unit="TOKENS").amount == 1 + 100


def test_usage_read_off_pydantic_models_the_way_pydantic_resolves_attributes():
    """Fields, then class attributes (a property), then extra fields: read without a failing `getattr` per probe."""
    from pydantic import BaseModel, ConfigDict

    openai_types = pytest.importorskip("openai.types")
    from openai.types.responses import ResponseUsage

    chat = openai_types.CompletionUsage(
        prompt_tokens=100, completion_tokens=20, total_tokens=120,
        prompt_tokens_details={"cached_tokens": 30, "cache_write_tokens": 5},
        completion_tokens_details={"reasoning_tokens": 7},
    )  # fmt: skip
    assert normalize_usage(chat) == TokenUsage(
        100, 20, cached_input_tokens=30, cache_write_tokens=5, reasoning_tokens=7
    )
    responses = ResponseUsage(
        input_tokens=100, output_tokens=20, total_tokens=120,
        input_tokens_details={"cached_tokens": 30, "cache_write_tokens": 5},
        output_tokens_details={"reasoning_tokens": 7},
    )  # fmt: skip
    assert normalize_usage(responses) == TokenUsage(100, 20, 30, 5, 7)

    class Computed(BaseModel):  # token counts behind a property
        counts: tuple[int, int]

        @property
        def prompt_tokens(self) -> int:
            return self.counts[0]

        @property
        def completion_tokens(self) -> int:
            return self.counts[1]

    assert normalize_usage(Computed(counts=(12, 3))) == TokenUsage(12, 3)

    class Loose(BaseModel):  # a provider's usage carried as extra fields
        model_config = ConfigDict(extra="allow")

    assert normalize_usage(Loose.model_validate({"input_tokens": 4, "output_tokens": 2})) == TokenUsage(4, 2)
    llama = pytest.importorskip("llama_index.core.llms")
    response = llama.ChatResponse(
        message=llama.ChatMessage(role="assistant", content="hi"),
        raw={"usage": {"prompt_tokens": 11, "completion_tokens": 4}},
    )
    assert normalize_usage(response) == TokenUsage(11, 4)
