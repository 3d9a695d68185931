"""What a guarded client's `request()` returned, settled: a parsed answer commits its priced usage, an SDK `Stream` /
`AsyncStream` settles as it is read (exhausted, closed early, dropped, cut), and a raw response settles from its JSON
or when it is parsed or closed. Budget logic is in the core (`cycles.calls.ModelCall`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import openai
from openai._constants import RAW_RESPONSE_HEADER
from openai._legacy_response import LegacyAPIResponse

from cycles.calls import ModelCall

from ._requests import observe

__all__ = ["StreamFailed", "asettle", "settle"]


class StreamFailed(Exception):
    """A responses stream ended with response.failed (settled like a call that failed after producing output)."""


def _reads_later(options: Any, stream: bool) -> bool:
    """A raw response whose body the caller reads later (`with_streaming_response`)."""
    headers = options.headers
    return stream or (isinstance(headers, Mapping) and headers.get(RAW_RESPONSE_HEADER) == "stream")


def _background(options: Any, answer: Any) -> bool:
    body = options.json_data
    return bool(body.get("background")) and getattr(answer, "status", None) in ("queued", "in_progress")


# ---------------------------------------------------------------------------------------------------- streams


class _Watch:
    """What a stream has shown of its call, between the SDK's iterator and the caller."""

    __slots__ = ("call", "hide", "busy", "ended", "failure")

    def __init__(self, call: ModelCall, hide: bool) -> None:
        self.call = call
        self.hide = hide
        self.busy = False  # inside the SDK's iterator (which closes the response itself when it ends)
        self.ended = False  # a responses stream's terminal event came: settle now
        self.failure: BaseException | None = None

    def see(self, event: Any) -> bool:
        """Record an event; False when the caller must not see it (the usage chunk we asked for)."""
        call = self.call
        kind = getattr(event, "type", None)
        if kind is None:  # a chat or completions chunk
            usage = event.usage
            choices = event.choices
            if choices:
                for choice in choices:
                    delta = getattr(choice, "delta", None)
                    if delta is None:
                        call.output(choice.text or "")
                        continue
                    call.output(delta.content or "")
                    for tool in delta.tool_calls or ():
                        if tool.function is not None:
                            call.output(tool.function.arguments or "")
            if usage is not None:
                call.output(usage=usage)
                call.model_version = event.model
                return not (self.hide and not choices)
            return True
        if kind in ("response.output_text.delta", "response.function_call_arguments.delta"):
            call.output(event.delta)
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            response = event.response
            call.output(usage=response.usage)
            call.model_version = response.model
            self.ended = True
            if kind == "response.failed":
                self.failure = StreamFailed(getattr(response.error, "message", None) or "response.failed")
        return True


def _watch(stream: Any, call: ModelCall, hide: bool) -> Any:
    """Settle `call` from a sync `Stream` as it is read, exhausted or closed early; the same object is returned."""
    watch = _Watch(call, hide)
    inner = stream._iterator
    response = stream.response
    close = response.close

    def events() -> Any:
        failure: BaseException | None = None
        try:
            while True:
                watch.busy = True
                try:
                    event = next(inner)
                except StopIteration:
                    break
                finally:
                    watch.busy = False
                if watch.see(event):
                    if watch.ended:
                        call.finish(watch.failure)
                    yield event
        except BaseException as exc:  # GeneratorExit: closed early, or dropped
            failure = exc
            raise
        finally:
            call.finish(failure or watch.failure)

    def closed() -> None:
        if not watch.busy:  # the caller closed it (the SDK closes it on its last event, before we see the end)
            call.finish(GeneratorExit())
        close()

    stream._iterator = events()
    response.close = closed
    return stream


def _awatch(stream: Any, call: ModelCall, hide: bool) -> Any:
    """`_watch` for an `AsyncStream`."""
    watch = _Watch(call, hide)
    inner = stream._iterator
    response = stream.response
    aclose = response.aclose

    async def events() -> Any:
        failure: BaseException | None = None
        try:
            while True:
                watch.busy = True
                try:
                    event = await inner.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    watch.busy = False
                if watch.see(event):
                    if watch.ended:
                        await call.afinish(watch.failure)
                    yield event
        except BaseException as exc:
            failure = exc
            raise
        finally:
            await call.afinish(failure or watch.failure)

    async def closed() -> None:
        if not watch.busy:
            await call.afinish(GeneratorExit())
        await aclose()

    stream._iterator = events()
    response.aclose = closed
    return stream


# ---------------------------------------------------------------------------------------------------- answers


def settle(call: ModelCall, options: Any, answer: Any, stream: bool, hide: bool) -> Any:
    """Settle a sync call from what `request()` returned (or hand its stream the job)."""
    if isinstance(answer, openai.Stream):
        return _watch(answer, call, hide)
    if isinstance(answer, (LegacyAPIResponse, openai.APIResponse)):
        return _settle_raw(call, options, answer, stream, hide)
    if _background(options, answer):
        call.finish(actual=call.estimate.amount)
        return answer
    observe(call, answer)
    call.finish()
    return answer


def _settle_raw(call: ModelCall, options: Any, raw: Any, stream: bool, hide: bool) -> Any:
    if not _reads_later(options, stream):  # the body is read: commit from its JSON
        try:
            observe(call, json.loads(raw.http_response.content))
        except ValueError:
            pass
        call.finish()
        return raw
    parse, response = raw.parse, raw.http_response
    close = response.close

    @functools.wraps(parse)
    def parsed(*args: Any, **kwargs: Any) -> Any:
        out = parse(*args, **kwargs)
        if not call.reservation.active or getattr(out, "_cycles_watched", False):  # parsed before
            return out
        response.close = close  # from here the stream (or the answer) settles the call
        if isinstance(out, openai.Stream):
            out._cycles_watched = True
            return _watch(out, call, hide)
        observe(call, out)
        call.finish()
        return out

    def closed() -> None:
        call.finish(actual=call.estimate.amount)  # read as bytes, unparsed: the worst case
        close()

    raw.parse = parsed
    response.close = closed
    return raw


async def asettle(call: ModelCall, options: Any, answer: Any, stream: bool, hide: bool) -> Any:
    if isinstance(answer, openai.AsyncStream):
        return _awatch(answer, call, hide)
    if isinstance(answer, (LegacyAPIResponse, openai.AsyncAPIResponse)):
        return await _asettle_raw(call, options, answer, stream, hide)
    if _background(options, answer):
        await call.afinish(actual=call.estimate.amount)
        return answer
    observe(call, answer)
    await call.afinish()
    return answer


async def _asettle_raw(call: ModelCall, options: Any, raw: Any, stream: bool, hide: bool) -> Any:
    if not _reads_later(options, stream):
        try:
            observe(call, json.loads(raw.http_response.content))
        except ValueError:
            pass
        await call.afinish()
        return raw
    parse, response = raw.parse, raw.http_response
    aclose = response.aclose

    def watched(out: Any) -> Any:
        response.aclose = aclose  # from here the stream settles the call
        out._cycles_watched = True
        return _awatch(out, call, hide)

    if isinstance(raw, LegacyAPIResponse):  # `with_raw_response.create(stream=True)`: a sync parse()

        @functools.wraps(parse)
        def parsed(*args: Any, **kwargs: Any) -> Any:
            out = parse(*args, **kwargs)
            if call.reservation.active and isinstance(out, openai.AsyncStream) and not hasattr(out, "_cycles_watched"):
                return watched(out)
            return out

    else:

        @functools.wraps(parse)
        async def parsed(*args: Any, **kwargs: Any) -> Any:
            out = await parse(*args, **kwargs)
            if not call.reservation.active or hasattr(out, "_cycles_watched"):
                return out
            if isinstance(out, openai.AsyncStream):
                return watched(out)
            response.aclose = aclose
            observe(call, out)
            await call.afinish()
            return out

    async def closed() -> None:
        await call.afinish(actual=call.estimate.amount)  # read as bytes, unparsed: the worst case
        await aclose()

    raw.parse = parsed
    response.aclose = closed
    return raw
