"""Every error a request can meet, with the HTTP status it maps to.

Raised anywhere below `model.py`; turned into a response in exactly one place
(`http_io.error_response`). Messages say what to change, not what went wrong inside.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class; `status` is the HTTP status the client gets, `openai_type` / `openai_code` OpenAI's error type
    and code. `param` names the request field at fault where it is known (OpenAI's `error.param`)."""

    status: int = 500
    openai_type: str = "server_error"
    openai_code: str | None = None

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
    """The request names something this server does not have (a model id on `/v1/models/{id}`)."""

    status = 404
    openai_type = "invalid_request_error"
    openai_code = "not_found"


class EngineOverloaded(ServingError):
    """More requests in flight than the engine queues; the client should retry."""

    status = 429
    openai_type = "rate_limit_error"
    openai_code = "rate_limit_exceeded"


class ClientDisconnected(ServingError):
    """The client left before its non-streaming response was ready; nobody reads this status."""

    status = 499


class BackendError(ServingError):
    """Generation failed inside the engine for this request."""

    status = 500


class ArtifactError(RuntimeError):
    """Model/engine artifacts could not be found or downloaded; raised from `load()`."""


class EngineMismatchError(RuntimeError):
    """A prebuilt engine does not match this GPU or TensorRT-LLM version; raised from `load()`."""
