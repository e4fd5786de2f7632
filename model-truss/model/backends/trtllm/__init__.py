"""The `tensorrt_llm` backend: a prebuilt TensorRT-LLM engine (trtllm-build output) served by one engine thread.

Contract (`model/backends/base.py`): prompt ids in, `TokenChunk`s of new ids out. No chunk holds the
prompt or the end token; the last chunk says "stop" (end or stop token) or "length" (max_new_tokens or
the engine's max_seq_len). A request the runtime refuses fails alone; an error inside an engine step
fails the requests that step was running (TensorRT-LLM's own behaviour, see `executor`), and the engine
goes on serving. Before anything is loaded, `runtime_rules` refuses an engine or settings the runtime
would refuse, turns on prefix caching and chunked context where the engine supports them, and derives
the prompt limit as the runtime does. `tensorrt_llm` is imported only in `load` (it needs a GPU).
Concurrent requests are never serialized:

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

Modules, in the order a request meets them:
- this one: `TrtllmBackend.load` checks the engine, reads its limits and picks one of the three engines;
  `_Engine` is what each of them offers the engine thread.
- `engine_config`: what the engine folder says (`EngineSpec`, the token ids, the launch layout).
- `runtime_rules`: what the runtime derives from it or refuses (limits, chunked context, block reuse).
- `executor`: the C++ Executor loop (`ExecutorEngine`), its `Request`s, and `serve_worker_rank`.
- `speculative`: draft-target speculative decoding over two Executors (`SpeculativeEngine`).
- `static_batch`: the python runner's dynamic static batching (`StaticBatchEngine`).
- `shared`: ids, the seed, the last chunk and the draft's settings, used by more than one engine (and by
  the LLM-API backend, model/backends/trtllm_llmapi/).

Each module's docstring lists the NVIDIA/TensorRT-LLM sources it was checked against through the code
index (1.2.0rc2 is commit b35ac1b6), and what was checked only against the double (tests/doubles/trtllm.py).
All timing is checked only against the double.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from transformers import PreTrainedTokenizerBase

from model.artifacts import Artifacts
from model.backends.base import BatchingBackend, EngineStats, Limits, Submission
from model.backends.trtllm.engine_config import EngineSpec
from model.backends.trtllm.executor import ExecutorEngine, serve_worker_rank
from model.backends.trtllm.runtime_rules import (
    check_executor_build,
    engine_limits,
    executor_input_limit,
    runtime_options,
    session_input_limit,
)
from model.backends.trtllm.shared import token_ids
from model.backends.trtllm.speculative import SpeculativeEngine, load_draft, speculative_limits
from model.backends.trtllm.static_batch import StaticBatchEngine
from model.settings import ServerSettings

__all__ = ["TrtllmBackend", "serve_worker_rank"]

logger = logging.getLogger(__name__)


class _Engine(Protocol):
    """One way of driving TensorRT-LLM from the engine thread."""

    supports: frozenset[str]  # the optional SamplingParams features it honours

    def has_work(self) -> bool: ...

    def step(self, new: list[Submission], cancelled: set[int]) -> None: ...

    def fail_all(self, exc: BaseException) -> None: ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...


class TrtllmBackend(BatchingBackend):
    name = "tensorrt_llm"

    def __init__(self, engine: _Engine, limits: Limits, stop_ids: frozenset[int]) -> None:
        super().__init__(limits, stop_ids)
        self.engine = engine
        self.supports = engine.supports

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
        ids = token_ids(tokenizer, artifacts, spec.vocab_size)
        if settings.trtllm_runner == "python":
            limits = engine_limits(settings, spec, session_input_limit(spec))
            engine: _Engine = StaticBatchEngine.build(spec, limits, ids, engine_dir)
            logger.info("tensorrt_llm backend: python runner, %s", limits)
            return cls(engine, limits, ids.stop_ids)
        check_executor_build(spec)
        options = runtime_options(settings, spec)
        input_limit = executor_input_limit(spec, options)
        limits = engine_limits(settings, spec, input_limit)
        draft = load_draft(settings, spec, artifacts, fetch) if settings.draft_model_repo else None
        if draft is not None:
            limits = speculative_limits(limits, input_limit, draft)
            engine = SpeculativeEngine.build(settings, limits, ids, engine_dir, (spec, options), draft)
        else:
            engine = ExecutorEngine.build(settings, spec, limits, ids, engine_dir, options)
        logger.info(
            "tensorrt_llm backend: cpp runner, %d rank(s), chunked context %s, block reuse %s, prompts up to %d "
            "tokens (%s), end_id %d, stop ids %s, %s",
            spec.world_size,
            options.chunked_context,
            options.block_reuse,
            limits.max_input_len,
            input_limit.rule,
            ids.end_id,
            sorted(ids.stop_ids),
            f"draft-target with {draft.draft_len} draft tokens from {draft.engine_dir}" if draft else "no draft",
        )
        return cls(engine, limits, ids.stop_ids)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def _has_work(self) -> bool:
        return self.engine.has_work()

    def _step(self, new: list[Submission], cancelled: set[int]) -> None:
        self.engine.step(new, cancelled)

    def _fail_all(self, exc: BaseException) -> None:
        self.engine.fail_all(exc)

    def _close(self) -> None:
        self.engine.close()
