"""The Truss `Model`'s routes with a recording backend: limits, error statuses and shapes, stream vs JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from model.backends.base import BatchingBackend, Limits, SamplingParams, TokenChunk
from model.errors import BackendError, EngineOverloaded
from model.generation import TextGenerator
from model.model import Model


class RecordingBackend:
    """Answers every request with the ids of a fixed text; remembers the params it was given."""

    name = "recording"
    supports = frozenset()
    check_supported = BatchingBackend.check_supported
    prepare = BatchingBackend.prepare

    max_queued = 8

    def __init__(self, tokenizer, limits: Limits, fail_with: Exception | None = None) -> None:
        self.limits = limits
        self.answer = tokenizer("The mistral is a wind.", add_special_tokens=False).input_ids
        self.fail_with = fail_with
        self.seen: list[SamplingParams] = []

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenChunk]:
        self.seen.append(params)
        if self.fail_with is not None:
            raise self.fail_with
        for token in self.answer[:-1]:
            yield TokenChunk((token,))
        yield TokenChunk((self.answer[-1],), "stop")


def http_request(path: str, body: object | bytes) -> Request:
    """A starlette request with this body, whose client never disconnects."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    request = Request(scope, receive)
    request.is_disconnected = _never  # type: ignore[method-assign]
    return request


async def _never() -> bool:
    return False


def _model(tokenizer, limits: Limits, fail_with: Exception | None = None) -> tuple[Model, RecordingBackend]:
    model = Model(config={"model_metadata": {"prompt_format": "raw"}})
    backend = RecordingBackend(tokenizer, limits, fail_with)
    model.backend = backend  # type: ignore[assignment]
    model.generator = TextGenerator(backend, tokenizer, model.settings)  # type: ignore[arg-type]
    return model, backend


async def _body(response: Response) -> bytes:
    if isinstance(response, StreamingResponse):
        return b"".join(
            [chunk if isinstance(chunk, bytes) else chunk.encode() async for chunk in response.body_iterator]
        )
    return bytes(response.body)


def _predict(model: Model, body: object | bytes) -> tuple[Response, bytes]:
    async def call() -> tuple[Response, bytes]:
        response = await model.predict(http_request("/v1/models/model:predict", body))
        return response, await _body(response)

    return asyncio.run(call())


def test_json_response(tokenizer) -> None:
    model, _ = _model(tokenizer, Limits(100, 200, 50, 4))
    response, body = _predict(model, {"prompt": "What is a mistral?"})
    answer = json.loads(body)
    assert response.status_code == 200 and response.media_type == "application/json"
    assert answer["output"] == "The mistral is a wind."
    assert answer["finish_reason"] == "stop"
    assert answer["usage"]["prompt_tokens"] == len(tokenizer("What is a mistral?").input_ids)


def test_stream_yields_the_same_text_as_plain_text(tokenizer) -> None:
    model, _ = _model(tokenizer, Limits(100, 200, 50, 4))
    response, body = _predict(model, {"prompt": "What is a mistral?", "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert body.decode() == "The mistral is a wind."


def test_default_max_new_tokens_shrinks_to_fit_the_engine(tokenizer) -> None:
    model, backend = _model(tokenizer, Limits(max_input_len=30, max_seq_len=40, max_new_tokens=2048, max_batch_size=4))
    prompt = "one two three four five six seven eight nine ten"
    _predict(model, {"prompt": prompt})
    assert backend.seen[-1].max_new_tokens == 40 - len(tokenizer(prompt).input_ids)
    response, body = _predict(model, {"prompt": prompt, "max_new_tokens": 39})  # an explicit misfit is refused
    assert response.status_code == 400 and "lower max_new_tokens" in json.loads(body)["error"]


@pytest.mark.parametrize(
    ("failure", "status"), [(EngineOverloaded("busy; retry"), 429), (BackendError("engine broke"), 500)]
)
def test_engine_errors_keep_their_status(tokenizer, failure: Exception, status: int) -> None:
    model, _ = _model(tokenizer, Limits(100, 200, 50, 4), fail_with=failure)
    for stream in (False, True):
        response, body = _predict(model, {"prompt": "hi", "stream": stream})
        assert (response.status_code, json.loads(body)) == (status, {"error": str(failure)})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"prompt": "\xff"}', "not UTF-8"),
        (b"[" * 100_000, "Invalid JSON"),
        (b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", "Invalid JSON"),
        (b'{"prompt": ', "Invalid JSON"),
    ],
    ids=["not-utf8", "deep-nesting", "huge-integer", "truncated"],
)
def test_malformed_bodies_are_400s(tokenizer, raw: bytes, message: str) -> None:
    model, backend = _model(tokenizer, Limits(100, 200, 50, 4))
    response, body = _predict(model, raw)
    assert response.status_code == 400 and message in json.loads(body)["error"]
    assert backend.seen == []


def test_openai_errors_are_openai_error_objects(tokenizer) -> None:
    model, _ = _model(tokenizer, Limits(100, 200, 50, 4))

    async def call() -> tuple[Response, bytes]:
        response = await model.chat_completions(http_request("/v1/chat/completions", {"messages": []}))
        return response, await _body(response)

    response, body = asyncio.run(call())
    error = json.loads(body)["error"]
    assert response.status_code == 400
    assert error["type"] == "invalid_request_error" and error["code"] == 400 and "messages" in error["message"]
