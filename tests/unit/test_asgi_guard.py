"""The launcher's middleware at the ASGI level: API key, body size, and the exception barrier."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from model.asgi_guard import LINGER_BYTES, GuardMiddleware
from model.errors import BackendError, EngineOverloaded

LIMIT = 1000
KEY = "s3cret"


async def echo(scope: dict, receive: Any, send: Any) -> None:
    """Answers with the body it read."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def call(
    app: Any, path: str = "/v1/models/model:predict", chunks: tuple[bytes, ...] = (b"{}",), **headers: str
) -> list[dict]:
    """Run one request through the guard; returns every message it sent."""
    header_list = [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {"type": "http", "method": "POST", "path": path, "headers": header_list, "query_string": b""}
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def status_and_body(sent: list[dict]) -> tuple[int, bytes]:
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def guard(app: Any = echo, api_key: str | None = KEY) -> GuardMiddleware:
    return GuardMiddleware(app, max_request_bytes=LIMIT, api_key=api_key)


def test_the_api_key_is_required_except_on_probes_and_metrics() -> None:
    status, body = status_and_body(call(guard()))
    assert status == 401 and "Authorization: Bearer <key>" in json.loads(body)["error"]
    assert status_and_body(call(guard(), authorization="Bearer wrong"))[0] == 401
    assert status_and_body(call(guard(), authorization=KEY))[0] == 401  # the scheme is part of it
    assert status_and_body(call(guard(), authorization=f"Bearer {KEY}")) == (200, b"{}")
    for path in ("/", "/v1/models/model", "/metrics"):
        assert status_and_body(call(guard(), path=path))[0] == 200
    status, body = status_and_body(call(guard(), path="/v1/chat/completions"))
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"  # OpenAI's shape


def test_no_key_means_no_authentication() -> None:
    assert status_and_body(call(guard(api_key=None))) == (200, b"{}")


def test_a_declared_body_over_the_limit_is_refused_unread() -> None:
    never_read: list[bool] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        never_read.append(False)

    sent = call(guard(app, api_key=None), content_length=str(LIMIT + LINGER_BYTES + 1))
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert never_read == []


@pytest.mark.parametrize("chunks", [(b"x" * 600, b"x" * 600), (b"x" * (LIMIT + LINGER_BYTES + 1),)])
def test_a_chunked_body_over_the_limit_is_a_413(chunks: tuple[bytes, ...]) -> None:
    status, body = status_and_body(call(guard(api_key=None), chunks=chunks))
    assert status == 413 and f"larger than {LIMIT} bytes" in json.loads(body)["error"]


def test_a_body_at_the_limit_reaches_the_app_whole() -> None:
    assert status_and_body(call(guard(api_key=None), chunks=(b"a" * 500, b"b" * 500))) == (200, b"a" * 500 + b"b" * 500)


def test_an_unexpected_error_is_a_fixed_500_without_internals() -> None:
    async def broken(scope: dict, receive: Any, send: Any) -> None:
        raise TypeError("secret internals")

    status, body = status_and_body(call(guard(broken, api_key=None)))
    assert status == 500
    assert json.loads(body) == {"error": "internal server error; the server log has the details"}


def test_an_error_mid_response_ends_it_without_the_final_chunk() -> None:
    async def fails_mid_stream(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise BackendError("generation failed")

    sent = call(guard(fails_mid_stream, api_key=None))  # returns normally: uvicorn then closes the connection
    assert [m.get("more_body") for m in sent[1:]] == [True]


def test_an_error_after_the_response_completed_is_not_raised() -> None:
    async def answered_then_raised(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        raise RuntimeError("truss's fallback handler re-raises")

    assert status_and_body(call(guard(answered_then_raised, api_key=None))) == (500, b"{}")


def test_a_full_engine_refuses_generation_requests_before_the_application_runs() -> None:
    reached: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await echo(scope, receive, send)

    def full() -> None:
        raise EngineOverloaded("64 requests are in flight (limit 64); retry shortly")

    full_guard = GuardMiddleware(app, max_request_bytes=LIMIT, api_key=None, check_capacity=full)
    sent = call(full_guard)
    status, body = status_and_body(sent)
    assert status == 429 and json.loads(body) == {"error": "64 requests are in flight (limit 64); retry shortly"}
    assert (b"retry-after", b"1") in [(k.lower(), v) for k, v in sent[0]["headers"]]
    status, body = status_and_body(call(full_guard, path="/v1/chat/completions"))
    assert status == 429 and json.loads(body)["error"]["type"] == "rate_limit_error"
    assert reached == []
    assert status_and_body(call(full_guard, path="/metrics"))[0] == 200  # not a generation route
    assert reached == ["/metrics"]
