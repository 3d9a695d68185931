"""Model prices, usage normalisation and estimates, for every integration.

Prices come from `genai-prices` (its bundled snapshot: nothing is fetched, its background updater is never started),
overridable per model for custom and fine-tuned models or negotiated rates. Money leaves this module as integer
USD_MICROCENTS. Rounding rule: a call's cost is computed exactly (Decimal) and rounded UP to the next whole microcent,
once per call, so a budget is never under-charged.

Usage arrives in many shapes; `normalize_usage` reads LangChain `usage_metadata`, OpenAI chat completions and
responses usage, LlamaIndex responses and plain dicts into one `TokenUsage`.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .amounts import MICROCENTS_PER_USD
from .models import Amount

__all__ = [
    "ModelPrice",
    "Pricing",
    "TokenUsage",
    "UnknownModelPrice",
    "default_pricing",
    "normalize_usage",
]


class UnknownModelPrice(LookupError):
    """No price is known for a model and no fallback price is configured."""


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts of one call. `input_tokens` includes cached input; `output_tokens` includes reasoning."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cached_input_tokens + other.cached_input_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
        )

    def __bool__(self) -> bool:
        return self.input_tokens + self.output_tokens > 0


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens. Cached input defaults to the input price, cache writes to the input price."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None
    # input, output, cached input and cache write rates over one denominator, exact integers: pricing a call is
    # integer arithmetic (as exact as Decimal, and much cheaper on the hot path)
    _rates: tuple[int, int, int, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        prices = (
            self.input_per_mtok,
            self.output_per_mtok,
            self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok,
            self.input_per_mtok if self.cache_write_per_mtok is None else self.cache_write_per_mtok,
        )
        ratios = [price.as_integer_ratio() for price in prices]
        denominator = math.lcm(*(d for _, d in ratios))
        rates = [n * (denominator // d) * MICROCENTS_PER_USD for n, d in ratios]  # microcents per million tokens
        object.__setattr__(self, "_rates", (*rates, denominator * 1_000_000))

    @classmethod
    def of(cls, value: ModelPrice | Mapping[str, Any] | Sequence[Any]) -> ModelPrice:
        """Accept a ModelPrice, a mapping of its fields, or an (input, output) pair of $/MTok."""
        if isinstance(value, ModelPrice):
            return value
        if isinstance(value, Mapping):
            fields = {k: None if v is None else Decimal(str(v)) for k, v in value.items()}
            return cls(**fields)  # type: ignore[arg-type]
        input_price, output_price = value
        return cls(Decimal(str(input_price)), Decimal(str(output_price)))

    def cost_microcents(self, usage: TokenUsage) -> int:
        return self.tokens_cost(
            usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.cache_write_tokens
        )

    def tokens_cost(self, input_tokens: int, output_tokens: int, cached: int = 0, writes: int = 0) -> int:
        """Microcents for these token counts (input includes cached input and cache writes), rounded up once."""
        input_rate, output_rate, cached_rate, write_rate, denominator = self._rates
        total = input_tokens * input_rate + output_tokens * output_rate
        if cached or writes:  # priced at their own rates instead of the input rate
            cached = min(cached, input_tokens)
            writes = min(writes, input_tokens - cached)
            total += cached * (cached_rate - input_rate) + writes * (write_rate - input_rate)
        return -(-total // denominator)


def _catalog_price(model: str, provider: str | None) -> ModelPrice | None:
    """A flat ModelPrice from genai-prices' bundled snapshot, or None when unknown or priced in tiers."""
    from genai_prices import Usage, calc_price

    try:
        found = calc_price(Usage(input_tokens=1, output_tokens=1), model, provider_id=provider)
    except LookupError:
        # genai-prices infers a provider from name patterns that miss some of its own models (embeddings such as
        # text-embedding-3-small): take the first provider that lists the exact model
        owner = None if provider is not None else _provider_listing(model)
        if owner is None:
            return None
        return _catalog_price(model, owner)
    price = found.model_price
    fields = (price.input_mtok, price.output_mtok, price.cache_read_mtok, price.cache_write_mtok)
    if not all(v is None or isinstance(v, Decimal) for v in fields) or price.input_mtok is None:
        return None  # tiered prices (by context length) are not flat: leave them to an override
    return ModelPrice(price.input_mtok, price.output_mtok or Decimal(0), price.cache_read_mtok, price.cache_write_mtok)


def _provider_listing(model: str) -> str | None:
    from genai_prices import data_snapshot

    return next((p.id for p in data_snapshot.get_snapshot().providers if p.find_model(model)), None)


class Pricing:
    """Turns a model's token usage into USD_MICROCENTS, and a request into a worst-case estimate.

    `overrides` map model names to prices ($/MTok: a ModelPrice, a dict of its fields, or an (input, output) pair)
    and win over the catalog; `fallback` prices unknown models (else UnknownModelPrice). Estimates count prompt tokens
    offline (about 4 characters a token, or tiktoken when `use_tiktoken=True` and it is installed) and add the
    request's max output tokens, else `default_max_output_tokens`.
    """

    def __init__(
        self,
        overrides: Mapping[str, ModelPrice | Mapping[str, Any] | Sequence[Any]] | None = None,
        *,
        fallback: ModelPrice | Mapping[str, Any] | Sequence[Any] | None = None,
        default_max_output_tokens: int = 1024,
        chars_per_token: float = 4.0,
        use_tiktoken: bool = False,
        provider: str | None = None,
    ) -> None:
        self._overrides = {name: ModelPrice.of(price) for name, price in (overrides or {}).items()}
        self.fallback = ModelPrice.of(fallback) if fallback is not None else None
        self.default_max_output_tokens = default_max_output_tokens
        self.chars_per_token = chars_per_token
        self.use_tiktoken = use_tiktoken
        self.provider = provider
        self._cache: dict[str, ModelPrice | None] = {}
        self._lock = threading.Lock()

    def set_price(self, model: str, price: ModelPrice | Mapping[str, Any] | Sequence[Any]) -> None:
        self._overrides[model] = ModelPrice.of(price)

    def price(self, model: str) -> ModelPrice:
        """The price used for `model`: override, else catalog (looked up once per model), else fallback."""
        found = self._overrides.get(model) or self._cache.get(model)
        if found is not None:
            return found
        if model not in self._cache:
            found = _catalog_price(model, self.provider)
            with self._lock:
                self._cache[model] = found
        found = self._cache[model]
        if found is not None:
            return found
        if self.fallback is not None:
            return self.fallback
        raise UnknownModelPrice(
            f"no price known for model {model!r}: add Pricing(overrides={{{model!r}: (input_usd_per_mtok, "
            "output_usd_per_mtok)}) or set a fallback price"
        )

    def cost(self, model: str, usage: TokenUsage | Any, unit: str = "USD_MICROCENTS") -> Amount:
        """What a call with this usage costs, in `unit` (TOKENS budgets need no price)."""
        return Amount(unit=unit, amount=self.cost_amount(model, usage, unit))

    def cost_amount(self, model: str, usage: TokenUsage | Any, unit: str = "USD_MICROCENTS") -> int:
        """`cost(...).amount`, without building the Amount (a commit can take the integer as it is)."""
        usage = usage if isinstance(usage, TokenUsage) else normalize_usage(usage)
        return self._amount(
            model, unit, usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.cache_write_tokens
        )

    def _amount(
        self, model: str, unit: str, input_tokens: int, output_tokens: int, cached: int = 0, writes: int = 0
    ) -> int:
        if unit == "TOKENS":
            return input_tokens + output_tokens
        if unit != "USD_MICROCENTS":
            raise ValueError(f"cannot price model usage in {unit}: use USD_MICROCENTS or TOKENS")
        return self.price(model).tokens_cost(input_tokens, output_tokens, cached, writes)

    def count_tokens(self, text: str, model: str | None = None) -> int:
        if not text:
            return 0
        if self.use_tiktoken:
            try:
                import tiktoken

                try:
                    encoding = tiktoken.encoding_for_model(model or "gpt-4o")
                except KeyError:
                    encoding = tiktoken.get_encoding("o200k_base")
                return len(encoding.encode(text))
            except Exception:  # tiktoken missing, or its data cannot be fetched offline: use the heuristic
                pass
        return math.ceil(len(text) / self.chars_per_token)

    def estimate(
        self,
        model: str,
        *,
        prompt: str | Sequence[Any] | None = None,
        prompt_tokens: int | None = None,
        max_output_tokens: int | None = None,
        unit: str = "USD_MICROCENTS",
    ) -> Amount:
        """Worst case of a request: its prompt tokens plus the most output it may produce."""
        if prompt_tokens is None:
            prompt_tokens = self.count_tokens(prompt_text(prompt), model)
        output = max_output_tokens if max_output_tokens is not None else self.default_max_output_tokens
        return _estimate_amount(unit, self._amount(model, unit, prompt_tokens, output))


@functools.lru_cache(maxsize=4096)
def _estimate_amount(unit: str, amount: int) -> Amount:
    # Every call of one request shape has the same estimate: validate its Amount once, not per call (Amounts are
    # never mutated, so calls can share one). An invalid one raises and is not cached.
    return Amount(unit=unit, amount=amount)


def prompt_text(prompt: Any) -> str:
    """Flatten a prompt (a string, chat messages as objects or dicts, content parts) into text for counting."""
    if isinstance(prompt, str):
        return prompt
    if prompt is None:
        return ""
    shape = _shape(type(prompt))
    if shape is Mapping:
        parts = [prompt_text(prompt.get("content")), prompt_text(prompt.get("text"))]
        return "\n".join(p for p in parts if p)
    if shape is Sequence:  # chat messages, usually: read a message's text content without a call per message
        return "\n".join([c if type(c := getattr(p, "content", None)) is str else prompt_text(p) for p in prompt])
    content = getattr(prompt, "content", None)  # a message object
    if content is not None:
        return content if isinstance(content, str) else prompt_text(content)
    text = getattr(prompt, "text", None)
    return text if isinstance(text, str) else str(prompt)


@functools.cache
def _shape(cls: type) -> type | None:
    """Mapping, Sequence (not str) or None: abstract class checks are slow, and their answer depends on the class."""
    if issubclass(cls, Mapping):
        return Mapping
    return Sequence if issubclass(cls, Sequence) and not issubclass(cls, str) else None


def _getter(obj: Any) -> Callable[[str], Any]:
    """Read fields off a mapping or an object alike (None when missing)."""
    cls = type(obj)
    if _shape(cls) is Mapping:
        return obj.get
    if _is_pydantic(cls):
        return _model_reader(obj, cls)
    return lambda name: getattr(obj, name, None)


@functools.cache
def _is_pydantic(cls: type) -> bool:
    return hasattr(cls, "__pydantic_fields__") and hasattr(cls, "__pydantic_extra__")


@functools.cache
def _on_class(cls: type, name: str) -> bool:
    return hasattr(cls, name)


def _model_reader(obj: Any, cls: type) -> Callable[[str], Any]:
    """A pydantic model's fields, read the way pydantic resolves them (fields, then class attributes such as
    properties, then extra fields) but without `getattr`: a usage probe misses most names it asks for, and a miss
    through a model's `__getattr__` raises and catches an AttributeError (measured: 5 µs per OpenAI usage object)."""
    values, extra = obj.__dict__, obj.__pydantic_extra__

    def read(name: str) -> Any:
        if name in values:
            return values[name]
        if _on_class(cls, name):
            return getattr(obj, name, None)
        return extra.get(name) if extra else None

    return read


def _get(obj: Any, name: str) -> Any:
    return None if obj is None else _getter(obj)(name)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def normalize_usage(usage: Any) -> TokenUsage:
    """One TokenUsage from any usage shape we meet:

    - LangChain `usage_metadata`: input_tokens, output_tokens, input_token_details.{cache_read, cache_creation},
      output_token_details.reasoning;
    - OpenAI chat completions: prompt_tokens, completion_tokens, prompt_tokens_details.{cached_tokens,
      cache_write_tokens}, completion_tokens_details.reasoning_tokens;
    - OpenAI responses: input_tokens, output_tokens, input_tokens_details.{cached_tokens, cache_write_tokens},
      output_tokens_details.reasoning_tokens;
    - LlamaIndex: a response whose `raw` carries one of the above (or whose additional_kwargs hold
      prompt_tokens/completion_tokens), or TokenCountingHandler-style prompt_llm_token_count and
      completion_llm_token_count.
    Objects or dicts alike; anything else gives an empty usage.
    """
    if usage is None:
        return TokenUsage()
    if isinstance(usage, TokenUsage):
        return usage
    get = usage.get if type(usage) is dict else _getter(usage)  # a plain dict (LangChain's usage_metadata) is usual
    for nested in ("usage_metadata", "usage"):  # a message or response object carrying its usage
        inner = get(nested)
        if inner is not None and inner is not usage:
            found = normalize_usage(inner)
            if found:
                return found
    prompt_tokens, completion_tokens = get("prompt_tokens"), get("completion_tokens")
    if prompt_tokens is not None or completion_tokens is not None:
        cached = writes = 0
        if (details := get("prompt_tokens_details")) is not None:
            read = _getter(details)
            cached, writes = _int(read("cached_tokens")), _int(read("cache_write_tokens"))
        return TokenUsage(
            input_tokens=_int(prompt_tokens),
            output_tokens=_int(completion_tokens),
            cached_input_tokens=cached,
            cache_write_tokens=writes,
            reasoning_tokens=_int(_get(get("completion_tokens_details"), "reasoning_tokens")),
        )
    input_tokens, output_tokens = get("input_tokens"), get("output_tokens")
    if input_tokens is not None or output_tokens is not None:
        cached = writes = reasoning = 0
        if (details := get("input_token_details")) is not None:  # LangChain
            cached, writes = _int(_get(details, "cache_read")), _int(_get(details, "cache_creation"))
        if not cached and (details := get("input_tokens_details")) is not None:  # OpenAI responses
            read = _getter(details)
            cached, writes = _int(read("cached_tokens")), writes or _int(read("cache_write_tokens"))
        if (details := get("output_token_details")) is not None:
            reasoning = _int(_get(details, "reasoning"))
        if not reasoning and (details := get("output_tokens_details")) is not None:
            reasoning = _int(_get(details, "reasoning_tokens"))
        return TokenUsage(
            input_tokens=_int(input_tokens),
            output_tokens=_int(output_tokens),
            cached_input_tokens=cached,
            cache_write_tokens=writes,
            reasoning_tokens=reasoning,
        )
    if get("prompt_llm_token_count") is not None:
        return TokenUsage(
            input_tokens=_int(get("prompt_llm_token_count")),
            output_tokens=_int(get("completion_llm_token_count")),
        )
    for nested in ("raw", "additional_kwargs"):  # LlamaIndex ChatResponse / CompletionResponse
        inner = get(nested)
        if inner is not None:
            found = normalize_usage(inner)
            if found:
                return found
    return TokenUsage()


_default: Pricing | None = None


def default_pricing() -> Pricing:
    """The shared Pricing used when an integration is given none (catalog prices, no fallback)."""
    global _default
    if _default is None:
        _default = Pricing()
    return _default
