"""The request path both APIs share: a validated request in, text pieces and a usage record out.

`TextGenerator.start`: prompt -> token ids (prompting.py) -> limits -> `backend.prepare` ->
`backend.generate` (token ids) -> `generate_text` (text pieces, streaming.py), and waits for the first
piece, so that every error before it is raised here (and becomes a 4xx/5xx response) and a stream
always starts with text. `Generation.stream` then yields the pieces to an HTTP client and stops,
cancelling the generation in the engine, once that client is gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from transformers import PreTrainedTokenizerBase

from model import metrics
from model.backends.base import BatchingBackend, SamplingParams
from model.errors import ClientDisconnected
from model.prompting import encode_prompt
from model.schema import GenerateRequest, check_limits
from model.settings import ServerSettings
from model.streaming import GenerationResult, generate_text

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5


@dataclass
class Generation:
    """One request's generation once started: its text pieces (the first already produced) and usage."""

    pieces: AsyncIterator[str]
    result: GenerationResult

    def stream(self, request: Request) -> AsyncIterator[str]:
        """The pieces for an HTTP client, ending (and cancelling the generation) if it goes away."""
        return _follow(self.pieces, request)

    async def complete(self, request: Request) -> GenerationResult:
        """Run to the end (non-streaming); `result` then holds the whole text."""
        async for _ in self.stream(request):
            pass
        if self.result.finish_reason is None:
            raise ClientDisconnected("client disconnected; generation cancelled")
        return self.result


class TextGenerator:
    def __init__(self, backend: BatchingBackend, tokenizer: PreTrainedTokenizerBase, settings: ServerSettings) -> None:
        self.backend, self.tokenizer, self.settings = backend, tokenizer, settings

    async def start(self, request: GenerateRequest) -> Generation:
        """Start generating; raises `ServingError` for anything that goes wrong before the first piece."""
        prompt_ids = encode_prompt(self.tokenizer, request, self.settings.prompt_format)
        params = request.sampling_params(self.default_max_new_tokens(len(prompt_ids)))
        return await self.start_ids(prompt_ids, params, request.stop_strings)

    def default_max_new_tokens(self, prompt_len: int) -> int:
        """For a request that names no max_new_tokens: the default, shrunk to what still fits the engine."""
        limits = self.backend.limits
        room = max(1, limits.max_seq_len - prompt_len)
        return min(self.settings.default_max_new_tokens, limits.max_new_tokens, room)

    async def start_ids(self, prompt_ids: list[int], params: SamplingParams, stop_strings: list[str]) -> Generation:
        """`start` for a prompt already tokenized (the OpenAI routes build their own prompts)."""
        started = time.perf_counter()
        check_limits(len(prompt_ids), params, self.backend.limits)
        await self.backend.prepare(params)
        result = GenerationResult(prompt_tokens=len(prompt_ids))
        pieces = generate_text(self.backend.generate(prompt_ids, params), self.tokenizer, stop_strings, result)
        first = await anext(pieces, None)
        metrics.TIME_TO_FIRST_TOKEN.observe(time.perf_counter() - started)
        metrics.PROMPT_TOKENS.inc(result.prompt_tokens)
        return Generation(_counted(first, pieces, result, started), result)


async def _counted(
    first: str | None, pieces: AsyncIterator[str], result: GenerationResult, started: float
) -> AsyncIterator[str]:
    """The first piece, then the rest; closing it closes `pieces` (cancelling the request) and counts the outcome.

    Inter-token latency: each gap between pieces, spread over the tokens the later piece carries (a piece holds
    several tokens when the detokenizer waited for a whole character)."""
    outcome = "disconnected"  # closed before the end
    try:
        if first is not None:
            yield first
        last, tokens = time.perf_counter(), result.completion_tokens
        async for piece in pieces:
            now, new = time.perf_counter(), result.completion_tokens - tokens
            for _ in range(new):
                metrics.INTER_TOKEN_LATENCY.observe((now - last) / new)
            last, tokens = now, result.completion_tokens
            yield piece
        outcome = "completed"
        metrics.E2E_REQUEST_LATENCY.observe(time.perf_counter() - started)
    except Exception:
        outcome = "failed"
        raise
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]
        metrics.REQUESTS.labels(outcome=outcome).inc()
        metrics.GENERATED_TOKENS.inc(result.completion_tokens)


async def _follow(pieces: AsyncIterator[str], request: Request) -> AsyncIterator[str]:
    """Yield the pieces to an HTTP client; once it is gone, stop, which cancels the generation in the engine.

    The server may go on draining a streaming response after the client left, so the check lives here.
    """
    checked = time.monotonic()
    try:
        async for piece in pieces:
            if time.monotonic() - checked > DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    logger.info("client disconnected; cancelling its generation")
                    return
            yield piece
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]
