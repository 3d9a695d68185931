"""`guard_embedding`: an embedding model whose every provider call is reserved.

    Settings.embed_model = guard_embedding(OpenAIEmbedding())      # priced from the catalog (genai-prices)
    guard_embedding(MyEmbedding(), pricing=cycles.pricing.Pricing({"my-embed": (0.02, 0)}))   # $ per million tokens

LlamaIndex's EMBEDDING start event carries no texts, so a callback handler cannot price it; this wrapper sits
where the texts are. Each provider call (a query, a text, or one batch of `embed_batch_size` texts while an index is
built) reserves the texts' tokens priced as input (or the `estimate=` you give), under the action
`("llm.embedding", model_name)`, and commits the token count: the one `tokens(texts)` reports (the provider's
tokenizer, or the usage your embedder saw), else the count the estimate was priced from. A failure releases the
hold. The wrapper is a `BaseEmbedding` with the wrapped model's name, batch size, callback manager, cache and rate
limiter, so LlamaIndex batches, caches (a cached text is neither embedded nor reserved) and reports as before.
Inside `cycles.run(...)` or a guarded tool, embedding calls draw from that hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.instrumentation.dispatcher import active_instrument_tags

from cycles import Amount, Client, default_client
from cycles.calls import ModelCall, handler_subject, with_tags
from cycles.pricing import Pricing, TokenUsage, default_pricing

__all__ = ["GuardedEmbedding", "guard_embedding"]


class GuardedEmbedding(BaseEmbedding):
    """`embed_model` behind a reservation per provider call (see the module docstring)."""

    embed_model: BaseEmbedding

    _client: Client | None = PrivateAttr(default=None)
    _pricing: Pricing = PrivateAttr()
    _estimate: Amount | Callable[[list[str]], Amount] | None = PrivateAttr(default=None)
    _tokens: Callable[[list[str]], int] | None = PrivateAttr(default=None)
    _unit: str = PrivateAttr(default="USD_MICROCENTS")
    _subject: dict[str, Any] = PrivateAttr(default_factory=dict)

    @classmethod
    def class_name(cls) -> str:
        return "CyclesGuardedEmbedding"

    @property
    def client(self) -> Client:
        return self._client or default_client()

    # --------------------------------------------------------------------------------------------- the guard
    def _call(self, texts: list[str]) -> tuple[ModelCall, int]:
        model = self.model_name
        counted = self._pricing.count_tokens("\n".join(texts), model)
        estimate = self._estimate(texts) if callable(self._estimate) else self._estimate
        call = ModelCall(
            self.client,
            model,
            prompt=texts,
            prompt_tokens=counted,
            max_output_tokens=0,  # priced as its input alone
            estimate=estimate,
            pricing=self._pricing,
            unit=self._unit,
            subject=with_tags(self._subject, active_instrument_tags.get()),
            kind="llm.embedding",
        )
        return call, counted

    def _used(self, call: ModelCall, texts: list[str], counted: int) -> None:
        reported = self._tokens(texts) if self._tokens is not None else None
        call.output(usage=TokenUsage(input_tokens=counted if reported is None else reported))

    def _guarded(self, texts: list[str], embed: Callable[[], Any]) -> Any:
        call, counted = self._call(texts)
        call.begin()
        try:
            with call.reservation.entered():
                out = embed()
        except BaseException as exc:
            call.finish(exc)
            raise
        self._used(call, texts, counted)
        call.finish()
        return out

    async def _aguarded(self, texts: list[str], embed: Callable[[], Any]) -> Any:
        call, counted = self._call(texts)
        await call.abegin()
        try:
            with call.reservation.entered():
                out = await embed()
        except BaseException as exc:
            await call.afinish(exc)
            raise
        self._used(call, texts, counted)
        await call.afinish()
        return out

    # ------------------------------------------------------------------------------ BaseEmbedding's provider
    def _get_query_embedding(self, query: str) -> Embedding:
        return self._guarded([query], lambda: self.embed_model._get_query_embedding(query))

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await self._aguarded([query], lambda: self.embed_model._aget_query_embedding(query))

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._guarded([text], lambda: self.embed_model._get_text_embedding(text))

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await self._aguarded([text], lambda: self.embed_model._aget_text_embedding(text))

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._guarded(texts, lambda: self.embed_model._get_text_embeddings(texts))

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await self._aguarded(texts, lambda: self.embed_model._aget_text_embeddings(texts))


def guard_embedding(
    embed_model: BaseEmbedding,
    *,
    client: Client | None = None,
    pricing: Pricing | None = None,
    estimate: Amount | Callable[[list[str]], Amount] | None = None,
    tokens: Callable[[list[str]], int] | None = None,
    unit: str = "USD_MICROCENTS",
    scope: str | None = None,
    **subject: Any,
) -> GuardedEmbedding:
    """Wrap an embedding model so every provider call is reserved and committed (see the module docstring).

    Args:
        embed_model: any LlamaIndex `BaseEmbedding`.
        client: the `cycles.Client` (default: `cycles.default_client()` at call time).
        pricing: prices the model (embedding models are priced per input token: give an override).
        estimate: an Amount per call, or `estimate(texts) -> Amount`; default the texts' tokens, priced.
        tokens: `tokens(texts) -> int`, the token count to commit; default the count the estimate used.
        unit: USD_MICROCENTS, or TOKENS (which needs no price).
        scope, **subject: subject levels and dimensions.
    """
    guarded = GuardedEmbedding(
        embed_model=embed_model,
        model_name=embed_model.model_name,
        embed_batch_size=embed_model.embed_batch_size,
        callback_manager=embed_model.callback_manager,
        num_workers=embed_model.num_workers,
        embeddings_cache=embed_model.embeddings_cache,  # LlamaIndex applies these around the provider calls
        rate_limiter=embed_model.rate_limiter,
    )
    guarded._client = client
    guarded._pricing = pricing or default_pricing()
    guarded._estimate = estimate
    guarded._tokens = tokens
    guarded._unit = unit
    guarded._subject = handler_subject(scope, subject)
    return guarded
