"""`guard_model`: a chat model that reserves *before* its request is built, so ALLOW_WITH_CAPS caps are applied.

    model = guard_model(ChatOpenAI(model="gpt-4o-mini"), agent="bot")
    chain = prompt | model | parser                       # invoke, batch, stream, ainvoke, abatch, astream

A callback runs after LangChain has built the request, so `CyclesCallbackHandler` can only report a `max_tokens` cap.
`guard_model` wraps the model instead: it reserves the call's estimate (priced like the handler's), and when the
authority answers with `caps.max_tokens` below what the request asks for, it passes `max_tokens=<cap>` to the call
(`max_tokens_param=` names the model's parameter when it differs, e.g. "max_output_tokens"). The call then commits its
priced `usage_metadata`; a failure releases; a stream closed early commits the usage seen so far, else the estimate.

With a `CyclesCallbackHandler` on the same run, the handler's reservation for the call draws from this one (cycles'
nested-guard rule) instead of reserving again. Tool allow/deny caps are applied by `guard_tool` and the handler's
tool reservations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.messages.ai import add_usage
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig, ensure_config

from cycles import Amount, Client, default_client
from cycles.calls import MAX_TOKENS_KEYS, ModelCall, handler_subject, with_tags
from cycles.pricing import Pricing, default_pricing

__all__ = ["GuardedModel", "guard_model"]


def _unbind(runnable: Runnable[Any, Any]) -> tuple[Any, dict[str, Any]]:
    """The chat model under `.bind(...)` / `.bind_tools(...)` layers, and the keyword arguments they bind."""
    bound: dict[str, Any] = {}
    while isinstance(runnable, RunnableBinding):
        bound = {**runnable.kwargs, **bound}
        runnable = runnable.bound
    return runnable, bound


def _text(message: Any) -> str:
    content = getattr(message, "content", "")
    text = content if isinstance(content, str) else str(content)
    return text + "".join(str(call.get("args", "")) for call in getattr(message, "tool_calls", None) or ())


class GuardedModel(Runnable[Any, Any]):
    """A chat model (or a binding of one) whose every call is reserved first and capped (see `guard_model`)."""

    def __init__(
        self,
        model: Runnable[Any, Any],
        *,
        client: Client | None = None,
        pricing: Pricing | None = None,
        estimate: Any = None,
        unit: str = "USD_MICROCENTS",
        max_tokens_param: str = "max_tokens",
        subject: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self._client = client
        self.pricing = pricing or default_pricing()
        self.estimate = estimate
        self.unit = unit
        self.max_tokens_param = max_tokens_param
        self.subject = subject or {}

    @property
    def client(self) -> Client:
        return self._client or default_client()

    def _with(self, model: Runnable[Any, Any]) -> GuardedModel:
        return GuardedModel(
            model, client=self._client, pricing=self.pricing, estimate=self.estimate, unit=self.unit,
            max_tokens_param=self.max_tokens_param, subject=self.subject,
        )  # fmt: skip

    def bind_tools(self, tools: Any, **kwargs: Any) -> GuardedModel:
        """`model.bind_tools(...)`, still guarded."""
        return self._with(self.model.bind_tools(tools, **kwargs))  # type: ignore[attr-defined]

    # -------------------------------------------------------------------------------------------- one call
    def _describe(self, input: Any, kwargs: dict[str, Any]) -> tuple[str, Any, int | None]:
        """Model name, prompt and max output tokens of a call, as LangChain will report them."""
        base, bound = _unbind(self.model)
        call = {**bound, **kwargs}
        try:
            ls = base._get_ls_params(**call)
        except Exception:
            ls = {}
        name = ls.get("ls_model_name")
        if not isinstance(name, str) or not name:
            name = getattr(base, "model_name", None) or getattr(base, "model", None) or type(base).__name__
        max_out = next((v for k in MAX_TOKENS_KEYS if isinstance(v := call.get(k), int) and v > 0), None)
        if max_out is None and isinstance(ls.get("ls_max_tokens"), int):
            max_out = ls["ls_max_tokens"]
        prompt = input.to_messages() if hasattr(input, "to_messages") else input
        return str(name), prompt, max_out

    def _call(self, input: Any, config: RunnableConfig, kwargs: dict[str, Any]) -> ModelCall:
        model, prompt, max_out = self._describe(input, kwargs)
        _, bound = _unbind(self.model)
        return ModelCall(
            self.client,
            model,
            prompt=prompt,
            tools={**bound, **kwargs}.get("tools"),
            max_output_tokens=max_out,
            estimate=self.estimate,
            pricing=self.pricing,
            unit=self.unit,
            subject=with_tags(self.subject, config.get("metadata")),
        )

    def _capped(self, call: ModelCall, kwargs: dict[str, Any]) -> dict[str, Any]:
        # the caps are its own, or (drawn from an enclosing hold) that hold's
        return {**kwargs, self.max_tokens_param: call.max_output_tokens} if call.capped else kwargs

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        config = ensure_config(config)
        call = self._call(input, config, kwargs).begin()
        try:
            with call.reservation.entered():
                output = self.model.invoke(input, config, **self._capped(call, kwargs))
        except BaseException as exc:
            call.finish(exc)
            raise
        call.output(_text(output), getattr(output, "usage_metadata", None))
        call.finish()
        return output

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        config = ensure_config(config)
        call = await self._call(input, config, kwargs).abegin()
        try:
            with call.reservation.entered():
                output = await self.model.ainvoke(input, config, **self._capped(call, kwargs))
        except BaseException as exc:
            await call.afinish(exc)
            raise
        call.output(_text(output), getattr(output, "usage_metadata", None))
        await call.afinish()
        return output

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        config = ensure_config(config)
        call = self._call(input, config, kwargs).begin()
        chunks = self.model.stream(input, config, **self._capped(call, kwargs))
        usage: Any = None
        failure: BaseException | None = None
        try:
            while True:
                with call.reservation.entered():
                    try:
                        chunk = next(chunks)
                    except StopIteration:
                        break
                if getattr(chunk, "usage_metadata", None):
                    usage = add_usage(usage, chunk.usage_metadata)
                call.output(_text(chunk), usage)  # from here a cut stream commits its usage, else the estimate
                yield chunk
        except BaseException as exc:
            failure = exc
            raise
        finally:
            with call.reservation.entered():
                chunks.close()  # type: ignore[attr-defined]
            call.finish(failure)

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        config = ensure_config(config)
        call = await self._call(input, config, kwargs).abegin()
        chunks = self.model.astream(input, config, **self._capped(call, kwargs))
        usage: Any = None
        failure: BaseException | None = None
        try:
            while True:
                with call.reservation.entered():
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                if getattr(chunk, "usage_metadata", None):
                    usage = add_usage(usage, chunk.usage_metadata)
                call.output(_text(chunk), usage)
                yield chunk
        except BaseException as exc:
            failure = exc
            raise
        finally:
            with call.reservation.entered():
                await chunks.aclose()  # type: ignore[attr-defined]
            await call.afinish(failure)


def guard_model(
    model: Runnable[Any, Any],
    *,
    client: Client | None = None,
    pricing: Pricing | None = None,
    estimate: Amount | Any = None,
    unit: str = "USD_MICROCENTS",
    max_tokens_param: str = "max_tokens",
    scope: str | None = None,
    **subject: Any,
) -> GuardedModel:
    """Wrap a chat model (or `model.bind(...)` / `model.bind_tools(...)`) so every call is reserved before its request
    is built and ALLOW_WITH_CAPS `max_tokens` caps are applied (see the module docstring). Arguments as for
    `CyclesCallbackHandler`."""
    return GuardedModel(
        model, client=client, pricing=pricing, estimate=estimate, unit=unit, max_tokens_param=max_tokens_param,
        subject=handler_subject(scope, subject),
    )  # fmt: skip
