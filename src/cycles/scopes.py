"""Subjects and scope paths.

A scope path is the subject's present levels in canonical order, `level:value` joined by `/`
(`tenant:acme/workspace:prod/agent:bot`); its affected scopes are the cumulative prefixes. Dimensions never affect
scopes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from .errors import InvalidRequest
from .models import LEVELS, SCOPE_VALUE, Subject

__all__ = ["LEVELS", "scope_path", "affected_scopes", "parse_scope", "format_scope", "subject_fields"]

_RANK = {level: i for i, level in enumerate(LEVELS)}


def _getter(subject: Subject | Mapping[str, Any]) -> Any:
    # dict first: the ledger passes plain dicts, and an ABC isinstance check costs more than the rest
    if isinstance(subject, dict) or isinstance(subject, Mapping):
        return subject.get
    return lambda level: getattr(subject, level)


def subject_fields(subject: Subject | Mapping[str, Any]) -> dict[str, str]:
    """The standard levels present on a subject, in canonical order."""
    get = _getter(subject)
    return {level: value for level in LEVELS if (value := get(level)) is not None}


def affected_scopes(subject: Subject | Mapping[str, Any]) -> list[str]:
    """Cumulative prefixes: `{tenant:a, agent:b}` -> `["tenant:a", "tenant:a/agent:b"]`."""
    get = _getter(subject)
    return list(_prefixes(get("tenant"), get("workspace"), get("app"), get("workflow"), get("agent"), get("toolset")))


@functools.lru_cache(maxsize=4096)  # a process sees the same few subjects again and again
def _prefixes(*values: str | None) -> tuple[str, ...]:
    scopes: list[str] = []
    path = ""
    for level, value in zip(LEVELS, values, strict=True):
        if value is not None:
            path = f"{path}/{level}:{value}" if path else f"{level}:{value}"
            scopes.append(path)
    return tuple(scopes)


def scope_path(subject: Subject | Mapping[str, Any]) -> str:
    scopes = affected_scopes(subject)
    return scopes[-1] if scopes else ""


def parse_scope(text: str) -> dict[str, str]:
    """Parse `tenant:acme/agent:bot` into `{"tenant": "acme", "agent": "bot"}`.

    Levels must be known, appear at most once and in canonical order; values must be well formed.
    """
    if not isinstance(text, str) or not text:
        raise InvalidRequest("scope must be a non-empty string like 'tenant:acme/agent:bot'")
    fields: dict[str, str] = {}
    last_rank = -1
    for segment in text.split("/"):
        level, sep, value = segment.partition(":")
        if not sep or level not in _RANK:
            raise InvalidRequest(
                f"bad scope segment {segment!r} in {text!r}: expected level:value with level one of {', '.join(LEVELS)}"
            )
        if _RANK[level] <= last_rank:
            raise InvalidRequest(f"scope levels out of canonical order in {text!r} (order: {' > '.join(LEVELS)})")
        if not SCOPE_VALUE.match(value) or len(value) > 128:
            raise InvalidRequest(f"bad scope value {value!r} in {text!r}: letters, digits, '_', '.', '-' only (<=128)")
        last_rank = _RANK[level]
        fields[level] = value
    return fields


def format_scope(fields: Mapping[str, str]) -> str:
    return "/".join(f"{level}:{fields[level]}" for level in LEVELS if fields.get(level) is not None)


def tenant_of(scope: str) -> str:
    """The tenant a scope path is rooted at (the path must start with `tenant:`)."""
    fields = parse_scope(scope)
    if "tenant" not in fields:
        raise InvalidRequest(f"scope {scope!r} must be rooted at tenant:<id>")
    return fields["tenant"]
