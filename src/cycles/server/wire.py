"""Reading requests and writing responses: bounded JSON bodies, query strings, path ids, model responses.

Bad input never reaches the ledger as anything but a plain JSON object: wrong content type, malformed or non-object
JSON, NaN/Infinity, lone surrogates and absurd nesting are 400 INVALID_REQUEST; a body over the limit is 413.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from pydantic import BaseModel
from pydantic_core import from_json
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive

from ..errors import IdempotencyMismatch, InvalidRequest
from ..ledger.rules import parse_time_ms
from .errors import PayloadTooLarge

MAX_BODY_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_ID_LENGTH = 128


async def read_body(receive: Receive, headers: Mapping[str, str], limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, refused with 413 as soon as it is known to exceed `limit` (header or streamed size)."""
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise InvalidRequest("Content-Length is not a number")
        if int(length) > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes", details={"max_bytes": limit})
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes", details={"max_bytes": limit})
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check(value: Any, depth: int = 0) -> None:
    """Nesting depth bounded; every string encodable as UTF-8 (no lone surrogates from \\ud800 escapes)."""
    if depth > MAX_DEPTH:
        raise InvalidRequest(f"JSON nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidRequest("JSON string holds an unpaired surrogate") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check(k, depth + 1)
            _check(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check(v, depth + 1)


def _standard_loads(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidRequest(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limits, NaN/Infinity
        raise InvalidRequest(f"malformed JSON body: {exc}") from None


def parse_json(headers: Mapping[str, str], raw: bytes, *, required: bool = True) -> dict[str, Any]:
    """A JSON object from the request body. When both carry one, X-Idempotency-Key must equal the body's
    idempotency_key (409 IDEMPOTENCY_MISMATCH)."""
    content_type = headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise InvalidRequest(f"Content-Type must be application/json, got {media or '(empty)'!r}")
    if not raw.strip():
        if required:
            raise InvalidRequest("request body must be a JSON object")
        return {}
    try:
        data = from_json(raw, allow_inf_nan=False)  # pydantic-core: three times json.loads on these bodies
    except ValueError:  # json.loads decides: the same errors as ever, and the encodings it alone reads (UTF-16, BOM)
        data = _standard_loads(raw)
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(data).__name__}")
    if b"\\u" in raw or raw.count(b"{") + raw.count(b"[") > MAX_DEPTH:
        _check(data)
    header = headers.get("x-idempotency-key")
    body_key = data.get("idempotency_key")
    if header is not None and isinstance(body_key, str) and header != body_key:
        raise IdempotencyMismatch(
            "X-Idempotency-Key header and body idempotency_key differ",
            details={"header": header[:256], "body": body_key[:256]},
        )
    return data


def query_dict(query_string: bytes) -> dict[str, str]:
    """Query parameters as a flat dict (last value wins; repeated `include` values are joined with commas), decoded
    as Starlette decodes them."""
    if not query_string:
        return {}
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    out = dict(pairs)
    if "include" in out:
        out["include"] = ",".join(v for k, v in pairs if k == "include")
    return out


def query_int(query: Mapping[str, str], name: str, default: int, low: int = 1, high: int = 200) -> int:
    text = query.get(name)
    if text is None or text == "":
        return default
    if not (text.isascii() and text.lstrip("-").isdigit()) or len(text) > 12:
        raise InvalidRequest(f"{name} must be an integer between {low} and {high}")
    value = int(text)
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be an integer between {low} and {high}")
    return value


def required_query(query: Mapping[str, str], *names: str) -> list[str]:
    missing = [n for n in names if not query.get(n)]
    if missing:
        raise InvalidRequest(f"query parameter(s) required: {', '.join(missing)}")
    return [query[n] for n in names]


MIN_TIME_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


def check_timestamps(data: Mapping[str, Any], *fields: str) -> None:
    """Timestamps (ISO-8601 or epoch ms) the ledger will store or compare must lie in years 1-9999: beyond that they
    overflow SQLite integers or Python datetimes (a 500) instead of being refused (a 400)."""
    for name in fields:
        text = data.get(name)
        if not isinstance(text, str) or not text:
            continue
        try:
            ms = parse_time_ms(text, name)
        except (ValueError, OverflowError):
            ms = None
        if ms is None or not MIN_TIME_MS <= ms <= MAX_TIME_MS:
            raise InvalidRequest(f"{name} is not a timestamp in years 1-9999: {text[:64]!r}")


def path_id(value: str, name: str) -> str:
    if not value or len(value) > MAX_ID_LENGTH:
        raise InvalidRequest(f"{name} must be 1-{MAX_ID_LENGTH} characters")
    return value


def model_response(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(exclude_none=True), status_code=status, media_type="application/json")


def json_response(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status_code=status, media_type="application/json")
