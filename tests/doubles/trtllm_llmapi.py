"""A double of TensorRT-LLM 1.2's LLM API (`tensorrt_llm.LLM`, PyTorch backend), as backends/trtllm_llmapi uses it.

Built from NVIDIA/TensorRT-LLM sources read through the code index (1.2.0rc2 is commit b35ac1b6):
- tensorrt_llm/sampling_params.py at b35ac1b6: the `SamplingParams` field set (a kw-only dataclass: an unknown
  field is a TypeError) and `_validate` (top_p in [0, 1], top_k >= 0, temperature >= 0, one guide per request,
  `logprobs` coerced with `self.logprobs and int(self.logprobs)`, so 0 asks for none); `GuidedDecodingParams(json,
  regex, grammar, json_object, structural_tag)`.
- tensorrt_llm/llmapi/llm.py, the stored 1.x revision with `cache_salt` and `_check_arguments(..., is_gen_only)`
  (its commit unnamed by the index): `generate_async(inputs, sampling_params, ..., streaming=False) -> RequestOutput`,
  invalid keyword arguments refused by name ("LLM got invalid argument"), not more GPUs than are visible, and for the
  PyTorch backend without chunked prefill "The sum of prompt length (..), query length (0) should not exceed
  max_num_tokens (..)" raised at submission; `get_stats(timeout)` -> a list of dicts; `shutdown()`.
- tensorrt_llm/executor/result.py (005bc848, a 1.x revision): `CompletionOutput` (token_ids grows, `token_ids_diff`
  and `logprobs_diff` are what arrived since the previous response), finish reasons END_ID/STOP_WORDS -> "stop" (a
  stop word's ids are cut from token_ids but not from logprobs), LENGTH -> "length", CANCELLED -> "cancelled";
  `RequestOutput` is async-iterable when streaming and `abort()` cancels; a request the runtime fails raises
  `RequestError` from the iteration.
- tensorrt_llm/llmapi/llm_args.py (the revision with `eagle3_one_model` and `speculative_model_dir`):
  `KvCacheConfig(enable_block_reuse=True, free_gpu_memory_fraction=0.9, ...)`, `DraftTargetDecodingConfig` and
  `EagleDecodingConfig(max_draft_len, speculative_model_dir, eagle3_one_model=True)`, `guided_decoding_backend`,
  `enable_chunked_prefill`, `enable_iter_perf_stats`.
- tensorrt_llm/_torch/pyexecutor/sampler.py (a 1.x revision): top-k logprobs are the log-softmax of the raw logits
  ("not reflect temperature scaling, top-k/top-p masking"); the dict per token holds the k most likely tokens and
  the sampled one (sampling_utils' `{sampled: Logprob, **topk}`), each with its rank.
- cpp/tensorrt_llm/executor/jsonSerialization.cpp: the iteration-stats JSON names (kvCacheStats: maxNumBlocks,
  usedNumBlocks, tokensPerBlock, reusedBlocks, missedBlocks, ...).
- tensorrt_llm/_torch/pyexecutor/guided_decoder.py (07dacbbc, a 1.x revision): the grammar matcher of a guided
  request is created inside an executor step (`GuidedDecoder._build` -> `grammar_matcher_factory.create`), so
  a guide xgrammar cannot compile raises there and, as any error in a step, fails every request of the step.
- PR 16485 (merged 2026-07): in 1.2 the default TorchSampler accepts but ignores repetition, presence and
  frequency penalties; the double ignores them too.
Simplified: the model is `tests/doubles/trtllm.FakeModel` (deterministic, temperature and seed have no effect);
a speculative config changes nothing in the tokens (greedy speculation is lossless); a guided request emits
`FakeLlmApi.guided_outputs[kind]` and ends "stop"; the KV cache is `kv_blocks` blocks of 32 tokens (fewer when
`KvCacheConfig.max_tokens` says so), admission reserves prompt + max_tokens; one engine thread advances every
active request one token per iteration.
Assumed, not found in the sources (scripts/trtllm_smoke.py checks it on a GPU): the PyTorch backend treats
`fail_fast_on_attention_window_too_large` as the C++ runtime does, so a KV cache that cannot hold one
max_seq_len sequence fails the load with it and lowers max_seq_len (a warning in `FakeLlmApi.warnings`) without.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import types
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xgrammar

from tests.doubles.trtllm import BlockCache, FakeModel, install_modules

TOKENS_PER_BLOCK = 32


class RequestError(RuntimeError):
    """`tensorrt_llm.executor.utils.RequestError`: the runtime failed this request."""


@dataclass(slots=True, kw_only=True)
class GuidedDecodingParams:
    json: str | dict | None = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None

    def _validate(self) -> None:
        guides = sum(
            bool(getattr(self, name)) for name in ("json", "regex", "grammar", "json_object", "structural_tag")
        )
        if guides > 1:
            raise ValueError(f"Only one guide can be used for a request, but got {guides}.")

    @property
    def kind(self) -> str:
        return next(
            name for name in ("json", "regex", "grammar", "json_object", "structural_tag") if getattr(self, name)
        )


def _grammar_error(guided: GuidedDecodingParams) -> str | None:
    """What xgrammar says of the guide XGrammarMatcherFactory would compile (the grammar side only; no tokenizer)."""
    try:
        if guided.json is not None:
            xgrammar.Grammar.from_json_schema(guided.json if isinstance(guided.json, str) else json.dumps(guided.json))
        elif guided.regex is not None:
            xgrammar.Grammar.from_regex(guided.regex)
        elif guided.grammar is not None:
            xgrammar.Grammar.from_ebnf(guided.grammar)
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    return None


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    """The 1.2 field set (sampling_params.py at b35ac1b6), without the logits processors and tensors."""

    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    bad: str | list[str] | None = None
    bad_token_ids: list[int] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    top_p: float | None = None
    top_p_min: float | None = None
    top_p_reset_ids: int | None = None
    top_p_decay: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    beam_search_diversity_rate: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    prompt_ignore_length: int | None = None
    length_penalty: float | None = None
    early_stopping: int | None = None
    no_repeat_ngram_size: int | None = None
    min_p: float | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = True
    return_perf_metrics: bool = False
    guided_decoding: GuidedDecodingParams | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.pad_id is None:
            self.pad_id = self.end_id
        self.best_of = self.best_of or self.n
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError(f"require 0 <= top_p <= 1, got top_p={self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"require top_k >= 0, got top_k={self.top_k}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"require temperature >= 0, got temperature={self.temperature}")
        if self.guided_decoding is not None:
            self.guided_decoding._validate()
        self.logprobs = self.logprobs and int(self.logprobs)


@dataclass(kw_only=True)
class KvCacheConfig:
    enable_block_reuse: bool = True
    max_tokens: int | None = None
    max_attention_window: list[int] | None = None
    sink_token_length: int | None = None
    free_gpu_memory_fraction: float | None = 0.9
    host_cache_size: int | None = None
    onboard_blocks: bool = True
    cross_kv_cache_fraction: float | None = None
    secondary_offload_min_priority: int | None = None
    event_buffer_max_size: int = 0
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True
    dtype: str = "auto"


@dataclass(kw_only=True)
class DraftTargetDecodingConfig:
    max_draft_len: int | None = None
    speculative_model_dir: str | Path | None = None


@dataclass(kw_only=True)
class EagleDecodingConfig:
    max_draft_len: int | None = None
    speculative_model_dir: str | Path | None = None
    eagle3_one_model: bool | None = True


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    _last_token_ids_len: int = 0
    _last_logprobs_len: int = 0

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len :]

    @property
    def logprobs_diff(self) -> list[dict[int, Logprob]]:
        return self.logprobs[self._last_logprobs_len :]


# The keyword arguments the double's LLM accepts: TorchLlmArgs fields the backend may send, and a few more.
LLM_ARGS = frozenset({
    "model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code", "tensor_parallel_size",
    "pipeline_parallel_size", "dtype", "revision", "tokenizer_revision", "max_batch_size", "max_num_tokens",
    "max_seq_len", "max_beam_width", "kv_cache_config", "enable_chunked_prefill", "speculative_config",
    "guided_decoding_backend", "enable_iter_perf_stats", "return_perf_metrics", "stream_interval",
    "fail_fast_on_attention_window_too_large", "disable_overlap_scheduler", "cuda_graph_config",
})  # fmt: skip


@dataclass
class _Response:
    """What one executor response carries to the consumer (result.py applies it there, in order)."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    finish_reason: str | None = None
    stop_word: bool = False
    error: str | None = None


class RequestOutput:
    """One request: responses are made by the engine thread and applied on the event loop that submitted it."""

    def __init__(self, request_id: int, prompt: list[int], params: SamplingParams, streaming: bool,
                 llm: FakeLLM) -> None:  # fmt: skip
        self.request_id = request_id
        self.prompt_token_ids = prompt
        self.sampling_params = params
        self.streaming = streaming
        self.outputs = [CompletionOutput(0)]
        self.finished = False
        self._llm = llm
        self._loop = asyncio.get_running_loop()  # GenerationResult uses an AsyncQueue when a loop runs
        self._responses: asyncio.Queue[_Response] = asyncio.Queue()
        self.generated: list[int] = []  # engine side: every token made, a stop word's too
        self.logprobs: list[dict[int, Logprob]] = []
        self.sent = 0
        self.blocks = 0

    def abort(self) -> None:
        self._llm.abort_request(self.request_id)

    def _send(self, response: _Response) -> None:
        """Engine thread."""
        with contextlib.suppress(RuntimeError):  # the consumer's loop is closed: nobody reads this request any more
            self._loop.call_soon_threadsafe(self._responses.put_nowait, response)

    def __aiter__(self) -> RequestOutput:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        response = await self._responses.get()
        if response.error is not None:
            self.finished = True
            raise RequestError(response.error)
        completion = self.outputs[0]
        completion._last_token_ids_len = len(completion.token_ids)
        completion._last_logprobs_len = len(completion.logprobs)
        completion.token_ids.extend(response.tokens)
        completion.logprobs.extend(response.logprobs)
        if response.stop_word:  # result.py: a stop word's ids leave token_ids unless include_stop_str_in_output
            completion.stop_reason = completion.token_ids.pop()
        if response.finish_reason is not None:
            completion.finish_reason = response.finish_reason
            self.finished = True
        return self


@dataclass
class _Live:
    output: RequestOutput
    cancelled: bool = False


class FakeLLM:
    """`tensorrt_llm.LLM`: loads a checkpoint folder, runs one engine thread."""

    fake: FakeLlmApi  # set on the class the fake package exports

    def __init__(self, model: str | Path, **kwargs: Any) -> None:
        invalid = sorted(set(kwargs) - LLM_ARGS)
        if invalid:
            raise ValueError(f"LLM got invalid argument: {invalid[0]}")
        fake = self.fake
        fake.load_calls.append(kwargs)
        tensor_parallel = kwargs.get("tensor_parallel_size", 1)
        if tensor_parallel > fake.gpus:
            raise RuntimeError(f"Only {fake.gpus} GPUs are available, but {tensor_parallel} are required.")
        folder = Path(model)
        config = json.loads((folder / "config.json").read_text())  # a Hugging Face checkpoint, not an engine
        if "build_config" in config:
            raise ValueError(f"{folder} is a TensorRT engine; the PyTorch backend serves Hugging Face checkpoints")
        quant = folder / "hf_quant_config.json"
        self.quant_algo = json.loads(quant.read_text())["quantization"]["quant_algo"] if quant.is_file() else None
        speculative = kwargs.get("speculative_config")
        if speculative is not None and not (
            speculative.max_draft_len and Path(speculative.speculative_model_dir).is_dir()
        ):
            raise ValueError("speculative_config needs max_draft_len > 0 and speculative_model_dir, a local folder")
        self.model_dir = folder
        self.kwargs = kwargs
        self.args = types.SimpleNamespace(backend="pytorch", **kwargs)
        self.max_seq_len = kwargs.get("max_seq_len") or config.get("max_position_embeddings", 2048)
        self.max_num_tokens = kwargs.get("max_num_tokens") or 8192
        self.max_batch_size = kwargs.get("max_batch_size") or 2048
        self.chunked = bool(kwargs.get("enable_chunked_prefill", False))
        kv_config = kwargs.get("kv_cache_config") or KvCacheConfig()
        self.kv_blocks = fake.kv_blocks
        if kv_config.max_tokens is not None:
            self.kv_blocks = min(self.kv_blocks, kv_config.max_tokens // TOKENS_PER_BLOCK)
        self._fit_max_seq_len(bool(kwargs.get("fail_fast_on_attention_window_too_large")))
        self._blocks = BlockCache(TOKENS_PER_BLOCK, enabled=kv_config.enable_block_reuse)
        self.model = FakeModel(vocab_size=config.get("vocab_size", fake.model.vocab_size), scripts=fake.model.scripts,
                               failing_prompts=fake.model.failing_prompts,
                               failing_step_prompts=fake.model.failing_step_prompts)  # fmt: skip
        self._lock = threading.Lock()
        self._queue: deque[_Live] = deque()
        self._active: list[_Live] = []
        self._by_id: dict[int, _Live] = {}
        self._next_id = 1
        self._stats: list[dict[str, Any]] = []
        self._iteration = 0
        self._stopping = threading.Event()
        self._shutdown = False
        self.requests: list[RequestOutput] = []
        self.batch_sizes: list[int] = []
        fake.llms.append(self)
        self._thread = threading.Thread(target=self._run, name="fake-llm-engine", daemon=True)
        self._thread.start()

    def _fit_max_seq_len(self, fail_fast: bool) -> None:
        """A KV cache that cannot hold one max_seq_len sequence: fail the load, or lower max_seq_len to what fits."""
        capacity = self.kv_blocks * TOKENS_PER_BLOCK
        if capacity >= self.max_seq_len:
            return
        message = (
            f"Attention window too large: the KV cache holds {capacity} tokens, fewer than one sequence of "
            f"max_seq_len {self.max_seq_len}"
        )
        if fail_fast:
            raise RuntimeError(message)
        self.fake.warnings.append(f"{message}; max_seq_len lowered to {capacity}")
        self.max_seq_len = capacity

    def generate_async(
        self,
        inputs: list[int],
        sampling_params: SamplingParams | None = None,
        lora_request: Any = None,
        prompt_adapter_request: Any = None,
        streaming: bool = False,
        **kwargs: Any,
    ) -> RequestOutput:
        if self._shutdown:
            raise RuntimeError("LLM is shutting down")
        if not isinstance(inputs, list) or not all(isinstance(t, int) for t in inputs):
            raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")
        params = sampling_params or SamplingParams()
        if params.end_id is None:
            raise ValueError("tokenizer is required to reset end_id if it is None")
        if not self.chunked and len(inputs) > self.max_num_tokens:
            raise ValueError(
                f"The sum of prompt length ({float(len(inputs))}), query length (0) should not exceed "
                f"max_num_tokens ({self.max_num_tokens})"
            )
        if params.guided_decoding is not None and self.kwargs.get("guided_decoding_backend") is None:
            raise ValueError("guided decoding needs the LLM's guided_decoding_backend (xgrammar or llguidance)")
        with self._lock:
            output = RequestOutput(self._next_id, list(inputs), params, streaming, self)
            self._next_id += 1
            live = _Live(output)
            self._queue.append(live)
            self._by_id[output.request_id] = live
            self.requests.append(output)
        return output

    def abort_request(self, request_id: int) -> None:
        with self._lock:
            live = self._by_id.get(request_id)
            if live is not None:
                live.cancelled = True

    def get_stats(self, timeout: float | None = 2) -> list[dict[str, Any]]:
        if not self.kwargs.get("enable_iter_perf_stats"):
            return []
        with self._lock:
            stats, self._stats = self._stats, []
        return stats

    def shutdown(self) -> None:
        self._shutdown = True
        self._stopping.set()
        self._thread.join(timeout=10)

    # -- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                self._admit()
                busy = bool(self._active)
                if busy:
                    self._iterate()
            time.sleep(self.fake.iteration_seconds if busy else 0.001)

    def _admit(self) -> None:
        while self._queue and len(self._active) < self.max_batch_size:
            live = self._queue[0]
            output = live.output
            max_tokens = min(output.sampling_params.max_tokens, self.max_seq_len - len(output.prompt_token_ids))
            output.sampling_params.max_tokens = max_tokens
            output.blocks = -(-(len(output.prompt_token_ids) + max_tokens) // TOKENS_PER_BLOCK)
            if output.blocks > self.kv_blocks - sum(a.output.blocks for a in self._active):
                return
            self._queue.popleft()
            self._blocks.admit(output.prompt_token_ids)
            self._active.append(live)

    def _iterate(self) -> None:
        self._iteration += 1
        self.batch_sizes.append(len(self._active))
        error = next(filter(None, map(self._step_error, self._active)), None)
        if error is not None:
            for live in self._active:  # PyExecutor's error handling: every request of the step fails
                self._finish(live, f"Encountered an error in forward: {error}")
            self._active.clear()
            return
        for live in list(self._active):
            reason = "cancelled" if live.cancelled else self._decode(live.output)
            if reason is not None or live.output.streaming:
                self._respond(live, reason)
            if reason is not None:
                self._active.remove(live)
        used = sum(a.output.blocks for a in self._active)
        stats = self._blocks.stats(self.kv_blocks, used)
        self._stats.append({
            "iter": self._iteration,
            "numActiveRequests": len(self._active),
            "numQueuedRequests": len(self._queue),
            "kvCacheStats": {
                "maxNumBlocks": stats["max_num_blocks"], "freeNumBlocks": stats["free_num_blocks"],
                "usedNumBlocks": stats["used_num_blocks"], "tokensPerBlock": stats["tokens_per_block"],
                "allocTotalBlocks": stats["alloc_total_blocks"], "allocNewBlocks": stats["alloc_new_blocks"],
                "reusedBlocks": stats["reused_blocks"], "missedBlocks": stats["missed_blocks"],
                "cacheHitRate": stats["cache_hit_rate"],
            },
        })  # fmt: skip

    def _step_error(self, live: _Live) -> str | None:
        """Why a step holding this request fails: an injected failure, or a guide the matcher cannot be built for."""
        if tuple(live.output.prompt_token_ids) in self.model.failing_step_prompts:
            return "injected step failure"
        guided = live.output.sampling_params.guided_decoding
        return None if guided is None else _grammar_error(guided)

    def _decode(self, output: RequestOutput) -> str | None:
        """One token; the finish reason if the request ended."""
        params, prompt = output.sampling_params, output.prompt_token_ids
        if tuple(prompt) in self.model.failing_prompts:
            return "error"
        guided = params.guided_decoding
        if guided is not None:
            script = self.fake.guided_outputs[guided.kind]
            if len(output.generated) == len(script):
                return "stop"  # the grammar is complete: the matcher accepts only the end
            token = script[len(output.generated)]
        else:
            token = self.model.next_token(prompt, output.generated)
        end_id = -1 if params.ignore_eos else params.end_id
        if token == end_id:
            return "stop"
        if params.logprobs:
            output.logprobs.append(self._logprobs(output, token, params.logprobs))
        output.generated.append(token)
        if not params.ignore_eos and token in (params.stop_token_ids or []):
            return "stop_word"
        return "length" if len(output.generated) >= params.max_tokens else None

    def _logprobs(self, output: RequestOutput, token: int, k: int) -> dict[int, Logprob]:
        """The k most likely tokens by raw log-softmax, and the sampled one, each with its rank."""
        ranked = {t: Logprob(lp, rank) for rank, (t, lp) in enumerate(self.model.distribution(
            output.prompt_token_ids, output.generated), 1)}  # fmt: skip
        return {token: ranked.get(token, Logprob(float("-inf"), None)), **dict(list(ranked.items())[:k])}

    def _respond(self, live: _Live, reason: str | None) -> None:
        output = live.output
        if reason == "error":
            self._finish(live, error="injected failure for this prompt")
            return
        new_tokens, new_logprobs = output.generated[output.sent :], output.logprobs[output.sent :]
        output.sent = len(output.generated)
        finish = "stop" if reason == "stop_word" else reason
        output._send(_Response(new_tokens, new_logprobs, finish, stop_word=reason == "stop_word"))
        if reason is not None:
            self._by_id.pop(output.request_id, None)

    def _finish(self, live: _Live, error: str) -> None:
        self._by_id.pop(live.output.request_id, None)
        live.output._send(_Response([], [], error=error))


@dataclass
class FakeLlmApi:
    """State of the fake `tensorrt_llm` package for the LLM API; tests read what the backend did from here."""

    model: FakeModel = field(default_factory=FakeModel)  # its scripts and failures apply to every LLM
    version: str = "1.2.0"
    gpus: int = 1
    kv_blocks: int = 4096
    iteration_seconds: float = 0.0
    guided_outputs: dict[str, list[int]] = field(default_factory=dict)  # GuidedDecodingParams kind -> tokens
    llms: list[FakeLLM] = field(default_factory=list)  # the LLMs that loaded
    load_calls: list[dict[str, Any]] = field(default_factory=list)  # LLM(...)'s keyword arguments, loaded or not
    warnings: list[str] = field(default_factory=list)  # what TensorRT-LLM would log as a warning

    @property
    def llm(self) -> FakeLLM:
        return self.llms[-1]

    def modules(self) -> dict[str, types.ModuleType]:
        package = types.ModuleType("tensorrt_llm")
        package.__path__ = []
        package.__version__ = self.version
        llm_class = type("LLM", (FakeLLM,), {"fake": self})
        llmapi = types.ModuleType("tensorrt_llm.llmapi")
        exported = (SamplingParams, GuidedDecodingParams, KvCacheConfig, DraftTargetDecodingConfig,
                    EagleDecodingConfig, CompletionOutput, RequestOutput, RequestError)  # fmt: skip
        for cls in exported:
            setattr(llmapi, cls.__name__, cls)
        llmapi.LLM = package.LLM = llm_class
        package.SamplingParams = SamplingParams
        package.llmapi = llmapi
        return {"tensorrt_llm": package, "tensorrt_llm.llmapi": llmapi}

    def install(self, monkeypatch: Any = None) -> FakeLlmApi:
        """Into `sys.modules`: for one test through a pytest MonkeyPatch, or for the process (a server)."""
        install_modules(self.modules(), None if monkeypatch is None else monkeypatch.setitem)
        return self

    @classmethod
    def for_server(cls, environ: dict[str, str] | None = None) -> FakeLlmApi:
        """The double a server process under test runs with; FAKE_TRTLLM_ITERATION_SECONDS slows its steps."""
        environ = os.environ if environ is None else environ
        return cls(iteration_seconds=float(environ.get("FAKE_TRTLLM_ITERATION_SECONDS", "0")))


def sitecustomize_source(repo_root: Path) -> str:
    """A `sitecustomize.py` that installs the double in every Python process started with it on PYTHONPATH."""
    return (
        "import sys\n"
        f"sys.path.insert(0, {str(repo_root)!r})\n"
        "from tests.doubles.trtllm_llmapi import FakeLlmApi\n"
        "FakeLlmApi.for_server().install()\n"
    )
