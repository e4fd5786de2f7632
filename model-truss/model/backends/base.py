"""The contract between the request layer and a generation engine.

A backend knows token ids, never text: it takes prompt ids and `SamplingParams` and yields
`TokenChunk`s of newly generated ids (the end token excluded) until a chunk carries a
`finish_reason`. Detokenization, stop strings and response shapes live in `model/streaming.py`.

Every field of `SamplingParams` is honoured or refused: the request layer awaits
`prepare(params)` before `generate`, and a backend that cannot do something (logprobs,
guided decoding, a penalty) raises `InvalidRequest` there, naming the field; `prepare` is also where
slow per-request work that can fail (compiling a JSON schema into a grammar) runs, off the event loop
and before any response is sent. Values that reach a
backend have passed the request schema, and any such value must be safe: one request's values never
fail or change another request's tokens.

Both engines here batch in flight, so both share one shape (`BatchingBackend`): requests are
handed to a single engine thread that owns the model; the thread admits new requests between
steps, advances every active request together, and hands each request's new tokens to that
request's own `TokenStream` (an asyncio queue fed thread-safely). Closing the consumer's async
iterator (client gone, stop string found) cancels the request in the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from model.errors import BackendError, EngineOverloaded, InvalidRequest

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


GuideKind = Literal["json_object", "json_schema", "regex", "grammar"]
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs; backends must support 0..MAX_TOP_LOGPROBS
# Temperatures below this decode greedily (vLLM's _SAMPLING_EPS): dividing logits by a tinier one
# overflows to inf/NaN, and the distribution is already one-hot at float precision.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class GuidedDecoding:
    """What the generated text must match (structured output), as TensorRT-LLM's GuidedDecodingParams names it.

    `json_object`: any JSON object (`spec` is None); `json_schema`: `spec` is the JSON schema as JSON text;
    `regex`: `spec` is a regular expression; `grammar`: `spec` is an EBNF grammar. The generation ends
    ("stop") once the text is complete under the guide.
    """

    kind: GuideKind
    spec: str | None = None


class TokenGuide(Protocol):
    """One request's structured-output state, for engines that mask logits themselves (model/guided.py).

    The bitmask is int32 [batch, ceil(vocab / 32)], bit j of word w set = token 32 * w + j may come next
    (the layout xgrammar and llguidance share).
    """

    def fill_next_token_bitmask(self, bitmask: Any, index: int) -> None:
        """Write the tokens allowed next into row `index` of `bitmask`."""

    def accept_token(self, token_id: int) -> bool:
        """Advance past the sampled token; False if the guide does not allow it."""

    def is_terminated(self) -> bool:
        """True once the output is complete under the guide (the request then ends with "stop")."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding controls; validated by `model/schema.py` before they get here."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 (anything below GREEDY_TEMPERATURE) means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0  # 1 means no nucleus filter
    repetition_penalty: float = 1.0  # HF/CTRL style: divides positive logits of seen tokens (prompt + output)
    presence_penalty: float = 0.0  # OpenAI style: subtracted once from logits of tokens already generated
    frequency_penalty: float = 0.0  # OpenAI style: subtracted per occurrence in the generated tokens
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: generate exactly max_new_tokens, as trtllm-bench does
    min_new_tokens: int = 0  # end tokens cannot be sampled before this many new tokens (vLLM's min_tokens)
    # None: no logprobs. k >= 0: each chunk carries the sampled token's logprob and the k most likely
    # alternatives, from the model's log-softmax before temperature, penalties and masks (vLLM's raw logprobs).
    logprobs: int | None = None
    guided: GuidedDecoding | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability, and the `logprobs` most likely tokens at that step."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class Limits:
    """What the loaded model/engine accepts; requests beyond these get a 400."""

    max_input_len: int
    max_seq_len: int  # prompt + generated tokens
    max_new_tokens: int
    max_batch_size: int
    kv_cache_tokens: int | None = None  # tokens the engine's KV cache holds, where the engine knows it


@dataclass(frozen=True)
class EngineStats:
    """What an engine reports to metrics and autoscalers (read from the event loop, written by the engine thread)."""

    running: int  # requests generating in the engine now
    waiting: int  # requests accepted and not yet running
    kv_cache_usage: float | None = None  # fraction of the KV cache in use, 0..1; None if the engine cannot tell
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0  # of those, tokens whose KV was reused


@dataclass(frozen=True)
class TokenChunk:
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id, when the request asked for logprobs


class TokenStream:
    """One request's tokens, written by the engine thread and read by an asyncio consumer.

    The stream ends with the chunk that carries a finish_reason, or with an exception. A consumer
    that is already gone (its event loop closed) is not an error for the engine thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()
        self.finished = False

    def put(
        self,
        token_ids: list[int] | tuple[int, ...],
        finish_reason: FinishReason | None = None,
        logprobs: tuple[TokenLogprob, ...] | None = None,
        *,
        outbox: Outbox | None = None,
    ) -> None:
        """Engine thread: deliver new tokens (now, or with `outbox`'s next flush); a finish_reason closes the stream."""
        self.finished = finish_reason is not None
        self._send(TokenChunk(tuple(token_ids), finish_reason, logprobs), outbox)

    def fail(self, exc: BaseException, *, outbox: Outbox | None = None) -> None:
        """Engine thread: end this request alone with an error."""
        self.finished = True
        self._send(exc, outbox)

    def _send(self, item: TokenChunk | BaseException, outbox: Outbox | None = None) -> None:
        if outbox is not None:
            outbox.add(self._loop, self._queue, item)
            return
        if self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop closed between the check and the call
            logger.debug("dropped a message for a consumer that is gone")

    async def __aiter__(self) -> AsyncIterator[TokenChunk]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


class Outbox:
    """Engine thread: stream items gathered during a step, handed to each event loop in one call at `flush`.

    One wake-up per loop per step instead of one per token: the engine thread and the event loop share the
    GIL, and a wake-up per token makes them hand it back and forth once per token. A step's items for a loop
    keep their order; an engine that uses an outbox sends every item of a step through it.
    """

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, TokenChunk | BaseException]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, target: asyncio.Queue, item: TokenChunk | BaseException) -> None:
        self._pending.setdefault(loop, []).append((target, item))

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            if loop.is_closed():
                continue
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop closed between the check and the call
                logger.debug("dropped %d messages for consumers that are gone", len(items))


def _put_all(items: list[tuple[asyncio.Queue, TokenChunk | BaseException]]) -> None:
    for target, item in items:
        target.put_nowait(item)


@dataclass
class Submission:
    """A request as the engine thread sees it."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    stream: TokenStream = field(repr=False)


# Optional features of SamplingParams, and the request fields that ask for them (for error messages).
FEATURE_FIELDS = {
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "min_tokens": "min_tokens",
    "logprobs": "logprobs / top_logprobs",
    "guided_decoding": "structured output (response_format, tool_choice)",
}


def used_features(params: SamplingParams) -> list[str]:
    """The optional features (FEATURE_FIELDS keys) a request uses."""
    used = {
        "presence_penalty": params.presence_penalty != 0.0,
        "frequency_penalty": params.frequency_penalty != 0.0,
        "min_tokens": params.min_new_tokens > 0,
        "logprobs": params.logprobs is not None,
        "guided_decoding": params.guided is not None,
    }
    return [name for name, on in used.items() if on]


class BatchingBackend(ABC):
    """Owns the engine thread; subclasses implement `_step` (admit, advance, dispatch)."""

    name: str
    supports: frozenset[str] = frozenset()  # the optional features (FEATURE_FIELDS keys) this engine honours

    def __init__(self, limits: Limits, stop_token_ids: frozenset[int]) -> None:
        self.limits = limits
        self.stop_token_ids = stop_token_ids
        self._inbox: queue.SimpleQueue[Submission] = queue.SimpleQueue()
        self._cancelled: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._fatal: BaseException | None = None
        self._in_flight = 0
        self._lock = threading.Lock()  # guards _in_flight only; generation never waits on it
        self._step_started: float | None = None  # monotonic time the running `_step` began; None between steps

    # -- consumer side (event loop) -------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenChunk]:
        """Yield this request's new tokens; closing the iterator early cancels it in the engine."""
        if self._fatal is not None:
            raise BackendError(f"the {self.name} engine stopped; the server log has the details")
        with self._lock:
            if self._in_flight >= self.max_queued:
                raise EngineOverloaded(
                    f"{self._in_flight} requests are in flight (limit {self.max_queued}); retry shortly"
                )
            self._in_flight += 1
        submission = Submission(next(self._ids), list(prompt_ids), params, TokenStream(asyncio.get_running_loop()))
        self._inbox.put(submission)
        self._wake.set()
        try:
            async for chunk in submission.stream:
                yield chunk
        finally:
            with self._lock:
                self._in_flight -= 1
            if not submission.stream.finished:
                self._cancelled.put(submission.request_id)
                self._wake.set()

    async def prepare(self, params: SamplingParams) -> None:
        """Refuse what this backend cannot do; subclasses add per-request set-up (e.g. grammar compilation)."""
        self.check_supported(params)

    def check_supported(self, params: SamplingParams) -> None:
        """Raise `InvalidRequest` naming the fields if this backend cannot honour `params`."""
        missing = [FEATURE_FIELDS[name] for name in used_features(params) if name not in self.supports]
        if missing:
            raise InvalidRequest(f"the {self.name} backend does not support {', '.join(missing)}; remove it")

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def stats(self) -> EngineStats:
        """Engines that know running from waiting, or their KV-cache use, override this."""
        return EngineStats(running=self._in_flight, waiting=0)

    @property
    def max_queued(self) -> int:
        """Requests accepted at once: a full batch running plus a full batch waiting."""
        return 2 * self.limits.max_batch_size

    def is_healthy(self) -> bool:
        return self._fatal is None and self._thread is not None and self._thread.is_alive()

    def stalled_s(self) -> float:
        """Seconds the engine thread has been inside its current step (0 between steps): a wedged engine grows it."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._close()

    # -- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                new = _drain(self._inbox)
                cancelled = set(_drain(self._cancelled))
                if not new and not cancelled and not self._has_work():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._step_started = time.monotonic()
                self._step(new, cancelled)
                self._step_started = None
        except BaseException as exc:  # the engine itself broke: fail everything, report unhealthy
            logger.exception("%s engine thread crashed", self.name)
            self._fatal = exc
            error = BackendError(f"the {self.name} engine stopped; the server log has the details")
            self._fail_all(error)
            for submission in _drain(self._inbox):
                submission.stream.fail(error)

    @abstractmethod
    def _has_work(self) -> bool:
        """True while any admitted request is still generating."""

    @abstractmethod
    def _step(self, new: list[Submission], cancelled: set[int]) -> None:
        """Admit `new`, drop `cancelled`, advance generation once, dispatch tokens to streams."""

    @abstractmethod
    def _fail_all(self, exc: BaseException) -> None:
        """Fail every admitted request (used when the engine thread dies)."""

    def _close(self) -> None:  # noqa: B027 - an optional hook: the torch backend holds nothing to release
        """Release engine resources after the thread stopped."""


def _drain(q: queue.SimpleQueue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
