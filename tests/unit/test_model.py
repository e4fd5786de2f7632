"""`Model.predict` with a recording backend: limits, error statuses, streaming vs JSON."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi import HTTPException

from model.backends.base import BatchingBackend, Limits, SamplingParams, TokenChunk
from model.errors import BackendError, EngineOverloaded
from model.model import Model


class RecordingBackend:
    """Answers every request with the ids of a fixed text; remembers the params it was given."""

    name = "recording"
    supports = frozenset()

    def __init__(self, tokenizer, limits: Limits, fail_with: Exception | None = None) -> None:
        self.limits = limits
        self.answer = tokenizer("The mistral is a wind.", add_special_tokens=False).input_ids
        self.fail_with = fail_with
        self.seen: list[SamplingParams] = []

    check_supported = BatchingBackend.check_supported
    prepare = BatchingBackend.prepare

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenChunk]:
        self.seen.append(params)
        if self.fail_with is not None:
            raise self.fail_with
        for token in self.answer[:-1]:
            yield TokenChunk((token,))
        yield TokenChunk((self.answer[-1],), "stop")


class ConnectedRequest:
    async def is_disconnected(self) -> bool:
        return False


def _model(tokenizer, limits: Limits, fail_with: Exception | None = None) -> tuple[Model, RecordingBackend]:
    model = Model(config={"model_metadata": {"prompt_format": "raw"}})
    backend = RecordingBackend(tokenizer, limits, fail_with)
    model.tokenizer, model.backend = tokenizer, backend
    return model, backend


def _predict(model: Model, body: object):
    return asyncio.run(model.predict(body, ConnectedRequest()))


def test_json_response(tokenizer) -> None:
    model, _ = _model(tokenizer, Limits(100, 200, 50, 4))
    response = _predict(model, {"prompt": "What is a mistral?"})
    assert response["output"] == "The mistral is a wind."
    assert response["finish_reason"] == "stop"
    prompt_tokens = len(tokenizer("What is a mistral?").input_ids)
    assert response["usage"]["prompt_tokens"] == prompt_tokens


def test_stream_yields_the_same_text(tokenizer) -> None:
    model, _ = _model(tokenizer, Limits(100, 200, 50, 4))

    async def collect() -> str:
        stream = await model.predict({"prompt": "What is a mistral?", "stream": True}, ConnectedRequest())
        return "".join([piece async for piece in stream])

    assert asyncio.run(collect()) == "The mistral is a wind."


def test_default_max_new_tokens_shrinks_to_fit_the_engine(tokenizer) -> None:
    model, backend = _model(tokenizer, Limits(max_input_len=30, max_seq_len=40, max_new_tokens=2048, max_batch_size=4))
    prompt = "one two three four five six seven eight nine ten"
    _predict(model, {"prompt": prompt})
    assert backend.seen[-1].max_new_tokens == 40 - len(tokenizer(prompt).input_ids)
    with pytest.raises(HTTPException) as info:  # an explicit value that does not fit is still refused
        _predict(model, {"prompt": prompt, "max_new_tokens": 39})
    assert info.value.status_code == 400 and "lower max_new_tokens" in info.value.detail


@pytest.mark.parametrize(
    ("failure", "status"), [(EngineOverloaded("busy; retry"), 429), (BackendError("engine broke"), 500)]
)
def test_engine_errors_keep_their_status(tokenizer, failure: Exception, status: int) -> None:
    model, _ = _model(tokenizer, Limits(100, 200, 50, 4), fail_with=failure)
    for stream in (False, True):
        with pytest.raises(HTTPException) as info:
            _predict(model, {"prompt": "hi", "stream": stream})
        assert (info.value.status_code, info.value.detail) == (status, str(failure))
