"""The `tensorrt_llm` backend: a prebuilt TensorRT-LLM engine (trtllm-build output) served by one engine thread.

Contract (`model/backends/base.py`): prompt ids in, `TokenChunk`s of new ids out. No chunk holds the
prompt or the end token; the last chunk says "stop" (end or stop token) or "length" (max_new_tokens or
the engine's max_seq_len). An error inside the engine for one request fails that request alone.
`tensorrt_llm` is imported only in `load` (it needs a GPU). Concurrent requests are never serialized:

- `trtllm_runner: cpp` (default): in-flight batching. `ModelRunnerCpp.from_dir(...)` builds the C++
  `Executor` (`runner.session`). `runner.generate()` is never called: it blocks until its own batch is
  done and is not safe to call from several threads. The engine thread (`BatchingBackend._run`) is the
  Executor's only caller. Each `_step` enqueues every new request as its own streaming `Request` (the
  Executor batches it in flight with the running ones), cancels closed streams with `cancel_request`,
  waits at most `POLL` in `await_responses`, and hands each `Response` to the stream its `request_id`
  belongs to.
- `trtllm_runner: cpp` with `draft_model_repo`: draft-target speculative decoding (`SpeculativeEngine`),
  TensorRT-LLM's run_dtm_pld.py loop per request instead of per batch. Two `ModelRunnerCpp`
  (target, then draft; orchestrator mode and KV-cache block reuse, as run_dtm_pld.py builds them). Each
  round of a request: the draft decodes up to max_draft_len greedy tokens of the sequence (a
  non-streaming request); the target gets the same sequence with them as `ExternalDraftTokensConfig`
  and max_tokens = len(draft) + 1, and returns the draft tokens it accepted plus one of its own (greedy
  verification: token comparison, run.py's `use_logits=False`). Those go to the stream; the next round
  starts from the longer sequence. Every request has one call in flight; all requests' calls are in
  flight together; an error or cancel touches only that call. A sampled request's target samples with
  seed + round. Sequences stay below both engines' max_input_len + 1 (each round is a new request).
- `trtllm_runner: python` (`ModelRunner`, the Python session): the weaker mode, dynamic static
  batching. It has no Executor; one `generate()` decodes one fixed batch. The loop gathers the waiting
  requests into a batch (at most max_batch_size; one `ignore_eos` value; longest prompt + largest
  max_new_tokens within max_seq_len), advances it one decode step per `_step` and starts the next batch
  when it ends. Requests arriving meanwhile wait for it; a finished or cancelled row keeps costing
  compute until its batch ends; an exception in `generate` fails its whole batch.

Tokens, as the sources define them:
- Executor, `streaming=True`: a response carries only the ids made since the previous one, never the
  prompt; the end token is never output (sequence lengths exclude it), a stop word's token is, so a
  trailing stop id is dropped here. `finish_reasons[0]`: END_ID/STOP_WORDS -> "stop", LENGTH -> "length".
- ModelRunner: `output_ids` [batch, beams, max_seq_len] hold the prompt, then the generated ids, then
  padding (pad/end ids); `sequence_lengths` [batch, beams] exclude the end token; streaming yields the
  cumulative tensors after each decode step. A row's new ids are `output_ids[row, 0, seen:length]`; a
  row that did not grow over a step has ended on its end token.

Sampling per request: temperature 0 (or top_k 1) is greedy (top_k=1); otherwise temperature, top_k (0 =
off), top_p, repetition_penalty and a seed (a random one when the request brings none: the engine's
default seed is 0, so every unseeded request would draw the same numbers). `ignore_eos` sends end_id=-1
and no stop words, as TensorRT-LLM's own LLM API does.

Multi-GPU (a TP x PP engine, `pretrained_config.mapping` in config.json):
- one process, no mpirun (a Kubernetes pod): orchestrator mode. `from_dir(..., is_orchestrator_mode=True)`
  makes the Executor spawn its tp*pp `executorWorker` processes through MPI; this process serves.
- `mpirun -n <tp*pp>`: leader mode. Every rank builds its Executor; only rank 0 can enqueue, so rank 0
  runs the server and ranks 1..N-1 call `serve_worker_rank(settings, engine_dir)` instead, which blocks
  until rank 0 shuts down: an MPMD launch, `mpirun -n 1 <server command> : -n <N-1> <worker command>`.
The python runner serves one-rank engines only.

Checked against NVIDIA/TensorRT-LLM through the code index (1.2.0rc2 is commit b35ac1b6):
- runtime/model_runner_cpp.py, the stored 1.x revision that has `fail_fast_on_attention_window_too_large`
  (the index did not name its commit): the `from_dir` keywords used here, `self.session = executor`,
  `_stream`/`_fill_output` (deltas appended to the prompt), `session.can_enqueue_requests()`. Revision
  03832911 (older, no fail_fast) names the attribute `executor`; `executor_of` accepts both.
- runtime/model_runner.py and runtime/generation.py (same 1.x line): `ModelRunner.from_dir` keywords,
  `generate(..., streaming, **sampling kwargs)`, per-row [batch] tensors and their dtypes,
  `decode_stream`, output_ids layout and padding.
- cpp/tensorrt_llm/nanobind/executor/{executor.cpp,executor.h,request.cpp} (1dd50d07, 0243026f, 008b2b8d)
  and pybind/executor/request.cpp (007a7508): Executor methods and argument names (`await_responses`
  releases the GIL while it waits), `Request`, `SamplingConfig`, `OutputConfig`, `Response`,
  `Result.finish_reasons`, `FinishReason` values.
- cpp/tensorrt_llm/executor/executorImpl.cpp at b35ac1b6: orchestrator spawn with MPI world size 1,
  leader mode needs world size == tp*pp*cp, `await_responses` returns [] on timeout,
  `can_enqueue_requests`, `cancel_request`, a worker rank's `shutdown()` joins its loop until the leader ends.
- cpp/tensorrt_llm/batch_manager/llmRequest.cpp (119c6e60) `createResult`: streaming deltas, prompt only
  in non-streaming output; the sampling-kernel tests: sequence length excludes the end token.
- executor worker (`end_id=-1 if ignore_eos`, `await_responses(timeout=timedelta(...))`),
  examples/run.py and examples/utils.py (pad_id falls back to end_id), _utils.py (000a01de, 1.0.0rc4).
- Draft-target: examples/draft_target_model/README.md (11925f62: target built with draft_tokens_external
  and max_draft_len, block reuse required, C++ runtime only, no beams); examples/prompt_lookup/run_dtm_pld.py
  (c3a2348d, the loop run.py calls: draft generate of draft_len, target generate with the draft tokens and
  max_new_tokens = draft_len + 1, every target token kept, both runners in orchestrator mode with
  `kv_cache_enable_block_reuse`); examples/cpp/executor/executorExampleFastLogits.cpp (the same with two
  Executors: target request with maxNewTokens = draft + 1 and `ExternalDraftTokensConfig`,
  `KvCacheConfig(enableBlockReuse)`); pybind/executor/request.cpp (`ExternalDraftTokensConfig(tokens,
  logits=None, acceptance_threshold=None, fast_logits=None)`, `Request(external_draft_tokens_config=...)`);
  the executor bindings test `test_request_perf_metrics_draft` (4 draft tokens, 2 accepted: 3 new tokens,
  final after one iteration); models/modeling_utils.py and builder.py (`SpeculativeDecodingMode` IntFlag,
  DRAFT_TOKENS_EXTERNAL = 2; `build_config.max_draft_len` / `speculative_decoding_mode` in config.json).
Only against the double (tests/doubles/trtllm.py): that the Executor accepts these calls at runtime,
orchestrator spawning on a real node, end_id=-1 in the Python session, and all timing. For draft-target:
the finish reason of a verification round (LENGTH and NOT_FINISHED are both taken as "round over"), how
config.json spells the mode (the int and the name are both accepted), two Executors in one process on
one GPU (memory: the target is built first and takes kv_cache_free_gpu_memory_fraction of what is free,
the draft the same share of the rest), and the speed-up.
"""

from __future__ import annotations

import datetime
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from model.artifacts import Artifacts
from model.backends.base import BatchingBackend, FinishReason, Limits, SamplingParams, Submission, TokenStream
from model.errors import ArtifactError, BackendError, EngineMismatchError
from model.prompting import stop_token_ids
from model.settings import ServerSettings, SettingsError

logger = logging.getLogger(__name__)

POLL = datetime.timedelta(milliseconds=10)  # longest wait in await_responses before new requests get in
DRAFT_TOKENS_EXTERNAL = 2  # SpeculativeDecodingMode.DRAFT_TOKENS_EXTERNAL, an IntFlag (NONE = 1) in config.json


@dataclass(frozen=True)
class EngineSpec:
    """What trtllm-build wrote to the engine's `config.json`: build limits and parallel layout."""

    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    vocab_size: int
    tp_size: int
    pp_size: int
    world_size: int  # ranks, one per GPU
    max_draft_len: int = 0  # draft tokens one target step can verify (trtllm-build --max_draft_len)
    draft_tokens_external: bool = False  # built with --speculative_decoding_mode draft_tokens_external

    @classmethod
    def read(cls, engine_dir: Path) -> EngineSpec:
        path = Path(engine_dir) / "config.json"
        try:
            config = json.loads(path.read_text())
            build, pretrained = config["build_config"], config["pretrained_config"]
            mapping = pretrained.get("mapping", {})
            tp_size, pp_size = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
            return cls(
                max_batch_size=int(build["max_batch_size"]),
                max_input_len=int(build["max_input_len"]),
                max_seq_len=int(build["max_seq_len"]),
                vocab_size=int(pretrained["vocab_size"]),
                tp_size=tp_size,
                pp_size=pp_size,
                world_size=int(mapping.get("world_size", tp_size * pp_size)),
                max_draft_len=int(build.get("max_draft_len") or 0),
                draft_tokens_external=_is_draft_tokens_external(build.get("speculative_decoding_mode")),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(
                f"{path} is not a trtllm-build engine config ({type(exc).__name__}: {exc}); point model_repo "
                "(and subfolder) at the folder trtllm-build wrote, with config.json and rank<N>.engine"
            ) from exc


def _is_draft_tokens_external(mode: Any) -> bool:
    """The IntFlag's value, or its name should a TensorRT-LLM version write the enum as a string."""
    return mode == DRAFT_TOKENS_EXTERNAL or "draft_tokens_external" in str(mode).lower()


def engine_limits(settings: ServerSettings, engine: EngineSpec) -> Limits:
    """The engine's build limits, lowered by the settings; settings above the engine are refused."""
    max_batch_size = _within_engine("max_batch_size", settings.max_batch_size, engine.max_batch_size)
    max_seq_len = _within_engine("max_seq_len", settings.max_seq_len, engine.max_seq_len)
    max_input_len = _within_engine("max_input_len", settings.max_input_len, engine.max_input_len)
    max_input_len = min(max_input_len, max_seq_len - 1)  # leave room for at least one new token
    return Limits(
        max_input_len=max_input_len,
        max_seq_len=max_seq_len,
        max_new_tokens=min(settings.max_new_tokens_limit, max_seq_len - 1),
        max_batch_size=max_batch_size,
    )


def _within_engine(name: str, wanted: int | None, built: int) -> int:
    if wanted is None:
        return built
    if wanted > built:
        raise SettingsError(
            f"{name}={wanted} exceeds this engine's build limit {built} (build_config.{name} in config.json); "
            f"set {name} (LLM_{name.upper()}) to at most {built}, or rebuild the engine with a larger {name}"
        )
    return wanted


@dataclass(frozen=True)
class TokenIds:
    end_id: int
    pad_id: int
    stop_ids: frozenset[int]  # end_id included


def token_ids(tokenizer: PreTrainedTokenizerBase, artifacts: Artifacts, engine: EngineSpec) -> TokenIds:
    """end_id = the tokenizer's EOS; pad_id = its pad token, else end_id (as examples/utils.py does)."""
    stops = stop_token_ids(tokenizer, artifacts.model_dir, artifacts.tokenizer_dir)
    end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(stops, default=None)
    if end_id is None:
        raise ArtifactError(
            f"the tokenizer at {artifacts.tokenizer_dir} has no EOS token and no generation_config.json lists one, "
            "so generation could never stop; use the tokenizer the engine was built from (tokenizer_repo)"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    outside = sorted(t for t in {end_id, *stops} if not 0 <= t < engine.vocab_size)  # pad may be an added token
    if outside:
        raise EngineMismatchError(
            f"special token ids {outside} of the tokenizer at {artifacts.tokenizer_dir} are outside this engine's "
            f"vocabulary ({engine.vocab_size}), so it is not the engine's tokenizer; set tokenizer_repo to the "
            "model the engine was built from"
        )
    return TokenIds(int(end_id), int(pad_id), frozenset({int(end_id), *stops}))


class _Engine(Protocol):
    """One way of driving TensorRT-LLM from the engine thread."""

    def has_work(self) -> bool: ...

    def step(self, new: list[Submission], cancelled: set[int]) -> None: ...

    def fail_all(self, exc: BaseException) -> None: ...

    def close(self) -> None: ...


class TrtllmBackend(BatchingBackend):
    name = "tensorrt_llm"

    def __init__(self, engine: _Engine, limits: Limits, stop_ids: frozenset[int]) -> None:
        super().__init__(limits, stop_ids)
        self.engine = engine

    @classmethod
    def load(
        cls,
        settings: ServerSettings,
        artifacts: Artifacts,
        tokenizer: PreTrainedTokenizerBase,
        fetch: Callable[[ServerSettings], Artifacts] | None = None,
    ) -> TrtllmBackend:
        """Refuse a foreign engine or impossible settings first, then build the configured runner.

        `fetch` is `model.artifacts.resolve_artifacts` bound to this deployment's cache and token; only a
        draft engine (settings.draft_model_repo) needs it, to be found the way the target was.
        """
        from model.engine_meta import verify_engine_compatible

        engine_dir = artifacts.model_dir
        verify_engine_compatible(engine_dir)  # before TensorRT deserializes anything
        spec = EngineSpec.read(engine_dir)
        limits = engine_limits(settings, spec)
        ids = token_ids(tokenizer, artifacts, spec)
        draft = load_draft(settings, spec, artifacts, fetch) if settings.draft_model_repo else None
        if settings.trtllm_runner == "python":
            engine: _Engine = StaticBatchEngine.build(spec, limits, ids, engine_dir)
        elif draft is not None:
            limits = speculative_limits(limits, spec, draft.spec)
            engine = SpeculativeEngine.build(settings, limits, ids, engine_dir, draft)
        else:
            engine = ExecutorEngine.build(settings, spec, limits, ids, engine_dir)
        logger.info(
            "tensorrt_llm backend: %s runner, %d rank(s), end_id %d, stop ids %s, %s",
            settings.trtllm_runner,
            spec.world_size,
            ids.end_id,
            sorted(ids.stop_ids),
            f"draft-target with {draft.draft_len} draft tokens from {draft.engine_dir}" if draft else "no draft",
        )
        return cls(engine, limits, ids.stop_ids)

    def _has_work(self) -> bool:
        return self.engine.has_work()

    def _step(self, new: list[Submission], cancelled: set[int]) -> None:
        self.engine.step(new, cancelled)

    def _fail_all(self, exc: BaseException) -> None:
        self.engine.fail_all(exc)

    def _close(self) -> None:
        self.engine.close()


# -- cpp runner: the Executor ----------------------------------------------------------------------


class ExecutorEngine:
    """In-flight batching by the C++ Executor; every call to it comes from the engine thread."""

    def __init__(self, runner: Any, api: ModuleType, ids: TokenIds) -> None:
        self._runner = runner  # owns the Executor; keep it alive
        self._executor = executor_of(runner)
        self._api = api  # tensorrt_llm.bindings.executor
        self._ids = ids
        self._stop_words = _stop_words(ids)
        self._reasons = _finish_reasons(api)
        self._by_executor_id: dict[int, Submission] = {}
        self._executor_ids: dict[int, int] = {}  # Submission.request_id -> Executor request id

    @classmethod
    def build(
        cls, settings: ServerSettings, spec: EngineSpec, limits: Limits, ids: TokenIds, engine_dir: Path
    ) -> ExecutorEngine:
        from tensorrt_llm.bindings import executor as api

        rank, orchestrator = _launch_layout(spec)
        if rank != 0:
            raise EngineMismatchError(
                f"this is rank {rank} of an `mpirun -n {spec.world_size}` launch; only rank 0 serves, the other "
                "ranks must run model.backends.trtllm.serve_worker_rank (see that module's docstring)"
            )
        runner = _cpp_runner(settings, limits, engine_dir, rank=0, orchestrator=orchestrator)
        engine = cls(runner, api, ids)
        if not engine._executor.can_enqueue_requests():
            raise EngineMismatchError("the TensorRT-LLM Executor of rank 0 cannot enqueue requests; check the launch")
        return engine

    def has_work(self) -> bool:
        return bool(self._by_executor_id)

    def step(self, new: list[Submission], cancelled: set[int]) -> None:
        for submission in new:
            self._enqueue(submission)
        for request_id in cancelled:
            self._cancel(request_id)
        if self._by_executor_id:
            for response in self._executor.await_responses(timeout=POLL):
                self._dispatch(response)

    def fail_all(self, exc: BaseException) -> None:
        for submission in self._by_executor_id.values():
            submission.stream.fail(exc)
        self._by_executor_id.clear()
        self._executor_ids.clear()

    def close(self) -> None:
        self._executor.shutdown()

    def _enqueue(self, submission: Submission) -> None:
        request = _executor_request(
            self._api, self._ids, submission.prompt_ids, submission.params, streaming=True, stop_words=self._stop_words
        )
        executor_id = _enqueue_or_fail(self._executor, request, submission)
        if executor_id is not None:
            self._by_executor_id[executor_id] = submission
            self._executor_ids[submission.request_id] = executor_id

    def _cancel(self, request_id: int) -> None:
        executor_id = self._executor_ids.pop(request_id, None)
        if executor_id is None:  # already finished, or refused at enqueue
            return
        del self._by_executor_id[executor_id]  # its last (CANCELLED) response will find no one
        self._executor.cancel_request(executor_id)

    def _dispatch(self, response: Any) -> None:
        submission = self._by_executor_id.get(response.request_id)
        if submission is None:
            return
        if response.has_error():
            self._forget(response.request_id)
            submission.stream.fail(BackendError(f"TensorRT-LLM failed this request: {response.error_msg}"))
            return
        result = response.result
        tokens = list(result.output_token_ids[0])  # beam 0: the ids since the previous response
        if not result.is_final:
            if tokens:
                submission.stream.put(tokens)
            return
        self._forget(response.request_id)
        reason = self._reasons.get(result.finish_reasons[0])
        if reason is None:
            submission.stream.fail(BackendError(f"TensorRT-LLM ended this request with {result.finish_reasons[0]}"))
            return
        _finish(submission.stream, tokens, reason, self._ids.stop_ids)

    def _forget(self, executor_id: int) -> None:
        submission = self._by_executor_id.pop(executor_id)
        self._executor_ids.pop(submission.request_id, None)


def _executor_request(
    api: ModuleType,
    ids: TokenIds,
    prompt: list[int],
    params: SamplingParams,
    *,
    streaming: bool,
    stop_words: list[list[int]] | None,
    **extra: Any,
) -> Any:
    """One Executor `Request`: new ids only in its output, `max_tokens` = params.max_new_tokens (prompt excluded)."""
    return api.Request(
        input_token_ids=prompt,
        max_tokens=params.max_new_tokens,
        streaming=streaming,
        sampling_config=_executor_sampling(api, params),
        output_config=api.OutputConfig(exclude_input_from_output=True),
        end_id=-1 if params.ignore_eos else ids.end_id,
        pad_id=ids.pad_id,
        stop_words=None if params.ignore_eos else stop_words,
        **extra,
    )


def _enqueue_or_fail(executor: Any, request: Any, submission: Submission) -> int | None:
    """The Executor's id for `request`; if it refuses the arguments, this request fails and the others go on."""
    try:
        return executor.enqueue_request(request)
    except Exception as exc:
        logger.warning("TensorRT-LLM refused request %d: %s", submission.request_id, exc)
        submission.stream.fail(BackendError(f"TensorRT-LLM refused this request: {exc}"))
        return None


def _stop_words(ids: TokenIds) -> list[list[int]] | None:
    """Stop ids other than the end id, as one-token stop words (the end id stops by itself)."""
    return [[token] for token in sorted(ids.stop_ids - {ids.end_id})] or None


def _finish_reasons(api: ModuleType) -> dict[Any, FinishReason]:
    return {api.FinishReason.END_ID: "stop", api.FinishReason.STOP_WORDS: "stop", api.FinishReason.LENGTH: "length"}


def executor_of(runner: Any) -> Any:
    """The Executor inside a ModelRunnerCpp: `session` in the 1.x sources, `executor` in one older revision."""
    for attribute in ("session", "executor"):
        candidate = getattr(runner, attribute, None)
        if candidate is not None and hasattr(candidate, "enqueue_request"):
            return candidate
    raise EngineMismatchError(
        f"{type(runner).__name__} holds no TensorRT-LLM Executor (`session`); this backend targets TensorRT-LLM 1.0-1.2"
    )


def _executor_sampling(api: ModuleType, params: SamplingParams) -> Any:
    penalty = params.repetition_penalty if params.repetition_penalty != 1.0 else None
    if params.greedy:
        return api.SamplingConfig(1, top_k=1, repetition_penalty=penalty)
    # top_p is always sent: with neither top_k nor top_p set the Executor decodes greedily.
    return api.SamplingConfig(
        1,
        top_k=params.top_k or None,
        top_p=params.top_p,
        temperature=params.temperature,
        seed=_seed(params),
        repetition_penalty=penalty,
    )


def _launch_layout(spec: EngineSpec) -> tuple[int, bool]:
    """(this process's MPI rank, orchestrator mode?) for the engine's ranks and how we were launched."""
    from tensorrt_llm._utils import mpi_rank, mpi_world_size

    world = mpi_world_size()
    if world == spec.world_size:
        return mpi_rank(), False
    if world == 1:
        return 0, True
    raise EngineMismatchError(
        f"this process is one of {world} MPI ranks but the engine has {spec.world_size} "
        f"(tp_size={spec.tp_size}, pp_size={spec.pp_size}); launch it under `mpirun -n {spec.world_size}` "
        "(leader mode) or without mpirun (orchestrator mode: the Executor spawns its own workers)"
    )


def _cpp_runner(
    settings: ServerSettings,
    limits: Limits,
    engine_dir: Path,
    *,
    rank: int,
    orchestrator: bool,
    block_reuse: bool = False,
) -> Any:
    from tensorrt_llm.runtime import ModelRunnerCpp

    return ModelRunnerCpp.from_dir(
        str(engine_dir),
        rank=rank,
        max_batch_size=limits.max_batch_size,
        max_input_len=limits.max_input_len,
        max_beam_width=1,
        kv_cache_free_gpu_memory_fraction=settings.kv_cache_free_gpu_memory_fraction,
        enable_chunked_context=settings.enable_chunked_context,
        kv_cache_enable_block_reuse=block_reuse,
        is_orchestrator_mode=orchestrator,
    )


def serve_worker_rank(settings: ServerSettings, engine_dir: Path) -> None:
    """Ranks 1..N-1 of a leader-mode launch: build this rank's Executor, then block until rank 0 stops.

    A non-leader Executor takes its requests from rank 0 over MPI; its `shutdown()` joins the
    execution loop, which ends when rank 0's Executor shuts down.
    """
    from model.engine_meta import verify_engine_compatible

    verify_engine_compatible(engine_dir)
    spec = EngineSpec.read(engine_dir)
    rank, orchestrator = _launch_layout(spec)
    if orchestrator or rank == 0:
        raise EngineMismatchError(
            f"serve_worker_rank is for ranks 1..{spec.world_size - 1} of an `mpirun -n {spec.world_size}` "
            "launch; rank 0 (or a process outside mpirun) serves with TrtllmBackend.load"
        )
    runner = _cpp_runner(settings, engine_limits(settings, spec), engine_dir, rank=rank, orchestrator=False)
    logger.info("rank %d of %d is serving its engine shard until rank 0 shuts down", rank, spec.world_size)
    executor_of(runner).shutdown()


# -- cpp runner with a draft engine: draft-target speculative decoding ------------------------------


@dataclass(frozen=True)
class Draft:
    """A draft engine checked against its target, and how many tokens it proposes per round."""

    engine_dir: Path
    spec: EngineSpec
    draft_len: int


def load_draft(
    settings: ServerSettings,
    target: EngineSpec,
    artifacts: Artifacts,
    fetch: Callable[[ServerSettings], Artifacts] | None,
) -> Draft:
    """Find the draft as the target was found, then refuse a pairing TensorRT-LLM cannot serve."""
    from model.engine_meta import verify_engine_compatible

    if not target.draft_tokens_external:
        raise EngineMismatchError(
            f"draft_model_repo is set but the target engine at {artifacts.model_dir} was not built for external "
            "draft tokens (build_config.speculative_decoding_mode in config.json); rebuild it with "
            "--speculative_decoding_mode draft_tokens_external --max_draft_len N (a `speculative` section in its "
            "engines/ spec), or unset draft_model_repo (LLM_DRAFT_MODEL_REPO)"
        )
    draft_len = settings.max_draft_len or target.max_draft_len
    if not 1 <= draft_len <= target.max_draft_len:
        raise SettingsError(
            f"max_draft_len={draft_len} exceeds the target engine's build limit {target.max_draft_len} "
            f"(build_config.max_draft_len in config.json); set max_draft_len (LLM_MAX_DRAFT_LEN) to at most "
            f"{target.max_draft_len}, or rebuild the target with a larger --max_draft_len"
        )
    if fetch is None:
        raise ArtifactError("draft_model_repo is set but TrtllmBackend.load got no fetch to resolve it with")
    try:
        found = fetch(draft_settings(settings, artifacts))
    except ArtifactError as exc:
        raise ArtifactError(
            f"draft engine: {exc} (the draft's settings: LLM_DRAFT_MODEL_REPO, LLM_DRAFT_SUBFOLDER)"
        ) from exc
    verify_engine_compatible(found.model_dir)
    spec = EngineSpec.read(found.model_dir)
    if spec.vocab_size != target.vocab_size:
        raise EngineMismatchError(
            f"the draft engine at {found.model_dir} has a vocabulary of {spec.vocab_size} tokens but the target has "
            f"{target.vocab_size}, so their token ids do not mean the same text; use a draft of the target's model "
            "family with the same tokenizer (Llama-3.2-1B for Llama-3.3-70B)"
        )
    return Draft(found.model_dir, spec, draft_len)


def draft_settings(settings: ServerSettings, target: Artifacts) -> ServerSettings:
    """What `resolve_artifacts` needs to find the draft: its repo and subfolder; the tokenizer is the target's."""
    same_repo = settings.draft_model_repo == settings.model_repo
    return settings.model_copy(
        update={
            "model_repo": settings.draft_model_repo,
            "subfolder": settings.draft_subfolder,
            "revision": settings.revision if same_repo else None,  # a pinned commit exists in its own repo only
            "allow_patterns": None,
            "tokenizer_repo": str(target.tokenizer_dir),  # a local folder: nothing to download
        }
    )


def speculative_limits(limits: Limits, target: EngineSpec, draft: EngineSpec) -> Limits:
    """Every round sends prompt + tokens so far as a new request: that must stay a valid input to both engines."""
    max_seq_len = min(limits.max_seq_len, target.max_input_len + 1, draft.max_input_len + 1, draft.max_seq_len)
    return Limits(
        max_input_len=min(limits.max_input_len, max_seq_len - 1),
        max_seq_len=max_seq_len,
        max_new_tokens=min(limits.max_new_tokens, max_seq_len - 1),
        max_batch_size=min(limits.max_batch_size, draft.max_batch_size),
    )


@dataclass
class _Speculation:
    """One request under draft-target decoding; exactly one of its calls (draft or target) is in flight."""

    submission: Submission
    sequence: list[int]  # prompt + accepted tokens: the next round's input
    seed: int  # round r samples with seed + r, so rounds of a sampled request draw different numbers
    generated: int = 0
    rounds: int = 0


@dataclass
class _Lane:
    """One Executor and the requests waiting for its responses, by its request ids."""

    executor: Any
    waiting: dict[int, _Speculation] = field(default_factory=dict)


class SpeculativeEngine:
    """Rounds of draft proposals and target verification over two Executors, all requests at once.

    A round of one request: the draft decodes up to draft_len greedy tokens of the sequence (one
    non-streaming request); the target gets the same sequence with them as external draft tokens and
    max_tokens = len(draft) + 1, and returns the ones it accepted plus one of its own. Those are the
    request's next tokens; the next round starts from the longer sequence.
    """

    def __init__(self, target: Any, draft: Any, api: ModuleType, ids: TokenIds, draft_len: int) -> None:
        self._runners = (target, draft)  # they own the Executors; keep them alive
        self._target = _Lane(executor_of(target))
        self._draft = _Lane(executor_of(draft))
        self._api = api
        self._ids = ids
        self._draft_len = draft_len
        self._stop_words = _stop_words(ids)
        self._reasons = _finish_reasons(api)
        # A verification round ends by its own max_tokens (LENGTH); NOT_FINISHED is accepted too, because a
        # response of fewer tokens than max_tokens is final after one step (tests/bindings) with no reason documented.
        self._round_ends = {api.FinishReason.LENGTH, api.FinishReason.NOT_FINISHED}
        self._where: dict[int, tuple[_Lane, int]] = {}  # Submission.request_id -> (lane, Executor id) in flight

    @classmethod
    def build(
        cls, settings: ServerSettings, limits: Limits, ids: TokenIds, engine_dir: Path, draft: Draft
    ) -> SpeculativeEngine:
        from tensorrt_llm._utils import mpi_world_size
        from tensorrt_llm.bindings import executor as api

        if mpi_world_size() != 1:
            raise EngineMismatchError(
                "draft-target decoding runs both engines in orchestrator mode, as TensorRT-LLM's run_dtm_pld.py "
                "does; start the server without mpirun"
            )
        # Inputs grow to max_seq_len - 1; block reuse keeps earlier rounds' KV cache (run_dtm_pld.py needs it too).
        runner_limits = replace(limits, max_input_len=limits.max_seq_len - 1)
        target = _cpp_runner(settings, runner_limits, engine_dir, rank=0, orchestrator=True, block_reuse=True)
        drafter = _cpp_runner(settings, runner_limits, draft.engine_dir, rank=0, orchestrator=True, block_reuse=True)
        return cls(target, drafter, api, ids, draft.draft_len)

    def has_work(self) -> bool:
        return bool(self._where)

    def step(self, new: list[Submission], cancelled: set[int]) -> None:
        for submission in new:
            self._next_round(_Speculation(submission, list(submission.prompt_ids), _seed(submission.params)))
        for request_id in cancelled:
            self._cancel(request_id)
        busy = [lane for lane in (self._draft, self._target) if lane.waiting]
        for lane in busy:  # await_responses returns once one is ready; the longest wait is shared out
            for response in lane.executor.await_responses(timeout=POLL / len(busy)):
                self._dispatch(lane, response)

    def fail_all(self, exc: BaseException) -> None:
        for lane in (self._draft, self._target):
            for speculation in lane.waiting.values():
                speculation.submission.stream.fail(exc)
            lane.waiting.clear()
        self._where.clear()

    def close(self) -> None:
        self._target.executor.shutdown()
        self._draft.executor.shutdown()

    def _next_round(self, speculation: _Speculation) -> None:
        """Ask the draft for tokens; when one token is left to make, ask the target alone."""
        room = speculation.submission.params.max_new_tokens - speculation.generated - 1  # the target adds one
        draft_len = min(self._draft_len, room)
        if draft_len > 0:
            proposal = SamplingParams(max_new_tokens=draft_len, ignore_eos=speculation.submission.params.ignore_eos)
            request = _executor_request(
                self._api, self._ids, speculation.sequence, proposal, streaming=False, stop_words=None
            )
            self._enqueue(self._draft, speculation, request)
        else:
            self._verify(speculation, [])

    def _verify(self, speculation: _Speculation, draft: list[int]) -> None:
        params = replace(
            speculation.submission.params, max_new_tokens=len(draft) + 1, seed=speculation.seed + speculation.rounds
        )
        request = _executor_request(
            self._api,
            self._ids,
            speculation.sequence,
            params,
            streaming=False,
            stop_words=self._stop_words,
            external_draft_tokens_config=self._api.ExternalDraftTokensConfig(draft) if draft else None,
        )
        self._enqueue(self._target, speculation, request)

    def _enqueue(self, lane: _Lane, speculation: _Speculation, request: Any) -> None:
        executor_id = _enqueue_or_fail(lane.executor, request, speculation.submission)
        if executor_id is not None:
            lane.waiting[executor_id] = speculation
            self._where[speculation.submission.request_id] = (lane, executor_id)

    def _cancel(self, request_id: int) -> None:
        where = self._where.pop(request_id, None)
        if where is None:  # finished, or refused at enqueue
            return
        lane, executor_id = where
        del lane.waiting[executor_id]  # its CANCELLED response will find no one
        lane.executor.cancel_request(executor_id)

    def _dispatch(self, lane: _Lane, response: Any) -> None:
        speculation = lane.waiting.pop(response.request_id, None)
        if speculation is None:
            return
        del self._where[speculation.submission.request_id]
        if response.has_error():
            speculation.submission.stream.fail(BackendError(f"TensorRT-LLM failed this request: {response.error_msg}"))
            return
        result = response.result  # non-streaming: the one final response, new ids only
        tokens = list(result.output_token_ids[0])
        if lane is self._draft:
            self._verify(speculation, tokens)
        else:
            self._accept(speculation, tokens, result.finish_reasons[0])

    def _accept(self, speculation: _Speculation, tokens: list[int], finish: Any) -> None:
        """Deliver a round's tokens, then finish the request or start its next round."""
        stream, params = speculation.submission.stream, speculation.submission.params
        if self._reasons.get(finish) == "stop":
            _finish(stream, tokens, "stop", self._ids.stop_ids)
            return
        if finish not in self._round_ends or not tokens:
            stream.fail(BackendError(f"TensorRT-LLM ended a verification round with {finish} and {len(tokens)} tokens"))
            return
        speculation.sequence.extend(tokens)
        speculation.generated += len(tokens)
        speculation.rounds += 1
        if speculation.generated >= params.max_new_tokens:
            stream.put(tokens, "length")
            return
        stream.put(tokens)
        self._next_round(speculation)


# -- python runner: dynamic static batching --------------------------------------------------------


@dataclass
class _Row:
    submission: Submission
    seen: int  # ids of this row's output_ids already handed out, prompt included
    generated: int = 0
    done: bool = False


@dataclass
class _Batch:
    rows: list[_Row]
    steps: Iterator[dict[str, torch.Tensor]]


class StaticBatchEngine:
    """`ModelRunner.generate` over one batch at a time, streamed one decode step per `step`."""

    def __init__(self, runner: Any, limits: Limits, ids: TokenIds) -> None:
        self._runner = runner
        self._limits = limits
        self._ids = ids
        self._waiting: list[Submission] = []
        self._batch: _Batch | None = None

    @classmethod
    def build(cls, spec: EngineSpec, limits: Limits, ids: TokenIds, engine_dir: Path) -> StaticBatchEngine:
        if spec.world_size != 1:
            raise EngineMismatchError(
                f"trtllm_runner=python serves one-rank engines only and this one has {spec.world_size} "
                f"(tp_size={spec.tp_size}, pp_size={spec.pp_size}); set trtllm_runner: cpp"
            )
        from tensorrt_llm.runtime import ModelRunner

        rank, _ = _launch_layout(spec)  # refuses an mpirun launch of this one-rank engine
        return cls(ModelRunner.from_dir(str(engine_dir), rank=rank), limits, ids)

    def has_work(self) -> bool:
        return bool(self._waiting or self._batch)

    def step(self, new: list[Submission], cancelled: set[int]) -> None:
        self._waiting.extend(new)
        if cancelled:
            self._waiting = [s for s in self._waiting if s.request_id not in cancelled]
            for row in self._open_rows():
                row.done = row.submission.request_id in cancelled
        if self._batch is not None and not self._open_rows():
            self._batch = None  # all its rows were cancelled; dropping the generator ends its decode loop
        if self._batch is None and self._waiting:
            self._batch = self._start(self._take())
        if self._batch is not None:
            self._advance(self._batch)

    def fail_all(self, exc: BaseException) -> None:
        for row in self._open_rows():
            row.submission.stream.fail(exc)
        for submission in self._waiting:
            submission.stream.fail(exc)
        self._waiting, self._batch = [], None

    def close(self) -> None:
        self._batch = None  # ModelRunner holds no threads or processes to stop

    def _open_rows(self) -> list[_Row]:
        return [row for row in self._batch.rows if not row.done] if self._batch else []

    def _take(self) -> list[Submission]:
        """Waiting requests in arrival order that can share one `generate` call."""
        batch: list[Submission] = []
        rest: list[Submission] = []
        longest = most_new = 0
        for submission in self._waiting:
            prompt, params = len(submission.prompt_ids), submission.params
            if prompt > self._limits.max_input_len or prompt + params.max_new_tokens > self._limits.max_seq_len:
                submission.stream.fail(BackendError(_does_not_fit(prompt, params, self._limits)))
            elif (
                len(batch) < self._limits.max_batch_size
                and (not batch or params.ignore_eos == batch[0].params.ignore_eos)  # end_id is one per call
                and max(longest, prompt) + max(most_new, params.max_new_tokens) <= self._limits.max_seq_len
            ):
                batch.append(submission)
                longest, most_new = max(longest, prompt), max(most_new, params.max_new_tokens)
            else:
                rest.append(submission)
        self._waiting = rest
        return batch

    def _start(self, batch: list[Submission]) -> _Batch | None:
        if not batch:
            return None
        params = [s.params for s in batch]
        try:
            steps = self._runner.generate(
                [torch.tensor(s.prompt_ids, dtype=torch.int32) for s in batch],
                streaming=True,
                return_dict=True,
                output_sequence_lengths=True,
                max_new_tokens=max(p.max_new_tokens for p in params),
                end_id=-1 if params[0].ignore_eos else self._ids.end_id,
                pad_id=self._ids.pad_id,
                # [batch] per-row values; greedy rows are top_k=1 at temperature 1
                temperature=torch.tensor([1.0 if p.greedy else p.temperature for p in params], dtype=torch.float32),
                top_k=torch.tensor([1 if p.greedy else p.top_k for p in params], dtype=torch.int32),
                top_p=torch.tensor([0.0 if p.greedy else p.top_p for p in params], dtype=torch.float32),
                repetition_penalty=torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32),
                random_seed=torch.tensor([_seed(p) for p in params], dtype=torch.int64),
            )
        except Exception as exc:  # the inputs were refused: this batch fails, the engine goes on
            logger.exception("TensorRT-LLM refused a batch of %d requests", len(batch))
            for submission in batch:
                submission.stream.fail(BackendError(f"TensorRT-LLM refused this batch: {exc}"))
            return None
        return _Batch([_Row(s, seen=len(s.prompt_ids)) for s in batch], iter(steps))

    def _advance(self, batch: _Batch) -> None:
        try:
            with torch.no_grad():
                outputs = next(batch.steps, None)
        except Exception as exc:  # the rows share this decode step
            logger.exception("TensorRT-LLM generation failed for a batch of %d requests", len(batch.rows))
            for row in self._open_rows():
                row.submission.stream.fail(BackendError(f"TensorRT-LLM generation failed: {exc}"))
            self._batch = None
            return
        if outputs is None:  # the decode loop is over; rows still open end here
            for row in self._open_rows():
                reason: FinishReason = "length" if row.generated >= row.submission.params.max_new_tokens else "stop"
                row.submission.stream.put((), reason)
            self._batch = None
            return
        self._dispatch(batch.rows, outputs)
        if not self._open_rows():
            self._batch = None  # every row has its answer; dropping the generator ends the decode loop

    def _dispatch(self, rows: list[_Row], outputs: dict[str, torch.Tensor]) -> None:
        open_rows = [(index, row) for index, row in enumerate(rows) if not row.done]
        if not open_rows:
            return
        lengths = outputs["sequence_lengths"][:, 0].tolist()  # [batch]: prompt + generated, end token excluded
        start = min(row.seen for _, row in open_rows)
        end = max(lengths[index] for index, _ in open_rows)
        window = outputs["output_ids"][:, 0, start:end].tolist()  # [batch, end - start]: one copy per step
        for index, row in open_rows:
            new = window[index][row.seen - start : lengths[index] - start]
            row.seen = max(row.seen, lengths[index])
            self._deliver(row, new)

    def _deliver(self, row: _Row, new: list[int]) -> None:
        stream, params = row.submission.stream, row.submission.params
        if not new:  # the decoder stops extending a row once it produced its end token
            row.done = True
            stream.put((), "stop")
            return
        stops = frozenset() if params.ignore_eos else self._ids.stop_ids
        taken = new[: params.max_new_tokens - row.generated]  # the batch may run longer than this request
        for position, token in enumerate(taken):
            if token in stops:
                row.done = True
                stream.put(taken[:position], "stop")
                return
        row.generated += len(taken)
        if row.generated >= params.max_new_tokens:
            row.done = True
            stream.put(taken, "length")
        else:
            stream.put(taken)


def _does_not_fit(prompt: int, params: SamplingParams, limits: Limits) -> str:
    return (
        f"a prompt of {prompt} tokens with max_new_tokens={params.max_new_tokens} does not fit this engine "
        f"(max_input_len {limits.max_input_len}, max_seq_len {limits.max_seq_len})"
    )


# -- shared ----------------------------------------------------------------------------------------


def _seed(params: SamplingParams) -> int:
    """The request's seed, else a fresh one: the engines' default seed (0) repeats across requests."""
    return params.seed if params.seed is not None else random.getrandbits(63)


def _finish(stream: TokenStream, tokens: list[int], reason: FinishReason, stop_ids: frozenset[int]) -> None:
    """Last chunk; a stop word's token, which the Executor outputs, is not part of the answer."""
    if reason == "stop" and tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    stream.put(tokens, reason)
