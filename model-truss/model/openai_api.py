"""OpenAI-compatible `/v1/chat/completions` and `/v1/completions`, translated to and from our own API.

truss routes those paths to `Model.chat_completions` / `Model.completions`. An OpenAI body becomes a
`/predict` body (so validation, limits and generation are the same code); results are wrapped in
OpenAI's response objects, streams in its server-sent events (`text/event-stream`: `data: {chunk}` ...
`data: [DONE]`), and errors in its error object. Options this server cannot honour (n > 1, logprobs,
penalties other than 0, tools) are refused with a 400 rather than silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from model.errors import InvalidRequest, ServingError
from model.generation import TextGenerator
from model.http_io import SSE_MEDIA_TYPE, error_response, read_json
from model.schema import describe, parse_request
from model.streaming import GenerationResult


class _OpenAIRequest(BaseModel):
    """Fields both endpoints share; `model` is accepted and echoed, not used to route."""

    model_config = ConfigDict(extra="forbid")

    model: str = "model"
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: Literal[1] = 1
    frequency_penalty: Literal[0, 0.0] = 0
    presence_penalty: Literal[0, 0.0] = 0
    logprobs: Literal[False] | None = None
    user: str | None = None

    def generation_fields(self) -> dict[str, Any]:
        """The `/predict` fields this request sets (unset ones keep the server's defaults)."""
        fields = {
            "max_new_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
        }
        return {key: value for key, value in fields.items() if value is not None}

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)


class CompletionRequest(_OpenAIRequest):
    prompt: str


async def chat_completions(generator: TextGenerator, request: Request) -> Response:
    return await _serve(generator, request, ChatCompletionRequest)


async def completions(generator: TextGenerator, request: Request) -> Response:
    return await _serve(generator, request, CompletionRequest)


async def _serve(generator: TextGenerator, request: Request, kind: type[_OpenAIRequest]) -> Response:
    try:
        openai_request, body = parse(await read_json(request, generator.settings.max_request_bytes), kind)
        generation = await generator.start(parse_request({**body, "stream": openai_request.stream}), request)
        response = OpenAIResponse(openai_request, chat=kind is ChatCompletionRequest)
        if openai_request.stream:
            events = response.events(generation.stream(request), generation.result)
            return StreamingResponse(events, media_type=SSE_MEDIA_TYPE)
        return JSONResponse(response.full(await generation.complete(request)))
    except ServingError as exc:
        return error_response(exc, openai=True)


def parse(body: Any, kind: type[_OpenAIRequest]) -> tuple[_OpenAIRequest, dict[str, Any]]:
    """Validate an OpenAI body; returns it and the equivalent `/predict` body."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        request = kind.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(describe(exc, kind)) from None
    if isinstance(request, ChatCompletionRequest):
        source: dict[str, Any] = {"messages": [_chat_message(m) for m in request.messages]}
    else:
        source = {"prompt": request.prompt}
    return request, {**source, **request.generation_fields()}


def _chat_message(message: dict[str, Any]) -> dict[str, str]:
    """OpenAI content may be a string or a list of text parts; other parts (images, tools) are refused."""
    content = message.get("content")
    if isinstance(content, list):
        if any(not isinstance(part, dict) or part.get("type") != "text" for part in content):
            raise InvalidRequest("only text content parts are supported in messages")
        content = "".join(str(part.get("text", "")) for part in content)
    return {"role": message.get("role"), "content": content}  # roles and types are checked by /predict's schema


class OpenAIResponse:
    """Builds one request's OpenAI objects: the full response, or its stream of chunks."""

    def __init__(self, request: _OpenAIRequest, chat: bool) -> None:
        self.request, self.chat = request, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def full(self, result: GenerationResult) -> dict[str, Any]:
        text = result.text
        choice = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
        choice |= {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return self._envelope(self.object, [choice]) | {"usage": _usage(result)}

    async def events(self, pieces: AsyncIterator[str], result: GenerationResult) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece, a final chunk with the finish reason, usage if asked, [DONE]."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        if self.chat:
            yield _sse(self._envelope(kind, [self._delta({"role": "assistant", "content": ""}, None)]))
        async for piece in pieces:
            yield _sse(self._envelope(kind, [self._delta(piece, None)]))
        yield _sse(self._envelope(kind, [self._delta("", result.finish_reason)]))
        if self.request.include_usage:
            yield _sse(self._envelope(kind, []) | {"usage": _usage(result)})
        yield "data: [DONE]\n\n"

    def _delta(self, content: str | dict[str, str], finish_reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            return choice | {"delta": content if isinstance(content, dict) else {"content": content}}
        return choice | {"text": content}

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.request.model, "choices": choices}


def _usage(result: GenerationResult) -> dict[str, int]:
    return result.as_response()["usage"]


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
