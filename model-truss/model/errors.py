"""Every error a request can meet, with the HTTP status it maps to.

Raised anywhere below `model.py`; turned into a response in exactly one place
(`http_io.error_response`). Messages say what to change, not what went wrong inside.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class; `status` is the HTTP status the client gets, `openai_type` / `openai_code` OpenAI's error type
    and code, `headers` any headers the response must carry. `param` names the request field at fault where it
    is known (OpenAI's `error.param`)."""

    status: int = 500
    openai_type: str = "server_error"
    openai_code: str | None = None
    headers: dict[str, str] = {}

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if code is not None:
            self.openai_code = code


class InvalidRequest(ServingError):
    """The request body is malformed or asks for something outside the limits."""

    status = 400
    openai_type = "invalid_request_error"


class NotFound(ServingError):
    """The request names something this server does not have: a route, or a model id on `/v1/models/{id}`."""

    status = 404
    openai_type = "invalid_request_error"
    openai_code = "not_found"


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


class MethodNotAllowed(ServingError):
    """A served path asked with the wrong method (e.g. GET on a POST route)."""

    status = 405
    openai_type = "invalid_request_error"


RETRY_AFTER_S = 1  # what a 429 tells the client to wait: a decode step frees slots in well under a second


class EngineOverloaded(ServingError):
    """More requests in flight than the engine queues; the client should retry."""

    status = 429
    openai_type = "rate_limit_error"
    openai_code = "rate_limit_exceeded"
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
