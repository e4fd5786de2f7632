"""Every error a request can meet, with the HTTP status it maps to.

Raised anywhere below `model.py`; turned into a response in exactly one place
(`http_io.error_response`). Messages say what to change, not what went wrong inside.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class; `status` is the HTTP status the client gets, `openai_type` the OpenAI error type,
    `headers` any headers the response must carry."""

    status: int = 500
    openai_type: str = "server_error"
    headers: dict[str, str] = {}


class InvalidRequest(ServingError):
    """The request body is malformed or asks for something outside the limits."""

    status = 400
    openai_type = "invalid_request_error"


class PayloadTooLarge(ServingError):
    """The request body is larger than `max_request_bytes`."""

    status = 413
    openai_type = "invalid_request_error"
    headers = {"Connection": "close"}


class Unauthorized(ServingError):
    """An API key is configured and the request did not send it."""

    status = 401
    openai_type = "authentication_error"
    headers = {"WWW-Authenticate": "Bearer"}


class RouteNotFound(ServingError):
    """A path this server does not serve."""

    status = 404
    openai_type = "invalid_request_error"


class MethodNotAllowed(ServingError):
    """A served path asked with the wrong method (e.g. GET on a POST route)."""

    status = 405
    openai_type = "invalid_request_error"


RETRY_AFTER_S = 1  # what a 429 tells the client to wait: a decode step frees slots in well under a second


class EngineOverloaded(ServingError):
    """More requests in flight than the engine queues; the client should retry."""

    status = 429
    openai_type = "rate_limit_error"
    headers = {"Retry-After": str(RETRY_AFTER_S)}


class ClientDisconnected(ServingError):
    """The client left before its non-streaming response was ready; nobody reads this status."""

    status = 499


class BackendError(ServingError):
    """Generation failed inside the engine for this request."""

    status = 500


class InternalError(ServingError):
    """A bug: anything unexpected. The client gets this fixed message, the log gets the traceback."""

    status = 500

    def __init__(self) -> None:
        super().__init__("internal server error; the server log has the details")


class ArtifactError(RuntimeError):
    """Model/engine artifacts could not be found or downloaded; raised from `load()`."""


class EngineMismatchError(RuntimeError):
    """A prebuilt engine does not match this GPU or TensorRT-LLM version; raised from `load()`."""
