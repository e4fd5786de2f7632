"""The `tensorrt_llm_llmapi` backend: a Hugging Face checkpoint served by TensorRT-LLM's LLM API, no engine build.

TensorRT-LLM 1.2 calls its PyTorch backend (`tensorrt_llm.LLM`, what trtllm-serve runs) the recommended
path; the engine workflow (`backends/trtllm/`) is its legacy TensorRT backend. This backend loads the
checkpoint folder (bf16/fp16, or a ModelOpt FP8/NVFP4 export) straight into `LLM(...)` with prefix
caching and chunked prefill on, tensor parallelism from `tensor_parallel_size`, and draft-target or
EAGLE-3 speculative decoding when a draft is configured.

Contract (`model/backends/base.py`), as for every backend: prompt ids in, `TokenChunk`s of new ids out,
no prompt or end token in any chunk, the last chunk "stop" or "length". The same shape as the others
(`BatchingBackend`): one engine thread owns the LLM; it runs a private asyncio loop on which each
request is one task iterating `llm.generate_async(prompt_ids, sampling, streaming=True)` and handing
each `CompletionOutput`'s `token_ids_diff` (and `logprobs_diff`) to the request's stream. A cancelled
request's task calls `RequestOutput.abort()`. A request TensorRT-LLM fails (a `RequestError` from the
iteration) fails alone; the LLM's own step errors fail the requests of that step, as in PyExecutor.

Optional features (`supports`), as 1.2 allows them: logprobs (raw log-softmax, top 0..20) and guided
decoding (xgrammar: json_object, json_schema, regex, grammar), both without speculative decoding (1.2's
speculative samplers return the sampled logprob only, and guided decoding with a draft is not verified
here). `prepare` compiles each guide with the same grammar library (model/guided.py, cached) so a bad
schema, regex or grammar is a 400 naming the field: TensorRT-LLM creates the grammar matcher inside an
executor step (`GuidedDecoder._build`, _torch/pyexecutor/guided_decoder.py at 07dacbbc), where the error
would fail every request of that step. Not offered: repetition, presence and frequency penalties (1.2's
TorchSampler ignores them; a request with a penalty other than neutral gets a 400) and min_tokens.
`stats()`: running = requests that produced output, waiting = accepted without output yet; KV use and
prefix-cache hits from `get_stats()`.

Modules: this one (the backend, its engine thread); `checkpoint` (the folder, runtime checks, the LLM's
arguments and limits); `requests` (SamplingParams, guides and logprobs between the two APIs). What is
verified against source and what only against the double (tests/doubles/trtllm_llmapi.py) is in each
module's docstring; `scripts/trtllm_smoke.py` checks it on a GPU.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from transformers import PreTrainedTokenizerBase

from model import engine_meta
from model.artifacts import Artifacts
from model.backends.base import BatchingBackend, EngineStats, Limits, SamplingParams, Submission
from model.backends.trtllm.runtime_rules import load_failure_hint
from model.backends.trtllm.shared import TokenIds, draft_settings, finish_stream, token_ids
from model.backends.trtllm_llmapi.checkpoint import Checkpoint, check_runtime, llm_plan
from model.backends.trtllm_llmapi.requests import llm_sampling, token_logprobs
from model.engine_meta import ComputeCapability
from model.errors import ArtifactError, BackendError, EngineMismatchError, InvalidRequest
from model.guided import GuideCompiler
from model.settings import ServerSettings

__all__ = ["LlmApiBackend"]

logger = logging.getLogger(__name__)

POLL_S = 0.01  # longest the engine loop waits for outputs before new requests get in
STATS_INTERVAL_S = 0.5  # how often the engine thread reads the LLM's iteration stats
STATS_TIMEOUT_S = 0.01  # get_stats blocks at most this long when no new stats are queued
FEATURES = frozenset({"logprobs", "guided_decoding"})  # what 1.2's PyTorch backend honours without speculation


@dataclass(frozen=True)
class _KvStats:
    usage: float | None
    queries: int  # prompt tokens looked up in the block cache, since start
    hits: int


class LlmApiBackend(BatchingBackend):
    name = "tensorrt_llm_llmapi"

    def __init__(
        self, llm: Any, llmapi: ModuleType, limits: Limits, ids: TokenIds, guides: GuideCompiler | None
    ) -> None:
        """`guides`: the checkpoint's grammar compiler; None under speculative decoding, which offers no features."""
        super().__init__(limits, ids.stop_ids)
        self._llm = llm
        self._llmapi = llmapi
        self._token_ids = ids
        self._guides = guides
        self.supports = FEATURES if guides is not None else frozenset()
        self._loop = asyncio.new_event_loop()  # runs on the engine thread only
        self._tasks: dict[int, tuple[asyncio.Task[None], Submission]] = {}
        self._started: set[int] = set()  # requests that produced output
        self._stats_at = 0.0
        self._kv = _KvStats(usage=None, queries=0, hits=0)

    @classmethod
    def load(
        cls,
        settings: ServerSettings,
        artifacts: Artifacts,
        tokenizer: PreTrainedTokenizerBase,
        fetch: Callable[[ServerSettings], Artifacts] | None = None,
        compute_capability: Callable[[], ComputeCapability | None] = engine_meta.gpu_compute_capability,
    ) -> LlmApiBackend:
        """Check the checkpoint and the runtime, then build the LLM; `fetch` finds a draft as the target was found."""
        import tensorrt_llm
        import tensorrt_llm.llmapi as llmapi

        checkpoint = Checkpoint.read(artifacts.model_dir)
        check_runtime(tensorrt_llm.__version__, checkpoint, compute_capability)
        ids = token_ids(tokenizer, artifacts, checkpoint.vocab_size)
        draft_dir = _draft_dir(settings, artifacts, fetch) if settings.draft_model_repo else None
        plan = llm_plan(settings, checkpoint, artifacts.tokenizer_dir, draft_dir, llmapi)
        guides = None if plan.speculative else GuideCompiler(tokenizer, checkpoint.vocab_size, ids.stop_ids)
        try:
            llm = llmapi.LLM(str(artifacts.model_dir), **plan.kwargs)
        except RuntimeError as exc:
            hint = load_failure_hint(str(exc), shorter="lower max_seq_len (LLM_MAX_SEQ_LEN)")
            raise EngineMismatchError(
                f"TensorRT-LLM could not load the checkpoint at {artifacts.model_dir}: {exc}; {hint}"
            ) from exc
        backend_kind = getattr(llm.args, "backend", None)
        if backend_kind != "pytorch":
            llm.shutdown()
            raise ArtifactError(f"tensorrt_llm.LLM loaded the {backend_kind} backend, not pytorch; check the image")
        logger.info(
            "tensorrt_llm_llmapi backend: %s (%s), tensor parallel %d, prompts up to %d tokens (%s), %s",
            artifacts.model_dir,
            checkpoint.quant_algo or "unquantized",
            settings.tensor_parallel_size,
            plan.limits.max_input_len,
            plan.input_rule,
            f"{plan.speculative} speculation from {draft_dir}" if plan.speculative else "no speculation",
        )
        return cls(llm, llmapi, plan.limits, ids, guides)

    async def prepare(self, params: SamplingParams) -> None:
        await super().prepare(params)
        if params.repetition_penalty != 1.0:
            raise InvalidRequest(
                f"the {self.name} backend does not support repetition_penalty (TensorRT-LLM 1.2's PyTorch sampler "
                "ignores it); remove it",
                param="repetition_penalty",
            )
        if params.guided is not None:
            assert self._guides is not None  # check_supported refused guided decoding without a compiler
            await asyncio.to_thread(self._guides.compile, params.guided)  # raises InvalidRequest naming the field

    def stats(self) -> EngineStats:
        running = len(self._started)
        kv = self._kv
        return EngineStats(
            running=running,
            waiting=len(self._tasks) - running,
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.queries,
            prefix_cache_hits=kv.hits,
        )

    # -- engine thread ---------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._tasks)

    def _step(self, new: list[Submission], cancelled: set[int]) -> None:
        for submission in new:
            task = self._loop.create_task(self._serve(submission))
            self._tasks[submission.request_id] = (task, submission)
        for request_id in cancelled:
            if request_id in self._tasks:
                self._tasks[request_id][0].cancel()  # the task aborts its request in TensorRT-LLM
        self._loop.run_until_complete(self._advance())
        self._poll_stats(idle=not self._tasks)

    async def _advance(self) -> None:
        tasks = [task for task, _ in self._tasks.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(0)  # let cancelled tasks finish

    async def _serve(self, submission: Submission) -> None:
        request_id, stream = submission.request_id, submission.stream
        output = None
        try:
            sampling = llm_sampling(self._llmapi, submission.params, self._token_ids)
            output = self._llm.generate_async(submission.prompt_ids, sampling, streaming=True)
            async for result in output:
                self._started.add(request_id)
                if self._deliver(submission, result.outputs[0]):
                    return
            stream.fail(BackendError("TensorRT-LLM ended this request's stream without a finish reason"))
        except asyncio.CancelledError:
            if output is not None:
                output.abort()
            raise
        except Exception as exc:  # this request failed in TensorRT-LLM; the others go on
            logger.warning("TensorRT-LLM failed request %d: %s", request_id, exc)
            stream.fail(BackendError(f"TensorRT-LLM failed this request: {exc}"))
        finally:
            self._tasks.pop(request_id, None)
            self._started.discard(request_id)

    def _deliver(self, submission: Submission, completion: Any) -> bool:
        """Hand one response's new tokens on; True once the request finished."""
        params, stream = submission.params, submission.stream
        tokens = list(completion.token_ids_diff)
        logprobs = None
        if params.logprobs is not None:
            logprobs = token_logprobs(tokens, list(completion.logprobs_diff), params.logprobs)
        reason = completion.finish_reason
        if reason is None:
            if tokens:
                stream.put(tokens, None, logprobs)
            return False
        if reason not in ("stop", "length"):
            stream.fail(BackendError(f"TensorRT-LLM ended this request with finish reason {reason!r}"))
            return True
        finish_stream(stream, tokens, reason, self._token_ids.stop_ids, logprobs)
        return True

    def _poll_stats(self, *, idle: bool) -> None:
        """At most every STATS_INTERVAL_S while busy; always once the LLM went idle (its last iteration)."""
        now = time.monotonic()
        if not idle and now - self._stats_at < STATS_INTERVAL_S:
            return
        self._stats_at = now
        rows = [
            json.loads(row) if isinstance(row, str) else row for row in self._llm.get_stats(timeout=STATS_TIMEOUT_S)
        ]
        kv = next((row["kvCacheStats"] for row in reversed(rows) if row.get("kvCacheStats")), None)
        if kv is not None:
            per_block = kv.get("tokensPerBlock", 0)
            self._kv = _KvStats(
                usage=kv["usedNumBlocks"] / kv["maxNumBlocks"] if kv.get("maxNumBlocks") else None,
                queries=(kv.get("reusedBlocks", 0) + kv.get("missedBlocks", 0)) * per_block,
                hits=kv.get("reusedBlocks", 0) * per_block,
            )

    def _fail_all(self, exc: BaseException) -> None:
        for task, submission in list(self._tasks.values()):
            submission.stream.fail(exc)
            task.cancel()
        self._tasks.clear()
        self._started.clear()

    def _close(self) -> None:
        """After the engine thread stopped: abort what is left, shut the LLM down, close the loop."""
        tasks = [task for task, _ in self._tasks.values()]
        for task in tasks:
            task.cancel()
        if tasks and not self._loop.is_closed():
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._llm.shutdown()
        self._loop.close()


def _draft_dir(
    settings: ServerSettings, artifacts: Artifacts, fetch: Callable[[ServerSettings], Artifacts] | None
) -> Path:
    """The draft checkpoint (or EAGLE-3 head), found as the target was."""
    if fetch is None:
        raise ArtifactError("draft_model_repo is set but LlmApiBackend.load got no fetch to resolve it with")
    try:
        return fetch(draft_settings(settings, artifacts)).model_dir
    except ArtifactError as exc:
        raise ArtifactError(f"draft: {exc} (the draft's settings: LLM_DRAFT_MODEL_REPO, LLM_DRAFT_SUBFOLDER)") from exc
