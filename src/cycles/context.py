"""Ambient state in ContextVars: the subject scope, the current run, the current reservation (which is also the
envelope inner guarded calls draw from: an outer guard, or a run budget's hold).

ContextVars follow asyncio tasks (each task starts with a copy of its creator's context). Threads start empty:
hand work to a thread with `cycles.wrap(fn)` (or `contextvars.copy_context().run`) to carry the scope along.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from .scopes import LEVELS, parse_scope

if TYPE_CHECKING:
    from .guard import Reservation, Run

T = TypeVar("T")

_subject: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "cycles_subject", default=MappingProxyType({})
)
reservation: contextvars.ContextVar[Reservation | None] = contextvars.ContextVar("cycles_reservation", default=None)
run: contextvars.ContextVar[Run | None] = contextvars.ContextVar("cycles_run", default=None)


def subject_fields(scope_text: str | None = None, **fields: Any) -> dict[str, Any]:
    """Subject fields from a scope string and/or keyword levels; `dimensions=` merges as a dict."""
    out: dict[str, Any] = dict(parse_scope(scope_text)) if scope_text else {}
    for name, value in fields.items():
        if value is None:
            continue
        if name != "dimensions" and name not in LEVELS:
            raise TypeError(f"unknown subject field {name!r}: use one of {', '.join(LEVELS)} or dimensions")
        out[name] = value
    return out


def merge(base: Mapping[str, Any], *layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """A new dict: each layer wins per level over the ones before it; dimensions merge key by key."""
    merged = dict(base)
    for extra in layers:
        if extra:
            dimensions = merged.get("dimensions")
            merged.update(extra)
            if dimensions is not None and "dimensions" in extra:
                merged["dimensions"] = {**dimensions, **extra["dimensions"]}
    return merged


@contextmanager
def scope(scope_text: str | None = None, /, **fields: Any) -> Iterator[dict[str, Any]]:
    """Ambient subject for everything inside: `with cycles.scope(workflow="refund", agent="planner"):`.

    Nested scopes merge (inner levels win). Accepts a scope string too: `cycles.scope("tenant:acme/agent:bot")`.
    """
    merged = merge(_subject.get(), subject_fields(scope_text, **fields))
    token = _subject.set(merged)
    try:
        yield merged
    finally:
        _subject.reset(token)


def under_scope(defaults: Mapping[str, Any], explicit: Mapping[str, Any] | None) -> dict[str, Any]:
    """A call's subject: `defaults` < the ambient `cycles.scope(...)` < `explicit` (a new dict)."""
    return merge(defaults, _subject.get(), explicit)


def current_scope() -> dict[str, Any]:
    """The ambient subject fields (a copy)."""
    return dict(_subject.get())


def current_run() -> Run | None:
    """The run budget this code runs under, if any."""
    return run.get()


def current_reservation() -> Reservation | None:
    """The innermost guarded call running here, e.g. to `.record()` usage from inside a guarded generator."""
    return reservation.get()


def wrap(fn: Callable[..., T]) -> Callable[..., T]:
    """Run `fn` in a copy of the current context, e.g. `executor.submit(cycles.wrap(work), item)`, so a worker
    thread sees the caller's scope and run budget."""
    ctx = contextvars.copy_context()

    @functools.wraps(fn)
    def run_in_context(*args: Any, **kwargs: Any) -> T:
        return ctx.copy().run(fn, *args, **kwargs)

    return run_in_context
