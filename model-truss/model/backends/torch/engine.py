"""`TorchBackend`: the engine thread's loop over scheduler, runner and sampler (the `BatchingBackend` contract).

Each `_step`:
1. accept new requests (a bad prompt or guide fails that request alone) and drop cancelled ones;
2. plan a step (scheduler.py) and launch it (runner.py): the device starts computing;
3. collect the previous step's tokens — they were copied back while step 2 was being planned — and hand
   each request its token (with logprobs when asked), ending it on an end token, a length limit or a
   finished guide. Structured output needs each token on the host before the next mask, so while a guided
   request runs, steps are collected as soon as they are launched.
A step that raises is retried sequence by sequence, so only the sequences that fail alone are failed; a
CUDA error is not retried (the device is unusable): the engine stops and reports itself unhealthy.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.artifacts import Artifacts
from model.backends.base import (
    FEATURE_FIELDS,
    MAX_TOP_LOGPROBS,
    BatchingBackend,
    EngineStats,
    Limits,
    Outbox,
    SamplingParams,
    Submission,
    TokenLogprob,
)
from model.backends.torch.attention import AttentionMeta, KVPool, PrefillSegment
from model.backends.torch.config import EngineConfig, load_hf_model
from model.backends.torch.hf_model import HFCausalLM
from model.backends.torch.kv_blocks import BlockManager
from model.backends.torch.layers import Ops
from model.backends.torch.llama import NativeLlama, native_unsupported_reason
from model.backends.torch.runner import CausalLM, ModelRunner, PendingStep, SampleBatch
from model.backends.torch.sampler import FLOAT_FIELDS, INT_FIELDS, Sampler, needs_full, row_values
from model.backends.torch.scheduler import Scheduler, Sequence, StepPlan
from model.errors import BackendError, InvalidRequest
from model.guided import GuideCompiler
from model.prompting import stop_token_ids
from model.settings import ServerSettings

logger = logging.getLogger(__name__)

BASE_FEATURES = frozenset(FEATURE_FIELDS) - {"guided_decoding"}
FAILED = "generation failed for this request; the server log has the details"  # no internals to the client


class TorchBackend(BatchingBackend):
    name = "torch"

    def __init__(
        self,
        model: CausalLM,
        runner: ModelRunner,
        scheduler: Scheduler,
        limits: Limits,
        stop_ids: frozenset[int],
        *,
        guides: GuideCompiler | None = None,
        load_report: dict[str, Any] | None = None,
    ) -> None:
        """`guides`: the tokenizer's grammar compiler (model/guided.py); without one, structured output is refused."""
        super().__init__(limits, stop_ids)
        self.model = model
        self.runner = runner
        self.scheduler = scheduler
        self.blocks = scheduler.blocks
        self.sampler = runner.sampler
        self.load_report = load_report or {}
        self._guides = guides
        self.supports = BASE_FEATURES | ({"guided_decoding"} if guides is not None else frozenset())
        self._pending: PendingStep | None = None
        self._outbox = Outbox()  # every stream item of a step goes through it
        self.steps = 0  # launched steps, for tests and benchmarks

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def load(cls, settings: ServerSettings, artifacts: Artifacts, tokenizer: PreTrainedTokenizerBase) -> TorchBackend:
        model = load_hf_model(settings, artifacts.model_dir)
        stops = stop_token_ids(tokenizer, artifacts.model_dir, artifacts.tokenizer_dir)
        guides = GuideCompiler(tokenizer, model.get_output_embeddings().out_features, stops)  # the logits' width
        return cls.from_hf_model(model, settings, stops, guides=guides)

    @classmethod
    def from_hf_model(
        cls,
        hf_model: PreTrainedModel,
        settings: ServerSettings,
        stop_ids: frozenset[int],
        *,
        guides: GuideCompiler | None = None,
        config: EngineConfig | None = None,
    ) -> TorchBackend:
        """Build the engine around a loaded transformers model (which it takes apart for the native forward).

        `config` overrides what `settings` resolves to (tests and benchmarks compare the engine's variants).
        """
        started = time.perf_counter()
        config = config or EngineConfig.from_settings(settings)
        positions = int(getattr(hf_model.config, "max_position_embeddings", 0) or 4096)
        max_positions = min(config.max_seq_len or positions, positions)
        model, impl = _build_model(hf_model, config, max_positions)
        bytes_per_token = KVPool.bytes_per_token(model.num_layers, model.kv_heads, model.head_dim, config.dtype)
        activations = _activation_bytes(model, config, bytes_per_token)
        tokens = config.pool_tokens(bytes_per_token, activations, max_positions)
        num_blocks = tokens // config.block_size + 1  # + the scratch block
        pool = _pool(model, config, num_blocks)
        capacity = (num_blocks - 1) * config.block_size
        max_seq_len = min(max_positions, capacity)
        limits = Limits(
            max_input_len=min(settings.max_input_len or max_seq_len - 1, max_seq_len - 1),
            max_seq_len=max_seq_len,
            max_new_tokens=min(settings.max_new_tokens_limit, max_seq_len - 1),
            max_batch_size=config.max_rows,
            kv_cache_tokens=capacity,
        )
        blocks = BlockManager(num_blocks, config.block_size, prefix_caching=config.prefix_caching)
        sampler = Sampler(slots=config.max_rows, vocab_size=model.vocab_size, stop_ids=stop_ids, device=config.device)
        native = isinstance(model, NativeLlama)

        def runner_with(flex: bool) -> ModelRunner:
            return ModelRunner(
                model,
                pool,
                sampler,
                blocks,
                max_rows=config.max_rows,
                max_seq_len=max_seq_len,
                token_budget=config.token_budget,
                flex=flex,
            )

        runner = runner_with(native and config.flex_decode)
        capture_s, decode_attention = 0.0, "flex_attention" if runner.flex is not None else "gather + sdpa"
        on_cuda = config.device.type == "cuda"
        reserved = torch.cuda.memory_reserved(config.device) if on_cuda else 0
        if config.graphs and runner.flex is not None:
            try:
                capture_s = runner.capture_graphs(prefill=config.prefill_graphs)
            except Exception as exc:  # an unsupported GPU/compiler combination: serve, slower, rather than not at all
                logger.exception("decode graph capture failed; decoding eagerly with gather + SDPA attention")
                runner = runner_with(False)
                decode_attention = f"gather + sdpa (flex_attention / graph capture failed: {type(exc).__name__})"
        scheduler = Scheduler(
            blocks, max_rows=config.max_rows, token_budget=config.token_budget, max_seq_len=max_seq_len
        )
        report = {
            "model_impl": impl,
            "device": str(config.device),
            "dtype": str(config.dtype).removeprefix("torch."),
            "kv_cache_tokens": capacity,
            "kv_cache_gib": round(pool.kv.numel() * pool.kv.element_size() / 2**30, 3),
            "kv_block_size": config.block_size,
            "token_budget": config.token_budget,
            "prefix_caching": config.prefix_caching,
            "decode_attention": decode_attention,
            "compile_ops": config.compile_ops and native,
            "graph_buckets": runner.buckets if runner.graphed else [],
            "prefill_graphs": len(runner.prefill_graphs),
            "capture_s": round(capture_s, 1),
            # what capture and warm-up added to the memory torch holds: the graphs' pools, compiled kernels' buffers
            "graphs_gib": round((torch.cuda.memory_reserved(config.device) - reserved) / 2**30, 2) if on_cuda else None,
            "warmup_s": round(time.perf_counter() - started, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if config.device.type == "cuda"
            else None,
        }
        logger.info("torch engine ready: %s", ", ".join(f"{k}={v}" for k, v in report.items()))
        stops = frozenset(stop_ids)
        return cls(model, runner, scheduler, limits, stops, guides=guides, load_report=report)

    # -- consumer side ----------------------------------------------------------------------

    async def prepare(self, params: SamplingParams) -> None:
        """Compile the request's grammar off the event loop (cached), so admitting it costs microseconds."""
        await super().prepare(params)  # refuses structured output when there is no compiler
        if params.guided is None:
            return
        if params.min_new_tokens:
            raise InvalidRequest(
                "min_tokens cannot be combined with structured output: the grammar decides where the output ends; "
                "remove min_tokens",
                param="min_tokens",
            )
        assert self._guides is not None
        await asyncio.to_thread(self._guides.compile, params.guided)  # InvalidRequest naming the field if bad

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.blocks.usage,
            prefix_cache_queries=self.blocks.queries,
            prefix_cache_hits=self.blocks.hits,
        )

    # -- engine thread ----------------------------------------------------------------------

    def _has_work(self) -> bool:
        return self.scheduler.has_work() or self._pending is not None

    @torch.inference_mode()
    def _step(self, new: list[Submission], cancelled: set[int]) -> None:
        try:
            self._advance(new, cancelled)
        finally:
            self._outbox.flush()  # the step's tokens and errors, one wake-up per event loop

    def _advance(self, new: list[Submission], cancelled: set[int]) -> None:
        for submission in new:
            self._accept(submission)
        if cancelled:
            for seq in [s for s in (*self.scheduler.running, *self.scheduler.waiting) if s.request_id in cancelled]:
                self.scheduler.finish(seq)
        guided = any(s.guide is not None for s in self.scheduler.running)
        if guided and self._pending is not None:
            self._collect(self._pending)
            self._pending = None
        plan = self.scheduler.schedule()
        launched = self._launch_isolated(plan) if plan is not None else None
        if self._pending is not None:
            self._collect(self._pending)
        self._pending = launched
        if launched is not None and any(s.guide is not None for s in launched.plan.sampled):
            self._collect(launched)
            self._pending = None

    def _accept(self, submission: Submission) -> None:
        prompt, params = submission.prompt_ids, submission.params
        vocab = self.model.vocab_size
        if not prompt or any(not 0 <= t < vocab for t in prompt):
            submission.stream.fail(
                InvalidRequest(f"prompt token ids must be non-empty and in [0, {vocab})"), outbox=self._outbox
            )
            return
        if len(prompt) >= self.limits.max_seq_len:
            submission.stream.fail(
                InvalidRequest(
                    f"the prompt has {len(prompt)} tokens; this engine takes at most {self.limits.max_seq_len - 1}"
                ),
                outbox=self._outbox,
            )
            return
        guide = None
        if params.guided is not None:
            if self._guides is None:
                submission.stream.fail(
                    InvalidRequest("the torch backend has no structured-output compiler; remove it"),
                    outbox=self._outbox,
                )
                return
            try:
                guide = self._guides.compile(params.guided).new_matcher()  # compiled in prepare(): a cache hit
            except InvalidRequest as exc:
                submission.stream.fail(exc, outbox=self._outbox)
                return
            except Exception:
                logger.exception("structured-output guide failed for request %d", submission.request_id)
                submission.stream.fail(BackendError(FAILED), outbox=self._outbox)
                return
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.scheduler.add(Sequence(submission, list(prompt), len(prompt), seed, guide))

    def _launch_isolated(self, plan: StepPlan) -> PendingStep | None:
        """Launch `plan`; if it raises, run each sequence alone and fail only those that fail alone."""
        try:
            return self._launch(plan)
        except Exception as exc:
            if _is_device_fault(exc):
                raise
            logger.exception("a step of %d sequences failed; retrying each alone", len(plan.sequences))
            first_error = exc
        if self._pending is not None:  # the retries deliver at once: the step before them goes first
            self._collect(self._pending)
            self._pending = None
        parts = plan.split()
        for part in parts:
            try:
                if len(parts) == 1:
                    raise first_error
                self._collect(self._launch(part))
            except Exception as exc:
                if _is_device_fault(exc):
                    raise
                if exc is not first_error:
                    logger.exception("requests %s failed alone", [seq.request_id for seq in part.sequences])
                for seq in part.sequences:
                    self._fail(seq, BackendError(FAILED))
        return None

    def _launch(self, plan: StepPlan) -> PendingStep:
        batch = self._sample_batch(plan)
        for seq in plan.sequences:
            if seq.fresh:
                self.sampler.reset_slot(seq.slot)
                seq.fresh = False
        pending = self.runner.launch(plan, batch)
        self.scheduler.launched(plan)
        for chunk in plan.chunks:
            chunk.seq.marked = chunk.start + len(chunk.tokens)
        for seq in plan.sequences:
            self.blocks.register(seq.table, seq.token_ids, seq.num_computed)
        self.steps += 1
        return pending

    def _sample_batch(self, plan: StepPlan) -> SampleBatch:
        rows = plan.sampled
        ints = np.zeros((len(rows), INT_FIELDS), dtype=np.int64)
        floats = np.zeros((len(rows), FLOAT_FIELDS), dtype=np.float32)
        bitmask = None
        for index, seq in enumerate(rows):
            ints[index], floats[index] = row_values(seq.submission.params, seq.slot, seq.num_generated, seq.seed)
            if seq.guide is not None:
                if bitmask is None:
                    bitmask = torch.full((len(rows), self.sampler.bitmask_words), -1, dtype=torch.int32)
                seq.guide.fill_next_token_bitmask(bitmask, index)
        seen_slots, seen_tokens = [], []
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.submission.params.repetition_penalty != 1.0:
                tokens = seq.token_ids[seq.marked : chunk.start + len(chunk.tokens)]
                seen_slots.append(np.full(len(tokens), seq.slot, dtype=np.int64))
                seen_tokens.append(np.asarray(tokens, dtype=np.int64))
        return SampleBatch(
            ints=ints,
            floats=floats,
            bitmask=bitmask.numpy() if bitmask is not None else None,
            full=any(needs_full(s.submission.params) for s in rows),
            logprobs=any(s.submission.params.logprobs is not None for s in rows),
            seen_slots=np.concatenate(seen_slots) if seen_slots else np.zeros(0, dtype=np.int64),
            seen_tokens=np.concatenate(seen_tokens) if seen_tokens else np.zeros(0, dtype=np.int64),
        )

    def _collect(self, pending: PendingStep) -> None:
        ints, floats = self.runner.collect(pending)
        for index, seq in enumerate(pending.plan.sampled):
            seq.in_flight -= 1
            if not seq.finished:
                try:
                    self._deliver(seq, int(ints[index, 0]), ints[index], floats[index])
                except Exception:  # a guide raising or rejecting the token: that request alone
                    logger.exception("request %d failed while its token was delivered", seq.request_id)
                    self._fail(seq, BackendError(FAILED))

    def _deliver(self, seq: Sequence, token: int, ints: np.ndarray, floats: np.ndarray) -> None:
        params = seq.submission.params
        stream = seq.submission.stream
        if seq.guide is not None and not seq.guide.accept_token(token):
            raise BackendError(f"the structured-output grammar rejected token {token}")
        if token in self.stop_token_ids and not params.ignore_eos:
            self.scheduler.finish(seq)
            stream.put((), "stop", outbox=self._outbox)
            return
        seq.token_ids.append(token)
        self.blocks.register(seq.table, seq.token_ids, seq.num_computed)
        logprobs = None
        if params.logprobs is not None:
            top = tuple(
                (int(ints[1 + j]), float(floats[1 + j]))
                for j in range(min(params.logprobs, MAX_TOP_LOGPROBS, self.model.vocab_size))
            )
            logprobs = (TokenLogprob(token, float(floats[0]), top),)
        generated = len(seq.token_ids) - seq.num_prompt
        if seq.guide is not None and seq.guide.is_terminated():
            reason = "stop"
        elif generated >= params.max_new_tokens or len(seq.token_ids) >= self.limits.max_seq_len:
            reason = "length"
        else:
            stream.put((token,), None, logprobs, outbox=self._outbox)
            return
        self.scheduler.finish(seq)
        stream.put((token,), reason, logprobs, outbox=self._outbox)

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        if not seq.finished:
            self.scheduler.finish(seq)
            seq.submission.stream.fail(exc, outbox=self._outbox)

    def _fail_all(self, exc: BaseException) -> None:
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self._fail(seq, exc)
        self._outbox.flush()
        self._pending = None


def _build_model(hf_model: PreTrainedModel, config: EngineConfig, max_positions: int) -> tuple[CausalLM, str]:
    """The native forward where it computes the same function, else transformers' modules; logged with why."""
    reason = native_unsupported_reason(hf_model)
    if config.model_impl == "native" and reason is not None:
        raise BackendError(f"torch_model_impl=native cannot serve this checkpoint: {reason}; use auto")
    if config.model_impl == "transformers" or reason is not None:
        why = "torch_model_impl=transformers" if reason is None else reason
        logger.info("torch engine: transformers modules on the paged KV pool (%s)", why)
        return HFCausalLM(hf_model), f"transformers ({why})"
    ops = Ops.compiled() if config.compile_ops else Ops.eager()  # for the CUDA graphs
    logger.info("torch engine: native Llama-family forward for %s", hf_model.config.model_type)
    return NativeLlama(hf_model, max_positions, ops), f"native ({hf_model.config.model_type})"


@torch.inference_mode()
def _activation_bytes(model: CausalLM, config: EngineConfig, bytes_per_token: int) -> int:
    """Run one prefill step of the largest forward a step makes (the token budget after max_rows padded decoding
    rows, as in a mixed-step graph) on a scratch pool: compiles the eager kernels, and on CUDA measures the
    activations' peak (what the KV pool must leave free). The transformers path is checked too."""
    tokens = config.token_budget + config.max_rows
    pool = _pool(model, config, -(-tokens // config.block_size) + 1)
    ids = torch.arange(tokens, device=config.device) % model.vocab_size
    slots = torch.arange(tokens, device=config.device) + config.block_size  # past the scratch block
    meta = AttentionMeta(slots, 0, None, [PrefillSegment(0, tokens, 0, slots[:0])])
    on_cuda = config.device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if on_cuda else 0
    last = torch.tensor([tokens - 1], device=config.device)
    model.compute_logits(ids, torch.arange(tokens, device=config.device), meta, pool, last)
    if isinstance(model, HFCausalLM):
        model.check_calls()
    peak = torch.cuda.max_memory_allocated() - before if on_cuda else 0
    del pool
    return peak


def _pool(model: CausalLM, config: EngineConfig, num_blocks: int) -> KVPool:
    return KVPool(
        layers=model.num_layers,
        num_blocks=num_blocks,
        block_size=config.block_size,
        kv_heads=model.kv_heads,
        head_dim=model.head_dim,
        dtype=config.dtype,
        device=config.device,
    )


def _is_device_fault(exc: BaseException) -> bool:
    """CUDA errors poison the context: retrying on the same device would only fail again."""
    return isinstance(exc, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(exc)
