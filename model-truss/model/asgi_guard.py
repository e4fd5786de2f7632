"""ASGI middleware the launcher (server_app.py) puts in front of truss's application.

In order, for every HTTP request:
1. API key: when one is configured, every route except the unauthenticated ones (liveness `/`,
   readiness `/v1/models/model`, `/metrics`) needs `Authorization: Bearer <key>`, else 401.
2. Body size: a declared Content-Length over `max_request_bytes` is a 413 before any of the body is
   read; a chunked body is counted while it is read and refused the same way once it passes the limit.
   A body at most `LINGER_BYTES` over is read to its end first, so that a client still sending it
   reads the 413 rather than a reset connection; either way the 413 says `Connection: close`.
3. Admission: a generation request (`POST` on one of `GENERATION_PATHS`) that finds the engine's queue
   full gets its 429 here, as soon as its body is read, before truss's routing, tracing and body
   parsing: under a burst the refusals then cost the event loop next to nothing, so the excess hears
   back at once. The generator checks again, authoritatively (a request with `n` choices takes `n`).
4. A barrier around the application: an exception before the response started becomes a fixed 500
   JSON body (never a traceback or an exception's class); one after the response started (a stream
   that failed mid-way) ends the connection without the final chunk, the documented failure signal of
   a `/predict` stream; one after the response completed (truss's fallback handler re-raises) is
   dropped, so the keep-alive connection stays usable.

Error bodies are those of `http_io.error_response`: OpenAI's error object on the OpenAI routes.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from model.errors import InternalError, PayloadTooLarge, ServingError, Unauthorized
from model.http_io import error_response, too_large_message

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNAUTHENTICATED_PATHS = frozenset({"/", "/v1/models/model", "/metrics", "/metrics/"})
OPENAI_PATH_PREFIXES = ("/v1/chat/", "/v1/completions")
LINGER_BYTES = 1024 * 1024  # read (and drop) up to this much past the limit so the client gets the 413
GENERATION_PATHS = frozenset({"/v1/models/model:predict", "/v1/chat/completions", "/v1/completions"})


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATH_PREFIXES)


class GuardMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_request_bytes: int,
        api_key: str | None,
        check_capacity: Callable[[], None] = lambda: None,
    ) -> None:
        """`check_capacity` raises a ServingError (EngineOverloaded) when the engine cannot take one more."""
        self.app, self.max_bytes, self._check_capacity = app, max_request_bytes, check_capacity
        self._key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        openai = is_openai_path(scope["path"])
        headers = dict(scope["headers"])  # lower-case names; a repeated header keeps its last value
        if self._key and scope["path"] not in UNAUTHENTICATED_PATHS and not self._authorized(headers):
            message = "missing or wrong API key; send the header 'Authorization: Bearer <key>'"
            await error_response(Unauthorized(message), openai=openai)(scope, receive, send)
            return
        body = await self._read_body(headers, receive)
        if body is None:
            await error_response(PayloadTooLarge(too_large_message(self.max_bytes)), openai=openai)(
                scope, receive, send
            )
            return
        if scope["method"] == "POST" and scope["path"] in GENERATION_PATHS:
            try:
                self._check_capacity()
            except ServingError as exc:
                await error_response(exc, openai=openai)(scope, receive, send)
                return
        await self._run(scope, _replay(body, receive), send, openai)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        assert self._key is not None
        return hmac.compare_digest(headers.get(b"authorization", b""), self._key)

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes | None:
        """The whole body, or None when it is over the limit (read on only as far as LINGER_BYTES allow)."""
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes + LINGER_BYTES:
            return None  # refused unread: an `Expect: 100-continue` client never sends it
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)  # the application sees the disconnect when it reads on
            size += len(message.get("body", b""))
            if size <= self.max_bytes:
                chunks.append(message.get("body", b""))
            elif size > self.max_bytes + LINGER_BYTES:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks) if size <= self.max_bytes else None

    async def _run(self, scope: Scope, receive: Receive, send: Send, openai: bool) -> None:
        state = {"started": False, "complete": False}

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            if state["complete"]:
                return  # already answered (truss's fallback handler re-raises after responding)
            if state["started"]:
                _log_abort(scope, exc)
                return  # uvicorn ends the connection without the final chunk: the client sees the failure
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            await error_response(InternalError(), openai=openai)(scope, receive, send)


def _log_abort(scope: Scope, exc: Exception) -> None:
    reason = str(exc) if isinstance(exc, ServingError) else type(exc).__name__  # a bug's traceback is logged once
    logger.error("%s %s ended mid-response (connection closed): %s", scope["method"], scope["path"], reason)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands out the body already read, then the client's later messages (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
