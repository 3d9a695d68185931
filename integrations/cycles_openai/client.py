"""Guarded OpenAI clients: every model request is reserved in the client's `request()` before the SDK sends it.

    client = guard(openai.OpenAI(), agent="bot")          # or: from cycles_openai import OpenAI; OpenAI(agent="bot")

`request(cast_to, options, *, stream, stream_cls)` is the one method every API call goes through, and the SDK retries
inside it: one hold covers a call and all its retries, and chat `create` / `parse` / `stream()`, responses `create` /
`parse` / `stream()`, legacy completions and embeddings are all caught there (`with_options()`, `with_raw_response`
and `with_streaming_response` go through it too). Other routes (files, models, ...) pass through untouched.

A call's lifecycle (`cycles.calls.ModelCall`):
- reserve the worst case from the JSON body: the prompt's tokens (tools included) plus `max_completion_tokens` /
  `max_tokens` / `max_output_tokens` (times `n`), else `Pricing.default_max_output_tokens`; embeddings reserve their
  input tokens. A denial raises before any byte is sent. A model without a price raises `UnknownModelPrice` (set
  `Pricing(fallback=...)` or an override for models served behind `base_url`);
- ALLOW_WITH_CAPS: the output limit sent is lowered to the cap and tools outside the allow/deny lists are removed
  from the body (with a `tool_choice` naming one of them) before the request leaves;
- commit the priced `usage` of the answer (cached input and reasoning tokens included), else its text counted; an
  error releases the hold (an SDK retry is not an error: only the call's final outcome counts);
- streams stay the SDK's `Stream` / `AsyncStream`: chat and completions streams get `stream_options.include_usage`
  when the caller did not set it (the extra usage chunk is then hidden from the caller), the usage commits when the
  stream is exhausted (responses streams: on response.completed / incomplete / failed), and a stream closed early
  (`close()`, leaving `with`, or dropped) commits the usage seen so far, else the estimate once output was produced,
  else releases;
- `background=True` responses return before the model runs: they commit the estimate (the worst case the request
  allowed) at once, as the final usage is only known to a later `responses.retrieve`;
- `with_raw_response` commits from the raw JSON body; `with_streaming_response` settles when `parse()` is called,
  else commits the estimate when the response is closed unparsed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, TypeVar

import openai
from openai._compat import model_copy

from cycles import Amount, Client, default_client
from cycles.calls import ModelCall, handler_subject
from cycles.pricing import Pricing

from ._answers import asettle, settle
from ._requests import ROUTES, USAGE_STREAMS, body_of, capped_body, max_tokens_of, prompt_of, token_inputs

__all__ = ["AsyncOpenAI", "OpenAI", "Settings", "guard", "openai_pricing"]

C = TypeVar("C", bound="openai.OpenAI | openai.AsyncOpenAI")


_pricing: Pricing | None = None


def openai_pricing() -> Pricing:
    """The pricing guarded clients use when given none: the catalog's OpenAI prices (embedding models included),
    no fallback (a model served behind `base_url` needs an override or `Pricing(fallback=...)`)."""
    global _pricing
    if _pricing is None:
        _pricing = Pricing(provider="openai")
    return _pricing


class Settings:
    """How a guarded client reserves: the cycles client, pricing, estimate, unit and subject of its calls.

    Args:
        client: the `cycles.Client` (default: `cycles.default_client()` at call time).
        pricing: a `cycles.pricing.Pricing` (default: `openai_pricing()`, the catalog's OpenAI prices).
        estimate: a fixed `Amount` per call, or `estimate(model, prompt, max_output_tokens) -> Amount`.
        unit: USD_MICROCENTS, or TOKENS (which needs no price).
        include_usage: ask chat streams for their usage (`stream_options.include_usage`) when the caller did not.
        scope, **subject: subject levels (`tenant` ... `toolset`) and `dimensions`, or a scope string.
    """

    __slots__ = ("_client", "pricing", "estimate", "unit", "include_usage", "subject")

    def __init__(
        self,
        client: Client | None = None,
        *,
        pricing: Pricing | None = None,
        estimate: Amount | Any = None,
        unit: str = "USD_MICROCENTS",
        include_usage: bool = True,
        scope: str | None = None,
        **subject: Any,
    ) -> None:
        self._client = client
        self.pricing = pricing or openai_pricing()
        self.estimate = estimate
        self.unit = unit
        self.include_usage = include_usage
        self.subject = handler_subject(scope, subject)

    @property
    def client(self) -> Client:
        return self._client or default_client()

    def call(self, route: str, body: Mapping[str, Any]) -> tuple[ModelCall, str | None]:
        """The call a request makes (not yet begun), and the body key of its output limit."""
        kind = ROUTES[route][0]
        model = str(body.get("model") or "unknown")
        prompt = prompt_of(route, body)
        key, max_out = max_tokens_of(route, body)
        embedding = kind == "llm.embedding"
        n = body.get("n")
        call = ModelCall(
            self.client,
            model,
            prompt=prompt,
            tools=body.get("tools"),
            max_output_tokens=0 if embedding else max_out,  # an embedding is priced as its input alone
            estimate=self.estimate,
            pricing=self.pricing,
            unit=self.unit,
            subject=self.subject,
            kind=kind,
            prompt_tokens=token_inputs(prompt) if embedding else None,  # inputs given as token ids count as they are
            choices=n if isinstance(n, int) and n > 1 else 1,
        )
        return call, key


def _prepare(settings: Settings, options: Any, stream: bool) -> tuple[ModelCall | None, str | None, bool]:
    """The call a request makes (None for a route we do not guard), the key of its output limit, and whether the
    stream's usage chunk is ours to ask for (and hide)."""
    route = options.url
    if route not in ROUTES or options.method != "post":
        return None, None, False
    body = body_of(options)
    if body is None:
        return None, None, False
    call, key = settings.call(route, body)
    hide = stream and settings.include_usage and route in USAGE_STREAMS and _asks_no_usage(body)
    return call, key, hide


def _asks_no_usage(body: Mapping[str, Any]) -> bool:
    stream_options = body.get("stream_options")
    return not isinstance(stream_options, Mapping) or "include_usage" not in stream_options


def _send_options(options: Any, call: ModelCall, key: str | None, hide: bool) -> Any:
    """The options to send: the caps applied and include_usage injected, on a copy (the caller's stay as given)."""
    body = body_of(options)
    assert body is not None
    capped = capped_body(options.url, body, call, key)
    if capped is None and not hide:
        return options
    out = dict(capped if capped is not None else body)
    if hide:
        out["stream_options"] = {**(out.get("stream_options") or {}), "include_usage": True}
    options = model_copy(options)
    options.json_data = out
    options.extra_json = None  # merged into the body above
    return options


# ---------------------------------------------------------------------------------------------------- clients


class _Guarded:
    """What a guarded client adds to the SDK's: its Settings, carried over by `copy()` / `with_options()`."""

    _cycles: Settings

    def __init__(self, *args: Any, cycles: Settings | None = None, **kwargs: Any) -> None:
        self._cycles = cycles or Settings()
        super().__init__(*args, **kwargs)

    def copy(self, *args: Any, _extra_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        extra = {**(_extra_kwargs or {}), "cycles": self._cycles}
        return super().copy(*args, _extra_kwargs=extra, **kwargs)  # type: ignore[misc]

    with_options = copy

    @property
    def cycles(self) -> Settings:
        """How this client's calls are reserved."""
        return self._cycles


class _GuardedSync(_Guarded):
    def request(self, cast_to: Any, options: Any, *, stream: bool = False, stream_cls: Any = None) -> Any:
        call, key, hide = _prepare(self._cycles, options, stream)
        if call is None:
            return super().request(cast_to, options, stream=stream, stream_cls=stream_cls)  # type: ignore[misc]
        call.begin()  # a denial raises here, before anything is sent
        try:
            options = _send_options(options, call, key, hide)
            with call.reservation.entered():
                answer = super().request(cast_to, options, stream=stream, stream_cls=stream_cls)  # type: ignore[misc]
        except BaseException as exc:
            call.finish(exc)
            raise
        return settle(call, options, answer, stream, hide)


class _GuardedAsync(_Guarded):
    async def request(self, cast_to: Any, options: Any, *, stream: bool = False, stream_cls: Any = None) -> Any:
        call, key, hide = _prepare(self._cycles, options, stream)
        if call is None:
            return await super().request(cast_to, options, stream=stream, stream_cls=stream_cls)  # type: ignore[misc]
        await call.abegin()
        try:
            options = _send_options(options, call, key, hide)
            with call.reservation.entered():
                answer = await super().request(  # type: ignore[misc]
                    cast_to, options, stream=stream, stream_cls=stream_cls
                )
        except BaseException as exc:
            await call.afinish(exc)
            raise
        return await asettle(call, options, answer, stream, hide)


class OpenAI(_GuardedSync, openai.OpenAI):
    """`openai.OpenAI`, every model call reserved first: `OpenAI(..., cycles=Settings(agent="bot"))`."""


class AsyncOpenAI(_GuardedAsync, openai.AsyncOpenAI):
    """`openai.AsyncOpenAI`, every model call reserved first: `AsyncOpenAI(..., cycles=Settings(agent="bot"))`."""


@functools.cache
def _guarded_class(cls: type) -> type:
    if issubclass(cls, _Guarded):
        return cls
    if cls is openai.OpenAI:
        return OpenAI
    if cls is openai.AsyncOpenAI:
        return AsyncOpenAI
    base = _GuardedAsync if issubclass(cls, openai.AsyncOpenAI) else _GuardedSync
    return type(f"Guarded{cls.__name__}", (base, cls), {"__module__": __name__})  # AzureOpenAI, subclasses


def guard(
    client: C,
    cycles_client: Client | None = None,
    *,
    pricing: Pricing | None = None,
    estimate: Amount | Any = None,
    unit: str = "USD_MICROCENTS",
    include_usage: bool = True,
    scope: str | None = None,
    **subject: Any,
) -> C:
    """A guarded copy of an `OpenAI` / `AsyncOpenAI` (or subclass, e.g. `AzureOpenAI`) client: same interface, same
    HTTP client and options, every model call reserved first (see the module docstring). The given client is left
    as it was. Arguments as for `Settings`."""
    if not isinstance(client, (openai.OpenAI, openai.AsyncOpenAI)):
        raise TypeError(f"guard() takes an openai.OpenAI or openai.AsyncOpenAI client, not {type(client).__name__}")
    settings = Settings(
        cycles_client, pricing=pricing, estimate=estimate, unit=unit, include_usage=include_usage, scope=scope,
        **subject,
    )  # fmt: skip
    cls = _guarded_class(type(client))
    guarded = object.__new__(cls)
    # the SDK's own state as it is (its HTTP client, auth, options), without the resources it built for `client`
    lazy = {name for name in vars(client) if isinstance(getattr(type(client), name, None), functools.cached_property)}
    guarded.__dict__.update({k: v for k, v in vars(client).items() if k not in lazy})
    guarded._cycles = settings
    return guarded
