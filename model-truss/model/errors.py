"""Every error a request can meet, with the HTTP status it maps to.

Raised anywhere below `model.py`; turned into a response in exactly one place
(`http_io.error_response`). Messages say what to change, not what went wrong inside.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class; `status` is the HTTP status the client gets, `openai_type` the OpenAI error type."""

    status: int = 500
    openai_type: str = "server_error"


class InvalidRequest(ServingError):
    """The request body is malformed or asks for something outside the limits."""

    status = 400
    openai_type = "invalid_request_error"


class EngineOverloaded(ServingError):
    """More requests in flight than the engine queues; the client should retry."""

    status = 429
    openai_type = "rate_limit_error"


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
