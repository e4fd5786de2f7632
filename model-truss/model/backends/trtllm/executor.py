"""`trtllm_runner: cpp`: in-flight batching by the C++ Executor, and the worker ranks of a leader-mode launch.

`ExecutorEngine` is the loop the package docstring describes: each step enqueues every new request as
its own streaming `Request`, cancels closed streams, waits at most `POLL` in `await_responses` and hands
each `Response` to its stream. The request building here (`executor_request`, `_executor_sampling`,
`enqueue_or_fail`, `stop_words_of`, `finish_reason_map`, `cpp_runner`) serves the speculative engine too.

Tokens, as the sources define them: with `streaming=True` a response carries only the ids made since
the previous one, never the prompt; the end token is never output (sequence lengths exclude it), a stop
word's token is, so a trailing stop id is dropped here. `finish_reasons[0]`: END_ID/STOP_WORDS -> "stop",
LENGTH -> "length".

Failures, as executorImpl.cpp handles them: a request the runtime refuses when it fetches it (too long a
prompt, a bad end id) gets an error response of its own; an exception inside an engine step fails every
request active in that step (`terminateActiveRequests`), each with the same error, and the Executor goes
on with the next requests.

Optional features (`supports`): `min_tokens` (SamplingConfig.min_tokens holds back the end id only, so it
is offered only where the end id is the model's one stop id). Not offered: logprobs (the Executor's are the
sampled token's only, after temperature: OutputConfig.return_log_probs), presence/frequency penalties (the
1.2 penalty kernel also counts prompt tokens), guided decoding (ModelRunnerCpp.from_dir takes no
GuidedDecodingConfig). `stats()` reads `get_latest_iteration_stats()`: active and queued requests, and the
KV cache's used/max blocks and its cumulative reused/missed blocks (the prefix-cache hits and lookups).

Checked against NVIDIA/TensorRT-LLM through the code index (1.2.0rc2 is commit b35ac1b6):
- runtime/model_runner_cpp.py, the stored 1.x revision that has `fail_fast_on_attention_window_too_large`
  (the index did not name its commit): the `from_dir` keywords used here, `self.session = executor`,
  `max_input_len` used only by `generate()`'s own input check (never part of the ExecutorConfig, so it is not
  passed here), `session.can_enqueue_requests()`. Revision 03832911 (older, no fail_fast) names the attribute
  `executor`; `executor_of` accepts both.
- cpp/tensorrt_llm/nanobind/executor/{executor.cpp,executor.h,request.cpp} (1dd50d07, 0243026f, 008b2b8d)
  and pybind/executor/request.cpp (007a7508): Executor methods and argument names (`await_responses`
  releases the GIL while it waits), `Request`, `SamplingConfig` (min_tokens), `OutputConfig`, `Response`,
  `Result.finish_reasons`, `FinishReason` values.
- cpp/tensorrt_llm/executor/executorImpl.cpp at b35ac1b6: orchestrator spawn with MPI world size 1,
  leader mode needs world size == tp*pp*cp, `await_responses` returns [] on timeout, `can_enqueue_requests`,
  `cancel_request`, per-request errors at fetch, `terminateActiveRequests`, a worker rank's `shutdown()` joins
  its loop until the leader ends.
- cpp/tensorrt_llm/batch_manager/llmRequest.cpp (119c6e60) `createResult`: streaming deltas, prompt only
  in non-streaming output; the sampling-kernel tests: sequence length excludes the end token; kvCacheManager.h:
  `getKvCacheStats` (reusedBlocks, missedBlocks from the block manager's counters).
- executor worker (`end_id=-1 if ignore_eos`, `await_responses(timeout=timedelta(...))`); PR 12514's
  comment on `outputLogProbs` (temperature applied in place before sampling on the TRT backend).
Only against the double (tests/doubles/trtllm.py): that the Executor accepts these calls at runtime,
orchestrator spawning on a real node, and that the reused/missed counters count since start.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

from model.backends.base import EngineStats, FinishReason, Limits, SamplingParams, Submission
from model.backends.trtllm.engine_config import EngineSpec, launch_layout
from model.backends.trtllm.runtime_rules import (
    RuntimeOptions,
    check_executor_build,
    engine_limits,
    executor_input_limit,
    load_failure_hint,
    runtime_options,
)
from model.backends.trtllm.shared import TokenIds, finish_stream, sampling_seed
from model.errors import BackendError, EngineMismatchError
from model.settings import ServerSettings

logger = logging.getLogger(__name__)

POLL = datetime.timedelta(milliseconds=10)  # longest wait in await_responses before new requests get in
STATS_INTERVAL_S = 0.5  # how often the engine thread drains get_latest_iteration_stats


class ExecutorEngine:
    """In-flight batching by the C++ Executor; every call to it comes from the engine thread."""

    def __init__(self, runner: Any, api: ModuleType, ids: TokenIds) -> None:
        self._runner = runner  # owns the Executor; keep it alive
        self._executor = executor_of(runner)
        self._api = api  # tensorrt_llm.bindings.executor
        self._ids = ids
        self._stop_words = stop_words_of(ids)
        self._reasons = finish_reason_map(api)
        self._by_executor_id: dict[int, Submission] = {}
        self._executor_ids: dict[int, int] = {}  # Submission.request_id -> Executor request id
        self._stats = IterationStatsReader(self._executor)
        self.supports = executor_features(ids)

    @classmethod
    def build(
        cls, settings: ServerSettings, spec: EngineSpec, limits: Limits, ids: TokenIds, engine_dir: Path,
        options: RuntimeOptions,
    ) -> ExecutorEngine:  # fmt: skip
        from tensorrt_llm.bindings import executor as api

        rank, orchestrator = launch_layout(spec)
        if rank != 0:
            raise EngineMismatchError(
                f"this is rank {rank} of an `mpirun -n {spec.world_size}` launch; only rank 0 serves, the other "
                "ranks must run model.backends.trtllm.serve_worker_rank (see that module's docstring)"
            )
        runner = cpp_runner(
            engine_dir,
            max_batch_size=limits.max_batch_size,
            kv_fraction=settings.kv_cache_free_gpu_memory_fraction,
            options=options,
            rank=0,
            orchestrator=orchestrator,
        )
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
        self._stats.poll(idle=not self._by_executor_id)

    def stats(self) -> EngineStats:
        return self._stats.current(idle=not self._by_executor_id)

    def fail_all(self, exc: BaseException) -> None:
        for submission in self._by_executor_id.values():
            submission.stream.fail(exc)
        self._by_executor_id.clear()
        self._executor_ids.clear()

    def close(self) -> None:
        self._executor.shutdown()

    def _enqueue(self, submission: Submission) -> None:
        params = submission.params
        request = executor_request(
            self._api, self._ids, submission.prompt_ids, params, streaming=True, stop_words=self._stop_words,
            min_tokens=params.min_new_tokens,
        )  # fmt: skip
        executor_id = enqueue_or_fail(self._executor, request, submission)
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
        finish_stream(submission.stream, tokens, reason, self._ids.stop_ids)

    def _forget(self, executor_id: int) -> None:
        submission = self._by_executor_id.pop(executor_id)
        self._executor_ids.pop(submission.request_id, None)


def executor_request(
    api: ModuleType,
    ids: TokenIds,
    prompt: list[int],
    params: SamplingParams,
    *,
    streaming: bool,
    stop_words: list[list[int]] | None,
    min_tokens: int = 0,
    **extra: Any,
) -> Any:
    """One Executor `Request`: new ids only in its output, `max_tokens` = params.max_new_tokens (prompt excluded)."""
    return api.Request(
        input_token_ids=prompt,
        max_tokens=params.max_new_tokens,
        streaming=streaming,
        sampling_config=_executor_sampling(api, params, min_tokens),
        output_config=api.OutputConfig(exclude_input_from_output=True),
        end_id=-1 if params.ignore_eos else ids.end_id,
        pad_id=ids.pad_id,
        stop_words=None if params.ignore_eos else stop_words,
        **extra,
    )


def enqueue_or_fail(executor: Any, request: Any, submission: Submission) -> int | None:
    """The Executor's id for `request`; if it refuses the arguments, this request fails and the others go on."""
    try:
        return executor.enqueue_request(request)
    except Exception as exc:
        logger.warning("TensorRT-LLM refused request %d: %s", submission.request_id, exc)
        submission.stream.fail(BackendError(f"TensorRT-LLM refused this request: {exc}"))
        return None


def stop_words_of(ids: TokenIds) -> list[list[int]] | None:
    """Stop ids other than the end id, as one-token stop words (the end id stops by itself)."""
    return [[token] for token in sorted(ids.stop_ids - {ids.end_id})] or None


def finish_reason_map(api: ModuleType) -> dict[Any, FinishReason]:
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


def executor_features(ids: TokenIds) -> frozenset[str]:
    """SamplingConfig.min_tokens holds back the end id only; other stop ids (stop words) would still end early."""
    return frozenset({"min_tokens"}) if ids.stop_ids == {ids.end_id} else frozenset()


def _executor_sampling(api: ModuleType, params: SamplingParams, min_tokens: int) -> Any:
    penalty = params.repetition_penalty if params.repetition_penalty != 1.0 else None
    extra: dict[str, Any] = {"min_tokens": min_tokens} if min_tokens > 0 else {}
    if params.greedy:
        return api.SamplingConfig(1, top_k=1, repetition_penalty=penalty, **extra)
    # top_p is always sent: with neither top_k nor top_p set the Executor decodes greedily.
    return api.SamplingConfig(
        1,
        top_k=params.top_k or None,
        top_p=params.top_p,
        temperature=params.temperature,
        seed=sampling_seed(params),
        repetition_penalty=penalty,
        **extra,
    )


class IterationStatsReader:
    """The Executor's latest iteration stats as `EngineStats`; polled from the engine thread, read from any."""

    def __init__(self, executor: Any) -> None:
        self._executor = executor
        self._polled_at = 0.0
        self._latest: EngineStats = EngineStats(running=0, waiting=0)

    def poll(self, *, idle: bool) -> None:
        """At most every STATS_INTERVAL_S while busy; always once the engine went idle (its last iteration)."""
        now = time.monotonic()
        if not idle and now - self._polled_at < STATS_INTERVAL_S:
            return
        self._polled_at = now
        iterations = self._executor.get_latest_iteration_stats()
        if iterations:
            self._latest = _engine_stats(iterations[-1])

    def current(self, *, idle: bool) -> EngineStats:
        """With nothing in flight the last iteration's request counts are stale: the engine is empty."""
        latest = self._latest
        return replace(latest, running=0, waiting=0) if idle else latest


def _engine_stats(iteration: Any) -> EngineStats:
    kv = iteration.kv_cache_stats
    usage = kv.used_num_blocks / kv.max_num_blocks if kv is not None and kv.max_num_blocks else None
    per_block = kv.tokens_per_block if kv is not None else 0
    return EngineStats(
        running=iteration.num_active_requests,
        waiting=iteration.num_queued_requests,
        kv_cache_usage=usage,
        prefix_cache_queries=(kv.reused_blocks + kv.missed_blocks) * per_block if kv is not None else 0,
        prefix_cache_hits=kv.reused_blocks * per_block if kv is not None else 0,
    )


def cpp_runner(
    engine_dir: Path,
    *,
    max_batch_size: int,
    kv_fraction: float,
    options: RuntimeOptions,
    rank: int,
    orchestrator: bool,
) -> Any:
    """`ModelRunnerCpp.from_dir`, failing fast (not clamping the attention window) when the KV cache is too small."""
    from tensorrt_llm.runtime import ModelRunnerCpp

    try:
        return ModelRunnerCpp.from_dir(
            str(engine_dir),
            rank=rank,
            max_batch_size=max_batch_size,
            max_beam_width=1,
            kv_cache_free_gpu_memory_fraction=kv_fraction,
            enable_chunked_context=options.chunked_context,
            kv_cache_enable_block_reuse=options.block_reuse,
            fail_fast_on_attention_window_too_large=True,
            is_orchestrator_mode=orchestrator,
        )
    except RuntimeError as exc:
        raise EngineMismatchError(
            f"TensorRT-LLM could not load the engine at {engine_dir}: {exc}; {load_failure_hint(str(exc))}"
        ) from exc


def serve_worker_rank(settings: ServerSettings, engine_dir: Path) -> None:
    """Ranks 1..N-1 of a leader-mode launch: build this rank's Executor, then block until rank 0 stops.

    A non-leader Executor takes its requests from rank 0 over MPI; its `shutdown()` joins the
    execution loop, which ends when rank 0's Executor shuts down.
    """
    from model.engine_meta import verify_engine_compatible

    verify_engine_compatible(engine_dir)
    spec = EngineSpec.read(engine_dir)
    rank, orchestrator = launch_layout(spec)
    if orchestrator or rank == 0:
        raise EngineMismatchError(
            f"serve_worker_rank is for ranks 1..{spec.world_size - 1} of an `mpirun -n {spec.world_size}` "
            "launch; rank 0 (or a process outside mpirun) serves with TrtllmBackend.load"
        )
    check_executor_build(spec)
    options = runtime_options(settings, spec)
    limits = engine_limits(settings, spec, executor_input_limit(spec, options))
    runner = cpp_runner(
        engine_dir,
        max_batch_size=limits.max_batch_size,
        kv_fraction=settings.kv_cache_free_gpu_memory_fraction,
        options=options,
        rank=rank,
        orchestrator=False,
    )
    logger.info("rank %d of %d is serving its engine shard until rank 0 shuts down", rank, spec.world_size)
    executor_of(runner).shutdown()
