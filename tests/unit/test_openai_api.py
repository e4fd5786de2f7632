"""The OpenAI routes in process, with a recording backend: what reaches the engine, shapes, refusals, stream errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from starlette.responses import Response

from model.backends.base import FEATURE_FIELDS, Limits, SamplingParams, TokenChunk
from model.errors import BackendError, InvalidRequest
from model.openai_api.tools import ToolCallParser
from tests.unit.test_model import _body, _model, http_request

LIMITS = Limits(100, 200, 50, 4)
CHAT = [{"role": "user", "content": "What is a mistral?"}]
IMAGE_PARAM = "messages[0].content"


def _capable(tokenizer):
    """The recording backend, declaring every optional feature (it records them; it does not act on them)."""
    model, backend = _model(tokenizer, LIMITS)
    backend.supports = frozenset(FEATURE_FIELDS)
    return model, backend


def _call(model, path: str, body: dict) -> tuple[Response, bytes]:
    route = model.chat_completions if path == "/v1/chat/completions" else model.completions

    async def call() -> tuple[Response, bytes]:
        response = await route(http_request(path, body))
        return response, await _body(response)

    return asyncio.run(call())


def _events(body: bytes) -> list[dict | str]:
    data = [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line]
    return [item if item == "[DONE]" else json.loads(item) for item in data]


def test_openai_defaults_and_extra_body_reach_the_engine(tokenizer) -> None:
    model, backend = _capable(tokenizer)
    _call(model, "/v1/chat/completions", {"messages": CHAT})
    assert (backend.seen[-1].temperature, backend.seen[-1].top_p) == (1.0, 1.0)  # OpenAI's, not /predict's
    extra = {"top_k": -1, "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 2, "seed": -1}
    body = {"messages": CHAT, "presence_penalty": 0.5, "frequency_penalty": 0.25, "stream": "false", **extra}
    response, _ = _call(model, "/v1/chat/completions", body)
    params = backend.seen[-1]
    assert response.status_code == 200 and response.media_type == "application/json"
    assert (params.top_k, params.repetition_penalty, params.ignore_eos, params.min_new_tokens) == (0, 1.1, True, 2)
    assert (params.presence_penalty, params.frequency_penalty, params.seed) == (0.5, 0.25, None)


def test_harmless_fields_are_accepted(tokenizer) -> None:
    model, _ = _model(tokenizer, LIMITS)
    body = {
        "messages": [{"role": "developer", "content": "Be brief."}, *CHAT],
        "response_format": {"type": "text"},
        "logit_bias": {},
        "metadata": {"run": "1"},
        "store": False,
        "parallel_tool_calls": True,
        "user": "u",
        "max_tokens": 5,
    }
    response, raw = _call(model, "/v1/chat/completions", body)
    assert response.status_code == 200, raw


@pytest.mark.parametrize("tokens", [{"max_completion_tokens": 0}, {"max_completion_tokens": 0, "max_tokens": 5}])
def test_max_completion_tokens_zero_is_refused_even_beside_max_tokens(tokenizer, tokens) -> None:
    model, _ = _model(tokenizer, LIMITS)
    response, raw = _call(model, "/v1/chat/completions", {"messages": CHAT, **tokens})
    assert response.status_code == 400
    assert json.loads(raw)["error"]["param"] == "max_completion_tokens"


def test_a_text_part_whose_text_is_not_a_string_is_refused(tokenizer) -> None:
    model, _ = _model(tokenizer, LIMITS)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": {"a": 1}}]}]
    response, raw = _call(model, "/v1/chat/completions", {"messages": parts})
    assert response.status_code == 400
    error = json.loads(raw)["error"]
    assert error["param"] == "messages[0].content[1].text"
    assert "must be a string, got dict" in error["message"]


def test_max_completion_tokens_wins_and_n_samples_with_derived_seeds(tokenizer) -> None:
    model, backend = _model(tokenizer, LIMITS)
    _, raw = _call(model, "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 7, "n": 3, "seed": 10})
    assert [p.seed for p in backend.seen[-3:]] == [10, 11, 12] and {p.max_new_tokens for p in backend.seen} == {7}
    body = json.loads(raw)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    one = len(tokenizer("The mistral is a wind.", add_special_tokens=False).input_ids)
    assert body["usage"]["completion_tokens"] == 3 * one  # summed over choices; the prompt counted once


def test_completions_take_lists_and_token_ids_raw(tokenizer) -> None:
    model, _ = _model(tokenizer, LIMITS)
    ids = tokenizer("The wind").input_ids
    _, raw = _call(model, "/v1/completions", {"prompt": ["The wind", "A storm"], "n": 2, "echo": True})
    body = json.loads(raw)
    assert [c["text"].split("The mistral")[0] for c in body["choices"]] == ["The wind"] * 2 + ["A storm"] * 2
    prompt_tokens = len(ids) + len(tokenizer("A storm").input_ids)
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    _, raw = _call(model, "/v1/completions", {"prompt": ids})
    assert json.loads(raw)["usage"]["prompt_tokens"] == len(ids)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {"5": 1}}, "logit_bias"),
        ("/v1/chat/completions", {"messages": CHAT, "store": True}, "store"),
        ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
        ("/v1/chat/completions", {"messages": CHAT, "audio": {}}, "audio"),
        ("/v1/chat/completions", {"messages": CHAT, "temperature": 3}, "temperature"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
        ),
        ("/v1/chat/completions", {"messages": CHAT, "n": 5}, "n"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 10**6}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
        ("/v1/completions", {"prompt": [10**9]}, "prompt"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
    ],
)
def test_what_cannot_be_honoured_is_refused_naming_the_field(tokenizer, path: str, body: dict, param: str) -> None:
    model, backend = _model(tokenizer, LIMITS)
    response, raw = _call(model, path, body)
    error = json.loads(raw)["error"]
    assert response.status_code == 400, raw
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert backend.seen == []


def test_a_backend_without_a_feature_refuses_it_by_name(tokenizer) -> None:
    model, _ = _model(tokenizer, LIMITS)  # the recording backend supports no optional feature
    response, raw = _call(model, "/v1/chat/completions", {"messages": CHAT, "logprobs": True})
    assert response.status_code == 400 and "logprobs" in json.loads(raw)["error"]["message"]


def test_a_stream_that_fails_after_its_first_chunk_ends_with_an_error_event(tokenizer) -> None:
    model, backend = _model(tokenizer, LIMITS)

    async def breaks(prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenChunk]:
        yield TokenChunk(tuple(backend.answer[:3]))
        raise BackendError("the engine broke")

    backend.generate = breaks  # type: ignore[method-assign]
    response, raw = _call(model, "/v1/chat/completions", {"messages": CHAT, "stream": True})
    events = _events(raw)
    assert response.status_code == 200 and response.media_type == "text/event-stream"
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_error" and "the engine broke" in events[-2]["error"]["message"]
    chunks = [e for e in events[:-2] if isinstance(e, dict)]
    assert chunks[1]["choices"][0]["delta"]["content"]  # text was sent before the failure
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)  # and no normal final chunk


def test_openai_error_codes_by_status() -> None:
    from model.errors import EngineOverloaded, NotFound
    from model.http_io import openai_error

    assert openai_error(InvalidRequest("bad", param="n"))["error"] == {
        "message": "bad",
        "type": "invalid_request_error",
        "param": "n",
        "code": None,
    }
    assert openai_error(EngineOverloaded("busy"))["error"]["code"] == "rate_limit_exceeded"
    assert openai_error(NotFound("gone", code="model_not_found"))["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("pieces", "content", "calls"),
    [
        (["Hello", " there."], "Hello there.", []),
        (["Sure. <tool", '_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'], "Sure. ", [("f", '{"x": 1}')]),
        (['{"name": "f", ', '"arguments": {}}'], "", [("f", "{}")]),
        (['{"name": "unknown", "arguments": {}}'], '{"name": "unknown", "arguments": {}}', []),
        (["<tool_call>not json"], "<tool_call>not json", []),
    ],
)
def test_tool_call_parser_streams_content_and_holds_calls(pieces: list[str], content: str, calls: list) -> None:
    parser = ToolCallParser(frozenset({"f"}), constrained=False)
    streamed = "".join(parser.feed(piece) for piece in pieces)
    streamed += parser.finish()
    assert streamed == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in parser.calls] == calls


def test_a_constrained_call_list_is_parsed_whole() -> None:
    parser = ToolCallParser(frozenset({"f", "g"}), constrained=True)
    assert parser.feed('[{"name": "f", "arguments": {"a": "b"}}, ') == ""
    assert parser.feed('{"name": "g", "arguments": {}}]') == ""
    assert parser.finish() == ""
    assert [c["function"]["name"] for c in parser.calls] == ["f", "g"]
