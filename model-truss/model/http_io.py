"""HTTP in and out for every route: the JSON body read here (not by truss), every response built here.

The model's routes take the raw request (truss then skips its own body parsing, which turns bodies
that are not UTF-8, nest too deep or hold huge integers into 500s) and return starlette responses
(so a stream goes out with its real media type, and an error with its status and a JSON body).

`read_json` refuses, each with a 4xx that says what to fix: a body over `max_request_bytes` (413; the
launcher's middleware refuses it before it is read, this check is for truss's own server on Baseten),
bytes that are not UTF-8, JSON that does not parse, NaN/Infinity, integers longer than Python converts,
nesting deeper than `MAX_JSON_DEPTH`, and lone UTF-16 surrogates (`"\\ud800"`) in any key or string,
which no tokenizer or UTF-8 encoder accepts. After any of these the connection stays usable.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from model import metrics
from model.errors import InvalidRequest, PayloadTooLarge, ServingError

logger = logging.getLogger(__name__)

PREDICT_STREAM_MEDIA_TYPE = "text/plain; charset=utf-8"
SSE_MEDIA_TYPE = "text/event-stream"
MAX_JSON_DEPTH = 64  # objects/arrays inside one another; JSON schemas for structured output stay well inside


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request body as JSON; anything else is a `ServingError` that says what to send."""
    raw = await request.body()
    if len(raw) > max_bytes:
        raise PayloadTooLarge(too_large_message(max_bytes))
    return parse_json(raw)


def too_large_message(max_bytes: int) -> str:
    return f"the request body is larger than {max_bytes} bytes (the server's max_request_bytes); send less"


def parse_json(raw: bytes) -> Any:
    """Bytes -> a JSON value whose strings are all valid Unicode and whose nesting is bounded."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the body is not UTF-8 text (byte {exc.start}); send JSON encoded as UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"Invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidRequest(f"Invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels; flatten the body") from None
    except ValueError as exc:  # an integer literal longer than Python converts, or NaN/Infinity (_refuse_constant)
        if "integer string conversion" in str(exc):
            digits = sys.get_int_max_str_digits()
            raise InvalidRequest(
                f"Invalid JSON: an integer has more than {digits} digits; send a smaller number"
            ) from None
        raise InvalidRequest(f"Invalid JSON: {exc}") from None
    _check_strings_and_depth(value)
    return value


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number; send a finite number")


def _check_strings_and_depth(value: Any) -> None:
    """Walk the value (iteratively: depth is what is being checked) for lone surrogates and deep nesting."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, path or "body")
            continue
        if not isinstance(item, dict | list):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise InvalidRequest(f"Invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels at {path}; flatten it")
        if isinstance(item, list):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
            continue
        for key, child in item.items():
            child_path = f"{path}.{key}" if path else key
            _check_text(key, f"a key in {path or 'the body'}")
            stack.append((child, child_path, depth + 1))


def _check_text(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = where.encode("utf-8", "replace").decode()  # a key can itself hold the surrogate
        raise InvalidRequest(
            f"{where}: a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x}) at character {exc.start} is not "
            "text; send valid Unicode (a surrogate pair, or the character itself)"
        ) from None


def error_response(exc: ServingError, *, openai: bool = False) -> JSONResponse:
    """The one place a `ServingError` becomes a response: `{"error": message}`, or OpenAI's error object."""
    metrics.REQUESTS.labels(outcome=type(exc).__name__).inc()
    if exc.status >= 500:
        logger.error("request failed: %s", exc)
    content: dict[str, Any] = openai_error(exc) if openai else {"error": str(exc)}
    return JSONResponse(content, status_code=exc.status, headers=exc.headers)


def openai_error(exc: ServingError) -> dict[str, Any]:
    """OpenAI's error object (the body of an error response, or the data of a stream's error event)."""
    return {"error": {"message": str(exc), "type": exc.openai_type, "param": exc.param, "code": exc.openai_code}}
