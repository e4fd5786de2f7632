"""HTTP in and out for every route: the JSON body read here (not by truss), every response built here.

The model's routes take the raw request (truss then skips its own body parsing, which turns bodies
that are not UTF-8, nest too deep or hold huge integers into 500s) and return starlette responses
(so a stream goes out with its real media type, and an error with its status and a JSON body).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from model import metrics
from model.errors import InvalidRequest, ServingError

logger = logging.getLogger(__name__)

PREDICT_STREAM_MEDIA_TYPE = "text/plain; charset=utf-8"
SSE_MEDIA_TYPE = "text/event-stream"


async def read_json(request: Request) -> Any:
    """The request body as JSON; anything else is an `InvalidRequest` that says what to send."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the body is not UTF-8 text (byte {exc.start}); send JSON encoded as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"Invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidRequest("Invalid JSON: the body is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python converts
        raise InvalidRequest(f"Invalid JSON: {exc}") from None


def error_response(exc: ServingError, *, openai: bool = False) -> JSONResponse:
    """The one place a `ServingError` becomes a response: `{"error": message}`, or OpenAI's error object."""
    metrics.REQUESTS.labels(outcome=type(exc).__name__).inc()
    if exc.status >= 500:
        logger.error("request failed: %s", exc)
    content: dict[str, Any] = openai_error(exc) if openai else {"error": str(exc)}
    return JSONResponse(content, status_code=exc.status)


def openai_error(exc: ServingError) -> dict[str, Any]:
    """OpenAI's error object (the body of an error response, or the data of a stream's error event)."""
    return {"error": {"message": str(exc), "type": exc.openai_type, "param": exc.param, "code": exc.openai_code}}
