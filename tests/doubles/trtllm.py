"""A double of the `tensorrt_llm` surface that `model/backends/trtllm/` uses, following TensorRT-LLM 1.2.

TensorRT-LLM cannot be installed without a GPU, so the backend is tested against this double. Every
class, argument and behaviour here was taken from the TensorRT-LLM sources listed in the backend's
module docstring; where the double simplifies, the docstring of that piece says how.

Executor (`tensorrt_llm.bindings.executor`), as `Executor::Impl` and `LlmRequest::createResult` behave:
- `enqueue_request(Request) -> int` hands out ascending ids; the request joins the running batch at
  the next iteration (in-flight batching: at most `max_batch_size` active, the rest wait in a queue);
- `await_responses(timeout=timedelta)` runs ONE engine iteration (one token for every active
  request) and returns what it produced; with nothing in flight it returns `[]` (after a shortened
  wait), and without a timeout it raises instead of blocking forever, which the real one would do;
- a streaming response carries only the tokens made since the previous response, never the
  prompt; the end token is never output (sequence lengths exclude it), a stop word's tokens are;
  the last response has `is_final` and `finish_reasons[beam]` END_ID, STOP_WORDS, LENGTH or CANCELLED;
- non-streaming: one final response with prompt + generated ids, unless `exclude_input_from_output`;
- a request the engine rejects (prompt above max_input_len, end_id outside the vocabulary, or a
  prompt in `FakeModel.failing_prompts`) gets `Response(request_id, error_msg)`: `has_error()`;
- `cancel_request(id)` ends the request at the next iteration with a CANCELLED final response;
- external draft tokens (`Request(external_draft_tokens_config=ExternalDraftTokensConfig(tokens))`, an
  engine built with draft_tokens_external): in ONE iteration the target accepts the longest prefix of
  the draft tokens equal to its own next tokens and adds one token of its own, and the request ends
  there, as tests/bindings/test_executor_bindings.py `test_request_perf_metrics_draft` shows (4 draft
  tokens, 2 accepted, 3 new tokens, final in iteration 0). The finish reason of such a round is not
  in that test; the double says LENGTH. More draft tokens than the engine's max_draft_len is an error
  (`LlmRequest::validate`: "exceeds maximum draft").

Runners (`tensorrt_llm.runtime`):
- `ModelRunnerCpp.from_dir(engine_dir, **kw)` takes the real keyword set and keeps the Executor as `.session`;
- `ModelRunner.from_dir(...).generate(...)`: `output_ids` [batch, beams, max_seq_len] hold the prompt
  at [0:input_len] and then the generated ids, padded with pad_id up to the longest prompt and with
  end_id after it; `sequence_lengths` [batch, beams] exclude the end token; `streaming=True` yields
  the cumulative dict after every decode step, plus a repeat of the last one when the loop ran to
  `max_new_tokens` (as `GenerationSession.decode_stream` does). `max_new_tokens`, `end_id` and
  `pad_id` are per call; temperature/top_k/top_p/repetition_penalty/random_seed are scalars or [batch] tensors.

The model (`FakeModel`) is deterministic: the next id is a function of the whole sequence so far,
and ids below `RESERVED_IDS` (special tokens) come only from `scripts`. Each engine folder can have
its own model (`FakeTrtllm.models`), so a draft engine can agree with its target or not.
"""

from __future__ import annotations

import copy
import datetime
import enum
import json
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

RESERVED_IDS = 10  # ids 0..9 are special tokens (pad, end, stop); the default rule never makes them


@dataclass
class FakeModel:
    """Next token = f(prompt + generated); `scripts` pin what follows a prompt (e.g. to end it)."""

    vocab_size: int = 1000
    scripts: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    failing_prompts: set[tuple[int, ...]] = field(default_factory=set)
    wrong_every: int = 0  # a draft's flaw: at sequence lengths divisible by this, a different id than the rule's

    def next_token(self, prompt: list[int], generated: list[int]) -> int:
        """A function of the sequence alone, so a continuation sent as a new prompt goes on the same way."""
        sequence = [*prompt, *generated]
        for start, script in self.scripts.items():
            made = sequence[len(start) :]
            if tuple(sequence[: len(start)]) == start and len(made) < len(script) and made == script[: len(made)]:
                return script[len(made)]
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


# -- tensorrt_llm.bindings.executor ------------------------------------------------------------


class FinishReason(enum.Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


_SAMPLING_FIELDS = (
    "top_k", "top_p", "top_p_min", "top_p_reset_ids", "top_p_decay", "seed", "temperature", "min_tokens",
    "beam_search_diversity_rate", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "length_penalty", "early_stopping", "no_repeat_ngram_size", "num_return_sequences", "min_p",
    "beam_width_array",
)  # fmt: skip


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
class _Live:
    """One request inside the executor."""

    request_id: int
    request: Request
    max_new_tokens: int
    generated: list[int] = field(default_factory=list)
    sent: int = 0
    iterations: int = 0

    def advance(self, model: FakeModel) -> FinishReason | None:
        """One iteration; returns why the request finished, if it did."""
        self.iterations += 1
        draft = self.request.draft_tokens if self.iterations == 1 else []
        for proposed in draft:  # greedy verification: accept while the draft says what the model says
            reason = self._decode(model)
            if reason is not None or self.generated[-1] != proposed:
                return reason or FinishReason.LENGTH  # that token was the model's own; the round ends
        reason = self._decode(model)
        return reason or (FinishReason.LENGTH if draft else None)

    def _decode(self, model: FakeModel) -> FinishReason | None:
        """One token of the model's own."""
        token = model.next_token(self.request.input_token_ids, self.generated)
        if self.request.end_id is not None and self.request.end_id >= 0 and token == self.request.end_id:
            return FinishReason.END_ID  # the end token is not part of the output
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


class FakeExecutor:
    """`tensorrt_llm.bindings.executor.Executor`; records what it was asked to do, and from which thread."""

    def __init__(self, model: FakeModel, *, max_batch_size: int, max_input_len: int, max_seq_len: int,
                 leader: bool, iteration_seconds: float, max_draft_len: int = 0) -> None:  # fmt: skip
        self.model = model
        self.max_draft_len = max_draft_len
        self.max_batch_size = max_batch_size
        self.max_input_len = max_input_len
        self.max_seq_len = max_seq_len
        self.leader = leader
        self.iteration_seconds = iteration_seconds
        self._next_id = 1
        self._queue: deque[_Live] = deque()
        self._active: list[_Live] = []
        self._ready: list[Response] = []
        self._cancel: set[int] = set()
        self._terminated: set[int] = set()
        self._shutdown_called = False
        self.requests: dict[int, Request] = {}
        self.calls: list[tuple[str, Any]] = []  # ("enqueue", id), ("await", n), ("cancel", id), ...
        self.batch_sizes: list[int] = []  # active requests in each iteration
        self.caller_threads: set[int] = set()

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
        max_new = min(request.max_tokens, self.max_seq_len - len(request.input_token_ids))  # LlmRequest::validate
        self._queue.append(_Live(request_id, request, max_new))
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
        while self._queue and len(self._active) < self.max_batch_size:
            live = self._queue.popleft()
            problem = self._validate(live.request)
            if problem:
                self._ready.append(Response(live.request_id, problem))
            else:
                self._active.append(live)

    def _validate(self, request: Request) -> str | None:
        if len(request.input_token_ids) > self.max_input_len:
            return (
                f"Prompt length ({len(request.input_token_ids)}) exceeds maximum input length ({self.max_input_len})."
            )
        if request.end_id is not None and not -1 <= request.end_id < self.model.vocab_size:
            return f"EndId ({request.end_id}) is not within acceptable range [-1, {self.model.vocab_size})."
        if len(request.draft_tokens) > self.max_draft_len:
            drafts = len(request.draft_tokens)
            return f"Draft tokens length ({drafts}) exceeds maximum draft length ({self.max_draft_len})."
        if tuple(request.input_token_ids) in self.model.failing_prompts:
            return "injected failure for this prompt"
        return None

    def _iterate(self) -> list[Response]:
        if not self._active:
            return []
        self.batch_sizes.append(len(self._active))
        time.sleep(self.iteration_seconds)
        responses: list[Response] = []
        for live in list(self._active):
            reason = FinishReason.CANCELLED if live.request_id in self._cancel else live.advance(self.model)
            response = live.response(reason)
            if response is not None:
                responses.append(response)
            if reason is not None:
                self._active.remove(live)
        return responses


# -- tensorrt_llm.runtime ----------------------------------------------------------------------


def _read_build(engine_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    config = json.loads((Path(engine_dir) / "config.json").read_text())
    return config["build_config"], config["pretrained_config"]


class FakeModelRunnerCpp:
    """`ModelRunnerCpp`: builds an Executor from the engine folder and keeps it as `session`."""

    fake: ClassVar[FakeTrtllm]

    def __init__(self, executor: FakeExecutor, max_batch_size: int, max_input_len: int, max_seq_len: int,
                 max_beam_width: int) -> None:  # fmt: skip
        self.session = executor
        self.max_batch_size = max_batch_size
        self.max_input_len = max_input_len
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
        mapping = pretrained.get("mapping", {})
        engine_ranks = mapping.get("tp_size", 1) * mapping.get("pp_size", 1)
        if is_orchestrator_mode and fake.mpi_world_size != 1:
            raise RuntimeError("When using the orchestrator mode and isOrchestrator is true, expect MPI worldSize 1")
        if not is_orchestrator_mode and fake.mpi_world_size != engine_ranks:
            raise RuntimeError(
                "With communicationMode kLEADER, MPI worldSize is expected to be equal to tp*pp*cp when "
                "participantIds are not specified"
            )
        assert rank == fake.mpi_rank
        if max_batch_size is None:
            max_batch_size = build["max_batch_size"]
        assert max_batch_size <= build["max_batch_size"]
        if max_beam_width is None:
            max_beam_width = build.get("max_beam_width", 1)
        assert max_beam_width <= build.get("max_beam_width", 1)
        executor = FakeExecutor(
            fake.model_for(engine_dir),
            max_batch_size=max_batch_size,
            max_input_len=build["max_input_len"],
            max_seq_len=build["max_seq_len"],
            leader=is_orchestrator_mode or rank == 0,
            iteration_seconds=fake.iteration_seconds,
            max_draft_len=build.get("max_draft_len", 0),
        )
        fake.executors.append(executor)
        max_input_len = max_input_len if max_input_len is not None else build["max_input_len"]
        return cls(executor, max_batch_size, max_input_len, build["max_seq_len"], max_beam_width)


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
    """`ModelRunner` (Python session): one `generate` call decodes one static batch."""

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
    events: list[tuple[str, str]] = field(default_factory=list)
    from_dir_calls: list[dict[str, Any]] = field(default_factory=list)
    executors: list[FakeExecutor] = field(default_factory=list)
    generate_calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def executor(self) -> FakeExecutor:
        return self.executors[-1]

    def model_for(self, engine_dir: str | Path) -> FakeModel:
        return self.models.get(str(engine_dir), self.model)

    def modules(self) -> dict[str, types.ModuleType]:
        package = types.ModuleType("tensorrt_llm")
        package.__path__ = []  # a package, so `import tensorrt_llm.x` looks in sys.modules
        package.__version__ = self.version

        executor = types.ModuleType("tensorrt_llm.bindings.executor")
        for cls in (FinishReason, SamplingConfig, OutputConfig, ExternalDraftTokensConfig, Request, Response, Result):
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

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeTrtllm:
        """Put the fake package in `sys.modules` for one test (monkeypatch undoes it)."""
        for name, module in self.modules().items():
            monkeypatch.setitem(sys.modules, name, module)
        return self


def write_engine_config(
    engine_dir: Path,
    *,
    max_batch_size: int = 8,
    max_input_len: int = 64,
    max_seq_len: int = 128,
    tp_size: int = 1,
    pp_size: int = 1,
    vocab_size: int = 1000,
    max_draft_len: int = 0,
) -> Path:
    """A `config.json` shaped like trtllm-build's (only the keys anyone reads)."""
    engine_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "version": "1.2.0",
        "pretrained_config": {
            "architecture": "LlamaForCausalLM",
            "dtype": "float16",
            "vocab_size": vocab_size,
            "mapping": {"world_size": tp_size * pp_size, "tp_size": tp_size, "pp_size": pp_size, "gpus_per_node": 8},
        },
        "build_config": {
            "max_batch_size": max_batch_size,
            "max_input_len": max_input_len,
            "max_seq_len": max_seq_len,
            "max_beam_width": 1,
            "max_num_tokens": max_batch_size * max_input_len,
            "max_draft_len": max_draft_len,
            "speculative_decoding_mode": 2
            if max_draft_len
            else 1,  # SpeculativeDecodingMode DRAFT_TOKENS_EXTERNAL / NONE
            "plugin_config": {"gpt_attention_plugin": "auto", "remove_input_padding": True, "paged_kv_cache": True},
        },
    }
    path = engine_dir / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path
