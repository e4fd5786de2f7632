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
from model.openai_api.routes import OpenAIRoutes


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
    model.openai = OpenAIRoutes(model.generator, "test-model")
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
        (b'{"prompt": "hi \\ud800 there"}', "prompt: a lone UTF-16 surrogate"),
    ],
    ids=["not-utf8", "deep-nesting", "huge-integer", "truncated", "surrogate"],
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
    assert error["type"] == "invalid_request_error" and error["param"] == "messages" and "messages" in error["message"]


class SlowBackend(RecordingBackend):
    """Holds every request before its first token until `release` is set; records closed generators."""

    def __init__(self, tokenizer, limits: Limits) -> None:
        super().__init__(tokenizer, limits)
        self.release = asyncio.Event()
        self.closed = 0

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenChunk]:
        try:
            await self.release.wait()
            async for chunk in super().generate(prompt_ids, params):
                yield chunk
        finally:
            self.closed += 1


def _metric(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_full_queue_is_a_429_with_retry_after_before_any_tokenization(tokenizer, monkeypatch) -> None:
    model, _ = _model(tokenizer, Limits(100, 200, 50, 4))
    generator = model.generator
    assert generator is not None
    monkeypatch.setattr(generator.encoder, "encode", lambda request: pytest.fail("tokenized a refused request"))
    generator.admitted = RecordingBackend.max_queued
    for stream in (False, True):
        response, body = _predict(model, {"prompt": "hi", "stream": stream})
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert "retry shortly" in json.loads(body)["error"]


def test_every_admitted_request_frees_its_slot(tokenizer) -> None:
    model, _ = _model(tokenizer, Limits(100, 200, 50, 4))
    for body in ({"prompt": "hi"}, {"prompt": "hi", "stream": True}, {"prompt": "hi", "max_new_tokens": 999}):
        _predict(model, body)
    assert model.generator is not None and model.generator.admitted == 0


def test_an_error_after_the_first_piece_is_raised_from_the_stream_and_counted(tokenizer) -> None:
    model, backend = _model(tokenizer, Limits(100, 200, 50, 4))

    async def fails_after_one_token(prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenChunk]:
        yield TokenChunk((backend.answer[0],))
        raise BackendError("generation failed for this request; the server log has the details")

    backend.generate = fails_after_one_token  # type: ignore[method-assign]
    failed = _metric("llm_requests_total", outcome="failed")

    async def call() -> tuple[Response, list[str], BaseException | None]:
        response = await model.predict(http_request("/v1/models/model:predict", {"prompt": "hi", "stream": True}))
        assert isinstance(response, StreamingResponse)
        pieces: list[str] = []
        try:
            async for piece in response.body_iterator:
                pieces.append(str(piece))
        except BackendError as exc:
            return response, pieces, exc
        return response, pieces, None

    response, pieces, error = asyncio.run(call())
    assert response.status_code == 200 and pieces == ["The"]
    assert isinstance(error, BackendError)  # the launcher turns it into a cut-off chunked body
    assert _metric("llm_requests_total", outcome="failed") == failed + 1
    assert model.generator is not None and model.generator.admitted == 0


def test_a_client_gone_before_the_first_piece_cancels_the_generation(tokenizer) -> None:
    model = Model(config={"model_metadata": {"prompt_format": "raw"}})
    backend = SlowBackend(tokenizer, Limits(100, 200, 50, 4))
    model.generator = generator = TextGenerator(backend, tokenizer, model.settings)  # type: ignore[arg-type]
    request = http_request("/v1/models/model:predict", {"prompt": "hi"})

    async def gone() -> bool:
        return True

    request.is_disconnected = gone  # type: ignore[method-assign]
    response, body = asyncio.run(_call_predict(model, request))
    assert response.status_code == 499 and "client disconnected" in json.loads(body)["error"]
    assert backend.closed == 1 and generator.admitted == 0


async def _call_predict(model: Model, request: Request) -> tuple[Response, bytes]:
    response = await model.predict(request)
    return response, await _body(response)


def test_a_prompt_too_long_to_fit_is_refused_without_tokenizing(tokenizer, monkeypatch) -> None:
    model, backend = _model(tokenizer, Limits(100, 200, 50, 4))
    assert model.generator is not None
    encoder = model.generator.encoder
    monkeypatch.setattr(encoder, "encode", lambda request: pytest.fail("tokenized a prompt that cannot fit"))
    response, body = _predict(model, {"prompt": "x" * (100 * encoder.max_token_chars + 1)})
    assert response.status_code == 400 and "Shorten the prompt" in json.loads(body)["error"]
    assert backend.seen == []


def test_a_predict_concurrency_that_could_queue_in_truss_is_refused(tokenizer) -> None:
    from model.settings import SettingsError

    backend = RecordingBackend(tokenizer, Limits(100, 200, 50, 4))
    with pytest.raises(SettingsError, match="predict_concurrency"):
        Model(config={"runtime": {"predict_concurrency": 2 * backend.max_queued}})._check_predict_concurrency(
            backend  # type: ignore[arg-type]
        )
    Model(config={"runtime": {"predict_concurrency": 2 * backend.max_queued + 1}})._check_predict_concurrency(
        backend  # type: ignore[arg-type]
    )
