"""Runs one planned step on the device and hands back its sampled tokens without blocking the host.

`launch(plan, batch)` packs the step's inputs on the host (numpy), uploads them in one non-blocking copy per
dtype from pinned memory (double-buffered, so step N+1 is packed while step N's copy may still be queued),
runs the forward and the sampler, and starts a non-blocking copy of the results into pinned memory; `collect`
waits for that copy. The engine launches step N+1 before collecting step N, so the host's work (scheduling,
detokenizing streams) overlaps the device's.

Two ways to run a step:
- with CUDA graphs: the step's inputs go into the graphs' static buffers, then one forward graph (input
  tokens of decoding rows read from `Sampler.last_token`, so no token ever goes through the host) and one
  sampler graph (per variant: argmax or full sampling, with or without logprobs) are replayed. A decode-only
  step replays the graph of its batch-size bucket (padding rows read the scratch slot, write the scratch
  block); a step with prefill chunks replays the graph of its (chunk tokens, context) bucket, which computes
  every decoding row (padded to `max_rows`) and the packed chunks in one forward, so a step reads the weights
  once whatever it mixes;
- anything else (CPU, graphs off, a step that fits no bucket): the same model code eagerly on the packed
  tokens.

Packed layout of a forward: T tokens = decode rows first (padded to a bucket when flex attention decodes),
then each prefill chunk's tokens; `sample_index` [B] picks the rows whose logits are sampled, in
`plan.sampled` order.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from model.backends.base import MAX_TOP_LOGPROBS
from model.backends.torch.attention import (
    AttentionMeta,
    FlexDecode,
    GatherDecode,
    KVPool,
    PackedPrefill,
    PrefillSegment,
)
from model.backends.torch.kv_blocks import SCRATCH_BLOCK, BlockManager
from model.backends.torch.sampler import FLOAT_FIELDS, INT_FIELDS, RowInputs, Sampler
from model.backends.torch.scheduler import Sequence, StepPlan

logger = logging.getLogger(__name__)


class CausalLM(Protocol):
    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int

    def compute_logits(
        self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta, pool: KVPool, index: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class SampleBatch:
    """The sampler's inputs for `plan.sampled`, built by the engine (see sampler.row_values)."""

    ints: np.ndarray  # [B, INT_FIELDS] int64
    floats: np.ndarray  # [B, FLOAT_FIELDS] float32
    bitmask: np.ndarray | None  # [B, words] int32, None: no row is guided
    full: bool
    logprobs: bool
    seen_slots: np.ndarray  # [N] int64: (slot, token) pairs for the repetition penalty's prompt tokens
    seen_tokens: np.ndarray


@dataclass
class PendingStep:
    plan: StepPlan
    rows: int  # sampled rows
    ints: torch.Tensor  # pinned host [rows, 1 + K]
    floats: torch.Tensor
    event: torch.cuda.Event | None


def graph_buckets(max_rows: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 16 (nano-vllm's choice), and max_rows itself."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_rows] + list(range(16, max_rows, 16))
    return [*buckets, max_rows]


PREFILL_MAX_CONTEXT = 8192  # mixed-step graphs gather at most this many context slots (a step's chunks together)


def prefill_buckets(token_budget: int, max_seq_len: int) -> list[tuple[int, int]]:
    """(chunk tokens, context slots) pairs to capture: powers of two from 32 tokens and 64 slots; a context
    bucket is larger than its token bucket, so one context entry is always left for the padding tokens."""
    tokens = [t for t in (32, 64, 128, 256, 512, 1024, 2048) if t < token_budget] + [token_budget]
    limit = min(PREFILL_MAX_CONTEXT, max_seq_len + token_budget)
    contexts = [c for c in (2**i for i in range(6, 14)) if c <= limit]
    return [(t, c) for t in tokens for c in contexts if c > t]


class _Uploader:
    """Host arrays -> device tensors through pinned staging memory, without blocking the host.

    A copy from pinned memory runs later, on the stream, so staging memory must not be rewritten until the
    copy has run: every upload of a step takes fresh space in its step's buffer (a bump allocator), and the
    two buffers alternate between steps (the step before last has been collected, so its copies are done).
    On CPU the staging buffer is the result itself, which the same rule keeps from being overwritten.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._parity = 0
        self._buffers: list[dict[torch.dtype, torch.Tensor]] = [{}, {}]
        self._used: list[dict[torch.dtype, int]] = [{}, {}]
        self._retired: list[list[torch.Tensor]] = [[], []]  # outgrown this step; in use until the parity returns

    @property
    def parity(self) -> int:
        return self._parity

    def flip(self) -> None:
        """Next step: the other buffers, from their start (the step that last used them has been collected)."""
        self._parity ^= 1
        self._used[self._parity].clear()
        self._retired[self._parity].clear()

    def upload(self, arrays: list[np.ndarray], dtype: torch.dtype) -> list[torch.Tensor]:
        sizes = [a.size for a in arrays]
        total = max(1, sum(sizes))
        buffers, used = self._buffers[self._parity], self._used[self._parity]
        start = used.get(dtype, 0)
        if dtype not in buffers or start + total > buffers[dtype].numel():
            if dtype in buffers:
                self._retired[self._parity].append(buffers[dtype])
            capacity = 2 * max(total, buffers[dtype].numel() if dtype in buffers else 0)
            buffers[dtype] = torch.empty(capacity, dtype=dtype, pin_memory=self.device.type == "cuda")
            start = 0
        used[dtype] = start + total
        host = buffers[dtype][start : start + total]
        numpy_host = host.numpy()
        offset = 0
        for array, size in zip(arrays, sizes, strict=True):
            numpy_host[offset : offset + size] = array.reshape(-1)
            offset += size
        device = host.to(self.device, non_blocking=True)
        out, offset = [], 0
        for array, size in zip(arrays, sizes, strict=True):
            out.append(device[offset : offset + size].view(array.shape))
            offset += size
        return out


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        pool: KVPool,
        sampler: Sampler,
        blocks: BlockManager,
        *,
        max_rows: int,
        max_seq_len: int,
        token_budget: int,
        flex: bool,
    ) -> None:
        self.model = model
        self.pool = pool
        self.sampler = sampler
        self.blocks = blocks
        self.device = pool.kv.device
        self.block_size = pool.block_size
        self.max_rows = max_rows
        self.max_blocks_per_row = -(-max_seq_len // self.block_size)
        self.buckets = graph_buckets(max_rows)
        self.prefill_buckets = prefill_buckets(token_budget, max_seq_len)
        self._upload = _Uploader(self.device)
        self.flex = (
            FlexDecode(max_rows=max_rows, num_blocks=pool.num_blocks, block_size=self.block_size, device=self.device)
            if flex
            else None
        )
        self._graphs: dict[int, _Replay] = {}
        self._sampler_graphs: dict[tuple[int, bool, bool], _Replay] = {}
        self._mixed_graphs: dict[tuple[int, int], _Replay] = {}  # per (chunk tokens, context) bucket
        # launched steps per path ("decode graph": decode-only, "mixed graph": with chunks, "eager"; and
        # "mixed with decode rows": mixed graphs that also advanced decoding rows), for tests and benchmarks
        self.steps_by_path: Counter[str] = Counter()
        self._all_bits = torch.full((max_rows + 1, sampler.bitmask_words), -1, dtype=torch.int32, device=self.device)
        pinned = self.device.type == "cuda"
        self._results = [  # per upload parity: sampled rows' ints and floats, pinned for non-blocking copies
            (
                torch.empty(max_rows, 1 + MAX_TOP_LOGPROBS, dtype=torch.int64, pin_memory=pinned),
                torch.empty(max_rows, 1 + MAX_TOP_LOGPROBS, dtype=torch.float32, pin_memory=pinned),
            )
            for _ in range(2)
        ]

    # -- one step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def launch(self, plan: StepPlan, batch: SampleBatch) -> PendingStep:
        self._upload.flip()
        rows = len(plan.sampled)
        decode = len(plan.decode)
        if batch.seen_slots.size:
            seen_slots, seen_tokens = self._upload.upload([batch.seen_slots, batch.seen_tokens], torch.int64)
            self.sampler.mark_seen(seen_slots, seen_tokens)
        mixed = self._mixed_bucket(plan)
        if self._graphs and (not plan.chunks or mixed is not None):
            padded = self.max_rows if plan.chunks else self._bucket(decode)
            self._fill_flex(plan, padded)
            out_ints, out_floats = self._replay(plan, batch, padded, mixed)
            self.steps_by_path["mixed graph" if plan.chunks else "decode graph"] += 1
            self.steps_by_path["mixed with decode rows"] += bool(plan.chunks and decode)
        else:
            padded = self._bucket(decode) if self.flex is not None and decode else decode
            if self.flex is not None and decode:
                self._fill_flex(plan, padded)
            out_ints, out_floats = self._eager(plan, batch, padded)
            self.steps_by_path["eager"] += 1
        return self._read_back(plan, rows, out_ints[:rows], out_floats[:rows])

    def collect(self, pending: PendingStep) -> tuple[np.ndarray, np.ndarray]:
        """Wait for a launched step; (ints [B, 1 + K], floats [B, 1 + K]) as sampler.py lays them out."""
        if pending.event is not None:
            pending.event.synchronize()
        return pending.ints.numpy(), pending.floats.numpy()

    def _read_back(self, plan: StepPlan, rows: int, ints: torch.Tensor, floats: torch.Tensor) -> PendingStep:
        if self.device.type == "cpu":
            return PendingStep(plan, rows, ints.clone(), floats.clone(), None)
        host_ints, host_floats = self._results[self._upload.parity]
        host_ints[:rows].copy_(ints, non_blocking=True)
        host_floats[:rows].copy_(floats, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingStep(plan, rows, host_ints[:rows], host_floats[:rows], event)

    # -- eager --------------------------------------------------------------------------------

    def _eager(self, plan: StepPlan, batch: SampleBatch, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
        decode = plan.decode
        positions = [np.array([s.num_tokens - 1 for s in decode] + [0] * (padded - len(decode)), dtype=np.int64)]
        kv_slots = [
            np.array([self._slot(s.table.blocks, s.num_tokens - 1) for s in decode] + [0] * (padded - len(decode)))
        ]
        input_slots = np.array([s.slot for s in decode] + [self.sampler.scratch_slot] * (padded - len(decode)))
        prefill_tokens, contexts, segments = [], [], []
        sample_index = list(range(len(decode)))
        offset = padded
        for chunk in plan.chunks:
            end = chunk.start + len(chunk.tokens)
            slots = self._slots(chunk.seq.table.blocks, end)
            positions.append(np.arange(chunk.start, end, dtype=np.int64))
            kv_slots.append(slots[chunk.start :])
            prefill_tokens.append(np.asarray(chunk.tokens, dtype=np.int64))
            contexts.append(slots if chunk.start else slots[:0])
            segments.append((offset, len(chunk.tokens), chunk.start))
            if chunk.samples:
                sample_index.append(offset + len(chunk.tokens) - 1)
            offset += len(chunk.tokens)
        gather = self._gather_arrays(decode) if decode and self.flex is None else []
        arrays = [
            input_slots,
            np.concatenate(positions),
            np.concatenate(kv_slots).astype(np.int64),
            np.concatenate(prefill_tokens) if prefill_tokens else np.zeros(0, dtype=np.int64),
            np.asarray(sample_index, dtype=np.int64),
            np.concatenate(contexts).astype(np.int64) if contexts else np.zeros(0, dtype=np.int64),
            batch.ints,
            *gather,
        ]
        uploaded = self._upload.upload(arrays, torch.int64)
        dev_slots, dev_pos, dev_kv, dev_tokens, dev_index, dev_contexts, dev_ints = uploaded[:7]
        (dev_floats,) = self._upload.upload([batch.floats], torch.float32)
        bitmask = self._bitmask(batch, len(sample_index))
        tokens = torch.cat([self.sampler.last_token[dev_slots], dev_tokens]) if padded else dev_tokens
        equal = len({s.num_tokens for s in decode}) <= 1
        decode_attention = (
            self.flex
            if self.flex is not None
            else GatherDecode(uploaded[7], uploaded[8], equal_lengths=equal)
            if decode
            else None
        )
        prefill, context_offset = [], 0
        for seg_offset, length, start in segments:
            context = start + length if start else 0
            prefill.append(
                PrefillSegment(seg_offset, length, start, dev_contexts[context_offset : context_offset + context])
            )
            context_offset += context
        meta = AttentionMeta(dev_kv, padded, decode_attention, prefill)
        logits = self.model.compute_logits(tokens, dev_pos, meta, self.pool, dev_index)
        return self.sampler.sample(
            logits, RowInputs(dev_ints, dev_floats, bitmask), full=batch.full, logprobs=batch.logprobs
        )

    def _gather_arrays(self, decode: list[Sequence]) -> list[np.ndarray]:
        """GatherDecode's inputs: slots [D, C] (tails on the scratch slot) and lengths [D]."""
        lengths = np.array([s.num_tokens for s in decode], dtype=np.int64)
        slots = np.zeros((len(decode), int(lengths.max())), dtype=np.int64)
        for row, seq in enumerate(decode):
            slots[row, : lengths[row]] = self._slots(seq.table.blocks, int(lengths[row]))
        return [slots, lengths]

    def _bitmask(self, batch: SampleBatch, rows: int) -> torch.Tensor:
        if batch.bitmask is None:
            return self._all_bits[:rows]
        (bitmask,) = self._upload.upload([batch.bitmask], torch.int32)
        return bitmask

    # -- flex attention buffers ---------------------------------------------------------------

    def _fill_flex(self, plan: StepPlan, padded: int) -> None:
        """Block tables, block counts and query positions of the decode rows (padding: the scratch block)."""
        assert self.flex is not None
        tables = np.full((padded, self.max_blocks_per_row), SCRATCH_BLOCK, dtype=np.int32)
        counts = np.ones(padded, dtype=np.int32)
        q_pos = np.zeros(padded, dtype=np.int32)
        for row, seq in enumerate(plan.decode):
            blocks = seq.table.blocks
            tables[row, : len(blocks)] = blocks
            counts[row] = len(blocks)
            q_pos[row] = seq.num_tokens - 1
        arrays = [tables, counts, q_pos]
        changed = self._drain_changed()
        if changed.size:
            arrays += [changed, self.blocks.logical_index[changed]]
        uploaded = self._upload.upload(arrays, torch.int32)
        self.flex.fill(*uploaded[:3])
        if changed.size:
            self.flex.logical_index[uploaded[3].long()] = uploaded[4]

    def _drain_changed(self) -> np.ndarray:
        changed = np.unique(np.asarray(self.blocks.changed, dtype=np.int32))
        self.blocks.changed.clear()
        return changed

    # -- CUDA graphs --------------------------------------------------------------------------

    @torch.inference_mode()
    def capture_graphs(self, *, prefill: bool = True) -> float:
        """Warm up and capture the decode, mixed-step and sampler graphs; returns the seconds taken.

        On CPU (tests) the "graphs" replay the same work eagerly on the same static buffers.
        """
        assert self.flex is not None, "decode graphs need the flex attention path (static shapes)"
        started = time.perf_counter()
        self._static = _StaticBuffers(self.max_rows, self.model.vocab_size, self.sampler, self.device)
        self._pstatic = _PrefillBuffers(self.prefill_buckets, self.max_rows, self.device)
        self._fill_flex_padding(self.max_rows)
        on_cuda = self.device.type == "cuda"
        pool = torch.cuda.graph_pool_handle() if on_cuda else None
        for bucket in reversed(self.buckets):
            self._graphs[bucket] = _capture(lambda b=bucket: self._decode_forward(b), pool, self.device)
            for full in (False, True):
                for logprobs in (False, True):
                    self._sampler_graphs[(bucket, full, logprobs)] = _capture(
                        lambda b=bucket, f=full, lp=logprobs: self._static_sample(b, f, lp), pool, self.device
                    )
        try:
            for tokens, context in reversed(self.prefill_buckets if prefill else []):
                work = lambda t=tokens, c=context: self._mixed_forward(t, c)  # noqa: E731
                self._mixed_graphs[(tokens, context)] = _capture(work, pool, self.device)
        except Exception:  # decode graphs are the larger win: keep them, run steps with chunks eagerly
            logger.exception("prefill graph capture failed; steps with prefill chunks run eagerly")
            self._mixed_graphs.clear()
        if on_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def _fill_flex_padding(self, rows: int) -> None:
        assert self.flex is not None
        tables = torch.full((rows, 1), SCRATCH_BLOCK, dtype=torch.int32, device=self.device)
        self.flex.fill(tables, torch.ones(rows, dtype=torch.int32, device=self.device), tables[:, 0] * 0)

    def _decode_forward(self, bucket: int) -> None:
        buf = self._static
        tokens = self.sampler.last_token[buf.input_slots[:bucket]]
        meta = AttentionMeta(buf.kv_slots[:bucket], bucket, self.flex)
        logits = self.model.compute_logits(
            tokens, buf.positions[:bucket], meta, self.pool, buf.index[:bucket], graphed=True
        )
        buf.logits[:bucket].copy_(logits)

    def _mixed_forward(self, tokens: int, context: int) -> None:
        """One forward over every decoding row (max_rows, padded) then `tokens` packed chunk tokens; the logits
        of the rows `index` picks (plan.sampled order) go to the sampler's static input."""
        buf, pbuf, rows = self._static, self._pstatic, self.max_rows
        packed = PackedPrefill(
            pbuf.context_slots[:context],
            pbuf.query_seg[:tokens],
            pbuf.positions[:tokens],
            pbuf.key_seg[:context],
            pbuf.key_pos[:context],
        )
        ids = torch.cat([self.sampler.last_token[buf.input_slots], pbuf.tokens[:tokens]])  # [rows + tokens]
        positions = torch.cat([buf.positions, pbuf.positions[:tokens]])
        meta = AttentionMeta(torch.cat([buf.kv_slots, pbuf.kv_slots[:tokens]]), rows, self.flex, packed=packed)
        logits = self.model.compute_logits(ids, positions, meta, self.pool, pbuf.index, graphed=True)
        buf.logits.copy_(logits)

    def _static_sample(self, bucket: int, full: bool, logprobs: bool) -> None:
        buf = self._static
        rows = RowInputs(buf.ints[:bucket], buf.floats[:bucket], buf.bitmask[:bucket])
        ints, floats = self.sampler.sample(buf.logits[:bucket], rows, full=full, logprobs=logprobs)
        buf.out_ints[:bucket].copy_(ints)
        buf.out_floats[:bucket].copy_(floats)

    def _mixed_bucket(self, plan: StepPlan) -> tuple[int, int] | None:
        """The smallest captured (tokens, context) pair that holds the step's chunks, if any."""
        if not plan.chunks or not self._mixed_graphs:
            return None
        tokens = sum(len(c.tokens) for c in plan.chunks)
        context = sum(c.start + len(c.tokens) for c in plan.chunks)
        return next(((t, c) for t, c in self.prefill_buckets if t >= tokens and c > context), None)

    def _replay(
        self, plan: StepPlan, batch: SampleBatch, bucket: int, mixed: tuple[int, int] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's forward graph (its decode bucket, or its mixed bucket with `bucket` = max_rows), then the
        sampler graph of its sampled rows' bucket."""
        buf = self._static
        self._set_decode_inputs(plan, bucket)
        if mixed is None:
            self._graphs[bucket].replay()
        else:
            self._set_chunk_inputs(plan, *mixed)
            self._mixed_graphs[mixed].replay()
        rows = len(plan.sampled)
        if not rows:
            return buf.out_ints[:0], buf.out_floats[:0]
        sample_bucket = self._bucket(rows)
        pad = sample_bucket - rows
        scratch = self.sampler.scratch_slot
        ints = np.concatenate([batch.ints, np.tile(_padding_ints(scratch), (pad, 1))])
        floats = np.concatenate([batch.floats, np.ones((pad, FLOAT_FIELDS), dtype=np.float32)])
        (dev_ints,) = self._upload.upload([ints], torch.int64)
        (dev_floats,) = self._upload.upload([floats], torch.float32)
        buf.ints[:sample_bucket].copy_(dev_ints)
        buf.floats[:sample_bucket].copy_(dev_floats)
        if batch.bitmask is not None:
            bits = np.concatenate([batch.bitmask, np.full((pad, batch.bitmask.shape[1]), -1, dtype=np.int32)])
            (dev_bits,) = self._upload.upload([bits], torch.int32)
            buf.bitmask[:sample_bucket].copy_(dev_bits)
        self._sampler_graphs[(sample_bucket, batch.full, batch.logprobs)].replay()
        if batch.bitmask is not None:
            buf.bitmask[:sample_bucket].fill_(-1)
        return buf.out_ints[:sample_bucket], buf.out_floats[:sample_bucket]

    def _set_decode_inputs(self, plan: StepPlan, bucket: int) -> None:
        """Input slots, positions and KV slots of the decoding rows (padding: the scratch slot and block)."""
        buf = self._static
        decode, pad = plan.decode, bucket - len(plan.decode)
        arrays = [
            np.array([s.slot for s in decode] + [self.sampler.scratch_slot] * pad, dtype=np.int64),
            np.array([s.num_tokens - 1 for s in decode] + [0] * pad, dtype=np.int64),
            np.array([self._slot(s.table.blocks, s.num_tokens - 1) for s in decode] + [0] * pad, dtype=np.int64),
        ]
        input_slots, positions, kv_slots = self._upload.upload(arrays, torch.int64)
        buf.input_slots[:bucket].copy_(input_slots)
        buf.positions[:bucket].copy_(positions)
        buf.kv_slots[:bucket].copy_(kv_slots)

    def _set_chunk_inputs(self, plan: StepPlan, tokens: int, context: int) -> None:
        """Pack the chunks after the max_rows decode rows (padding: token 0 at position 0 on the scratch block,
        segment -1) and the sample index: decoding rows, then each sampling chunk's last token."""
        ids, positions, kv_slots, query_seg = [], [], [], []
        context_slots, key_seg, key_pos = [], [], []
        index = [np.arange(len(plan.decode), dtype=np.int64)]
        offset = self.max_rows
        for seg, chunk in enumerate(plan.chunks):
            end = chunk.start + len(chunk.tokens)
            slots = self._slots(chunk.seq.table.blocks, end)
            ids.append(np.asarray(chunk.tokens, dtype=np.int64))
            positions.append(np.arange(chunk.start, end, dtype=np.int64))
            kv_slots.append(slots[chunk.start :])
            query_seg.append(np.full(len(chunk.tokens), seg, dtype=np.int64))
            context_slots.append(slots)
            key_seg.append(np.full(end, seg, dtype=np.int64))
            key_pos.append(np.arange(end, dtype=np.int64))
            offset += len(chunk.tokens)
            if chunk.samples:
                index.append(np.array([offset - 1], dtype=np.int64))
        arrays = [
            _padded(ids, tokens, 0),
            _padded(positions, tokens, 0),
            _padded(kv_slots, tokens, 0),
            _padded(query_seg, tokens, -1),
            _padded(context_slots, context, 0),
            _padded(key_seg, context, -1),
            _padded(key_pos, context, 0),
            _padded(index, self.max_rows, 0),
        ]
        uploaded = self._upload.upload(arrays, torch.int64)
        buf = self._pstatic
        targets = [buf.tokens, buf.positions, buf.kv_slots, buf.query_seg]
        targets += [buf.context_slots, buf.key_seg, buf.key_pos, buf.index]
        for target, source in zip(targets, uploaded, strict=True):
            target[: source.shape[0]].copy_(source)

    @property
    def graphed(self) -> bool:
        return bool(self._graphs)

    @property
    def prefill_graphs(self) -> list[tuple[int, int]]:
        """The (chunk tokens, context) buckets of the captured mixed-step graphs."""
        return sorted(self._mixed_graphs)

    # -- helpers ------------------------------------------------------------------------------

    def _bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def _slot(self, blocks: list[int], position: int) -> int:
        return blocks[position // self.block_size] * self.block_size + position % self.block_size

    def _slots(self, blocks: list[int], length: int) -> np.ndarray:
        """Pool slots of positions 0 .. length - 1 of a sequence holding `blocks`."""
        table = np.asarray(blocks[: -(-length // self.block_size)], dtype=np.int64)
        return (table[:, None] * self.block_size + np.arange(self.block_size)[None, :]).reshape(-1)[:length]


class _StaticBuffers:
    """The CUDA graphs' inputs and outputs, sized for the largest bucket; a replay reads and writes [:bucket]."""

    def __init__(self, rows: int, vocab: int, sampler: Sampler, device: torch.device) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.input_slots = torch.full((rows,), sampler.scratch_slot, dtype=torch.int64, device=device)
        self.positions = zeros(rows)
        self.kv_slots = zeros(rows)
        self.index = torch.arange(rows, device=device)
        self.logits = zeros(rows, vocab, dtype=torch.float32)
        self.ints = torch.as_tensor(np.tile(_padding_ints(sampler.scratch_slot), (rows, 1)), device=device)
        self.floats = torch.ones(rows, FLOAT_FIELDS, dtype=torch.float32, device=device)
        self.bitmask = torch.full((rows, sampler.bitmask_words), -1, dtype=torch.int32, device=device)
        self.out_ints = zeros(rows, 1 + MAX_TOP_LOGPROBS)
        self.out_floats = zeros(rows, 1 + MAX_TOP_LOGPROBS, dtype=torch.float32)


class _PrefillBuffers:
    """The mixed-step graphs' chunk inputs (packed chunk tokens [T], their contexts [C]) and sample index [rows]."""

    def __init__(self, buckets: list[tuple[int, int]], rows: int, device: torch.device) -> None:
        tokens, context = max(t for t, _ in buckets), max(c for _, c in buckets)

        def filled(size: int, value: int) -> torch.Tensor:
            return torch.full((size,), value, dtype=torch.int64, device=device)

        self.tokens, self.positions, self.kv_slots = filled(tokens, 0), filled(tokens, 0), filled(tokens, 0)
        self.query_seg = filled(tokens, -1)
        self.context_slots, self.key_seg, self.key_pos = filled(context, 0), filled(context, -1), filled(context, 0)
        self.index = filled(rows, 0)  # into the packed [rows + T] tokens of a mixed forward


def _padded(parts: list[np.ndarray], size: int, fill: int) -> np.ndarray:
    out = np.full(size, fill, dtype=np.int64)
    values = np.concatenate(parts) if parts else out[:0]
    out[: values.size] = values
    return out


def _padding_ints(scratch_slot: int) -> np.ndarray:
    """Sampler ints of a padding row: the scratch slot, greedy."""
    row = np.zeros(INT_FIELDS, dtype=np.int64)
    row[0], row[6] = scratch_slot, 1
    return row


class _Replay(Protocol):
    def replay(self) -> None: ...


class _EagerReplay:
    """Stands in for a CUDA graph on CPU: replays by running the work on the same static buffers (tests)."""

    def __init__(self, work: Callable[[], None]) -> None:
        self.replay = work


def _capture(work: Callable[[], None], pool: object, device: torch.device) -> _Replay:
    """Run `work` twice (compiles, autotunes, allocates), then capture it into a graph in the shared pool."""
    for _ in range(2):
        work()
    if device.type != "cuda":
        return _EagerReplay(work)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        work()
    return graph
