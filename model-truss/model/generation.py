"""The request path both APIs share: a prompt in, text pieces and a usage record out.

`TextGenerator.start_encoded`: admission (at most the engine's `max_queued` requests at once, else 429) ->
the prompt's token ids (the caller's `encode`, on a worker thread) -> its `SamplingParams` -> limits ->
`backend.prepare` -> `backend.generate` (token ids) -> `generate_text` (text pieces, streaming.py), and
waits for the first piece, so that every error before it is raised here (and becomes a 4xx/5xx response)
and a stream always starts with text. A client that leaves while it waits cancels the generation.
`Generation.stream` then yields the pieces to an HTTP client and stops, cancelling the generation in the
engine, once that client is gone. `start` is that path for a `/predict` body (prompting.py renders it,
after a length check that needs no tokenizer); the OpenAI routes build their own prompts.

An error after the first piece is raised from the stream as a `ServingError` (an unexpected one
becomes `BackendError`), so each route can signal it in its own format; it is counted as
`llm_requests_total{outcome="failed"}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from transformers import PreTrainedTokenizerBase

from model import metrics
from model.backends.base import BatchingBackend, SamplingParams
from model.errors import BackendError, ClientDisconnected, EngineOverloaded, InvalidRequest, ServingError
from model.prompting import prompt_encoder
from model.schema import GenerateRequest, check_limits
from model.settings import ServerSettings
from model.streaming import GenerationResult, generate_text

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5


class Generation:
    """One request's generation once started: its text pieces (the first already produced) and usage."""

    def __init__(self, first: str | None, pieces: AsyncIterator[str], result: GenerationResult) -> None:
        self._first, self._pieces, self.result = first, pieces, result

    def stream(self, client: Request | None = None) -> AsyncIterator[str]:
        """The pieces for an HTTP client, ending (and cancelling the generation) if it goes away."""
        return _follow(self._first, self._pieces, client)

    async def complete(self, client: Request | None = None) -> GenerationResult:
        """Run to the end (non-streaming); `result` then holds the whole text."""
        async for _ in self.stream(client):
            pass
        if self.result.finish_reason is None:
            raise ClientDisconnected("client disconnected; generation cancelled")
        return self.result

    async def close(self) -> None:
        """Cancel a generation nobody will read."""
        await self._pieces.aclose()  # type: ignore[attr-defined]


class TextGenerator:
    def __init__(self, backend: BatchingBackend, tokenizer: PreTrainedTokenizerBase, settings: ServerSettings) -> None:
        self.backend, self.tokenizer, self.settings = backend, tokenizer, settings
        self.encoder = prompt_encoder(tokenizer, settings.prompt_format)
        self.admitted = 0  # requests between admission and their end; only touched on the event loop

    async def start(self, request: GenerateRequest, client: Request | None = None) -> Generation:
        """`start_encoded` for a `/predict` body."""
        self.check_prompt_chars(len(request.prompt or "") + sum(len(m.content) for m in request.messages or []))
        return await self.start_encoded(
            lambda: self.encoder.encode(request),
            lambda prompt_ids: request.sampling_params(self.default_max_new_tokens(len(prompt_ids))),
            request.stop_strings,
            client,
        )

    async def start_encoded(
        self,
        encode: Callable[[], list[int]],
        params_for: Callable[[list[int]], SamplingParams],
        stop_strings: list[str],
        client: Request | None = None,
    ) -> Generation:
        """Start generating; raises `ServingError` for anything that goes wrong before the first piece."""
        result = GenerationResult(prompt_tokens=0)
        pieces = self._pieces(encode, params_for, stop_strings, result)
        first = await _first_piece(pieces, client)
        return Generation(first, pieces, result)

    def default_max_new_tokens(self, prompt_len: int) -> int:
        """For a request that names no max_new_tokens: the default, shrunk to what still fits the engine."""
        limits = self.backend.limits
        room = max(1, limits.max_seq_len - prompt_len)
        return min(self.settings.default_max_new_tokens, limits.max_new_tokens, room)

    def check_capacity(self, requests: int = 1) -> None:
        """The bounded queue: the engine's own limit, checked before any work (tokenization included)."""
        limit = self.backend.max_queued
        if self.admitted + requests > limit:
            raise EngineOverloaded(f"{self.admitted} requests are in flight (limit {limit}); retry shortly")

    def check_prompt_chars(self, chars: int) -> None:
        """Refuse, without tokenizing, text longer than any prompt of max_input_len tokens can be."""
        most = self.backend.limits.max_input_len * self.encoder.max_token_chars
        if chars > most:
            raise InvalidRequest(
                f"the prompt is {chars} characters; this deployment accepts at most "
                f"{self.backend.limits.max_input_len} tokens, which no text over {most} characters fits in. "
                "Shorten the prompt."
            )

    async def _pieces(
        self,
        encode: Callable[[], list[int]],
        params_for: Callable[[list[int]], SamplingParams],
        stop_strings: list[str],
        result: GenerationResult,
    ) -> AsyncIterator[str]:
        """The whole generation as one async generator: whatever ends it, its `finally` frees the slot.

        Inter-token latency: each gap between pieces, spread over the tokens the later piece carries (a piece
        holds several tokens when the detokenizer waited for a whole character).
        """
        self.check_capacity()
        self.admitted += 1
        started = time.perf_counter()
        outcome: str | None = None  # set once a piece has been handed out: then this generator counts the end
        try:
            text = await self._generate_text(encode, params_for, stop_strings, result)
            try:
                last, tokens = started, 0
                async for piece in text:
                    now, new = time.perf_counter(), result.completion_tokens - tokens
                    if outcome is None:
                        metrics.TIME_TO_FIRST_TOKEN.observe(now - started)
                    else:
                        for _ in range(new):
                            metrics.INTER_TOKEN_LATENCY.observe((now - last) / new)
                    last, tokens = now, result.completion_tokens
                    outcome = "disconnected"  # what a close at this yield means
                    yield piece
                outcome = "completed"
                metrics.E2E_REQUEST_LATENCY.observe(time.perf_counter() - started)
            finally:
                await text.aclose()  # type: ignore[attr-defined]
        except ServingError:
            outcome = outcome and "failed"
            raise
        except Exception as exc:
            if outcome is None:
                raise
            outcome = "failed"
            logger.exception("generation failed mid-stream")
            raise BackendError("generation failed after the response had started") from exc
        finally:
            self.admitted -= 1
            if outcome is not None:
                metrics.REQUESTS.labels(outcome=outcome).inc()
                metrics.GENERATED_TOKENS.inc(result.completion_tokens)

    async def _generate_text(
        self,
        encode: Callable[[], list[int]],
        params_for: Callable[[list[int]], SamplingParams],
        stop_strings: list[str],
        result: GenerationResult,
    ) -> AsyncIterator[str]:
        prompt_ids = await asyncio.to_thread(encode)  # a long prompt takes seconds to tokenize
        params = params_for(prompt_ids)
        check_limits(len(prompt_ids), params, self.backend.limits)
        await self.backend.prepare(params)
        result.prompt_tokens = len(prompt_ids)
        metrics.PROMPT_TOKENS.inc(result.prompt_tokens)
        return generate_text(self.backend.generate(prompt_ids, params), self.tokenizer, stop_strings, result)


async def _first_piece(pieces: AsyncIterator[str], client: Request | None) -> str | None:
    """The first piece (None: the output is empty); if the client leaves first, cancel the generation."""
    task = asyncio.ensure_future(anext(pieces, None))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if client is not None and await client.is_disconnected():
                logger.info("client disconnected before its first piece; cancelling its generation")
                raise ClientDisconnected("client disconnected; generation cancelled")
    finally:
        if not task.done():
            task.cancel()  # thrown into the generation where it waits: the engine request is cancelled
            await asyncio.wait({task})


async def _follow(first: str | None, pieces: AsyncIterator[str], client: Request | None) -> AsyncIterator[str]:
    """Yield the pieces to an HTTP client; once it is gone, stop, which cancels the generation in the engine.

    The server may go on draining a streaming response after the client left, so the check lives here.
    """
    checked = time.monotonic()
    try:
        if first is not None:
            yield first
        async for piece in pieces:
            if client is not None and time.monotonic() - checked > DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await client.is_disconnected():
                    logger.info("client disconnected; cancelling its generation")
                    return
            yield piece
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]
