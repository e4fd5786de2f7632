"""The Truss model: load() builds one backend, predict() serves a request, streaming or not.

(No `from __future__ import annotations` here: truss inspects the `Request` annotation at runtime.)

A request's path: `parse_request` (schema.py) -> `encode_prompt` (prompting.py) ->
`check_limits` -> `backend.generate` (token ids, backends/) -> `generate_text` (text pieces,
streaming.py) -> a stream of pieces, or `{"output", "finish_reason", "usage"}`. The OpenAI routes
(`chat_completions`, `completions`) translate their bodies in openai_api.py and take the same path.
"""

import asyncio
import atexit
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from starlette.requests import Request
from transformers import AutoTokenizer

from model import metrics, openai_api
from model.artifacts import resolve_artifacts
from model.backends import load_backend
from model.backends.base import BatchingBackend
from model.errors import ServingError
from model.prompting import encode_prompt
from model.schema import check_limits, parse_request
from model.settings import load_settings
from model.streaming import GenerationResult, generate_text

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5
WARMUP_REQUEST = {"prompt": "Hello", "max_new_tokens": 4}


class Model:
    def __init__(self, **kwargs: Any) -> None:
        self._config: dict = kwargs["config"]
        self._data_dir = Path(kwargs.get("data_dir") or "data")
        self._secrets: Mapping[str, str] = kwargs.get("secrets") or {}
        self.settings = load_settings(self._config.get("model_metadata"))
        self.tokenizer = None
        self.backend: BatchingBackend | None = None

    def load(self) -> None:
        fetch = functools.partial(
            resolve_artifacts, cache_dir=self.settings.cache_dir or self._data_dir, hf_token=self._hf_token()
        )
        artifacts = fetch(self.settings)
        self.tokenizer = AutoTokenizer.from_pretrained(artifacts.tokenizer_dir)
        self.backend = load_backend(self.settings, artifacts, self.tokenizer, fetch)
        atexit.register(self.backend.shutdown)
        metrics.track_backend(self.backend)
        if self.settings.warmup:
            started = time.perf_counter()
            asyncio.run(self._generate(WARMUP_REQUEST))
            logger.info("warm-up generation took %.0f ms", 1000 * (time.perf_counter() - started))

    def is_healthy(self) -> bool:
        return self.backend is not None and self.backend.is_healthy()

    async def predict(self, model_input: Any, request: Request) -> dict | AsyncIterator[str]:
        """This server's API: `{"output", "finish_reason", "usage"}`, or a stream of text pieces."""
        stream, pieces, result = await self._serve(model_input, request)
        if stream:
            return pieces
        await _drain(pieces, result)
        return result.as_response()

    async def chat_completions(self, model_input: Any, request: Request) -> dict | AsyncIterator[str]:
        """OpenAI `/v1/chat/completions` (see openai_api.py)."""
        return await self._openai(model_input, request, openai_api.ChatCompletionRequest)

    async def completions(self, model_input: Any, request: Request) -> dict | AsyncIterator[str]:
        """OpenAI `/v1/completions` (see openai_api.py)."""
        return await self._openai(model_input, request, openai_api.CompletionRequest)

    async def _openai(self, model_input: Any, request: Request, kind: type) -> dict | AsyncIterator[str]:
        with _as_http_errors():
            openai_request, body = openai_api.parse(model_input, kind)
        stream, pieces, result = await self._serve({**body, "stream": openai_request.stream}, request)
        response = openai_api.Response(openai_request, chat=kind is openai_api.ChatCompletionRequest)
        if stream:
            return response.events(pieces, result)
        await _drain(pieces, result)
        return response.full(result)

    async def _serve(self, model_input: Any, request: Request) -> tuple[bool, AsyncIterator[str], GenerationResult]:
        """Start generating; errors before the first piece become 4xx/5xx responses, so a stream starts with text."""
        started = time.perf_counter()
        with _as_http_errors():
            stream, pieces, result = await self._start(model_input)
            first = await anext(pieces, None)
        metrics.TIME_TO_FIRST_PIECE.observe(time.perf_counter() - started)
        metrics.PROMPT_TOKENS.inc(result.prompt_tokens)
        return stream, _serve_pieces(first, pieces, request, result), result

    async def _start(self, model_input: Any) -> tuple[bool, AsyncIterator[str], GenerationResult]:
        assert self.backend is not None and self.tokenizer is not None, "predict() before load()"
        request = parse_request(model_input)
        prompt_ids = encode_prompt(self.tokenizer, request, self.settings.prompt_format)
        limits = self.backend.limits
        # A request that names no max_new_tokens gets the default, shrunk to what still fits the engine.
        room = max(1, limits.max_seq_len - len(prompt_ids))
        params = request.sampling_params(min(self.settings.default_max_new_tokens, limits.max_new_tokens, room))
        check_limits(len(prompt_ids), params, limits)
        await self.backend.prepare(params)
        result = GenerationResult(prompt_tokens=len(prompt_ids))
        chunks = self.backend.generate(prompt_ids, params)
        return request.stream, generate_text(chunks, self.tokenizer, request.stop_strings, result), result

    async def _generate(self, model_input: dict) -> dict:
        """One non-streaming generation without HTTP (warm-up)."""
        _, pieces, result = await self._start(model_input)
        async for _ in pieces:
            pass
        return result.as_response()

    def _hf_token(self) -> str | None:
        try:
            token = self._secrets[self.settings.hf_token_secret]
        except Exception:  # truss raises its own SecretNotFound, not KeyError
            return None
        return token.strip() if token else None


@contextlib.contextmanager
def _as_http_errors() -> Iterator[None]:
    """The one place a `ServingError` becomes an HTTP response (truss passes HTTPException through)."""
    try:
        yield
    except ServingError as exc:
        metrics.REQUESTS.labels(outcome=type(exc).__name__).inc()
        raise HTTPException(status_code=exc.status, detail=str(exc)) from None


async def _drain(pieces: AsyncIterator[str], result: GenerationResult) -> None:
    """Run a non-streaming generation to its end; `result` then holds the text."""
    with _as_http_errors():
        async for _ in pieces:
            pass
    if result.finish_reason is None:
        raise HTTPException(status_code=499, detail="client disconnected; generation cancelled")


async def _serve_pieces(
    first: str | None, pieces: AsyncIterator[str], request: Request, result: GenerationResult
) -> AsyncIterator[str]:
    """Yield the pieces; once the client is gone, stop, which cancels generation in the engine.

    truss drains a streaming generator even after the client left, so the check lives here.
    """
    outcome = "failed"
    try:
        if first is not None:
            yield first
        checked = time.monotonic()
        async for piece in pieces:
            if time.monotonic() - checked > DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    logger.info("client disconnected; cancelling its generation")
                    outcome = "disconnected"
                    return
            yield piece
        outcome = "completed"
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]
        metrics.REQUESTS.labels(outcome=outcome).inc()
        metrics.GENERATED_TOKENS.inc(result.completion_tokens)
