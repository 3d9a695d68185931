"""Ambient state in ContextVars: the subject scope, the current envelope (run budget or outer guard), the current
reservation.

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
    from .guard import Envelope, Reservation, Run

T = TypeVar("T")

_subject: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "cycles_subject", default=MappingProxyType({})
)
envelope: contextvars.ContextVar[Envelope | None] = contextvars.ContextVar("cycles_envelope", default=None)
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


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`extra` wins per level; dimensions merge key by key."""
    if not extra:
        return dict(base)
    merged = {**base, **extra}
    if "dimensions" in base and "dimensions" in extra:
        merged["dimensions"] = {**base["dimensions"], **extra["dimensions"]}
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
