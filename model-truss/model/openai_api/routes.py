"""`POST /v1/chat/completions` and `POST /v1/completions`: an OpenAI body in, OpenAI's objects or events out.

A request's path: validate (requests.py) -> prompt ids (messages.py for chat, the raw prompt for completions:
as OpenAI, vLLM and trtllm-serve, no chat template) -> one `SamplingParams` per choice (n choices per prompt,
seeds `seed + i`) -> `TextGenerator.start_ids` for every choice at once (generation.py: limits, the engine's
`prepare`, the first piece; any error there is a 4xx/5xx response) -> each choice's pieces through its tool-call
parser, if tools are offered -> responses.py. Usage is summed as OpenAI sums it: each prompt once, every choice's
generated tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from model.backends.base import SamplingParams
from model.errors import ClientDisconnected, InvalidRequest, ServingError
from model.generation import Generation, TextGenerator
from model.http_io import SSE_MEDIA_TYPE, error_response, read_json
from model.openai_api.logprobs import TokenTexts
from model.openai_api.messages import encode_messages
from model.openai_api.requests import ChatCompletionRequest, CompletionRequest, OpenAIRequest, parse
from model.openai_api.responses import ChoiceItem, OpenAIResponse
from model.openai_api.tools import ToolCallParser, call_constraint

SEED_SPACE = 2**63
T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """One choice to generate."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    echo: str = ""  # completions `echo`: the prompt text, sent before the output


@dataclass
class Choice:
    job: Job
    generation: Generation
    parser: ToolCallParser | None


class OpenAIRoutes:
    """The two routes, on one `TextGenerator`, answering as `model_name` when a request names no model."""

    def __init__(self, generator: TextGenerator, model_name: str) -> None:
        self.generator, self.model_name = generator, model_name
        self.texts = TokenTexts(generator.tokenizer)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, ChatCompletionRequest)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionRequest)

    async def _serve(self, http_request: Request, kind: type[OpenAIRequest]) -> Response:
        try:
            body = parse(await read_json(http_request, self.generator.settings.max_request_bytes), kind)
            self.generator.check_capacity()  # before tokenizing, as for /predict
            jobs = await asyncio.to_thread(self._jobs, body)  # tokenization takes seconds for a long prompt
            choices = await self._start(jobs, body, http_request)
            response = OpenAIResponse(
                chat=isinstance(body, ChatCompletionRequest),
                model=body.model or self.model_name,
                texts=self.texts,
                logprobs=jobs[0].params.logprobs is not None,
                include_usage=body.include_usage,
            )
            items = _merged([_choice_items(choice, http_request) for choice in choices])
            if body.stream:
                events = response.events(items, [job.index for job in jobs], lambda: _usage(choices))
                return StreamingResponse(events, media_type=SSE_MEDIA_TYPE)
            return JSONResponse(await response.full(items, lambda: _usage(choices)))
        except ServingError as exc:
            return error_response(exc, openai=True)

    # -- requests -> jobs (on a worker thread) ----------------------------------------------

    def _jobs(self, body: OpenAIRequest) -> list[Job]:
        if isinstance(body, ChatCompletionRequest):
            return self._chat_jobs(body)
        assert isinstance(body, CompletionRequest)
        return self._completion_jobs(body)

    def _chat_jobs(self, body: ChatCompletionRequest) -> list[Job]:
        prompt_ids = encode_messages(self.generator.tokenizer, body, self.generator.check_prompt_chars)
        guided = body.response_format.guide() if body.response_format else None
        params = self._params(body, prompt_ids, logprobs=body.logprobs_k, guided=guided or call_constraint(body))
        return [Job(i, 0, prompt_ids, choice) for i, choice in enumerate(_per_choice(params, body.n))]

    def _completion_jobs(self, body: CompletionRequest) -> list[Job]:
        jobs = []
        for p, prompt in enumerate(body.prompts):
            prompt_ids = self._completion_prompt(prompt)
            echo = (prompt if isinstance(prompt, str) else self.generator.tokenizer.decode(prompt)) if body.echo else ""
            params = self._params(body, prompt_ids, logprobs=body.logprobs)
            jobs += [Job(len(jobs) + i, p, prompt_ids, c, echo) for i, c in enumerate(_per_choice(params, body.n))]
        return jobs

    def _completion_prompt(self, prompt: str | list[int]) -> list[int]:
        """Raw: the text tokenized as is (no chat template), or the token ids themselves."""
        tokenizer = self.generator.tokenizer
        if isinstance(prompt, str):
            self.generator.check_prompt_chars(len(prompt))
            return self.generator.encoder.encode_raw(prompt)
        if any(not 0 <= token < len(tokenizer) for token in prompt):
            raise InvalidRequest(f"prompt token ids must be in 0..{len(tokenizer) - 1}", param="prompt")
        return list(prompt)

    def _params(self, body: OpenAIRequest, prompt_ids: list[int], **extra: object) -> SamplingParams:
        max_new_tokens = body.requested_max_tokens() or self.generator.default_max_new_tokens(len(prompt_ids))
        return body.sampling().to_params(max_new_tokens, **extra)

    async def _start(self, jobs: list[Job], body: OpenAIRequest, client: Request) -> list[Choice]:
        """Every choice started (each waits for its first piece); if one cannot start, none goes on."""
        batch = self.generator.backend.limits.max_batch_size
        if len(jobs) > batch:
            message = f"{len(jobs)} choices (n times the prompts) exceed the batch size of {batch}; ask for fewer"
            raise InvalidRequest(message, param="n")
        stop_strings = body.sampling().stop_strings
        started = await asyncio.gather(
            *(
                self.generator.start_encoded(_given(job.prompt_ids), _given(job.params), stop_strings, client)
                for job in jobs
            ),
            return_exceptions=True,
        )
        failed = [result for result in started if isinstance(result, BaseException)]
        if failed:
            for result in started:
                if isinstance(result, Generation):
                    await result.close()
            raise failed[0]
        return [
            Choice(job, generation, _parser(body))
            for job, generation in zip(jobs, started, strict=True)
            if isinstance(generation, Generation)
        ]


def _given(value: T) -> Callable[..., T]:
    """A prompt or params already computed, in the shape `start_encoded` asks for."""
    return lambda *_: value


def _parser(body: OpenAIRequest) -> ToolCallParser | None:
    if not isinstance(body, ChatCompletionRequest) or not body.uses_tools:
        return None
    names = frozenset(tool.function.name for tool in body.tools or [])
    return ToolCallParser(names, constrained=body.tool_choice not in (None, "auto"))


def _per_choice(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n independent samples: choice i samples with seed + i, so choice 0 is what n=1 gives."""
    if params.seed is None:
        return [params] * n
    return [replace(params, seed=(params.seed + i) % SEED_SPACE) for i in range(n)]


async def _choice_items(choice: Choice, http_request: Request) -> AsyncIterator[ChoiceItem]:
    """One choice's text, as it is generated (held back by the tool-call parser where it may be a call)."""
    result, parser, index = choice.generation.result, choice.parser, choice.job.index
    consumed, offset = 0, 0
    if choice.job.echo:
        yield ChoiceItem(index, choice.job.echo)
        offset = len(choice.job.echo)
    async with aclosing(choice.generation.stream(http_request)) as pieces:  # closing it cancels the generation
        async for piece in pieces:
            text = parser.feed(piece) if parser is not None else piece
            logprobs, consumed = result.logprobs[consumed:], len(result.logprobs)
            if text or logprobs:
                yield ChoiceItem(index, text, logprobs, offset)
                offset += len(text)
    if result.finish_reason is None:
        raise ClientDisconnected("client disconnected; generation cancelled")
    rest = parser.finish() if parser is not None else ""
    calls = parser.calls if parser is not None else []
    reason = "tool_calls" if calls else result.finish_reason
    yield ChoiceItem(index, rest, result.logprobs[consumed:], offset, reason, calls or None)


async def _merged(streams: list[AsyncIterator[ChoiceItem]]) -> AsyncIterator[ChoiceItem]:
    """The items of every choice as they come; the first error ends it (and every choice)."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[ChoiceItem | Exception | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[ChoiceItem]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
            await queue.put(None)
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(choices: list[Choice]) -> dict[str, int]:
    prompts = {choice.job.prompt_index: choice.generation.result.prompt_tokens for choice in choices}
    prompt_tokens = sum(prompts.values())
    completion_tokens = sum(choice.generation.result.completion_tokens for choice in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
