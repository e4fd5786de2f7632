"""`trtllm_runner: cpp` with `draft_model_repo`: draft-target speculative decoding over two Executors.

`load_draft` finds the draft engine as the target was found and refuses a pairing TensorRT-LLM cannot
serve; `speculative_limits` keeps every round a valid input to both engines as the runtime derives their
input limits (so the runtime never truncates a round's draft tokens or lowers its max_tokens);
`kv_fractions` splits the KV-cache memory between the two engines on one GPU; `SpeculativeEngine` runs
the rounds the package docstring describes, every request's call in flight at once.

Memory: both Executors live in this process on the same GPU(s), the target loaded first. Each takes
`kv_cache_free_gpu_memory_fraction` of what is free *at its own load*, so the same fraction twice (0.9 and
0.9) leaves the draft a sliver (examples/draft_target_model/README.md: "--kv_cache_free_gpu_memory_fraction
should be specified if we want to place two models on one GPU"). Here the setting is the share of free
memory for both caches together, split so that both hold the same number of tokens: the target takes
f * r of what is free after its weights, r = its KV bytes per token / both engines' (from config.json),
and the draft f * (1 - r) / (1 - f * r) of what is free at its load, which is f * (1 - r) of the target's
free memory less the draft's weights.

Checked against NVIDIA/TensorRT-LLM through the code index: examples/draft_target_model/README.md
(11925f62: target built with draft_tokens_external and max_draft_len, block reuse required, C++ runtime
only, no beams, the memory fraction for two models on one GPU); examples/prompt_lookup/run_dtm_pld.py
(c3a2348d, the loop run.py calls: draft generate of draft_len, target generate with the draft tokens and
max_new_tokens = draft_len + 1, every target token kept, both runners in orchestrator mode with
`kv_cache_enable_block_reuse`); examples/cpp/executor/executorExampleFastLogits.cpp (the same with two
Executors: target request with maxNewTokens = draft + 1 and `ExternalDraftTokensConfig`,
`KvCacheConfig(enableBlockReuse)`); pybind/executor/request.cpp (`ExternalDraftTokensConfig(tokens,
logits=None, acceptance_threshold=None, fast_logits=None)`, `Request(external_draft_tokens_config=...)`);
the executor bindings test `test_request_perf_metrics_draft` (4 draft tokens, 2 accepted: 3 new tokens, final
after one iteration); llmRequest.cpp `validate` (draft truncated past the input limit, max_tokens lowered past
max_seq_len counting the draft length). How config.json marks a draft-target engine is in `engine_config`.
Only against the double (tests/doubles/trtllm.py): the finish reason of a verification round (LENGTH and
NOT_FINISHED are both taken as "round over"), two Executors in one process on one GPU (its KV-capacity model
stands in for cudaMemGetInfo), and the speed-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from model.artifacts import Artifacts
from model.backends.base import EngineStats, Limits, SamplingParams, Submission
from model.backends.trtllm.engine_config import EngineSpec
from model.backends.trtllm.executor import (
    POLL,
    IterationStatsReader,
    cpp_runner,
    enqueue_or_fail,
    executor_features,
    executor_of,
    executor_request,
    finish_reason_map,
    stop_words_of,
)
from model.backends.trtllm.runtime_rules import (
    InputLimit,
    RuntimeOptions,
    check_executor_build,
    executor_input_limit,
    runtime_options,
)
from model.backends.trtllm.shared import TokenIds, draft_settings, finish_stream, sampling_seed
from model.errors import ArtifactError, BackendError, EngineMismatchError
from model.settings import ServerSettings, SettingsError


@dataclass(frozen=True)
class Draft:
    """A draft engine checked against its target, how it is run, and how many tokens it proposes per round."""

    engine_dir: Path
    spec: EngineSpec
    options: RuntimeOptions
    draft_len: int

    @property
    def input_limit(self) -> InputLimit:
        return executor_input_limit(self.spec, self.options)


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
    check_executor_build(spec)
    if spec.vocab_size != target.vocab_size:
        raise EngineMismatchError(
            f"the draft engine at {found.model_dir} has a vocabulary of {spec.vocab_size} tokens but the target has "
            f"{target.vocab_size}, so their token ids do not mean the same text; use a draft of the target's model "
            "family with the same tokenizer (Llama-3.2-1B for Llama-3.3-70B)"
        )
    return Draft(found.model_dir, spec, runtime_options(settings, spec), draft_len)


def speculative_limits(limits: Limits, target_input: InputLimit, draft: Draft) -> Limits:
    """Every round sends prompt + tokens so far as a new request: that must stay a valid input to both engines.

    A round's sequence s (s < max_seq_len) with d draft tokens (s + d + 1 <= max_seq_len, as rounds never
    pass max_new_tokens) then keeps s + d within both input limits, so the runtime truncates no draft.
    `limits.max_seq_len` is already the target's built max_seq_len, which leaves room for the runtime's
    s + max_tokens + d <= config.json's max_seq_len (built + max_draft_len).
    """
    max_seq_len = min(
        limits.max_seq_len, target_input.tokens + 1, draft.input_limit.tokens + 1, draft.spec.built_max_seq_len
    )
    return Limits(
        max_input_len=min(limits.max_input_len, max_seq_len - 1),
        max_seq_len=max_seq_len,
        max_new_tokens=min(limits.max_new_tokens, max_seq_len - 1),
        max_batch_size=min(limits.max_batch_size, draft.spec.max_batch_size),
    )


def kv_fractions(fraction: float, target: EngineSpec, draft: EngineSpec) -> tuple[float, float]:
    """(target's, draft's) kv_cache_free_gpu_memory_fraction: `fraction` of free memory, split by KV bytes per token."""
    share = target.kv_bytes_per_token / (target.kv_bytes_per_token + draft.kv_bytes_per_token)
    return fraction * share, fraction * (1 - share) / (1 - fraction * share)


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
        self._stop_words = stop_words_of(ids)
        self._reasons = finish_reason_map(api)
        # A verification round ends by its own max_tokens (LENGTH); NOT_FINISHED is accepted too, because a
        # response of fewer tokens than max_tokens is final after one step (tests/bindings) with no reason documented.
        self._round_ends = {api.FinishReason.LENGTH, api.FinishReason.NOT_FINISHED}
        self._where: dict[int, tuple[_Lane, int]] = {}  # Submission.request_id -> (lane, Executor id) in flight
        self._stats = IterationStatsReader(self._target.executor)
        self.supports = executor_features(ids)

    @classmethod
    def build(
        cls,
        settings: ServerSettings,
        limits: Limits,
        ids: TokenIds,
        engine_dir: Path,
        target: tuple[EngineSpec, RuntimeOptions],
        draft: Draft,
    ) -> SpeculativeEngine:
        from tensorrt_llm._utils import mpi_world_size
        from tensorrt_llm.bindings import executor as api

        if mpi_world_size() != 1:
            raise EngineMismatchError(
                "draft-target decoding runs both engines in orchestrator mode, as TensorRT-LLM's run_dtm_pld.py "
                "does; start the server without mpirun"
            )
        target_spec, target_options = target
        fraction = settings.kv_cache_free_gpu_memory_fraction
        target_fraction, draft_fraction = kv_fractions(fraction, target_spec, draft.spec)
        target_runner = cpp_runner(
            engine_dir,
            max_batch_size=limits.max_batch_size,
            kv_fraction=target_fraction,
            options=target_options,
            rank=0,
            orchestrator=True,
        )
        draft_runner = cpp_runner(
            draft.engine_dir,
            max_batch_size=limits.max_batch_size,
            kv_fraction=draft_fraction,
            options=draft.options,
            rank=0,
            orchestrator=True,
        )
        return cls(target_runner, draft_runner, api, ids, draft.draft_len)

    def has_work(self) -> bool:
        return bool(self._where)

    def step(self, new: list[Submission], cancelled: set[int]) -> None:
        for submission in new:
            self._next_round(_Speculation(submission, list(submission.prompt_ids), sampling_seed(submission.params)))
        for request_id in cancelled:
            self._cancel(request_id)
        busy = [lane for lane in (self._draft, self._target) if lane.waiting]
        for lane in busy:  # await_responses returns once one is ready; the longest wait is shared out
            for response in lane.executor.await_responses(timeout=POLL / len(busy)):
                self._dispatch(lane, response)
        self._stats.poll(idle=not self._where)

    def stats(self) -> EngineStats:
        """Requests alternate between the Executors, so the request counts are this engine's own; KV is the target's."""
        target = self._stats.current(idle=True)
        return replace(target, running=len(self._where))

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
        # The target adds one token. Within max_new_tokens, the sequence and its draft stay within both engines'
        # input limits (speculative_limits), so the runtime never truncates the draft.
        room = speculation.submission.params.max_new_tokens - speculation.generated - 1
        draft_len = min(self._draft_len, room)
        if draft_len > 0:
            proposal = SamplingParams(max_new_tokens=draft_len, ignore_eos=speculation.submission.params.ignore_eos)
            request = executor_request(
                self._api, self._ids, speculation.sequence, proposal, streaming=False, stop_words=None
            )
            self._enqueue(self._draft, speculation, request)
        else:
            self._verify(speculation, [])

    def _verify(self, speculation: _Speculation, draft: list[int]) -> None:
        wanted = speculation.submission.params
        params = replace(wanted, max_new_tokens=len(draft) + 1, seed=speculation.seed + speculation.rounds)
        request = executor_request(
            self._api,
            self._ids,
            speculation.sequence,
            params,
            streaming=False,
            stop_words=self._stop_words,
            min_tokens=min(max(0, wanted.min_new_tokens - speculation.generated), params.max_new_tokens),
            external_draft_tokens_config=self._api.ExternalDraftTokensConfig(draft) if draft else None,
        )
        self._enqueue(self._target, speculation, request)

    def _enqueue(self, lane: _Lane, speculation: _Speculation, request: Any) -> None:
        executor_id = enqueue_or_fail(lane.executor, request, speculation.submission)
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
            finish_stream(stream, tokens, "stop", self._ids.stop_ids)
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
