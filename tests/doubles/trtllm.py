"""A double of the `tensorrt_llm` surface that `model/backends/trtllm/` uses, as strict as TensorRT-LLM 1.2.

TensorRT-LLM cannot be installed without a GPU, so the backend is tested against this double. Every
class, argument and behaviour here was taken from the TensorRT-LLM sources listed in the backend's
module docstrings (`executor`, `runtime_rules`, `speculative`); where the double simplifies, the
docstring of that piece says how.

Loading (`ModelRunnerCpp.from_dir` -> the C++ Executor), as trtGptModelInflightBatching.cpp,
trtGptModel.h and executorImpl.cpp at 1.2.0rc2 (b35ac1b6) check it, with their messages:
- in-flight batching needs the GPT attention plugin, packed input (remove_input_padding) and a paged KV cache;
- block reuse is switched off (a warning in `FakeTrtllm.warnings`) without paged context FMHA or with
  context logits, and a draft_tokens_external target then refuses to load without it;
- chunked context needs a paged KV cache and paged context FMHA; without it, and without context FMHA,
  max_input_len must not exceed max_num_tokens;
- the input limit is max_seq_len - 1 (chunked), min(max_seq_len - 1, max_num_tokens) (context FMHA with
  packed input), else the build's max_input_len; `from_dir(max_input_len=...)` does not change it;
- KV capacity (`FakeTrtllm.gpu_memory_bytes`, `weights_bytes`): each Executor loads its weights, then
  takes `kv_cache_free_gpu_memory_fraction` (default 0.9) of the memory free at that moment, in blocks of
  `tokens_per_block` tokens (config.json's KV shape gives the bytes per token). Too little for one
  max_seq_len sequence: with `fail_fast_on_attention_window_too_large` the load fails, else the attention
  window, max_seq_len and max_input_len are clamped to what fits (a warning) and tokens past the window are
  no longer attended to, so long sequences continue differently. Weights that do not fit: out of memory.
  The double stands in for cudaMemGetInfo and ignores activation buffers.

Executor (`tensorrt_llm.bindings.executor`), as `Executor::Impl` and `LlmRequest` behave:
- `enqueue_request(Request) -> int` hands out ascending ids; the request is fetched at the next iteration
  and validated then (`LlmRequest::validate`): a prompt above the input limit, an end id outside the
  vocabulary, more draft tokens than max_draft_len or a prompt in `FakeModel.failing_prompts` get an error
  response of their own; prompt + draft tokens above the input limit truncates the draft, prompt + max_tokens
  + draft length (max_draft_len when no draft is given) above max_seq_len lowers max_tokens (both recorded in
  `FakeExecutor.adjustments`);
- admission (GUARANTEED_NO_EVICT): a request joins the running batch (at most `max_batch_size`) when the KV
  cache has blocks for its whole prompt + max_tokens; the rest wait in the queue;
- `await_responses(timeout=timedelta)` runs ONE iteration (one token for every active request) and returns
  what it produced; with nothing in flight it returns `[]` (after a shortened wait), and without a timeout it
  raises instead of blocking forever, which the real one would do;
- an iteration that runs a prompt in `FakeModel.failing_step_prompts` fails: every request active in it gets
  an error response (`terminateActiveRequests`) and the Executor goes on;
- a streaming response carries only the tokens made since the previous response, never the prompt; the end
  token is never output, a stop word's tokens are; the last response has `is_final` and `finish_reasons[beam]`
  END_ID, STOP_WORDS, LENGTH or CANCELLED; `SamplingConfig(min_tokens=n)` holds back the end id (not stop
  words) for the first n tokens;
- non-streaming: one final response with prompt + generated ids, unless `exclude_input_from_output`;
- `cancel_request(id)` ends the request at the next iteration with a CANCELLED final response;
- external draft tokens: in ONE iteration the target accepts the longest prefix of the draft equal to its own
  next tokens and adds one token of its own, and the request ends there, as tests/bindings/
  test_executor_bindings.py `test_request_perf_metrics_draft` shows. The finish reason of such a round is not
  in that test; the double says LENGTH;
- `get_latest_iteration_stats()` returns (and forgets) one `IterationStats` per iteration since the last call:
  active and queued requests and `KvCacheStats` (blocks max/free/used, tokens per block, cumulative reused and
  missed blocks: a prompt's full blocks found, or not, among the blocks of earlier prompts when reuse is on).

Runners (`tensorrt_llm.runtime`): `ModelRunnerCpp.from_dir(engine_dir, **kw)` takes the real keyword set and
keeps the Executor as `.session`; `ModelRunner` (the Python session) is described at its class.

The model (`FakeModel`) is deterministic: the next id is a function of the whole sequence so far,
and ids below `RESERVED_IDS` (special tokens) come only from `scripts`. Each engine folder can have
its own model (`FakeTrtllm.models`), so a draft engine can agree with its target or not.
"""

from __future__ import annotations

import copy
import datetime
import enum
import json
import math
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

RESERVED_IDS = 10  # ids 0..9 are special tokens (pad, end, stop); the default rule never makes them
CANDIDATES = 8  # tokens the model's distribution spreads over (for logprobs), most likely first
DEFAULT_KV_FRACTION = 0.9  # KvCacheConfig's free_gpu_memory_fraction when none is given
DEFAULT_TOKENS_PER_BLOCK = 32  # plugin_config.tokens_per_block


@dataclass
class FakeModel:
    """Next token = f(prompt + generated); `scripts` pin what follows a prompt (e.g. to end it)."""

    vocab_size: int = 1000
    scripts: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    failing_prompts: set[tuple[int, ...]] = field(default_factory=set)  # refused when fetched: that request fails
    failing_step_prompts: set[tuple[int, ...]] = field(default_factory=set)  # break a step: all active requests fail
    wrong_every: int = 0  # a draft's flaw: at sequence lengths divisible by this, a different id than the rule's

    def next_token(self, prompt: list[int], generated: list[int]) -> int:
        """A function of the sequence alone, so a continuation sent as a new prompt goes on the same way."""
        sequence = [*prompt, *generated]
        for start, script in self.scripts.items():
            made = sequence[len(start) :]
            if tuple(sequence[: len(start)]) == start and len(made) < len(script) and made == script[: len(made)]:
                return script[len(made)]
        return self.rule_token(sequence)

    def rule_token(self, sequence: list[int]) -> int:
        """The unscripted rule: never a special token."""
        token = (sum(sequence) * 31 + len(sequence)) % (self.vocab_size - RESERVED_IDS)
        if self.wrong_every and len(sequence) % self.wrong_every == 0:
            token = (token + 1) % (self.vocab_size - RESERVED_IDS)
        return RESERVED_IDS + token

    def tokens(self, prompt: list[int], count: int) -> list[int]:
        """The first `count` ids the model makes for `prompt` when nothing stops it."""
        generated: list[int] = []
        for _ in range(count):
            generated.append(self.next_token(prompt, generated))
        return generated

    def distribution(self, prompt: list[int], generated: list[int]) -> list[tuple[int, float]]:
        """(token, log-softmax of the raw logits), most likely first: the next token, then CANDIDATES - 1 others.

        Logits fall by 0.75 per rank, so the log-probabilities are exact and differ per step.
        """
        first = self.next_token(prompt, generated)
        others = (
            RESERVED_IDS + (first - RESERVED_IDS + step) % (self.vocab_size - RESERVED_IDS) for step in range(1, 64)
        )
        tokens = [first, *[t for t in others if t != first][: CANDIDATES - 1]]
        logits = [-0.75 * rank for rank in range(len(tokens))]
        norm = math.log(sum(math.exp(x) for x in logits))
        return [(token, logit - norm) for token, logit in zip(tokens, logits, strict=True)]


# -- tensorrt_llm.bindings.executor ------------------------------------------------------------


class FinishReason(enum.Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


_SAMPLING_FIELDS = (
    "top_k",
    "top_p",
    "top_p_min",
    "top_p_reset_ids",
    "top_p_decay",
    "seed",
    "temperature",
    "min_tokens",
    "beam_search_diversity_rate",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "length_penalty",
    "early_stopping",
    "no_repeat_ngram_size",
    "num_return_sequences",
    "min_p",
    "beam_width_array",
)  # fmt: skip  (nanobind/executor/request.cpp @ 008b2b8d)


class SamplingConfig:
    """`SamplingConfig(beam_width=1, *, top_k=None, ...)`: every field optional, None = engine default."""

    def __init__(self, beam_width: int = 1, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(_SAMPLING_FIELDS)
        if unknown:
            raise TypeError(f"SamplingConfig got unexpected keyword arguments {sorted(unknown)}")
        self.beam_width = beam_width
        for name in _SAMPLING_FIELDS:
            setattr(self, name, kwargs.get(name))


@dataclass
class OutputConfig:
    return_log_probs: bool = False
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = False
    return_encoder_output: bool = False
    return_perf_metrics: bool = False
    additional_model_outputs: list[Any] | None = None


class ExternalDraftTokensConfig:
    """`ExternalDraftTokensConfig(tokens, logits=None, acceptance_threshold=None, fast_logits=None)`."""

    def __init__(
        self,
        tokens: list[int],
        logits: Any = None,
        acceptance_threshold: float | None = None,
        fast_logits: bool | None = None,
    ) -> None:
        if logits is not None or fast_logits:
            raise NotImplementedError("the double verifies by token comparison only (use_logits=False)")
        self.tokens = list(tokens)
        self.logits = logits
        self.acceptance_threshold = acceptance_threshold
        self.fast_logits = fast_logits


_REQUEST_EXTRA_FIELDS = frozenset({
    "position_ids", "bad_words", "embedding_bias", "external_draft_tokens_config", "prompt_tuning_config",
    "multimodal_input", "multimodal_embedding", "mrope_config", "lora_config", "lookahead_config",
    "kv_cache_retention_config", "logits_post_processor_name", "logits_post_processor",
    "encoder_input_token_ids", "client_id", "return_all_generated_tokens", "priority", "type",
    "context_phase_params", "encoder_input_features", "encoder_output_length", "cross_attention_mask",
    "num_return_sequences", "eagle_config", "skip_cross_attn_blocks", "guided_decoding_params",
    "language_adapter_uid", "allotted_time_ms",
})  # fmt: skip


class Request:
    """`Request(input_token_ids, max_tokens, *, streaming=False, ...)`; `max_tokens` counts new tokens."""

    def __init__(
        self,
        input_token_ids: list[int],
        max_tokens: int,
        *,
        streaming: bool = False,
        sampling_config: SamplingConfig | None = None,
        output_config: OutputConfig | None = None,
        end_id: int | None = None,
        pad_id: int | None = None,
        stop_words: list[list[int]] | None = None,
        **extra: Any,
    ) -> None:
        unknown = set(extra) - _REQUEST_EXTRA_FIELDS
        if unknown:
            raise TypeError(f"Request got unexpected keyword arguments {sorted(unknown)}")
        if extra.get("return_all_generated_tokens") or extra.get("num_return_sequences", 1) != 1:
            raise NotImplementedError("the double models return_all_generated_tokens=False, one sequence")
        if extra.get("guided_decoding_params") is not None:
            raise NotImplementedError("the backend builds no GuidedDecodingConfig, so it must send no guide")
        self.input_token_ids = list(input_token_ids)
        self.max_tokens = max_tokens
        self.streaming = streaming
        self.sampling_config = sampling_config or SamplingConfig()
        self.output_config = output_config or OutputConfig()
        self.end_id = end_id
        self.pad_id = pad_id
        self.stop_words = stop_words
        self.external_draft_tokens_config: ExternalDraftTokensConfig | None = extra.get("external_draft_tokens_config")

    @property
    def draft_tokens(self) -> list[int]:
        config = self.external_draft_tokens_config
        return config.tokens if config is not None else []


@dataclass
class Result:
    is_final: bool
    output_token_ids: list[list[int]]  # [beam][tokens]
    finish_reasons: list[FinishReason]  # [beam]
    sequence_index: int = 0
    is_sequence_final: bool = False
    decoding_iter: int = 0


class Response:
    """Either a result or an error; like the C++ class, reading the wrong one raises."""

    def __init__(self, request_id: int, result_or_error: Result | str) -> None:
        self.request_id = request_id
        self._payload = result_or_error

    def has_error(self) -> bool:
        return isinstance(self._payload, str)

    @property
    def error_msg(self) -> str:
        if not isinstance(self._payload, str):
            raise RuntimeError("Cannot get the error message for a response without error")
        return self._payload

    @property
    def result(self) -> Result:
        if isinstance(self._payload, str):
            raise RuntimeError("Cannot get the result for a response with an error")
        return self._payload


@dataclass
class KvCacheStats:
    max_num_blocks: int
    free_num_blocks: int
    used_num_blocks: int
    tokens_per_block: int
    alloc_total_blocks: int
    alloc_new_blocks: int
    reused_blocks: int
    missed_blocks: int
    cache_hit_rate: float


@dataclass
class IterationStats:
    iter: int
    num_active_requests: int
    num_queued_requests: int
    max_num_active_requests: int
    kv_cache_stats: KvCacheStats | None


class BlockCache:
    """KV-cache block reuse as the block manager counts it: a prompt's full blocks found among earlier prompts'.

    Counters are cumulative since start; a block counts only while every block before it was found too.
    """

    def __init__(self, tokens_per_block: int, *, enabled: bool) -> None:
        self.tokens_per_block = tokens_per_block
        self.enabled = enabled
        self._cached: set[tuple[int, ...]] = set()  # prompt prefixes ending on a block boundary
        self.reused = self.missed = 0

    def admit(self, prompt: list[int]) -> None:
        if not self.enabled:
            return
        per_block = self.tokens_per_block
        prefixes = [tuple(prompt[:end]) for end in range(per_block, len(prompt) + 1, per_block)]
        hits = next((i for i, prefix in enumerate(prefixes) if prefix not in self._cached), len(prefixes))
        self.reused += hits
        self.missed += len(prefixes) - hits
        self._cached.update(prefixes)

    def stats(self, max_blocks: int, used: int) -> dict[str, Any]:
        """KvCacheStats' fields (snake case, as the bindings name them)."""
        total = self.reused + self.missed
        return {
            "max_num_blocks": max_blocks,
            "free_num_blocks": max_blocks - used,
            "used_num_blocks": used,
            "tokens_per_block": self.tokens_per_block,
            "alloc_total_blocks": used,
            "alloc_new_blocks": used,
            "reused_blocks": self.reused,
            "missed_blocks": self.missed,
            "cache_hit_rate": self.reused / total if total else 0.0,
        }


@dataclass
class _Live:
    """One request inside the executor."""

    request_id: int
    request: Request
    max_new_tokens: int = 0  # set when fetched (LlmRequest::validate may lower max_tokens)
    blocks: int = 0  # KV blocks reserved for prompt + max_new_tokens
    generated: list[int] = field(default_factory=list)
    sent: int = 0
    iterations: int = 0

    def advance(self, model: FakeModel, window: int | None) -> FinishReason | None:
        """One iteration; returns why the request finished, if it did."""
        self.iterations += 1
        draft = self.request.draft_tokens if self.iterations == 1 else []
        for proposed in draft:  # greedy verification: accept while the draft says what the model says
            reason = self._decode(model, window)
            if reason is not None or self.generated[-1] != proposed:
                return reason or FinishReason.LENGTH  # that token was the model's own; the round ends
        reason = self._decode(model, window)
        return reason or (FinishReason.LENGTH if draft else None)

    def _decode(self, model: FakeModel, window: int | None) -> FinishReason | None:
        """One token of the model's own; with a clamped attention window only the last `window` tokens count."""
        sequence = [*self.request.input_token_ids, *self.generated]
        token = model.next_token(sequence[-window:], []) if window else model.next_token(sequence, [])
        end_id = self.request.end_id
        if end_id is not None and end_id >= 0 and token == end_id:
            if len(self.generated) >= (self.request.sampling_config.min_tokens or 0):
                return FinishReason.END_ID  # the end token is not part of the output
            # min_tokens: the end id is masked, the next most likely token is taken
            token = next(t for t, _ in model.distribution(sequence, []) if t != end_id)
        self.generated.append(token)
        for word in self.request.stop_words or []:
            if word and self.generated[-len(word) :] == word:
                return FinishReason.STOP_WORDS  # the stop word's tokens are
        if len(self.generated) >= self.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def response(self, reason: FinishReason | None) -> Response | None:
        """What `createResult` sends now: streaming deltas, or everything once at the end."""
        final = reason is not None
        if self.request.streaming:
            tokens = self.generated[self.sent :]
            if not tokens and not final:
                return None
            self.sent = len(self.generated)
        elif not final:
            return None
        elif self.request.output_config.exclude_input_from_output:
            tokens = list(self.generated)
        else:
            tokens = self.request.input_token_ids + self.generated
        reasons = [reason or FinishReason.NOT_FINISHED]
        return Response(self.request_id, Result(final, [tokens], reasons, 0, final, self.iterations))


@dataclass
class EngineLimits:
    """What the runtime derived at load (trtGptModel.h), after any clamp of the attention window."""

    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_draft_len: int
    kv_blocks: int
    tokens_per_block: int
    window: int | None = None  # the clamped attention window; None: the whole sequence


class FakeExecutor:
    """`tensorrt_llm.bindings.executor.Executor`; records what it was asked to do, and from which thread."""

    def __init__(self, model: FakeModel, limits: EngineLimits, *, leader: bool, block_reuse: bool,
                 iteration_seconds: float) -> None:  # fmt: skip
        self.model = model
        self.limits = limits
        self.leader = leader
        self.block_reuse = block_reuse
        self.iteration_seconds = iteration_seconds
        self._next_id = 1
        self._queue: deque[_Live] = deque()
        self._active: list[_Live] = []
        self._ready: list[Response] = []
        self._cancel: set[int] = set()
        self._terminated: set[int] = set()
        self._shutdown_called = False
        self._blocks = BlockCache(limits.tokens_per_block, enabled=block_reuse)
        self._iteration = 0
        self._stats: list[IterationStats] = []
        self.requests: dict[int, Request] = {}
        self.adjustments: list[tuple[int, str]] = []  # (request id, what LlmRequest::validate changed)
        self.calls: list[tuple[str, Any]] = []  # ("enqueue", id), ("await", n), ("cancel", id), ...
        self.batch_sizes: list[int] = []  # active requests in each iteration
        self.caller_threads: set[int] = set()

    @property
    def max_batch_size(self) -> int:
        return self.limits.max_batch_size

    def _called(self, name: str, detail: Any = None) -> None:
        if self._shutdown_called:
            raise RuntimeError("Shutdown called")
        self.caller_threads.add(threading.get_ident())
        self.calls.append((name, detail))

    def enqueue_request(self, request: Request) -> int:
        request_id = self._next_id
        self._next_id += 1
        self._called("enqueue", request_id)
        self.requests[request_id] = request
        self._queue.append(_Live(request_id, request))
        return request_id

    def enqueue_requests(self, requests: list[Request]) -> list[int]:
        return [self.enqueue_request(request) for request in requests]

    def cancel_request(self, id: int) -> None:  # `id`: the binding's own argument name
        self._called("cancel", id)
        if id not in self._terminated:
            self._cancel.add(id)

    def can_enqueue_requests(self) -> bool:
        return self.leader and not self._shutdown_called

    def get_num_responses_ready(self, id: int | None = None) -> int:
        return sum(1 for r in self._ready if id is None or r.request_id == id)

    def get_latest_iteration_stats(self) -> list[IterationStats]:
        stats, self._stats = self._stats, []
        return stats

    def shutdown(self) -> None:
        self.calls.append(("shutdown", None))
        self._shutdown_called = True

    def await_responses(self, timeout: datetime.timedelta | None = None) -> list[Response]:
        self._called("await", timeout)
        self._admit()
        if not self._active and not self._ready:
            if timeout is None:
                raise RuntimeError("await_responses() without a timeout and nothing in flight blocks forever")
            time.sleep(min(timeout.total_seconds(), 0.005))
            return []
        responses, self._ready = self._ready + self._iterate(), []
        for response in responses:
            if response.has_error() or response.result.is_final:
                self._terminated.add(response.request_id)
        return responses

    def _admit(self) -> None:
        """Fetch (validate) queued requests, then admit them while the batch and the KV cache have room."""
        while self._queue and len(self._active) < self.limits.max_batch_size:
            live = self._queue[0]
            if not live.blocks:
                problem = self._validate(live)
                if problem:
                    self._queue.popleft()
                    self._ready.append(Response(live.request_id, problem))
                    continue
            if live.blocks > self.free_blocks:
                return  # GUARANTEED_NO_EVICT: it waits until running requests free their blocks
            self._queue.popleft()
            self._blocks.admit(live.request.input_token_ids)
            self._active.append(live)

    def _validate(self, live: _Live) -> str | None:
        """`LlmRequest::validate`, run when the request is fetched."""
        request, limits = live.request, self.limits
        prompt = len(request.input_token_ids)
        if prompt > limits.max_input_len:
            return (
                f"Prompt length ({prompt}) exceeds maximum input length ({limits.max_input_len}). Set log level "
                "to info and check TRTGptModel logs for how maximum input length is set"
            )
        if request.end_id is not None and not -1 <= request.end_id < self.model.vocab_size:
            return f"EndId ({request.end_id}) is not within acceptable range [-1, {self.model.vocab_size})."
        draft = request.draft_tokens
        if len(draft) > limits.max_draft_len:
            return f"Draft tokens length ({len(draft)}) exceeds maximum draft tokens length ({limits.max_draft_len})."
        if tuple(request.input_token_ids) in self.model.failing_prompts:
            return "Encountered an error when fetching new request: injected failure for this prompt"
        draft_len = len(draft) if draft else limits.max_draft_len
        if draft and prompt + draft_len > limits.max_input_len:
            draft_len = limits.max_input_len - prompt
            del draft[draft_len:]
            self.adjustments.append((live.request_id, f"draft truncated to {draft_len}"))
        live.max_new_tokens = request.max_tokens
        if prompt + request.max_tokens + draft_len > limits.max_seq_len:
            live.max_new_tokens = limits.max_seq_len - prompt - draft_len
            self.adjustments.append((live.request_id, f"max_tokens lowered to {live.max_new_tokens}"))
        live.blocks = -(-(prompt + live.max_new_tokens + len(draft)) // limits.tokens_per_block)
        return None

    @property
    def free_blocks(self) -> int:
        return self.limits.kv_blocks - sum(live.blocks for live in self._active)

    def _iterate(self) -> list[Response]:
        if not self._active:
            return []
        self._iteration += 1
        self.batch_sizes.append(len(self._active))
        time.sleep(self.iteration_seconds)
        if any(tuple(live.request.input_token_ids) in self.model.failing_step_prompts for live in self._active):
            return self._terminate_active("Encountered an error in forwardAsync function: injected step failure")
        responses: list[Response] = []
        for live in list(self._active):
            if live.request_id in self._cancel:
                reason: FinishReason | None = FinishReason.CANCELLED
            else:
                reason = live.advance(self.model, self.limits.window)
            response = live.response(reason)
            if response is not None:
                responses.append(response)
            if reason is not None:
                self._active.remove(live)
        self._record_stats()
        return responses

    def _terminate_active(self, error: str) -> list[Response]:
        """executorImpl.cpp `terminateActiveRequests`: one error response for every request in the step."""
        responses = [Response(live.request_id, error) for live in self._active]
        self._active.clear()
        return responses

    def _record_stats(self) -> None:
        used = sum(live.blocks for live in self._active)
        kv = KvCacheStats(**self._blocks.stats(self.limits.kv_blocks, used))
        self._stats.append(
            IterationStats(self._iteration, len(self._active), len(self._queue), self.limits.max_batch_size, kv)
        )


# -- tensorrt_llm.runtime ----------------------------------------------------------------------


def _read_config(engine_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(engine_dir) / "config.json").read_text())


def _read_build(engine_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    config = _read_config(engine_dir)
    return config["build_config"], config["pretrained_config"]


def kv_bytes_per_token(pretrained: dict[str, Any]) -> int:
    """One token's K and V on one rank, from config.json's model shape."""
    mapping = pretrained.get("mapping", {})
    heads = pretrained["num_attention_heads"]
    kv_heads = pretrained.get("num_key_value_heads") or heads
    head_size = pretrained.get("head_size") or pretrained["hidden_size"] // heads
    layers = -(-pretrained["num_hidden_layers"] // mapping.get("pp_size", 1))
    kv_algo = (pretrained.get("quantization") or {}).get("kv_cache_quant_algo")
    element = 1 if kv_algo in ("FP8", "INT8") else 2
    return 2 * layers * max(1, kv_heads // mapping.get("tp_size", 1)) * head_size * element


class FakeModelRunnerCpp:
    """`ModelRunnerCpp`: builds an Executor from the engine folder and keeps it as `session`."""

    fake: ClassVar[FakeTrtllm]

    def __init__(self, executor: FakeExecutor, max_batch_size: int, max_input_len: int, max_seq_len: int,
                 max_beam_width: int) -> None:  # fmt: skip
        self.session = executor
        self.max_batch_size = max_batch_size
        self.max_input_len = max_input_len  # only generate()'s own check reads it; the Executor never sees it
        self.max_seq_len = max_seq_len
        self.max_beam_width = max_beam_width

    @classmethod
    def from_dir(
        cls,
        engine_dir: str,
        *,
        lora_dir: str | None = None,
        rank: int = 0,
        max_batch_size: int | None = None,
        max_input_len: int | None = None,
        max_output_len: int | None = None,
        max_beam_width: int | None = None,
        max_attention_window_size: list[int] | None = None,
        sink_token_length: int | None = None,
        kv_cache_free_gpu_memory_fraction: float | None = None,
        cross_kv_cache_fraction: float | None = None,
        medusa_choices: list[list[int]] | None = None,
        eagle_choices: list[list[int]] | None = None,
        eagle_posterior_threshold: float | None = None,
        eagle_use_dynamic_tree: bool = False,
        eagle_dynamic_tree_max_top_k: int | None = None,
        lookahead_config: list[int] | None = None,
        debug_mode: bool = False,
        lora_ckpt_source: str = "hf",
        use_gpu_direct_storage: bool = False,
        gpu_weights_percent: float = 1,
        max_tokens_in_paged_kv_cache: int | None = None,
        kv_cache_enable_block_reuse: bool = False,
        enable_chunked_context: bool = False,
        is_enc_dec: bool = False,
        multi_block_mode: bool = True,
        enable_context_fmha_fp32_acc: bool | None = None,
        cuda_graph_mode: bool | None = None,
        logits_processor_map: dict[str, Any] | None = None,
        device_ids: list[int] | None = None,
        is_orchestrator_mode: bool = False,
        use_runtime_defaults: bool = True,
        gather_generation_logits: bool = False,
        use_variable_beam_width_search: bool = False,
        mm_embedding_offloading: bool = False,
        fail_fast_on_attention_window_too_large: bool = False,
    ) -> FakeModelRunnerCpp:
        arguments = {k: v for k, v in locals().items() if k not in {"cls", "engine_dir"}}
        fake = cls.fake
        fake.events.append(("ModelRunnerCpp.from_dir", str(engine_dir)))
        fake.from_dir_calls.append({"engine_dir": str(engine_dir), **arguments})
        build, pretrained = _read_build(engine_dir)
        fake.check_launch(pretrained, rank, is_orchestrator_mode)
        batch = build["max_batch_size"] if max_batch_size is None else max_batch_size
        if batch > build["max_batch_size"]:
            raise RuntimeError(f"Runtime configured max batch size ({batch}) must not exceed engine max batch size")
        beams = build.get("max_beam_width", 1) if max_beam_width is None else max_beam_width
        if beams > build.get("max_beam_width", 1):
            raise RuntimeError(f"Runtime configured max beam width ({beams}) must not exceed engine max beam width")
        block_reuse = _fixed_block_reuse(fake, build, kv_cache_enable_block_reuse)
        _check_model(build, block_reuse, enable_chunked_context)
        limits = fake.allocate(
            engine_dir,
            build,
            pretrained,
            max_batch_size=batch,
            chunked=enable_chunked_context,
            fraction=DEFAULT_KV_FRACTION
            if kv_cache_free_gpu_memory_fraction is None
            else kv_cache_free_gpu_memory_fraction,
            fail_fast=fail_fast_on_attention_window_too_large,
        )
        executor = FakeExecutor(
            fake.model_for(engine_dir),
            limits,
            leader=is_orchestrator_mode or rank == 0,
            block_reuse=block_reuse,
            iteration_seconds=fake.iteration_seconds,
        )
        fake.executors.append(executor)
        runner_input = max_input_len if max_input_len is not None else build["max_input_len"]
        return cls(executor, batch, runner_input, build["max_seq_len"], beams)


def _plugins(build: dict[str, Any]) -> dict[str, Any]:
    return build.get("plugin_config") or {}


def _fixed_block_reuse(fake: FakeTrtllm, build: dict[str, Any], wanted: bool) -> bool:
    """`fixExecutorConfig`: reuse is switched off, with a warning, where the engine cannot reuse blocks."""
    if wanted and not _plugins(build).get("use_paged_context_fmha", False):
        fake.warnings.append(
            "Fixing executorConfig: KV cache reuse disabled because model was not built with paged context FMHA support"
        )
        return False
    if wanted and build.get("gather_context_logits"):
        fake.warnings.append(
            "Fixing executorConfig: KV cache reuse disabled because model was built to return context logits"
        )
        return False
    return wanted


def _check_model(build: dict[str, Any], block_reuse: bool, chunked: bool) -> None:
    """The TrtGptModelInflightBatching constructor's checks, with its messages."""
    plugins = _plugins(build)
    paged = str(build.get("kv_cache_type", "PAGED")).upper() == "PAGED"
    if not (
        plugins.get("gpt_attention_plugin") not in (None, "disable") and plugins.get("remove_input_padding") and paged
    ):
        raise RuntimeError(
            "TrtGptModelInflightBatching requires GPT attention/Mamba Conv 1d plugin with "
            "packed input and paged KV cache."
        )
    if build.get("speculative_decoding_mode") == 2 and not block_reuse:
        raise RuntimeError("KV cache block reuse must be enabled for speculative decoding target model")
    if chunked and not (paged and plugins.get("use_paged_context_fmha")):
        raise RuntimeError(
            "Chunked context requires context FMHA, paged kv_cache and paged context FMHA all enabled at the same time."
        )
    if not chunked and not plugins.get("context_fmha", True) and build["max_input_len"] > build["max_num_tokens"]:
        raise RuntimeError(
            f"Without enabling chunked context, the max context length ({build['max_input_len']}) needs to be less "
            f"than or equal to the max number of tokens ({build['max_num_tokens']})."
        )


def runtime_max_input_len(build: dict[str, Any], chunked: bool) -> int:
    """trtGptModel.h: what the Executor accepts as a prompt."""
    plugins = _plugins(build)
    if chunked:
        return build["max_seq_len"] - 1
    if plugins.get("context_fmha", True) and plugins.get("remove_input_padding"):
        return min(build["max_seq_len"] - 1, build["max_num_tokens"])
    return build["max_input_len"]


@dataclass
class RuntimeSamplingConfig:
    """`tensorrt_llm.runtime.SamplingConfig` (the Python session's), with the fields the double reads."""

    end_id: int | None
    pad_id: int | None
    max_new_tokens: int = 20
    num_beams: int = 1
    output_sequence_lengths: bool = False
    return_dict: bool = False
    stop_words_list: Any = None
    bad_words_list: Any = None
    temperature: float | torch.Tensor = 1.0
    top_k: int | torch.Tensor = 1
    top_p: float | torch.Tensor = 0.0
    random_seed: int | torch.Tensor | None = None
    repetition_penalty: float | torch.Tensor = 1.0

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Like the real one: known fields are set, the rest is handed back unused."""
        known = {f.name for f in fields(self)}
        for key, value in kwargs.items():
            if key in known:
                setattr(self, key, value)
        return {k: v for k, v in kwargs.items() if k not in known}


_PER_ROW_DTYPES = {
    "top_k": torch.int32,
    "top_p": torch.float32,
    "temperature": torch.float32,
    "repetition_penalty": torch.float32,
    "random_seed": torch.int64,
}


class FakeModelRunner:
    """`ModelRunner` (Python session): one `generate` call decodes one static batch.

    `output_ids` [batch, beams, max_seq_len] hold the prompt at [0:input_len] and then the generated ids,
    padded with pad_id up to the longest prompt and with end_id after it; `sequence_lengths` [batch, beams]
    exclude the end token; `streaming=True` yields the cumulative dict after every decode step, plus a repeat
    of the last one when the loop ran to `max_new_tokens` (as `GenerationSession.decode_stream` does).
    `max_new_tokens`, `end_id` and `pad_id` are per call; temperature/top_k/top_p/repetition_penalty/
    random_seed are scalars or [batch] tensors. The session checks prompts against the build's max_input_len.
    """

    fake: ClassVar[FakeTrtllm]

    def __init__(self, max_batch_size: int, max_input_len: int, max_seq_len: int, max_beam_width: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_input_len = max_input_len
        self.max_seq_len = max_seq_len
        self.max_beam_width = max_beam_width

    @classmethod
    def from_dir(
        cls,
        engine_dir: str,
        *,
        max_output_len: int | None = None,
        lora_dir: list[str] | None = None,
        rank: int = 0,
        debug_mode: bool = False,
        lora_ckpt_source: str = "hf",
        medusa_choices: list[list[int]] | None = None,
        stream: Any = None,
        gpu_weights_percent: float = 1,
        enable_context_fmha_fp32_acc: bool | None = None,
        multi_block_mode: bool | None = None,
        fail_fast_on_attention_window_too_large: bool = False,
    ) -> FakeModelRunner:
        arguments = {k: v for k, v in locals().items() if k not in {"cls", "engine_dir"}}
        cls.fake.events.append(("ModelRunner.from_dir", str(engine_dir)))
        cls.fake.from_dir_calls.append({"engine_dir": str(engine_dir), **arguments})
        build, _ = _read_build(engine_dir)
        beams = build.get("max_beam_width", 1)
        return cls(build["max_batch_size"], build["max_input_len"], build["max_seq_len"], beams)

    def generate(
        self,
        batch_input_ids: list[torch.Tensor],
        position_ids: list[torch.Tensor] | None = None,
        sampling_config: RuntimeSamplingConfig | None = None,
        prompt_table: Any = None,
        prompt_tasks: str | None = None,
        lora_uids: list[Any] | None = None,
        streaming: bool = False,
        **kwargs: Any,
    ) -> Any:
        scfg = copy.deepcopy(sampling_config) if sampling_config else RuntimeSamplingConfig(end_id=None, pad_id=None)
        scfg.update(**kwargs)
        if isinstance(scfg.temperature, float) and scfg.temperature == 0.0:
            scfg.temperature, scfg.top_k = 1.0, 1
        prompts = [ids.tolist() for ids in batch_input_ids]
        self._check(prompts, scfg)
        call = {"prompts": prompts, "sampling": scfg, "streaming": streaming, "steps": 0}
        self.fake.generate_calls.append(call)
        if any(tuple(p) in self.fake.model.failing_prompts for p in prompts):
            raise RuntimeError("injected failure for this batch")
        steps = self._decode(prompts, scfg, call)
        if streaming:
            return (self._outputs(prompts, state, scfg) for state in steps)
        *_, final = steps
        return self._outputs(prompts, final, scfg)

    def _check(self, prompts: list[list[int]], scfg: RuntimeSamplingConfig) -> None:
        """`ModelRunnerMixin._check_inputs` and the asserts of `GenerationSession.__setup_decoder`."""
        if len(prompts) > self.max_batch_size:
            raise RuntimeError(f"Input batch size ({len(prompts)}) exceeds the engine or specified limit")
        longest = max(len(p) for p in prompts)
        if longest > self.max_input_len:
            raise RuntimeError(f"Maximum input length ({longest}) exceeds the engine or specified limit")
        if longest + scfg.max_new_tokens > self.max_seq_len:
            raise RuntimeError(
                f"Maximum input length ({longest}) + maximum new tokens ({scfg.max_new_tokens}) exceeds the engine "
                f"or specified limit ({self.max_seq_len})"
            )
        assert scfg.end_id is not None, "end_id cannot be none"
        assert scfg.pad_id is not None, "pad_id cannot be none"
        for name, dtype in _PER_ROW_DTYPES.items():
            value = getattr(scfg, name)
            if isinstance(value, torch.Tensor):
                assert value.dtype == dtype, f"scfg.{name}.dtype ({value.dtype}) must be {dtype}"
                assert value.shape[0] == len(prompts), f"scfg.{name}.shape[0] must equal to batch_size"
        if scfg.stop_words_list is not None or scfg.bad_words_list is not None:
            raise NotImplementedError("stop/bad words lists are not modelled by the double")

    def _decode(
        self, prompts: list[list[int]], scfg: RuntimeSamplingConfig, call: dict[str, Any]
    ) -> Iterator[list[list[int]]]:
        """Yields every row's generated ids after each step; finished rows stop growing."""
        generated: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        for _ in range(scfg.max_new_tokens):
            call["steps"] += 1
            time.sleep(self.fake.iteration_seconds)
            for row, prompt in enumerate(prompts):
                if finished[row]:
                    continue
                token = self.fake.model.next_token(prompt, generated[row])
                if scfg.end_id >= 0 and token == scfg.end_id:
                    finished[row] = True
                else:
                    generated[row].append(token)
            yield [list(g) for g in generated]
            if all(finished):
                return
        yield [list(g) for g in generated]  # decode_stream's final yield after the loop ran out

    def _outputs(self, prompts: list[list[int]], generated: list[list[int]], scfg: RuntimeSamplingConfig) -> Any:
        longest = max(len(p) for p in prompts)
        output_ids = torch.full((len(prompts), 1, self.max_seq_len), scfg.end_id, dtype=torch.int32)
        lengths = torch.zeros((len(prompts), 1), dtype=torch.int32)
        for row, (prompt, tokens) in enumerate(zip(prompts, generated, strict=True)):
            output_ids[row, 0, :longest] = scfg.pad_id
            sequence = prompt + tokens
            output_ids[row, 0, : len(sequence)] = torch.tensor(sequence, dtype=torch.int32)
            lengths[row, 0] = len(sequence)
        if not scfg.return_dict:
            return output_ids
        outputs: dict[str, torch.Tensor] = {"output_ids": output_ids}
        if scfg.output_sequence_lengths:
            outputs["sequence_lengths"] = lengths
        return outputs


# -- the fake package --------------------------------------------------------------------------


@dataclass
class FakeTrtllm:
    """State shared by the fake modules; tests read what the backend did from here."""

    model: FakeModel = field(default_factory=FakeModel)
    models: dict[str, FakeModel] = field(default_factory=dict)  # engine folder -> its own model (a draft's)
    mpi_rank: int = 0
    mpi_world_size: int = 1
    iteration_seconds: float = 0.0
    version: str = "1.2.0"
    gpu_memory_bytes: int = 80 * 2**30  # per GPU; every engine here runs on the same GPU(s)
    weights_bytes: dict[str, int] = field(default_factory=dict)  # engine folder -> its weights per GPU
    gpu_used_bytes: int = 0
    warnings: list[str] = field(default_factory=list)  # what TensorRT-LLM would log as a warning
    events: list[tuple[str, str]] = field(default_factory=list)
    from_dir_calls: list[dict[str, Any]] = field(default_factory=list)
    executors: list[FakeExecutor] = field(default_factory=list)
    generate_calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def executor(self) -> FakeExecutor:
        return self.executors[-1]

    def model_for(self, engine_dir: str | Path) -> FakeModel:
        return self.models.get(str(engine_dir), self.model)

    def check_launch(self, pretrained: dict[str, Any], rank: int, orchestrator: bool) -> None:
        """executorImpl.cpp: orchestrator mode needs MPI world size 1, leader mode tp*pp*cp ranks."""
        mapping = pretrained.get("mapping", {})
        engine_ranks = mapping.get("tp_size", 1) * mapping.get("pp_size", 1)
        if orchestrator and self.mpi_world_size != 1:
            raise RuntimeError("When using the orchestrator mode and isOrchestrator is true, expect MPI worldSize 1")
        if not orchestrator and self.mpi_world_size != engine_ranks:
            raise RuntimeError(
                "With communicationMode kLEADER, MPI worldSize is expected to be equal to tp*pp*cp when "
                "participantIds are not specified"
            )
        assert rank == self.mpi_rank

    def allocate(self, engine_dir: str | Path, build: dict[str, Any], pretrained: dict[str, Any], *,
                 max_batch_size: int, chunked: bool, fraction: float, fail_fast: bool) -> EngineLimits:  # fmt: skip
        """Weights, then `fraction` of what is free as KV cache, then the one-sequence check of the window."""
        weights = self.weights_bytes.get(str(engine_dir), 0)
        free = self.gpu_memory_bytes - self.gpu_used_bytes
        if weights > free:
            raise RuntimeError(f"[TensorRT-LLM][ERROR] CUDA runtime error in cudaMalloc: out of memory ({engine_dir})")
        self.gpu_used_bytes += weights
        kv_bytes = int((free - weights) * fraction)
        self.gpu_used_bytes += kv_bytes
        per_block = _plugins(build).get("tokens_per_block", DEFAULT_TOKENS_PER_BLOCK)
        blocks = kv_bytes // (kv_bytes_per_token(pretrained) * per_block)
        limits = EngineLimits(
            max_batch_size=max_batch_size,
            max_input_len=runtime_max_input_len(build, chunked),
            max_seq_len=build["max_seq_len"],
            max_draft_len=build.get("max_draft_len", 0),
            kv_blocks=blocks,
            tokens_per_block=per_block,
        )
        if blocks * per_block >= limits.max_seq_len:
            return limits
        window = blocks * per_block
        if fail_fast:
            raise RuntimeError(
                "Attention window too large to fit even a single sequence in the KV cache. Failing fast rather than "
                f"attempting an adjustment of the window sizes. Old: [{limits.max_seq_len}], New: [{window}]"
            )
        self.warnings.append(
            f"maxAttentionWindowVec too large to fit at least one sequence in kvCache. New: [{window}]"
        )
        limits.window = window
        limits.max_seq_len = window
        limits.max_input_len = min(limits.max_input_len, window - 1)
        return limits

    def modules(self) -> dict[str, types.ModuleType]:
        package = types.ModuleType("tensorrt_llm")
        package.__path__ = []  # a package, so `import tensorrt_llm.x` looks in sys.modules
        package.__version__ = self.version

        executor = types.ModuleType("tensorrt_llm.bindings.executor")
        exported = (FinishReason, SamplingConfig, OutputConfig, ExternalDraftTokensConfig, Request, Response, Result,
                    KvCacheStats, IterationStats)  # fmt: skip
        for cls in exported:
            setattr(executor, cls.__name__, cls)
        executor.Executor = FakeExecutor
        bindings = types.ModuleType("tensorrt_llm.bindings")
        bindings.__path__ = []
        bindings.executor = executor

        runtime = types.ModuleType("tensorrt_llm.runtime")
        runtime.ModelRunnerCpp = type("ModelRunnerCpp", (FakeModelRunnerCpp,), {"fake": self})
        runtime.ModelRunner = type("ModelRunner", (FakeModelRunner,), {"fake": self})
        runtime.SamplingConfig = RuntimeSamplingConfig
        runtime.PYTHON_BINDINGS = True

        utils = types.ModuleType("tensorrt_llm._utils")
        utils.mpi_rank = lambda: self.mpi_rank
        utils.mpi_world_size = lambda: self.mpi_world_size

        package.bindings, package.runtime, package._utils = bindings, runtime, utils
        return {
            "tensorrt_llm": package,
            "tensorrt_llm.bindings": bindings,
            "tensorrt_llm.bindings.executor": executor,
            "tensorrt_llm.runtime": runtime,
            "tensorrt_llm._utils": utils,
        }

    def install(self, monkeypatch: Any) -> FakeTrtllm:
        """Put the fake package in `sys.modules` for one test (a pytest MonkeyPatch undoes it)."""
        install_modules(self.modules(), monkeypatch.setitem)
        return self


def install_modules(modules: dict[str, types.ModuleType], setitem: Any = None) -> None:
    """Into `sys.modules`, through `setitem(mapping, key, value)` when a test needs it undone."""
    target: MutableMapping[str, Any] = sys.modules
    for name, module in modules.items():
        if setitem is None:
            target[name] = module
        else:
            setitem(target, name, module)


def write_engine_config(
    engine_dir: Path,
    *,
    max_batch_size: int = 8,
    max_input_len: int = 64,
    max_seq_len: int = 128,
    max_num_tokens: int | None = None,
    tp_size: int = 1,
    pp_size: int = 1,
    vocab_size: int = 1000,
    max_draft_len: int = 0,
    paged_context_fmha: bool = True,
    context_fmha: bool = True,
    remove_input_padding: bool = True,
    kv_cache_type: str = "PAGED",
    num_hidden_layers: int = 2,
    num_key_value_heads: int = 2,
    head_size: int = 16,
    kv_cache_quant_algo: str | None = None,
) -> Path:
    """A `config.json` as trtllm-build writes it for these build arguments (only the keys anyone reads).

    As tensorrt_llm/builder.py does: a speculative build writes max_seq_len + max_draft_len, and raises
    max_num_tokens (default 8192) to at least max_batch_size * (max_draft_len + 1).
    """
    engine_dir.mkdir(parents=True, exist_ok=True)
    num_tokens = max_num_tokens or 8192
    if max_draft_len:
        num_tokens = max(num_tokens, max_batch_size * (max_draft_len + 1))
    config = {
        "version": "1.2.0",
        "pretrained_config": {
            "architecture": "LlamaForCausalLM",
            "dtype": "float16",
            "vocab_size": vocab_size,
            "hidden_size": head_size * 4,
            "num_attention_heads": 4,
            "num_key_value_heads": num_key_value_heads,
            "num_hidden_layers": num_hidden_layers,
            "quantization": {"quant_algo": None, "kv_cache_quant_algo": kv_cache_quant_algo},
            "mapping": {"world_size": tp_size * pp_size, "tp_size": tp_size, "pp_size": pp_size, "gpus_per_node": 8},
        },
        "build_config": {
            "max_batch_size": max_batch_size,
            "max_input_len": max_input_len,
            "max_seq_len": max_seq_len + max_draft_len,
            "max_beam_width": 1,
            "max_num_tokens": num_tokens,
            "max_draft_len": max_draft_len,
            "speculative_decoding_mode": 2
            if max_draft_len
            else 1,  # SpeculativeDecodingMode DRAFT_TOKENS_EXTERNAL / NONE
            "kv_cache_type": kv_cache_type,
            "gather_context_logits": False,
            "plugin_config": {
                "gpt_attention_plugin": "auto",
                "remove_input_padding": remove_input_padding,
                "paged_kv_cache": kv_cache_type == "PAGED",
                "context_fmha": context_fmha,
                "use_paged_context_fmha": paged_context_fmha,
                "tokens_per_block": DEFAULT_TOKENS_PER_BLOCK,
            },
        },
    }
    path = engine_dir / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path
