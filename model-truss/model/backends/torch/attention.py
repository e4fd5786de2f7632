"""The KV pool and attention over it, without padding, concatenation or expanding KV heads for GQA.

A forward pass computes a packed list of T tokens (no batch dimension): first `num_decode` decoding rows
(one token each), then prefill chunks. `AttentionMeta` says where each token's K/V goes (`slot_mapping`) and
what each token attends:
- decoding rows, through `meta.decode`: `GatherDecode` (eager, any device: gathers each row's context and
  runs SDPA with a per-row mask) or `FlexDecode` (CUDA: flex_attention straight over the pool, with a block
  mask built from the block tables, so only a row's own blocks are read; static shapes, so it is captured in
  the decode CUDA graphs);
- each prefill chunk, through SDPA on its own context (causal, offset by the chunk's start).
GQA never expands KV heads: flex_attention's and SDPA's flash kernel's `enable_gqa`, or query heads folded
into the query length for a masked SDPA call (see `_sdpa`); a sliding window (Mistral, Qwen2 layers) masks
`query_pos - key_pos >= window`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from model.backends.torch.kv_blocks import SCRATCH_BLOCK


class KVPool:
    """Keys and values of every layer: kv [layers, 2, kv_heads, slots, head_dim]; a slot holds one token."""

    def __init__(
        self,
        *,
        layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_blocks * block_size
        shape = (layers, 2, kv_heads, self.num_slots, head_dim)
        if device.type == "cuda":
            # flex_attention reads whole blocks (masking the unwritten tail): never-written memory must be finite
            self.kv = torch.zeros(shape, dtype=dtype, device=device)
        else:
            # the gather path reads only written slots and the scratch block; untouched pages stay unallocated
            self.kv = torch.empty(shape, dtype=dtype, device=device)
            self.kv[:, :, :, SCRATCH_BLOCK * block_size : (SCRATCH_BLOCK + 1) * block_size].zero_()

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def keys(self, layer: int) -> torch.Tensor:
        """[kv_heads, slots, head_dim]"""
        return self.kv[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots [T] int64; k, v [T, kv_heads, head_dim]."""
        self.kv[layer, 0].index_copy_(1, slots, k.transpose(0, 1))
        self.kv[layer, 1].index_copy_(1, slots, v.transpose(0, 1))


class DecodeAttention(Protocol):
    def __call__(
        self, pool: KVPool, layer: int, q: torch.Tensor, scale: float, window: int | None, softcap: float | None
    ) -> torch.Tensor:
        """q [rows, q_heads, head_dim] -> [rows, q_heads, head_dim]: each row attends its context."""


@dataclass(frozen=True)
class PrefillSegment:
    """One prefill chunk in the packed input: tokens offset .. offset + length - 1 at positions start ..."""

    offset: int
    length: int
    start: int
    context_slots: torch.Tensor  # [start + length] int64: the pool slots of positions 0 .. start + length - 1


class PackedPrefill:
    """All prefill chunks of a step attended at once (static shapes, so the step can be a CUDA graph).

    The chunks' contexts are gathered side by side from the pool — context_slots [C] (each chunk's positions
    0 .. end, chunk after chunk, then padding on the scratch block) — and one SDPA call masks what each token
    may see: key_seg / key_pos [C] say whose position each context entry is, query_seg / query_pos [L] the
    same for the chunk tokens. Padding tokens (segment -1) see only the padding entries (there is always one).
    """

    def __init__(
        self,
        context_slots: torch.Tensor,
        query_seg: torch.Tensor,
        query_pos: torch.Tensor,
        key_seg: torch.Tensor,
        key_pos: torch.Tensor,
    ) -> None:
        self.context_slots = context_slots
        self._same = query_seg[:, None] == key_seg[None, :]  # [L, C]
        self._q_pos, self._k_pos = query_pos[:, None], key_pos[None, :]
        self._masks: dict[int | None, torch.Tensor] = {}  # per window, for this forward pass only

    def mask(self, window: int | None) -> torch.Tensor:
        """[L, C] bool"""
        if window not in self._masks:
            self._masks[window] = self._same & _visible(self._q_pos, self._k_pos, window)
        return self._masks[window]


@dataclass
class AttentionMeta:
    """Everything attention needs for one forward pass over a packed token list."""

    slot_mapping: torch.Tensor  # [T] int64: where each token's K/V is written
    num_decode: int
    decode: DecodeAttention | None
    prefill: list[PrefillSegment] = field(default_factory=list)
    packed: PackedPrefill | None = None  # instead of `prefill`: every token after the decode rows at once


def attend(
    pool: KVPool,
    layer: int,
    meta: AttentionMeta,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [T, q_heads, D], k/v [T, kv_heads, D] of the packed tokens -> attention output [T, q_heads, D].

    Writes the tokens' K/V into the pool first, so a token sees itself and everything before it.
    """
    pool.write(layer, meta.slot_mapping, k, v)
    outputs = []
    if meta.num_decode:
        assert meta.decode is not None
        outputs.append(meta.decode(pool, layer, q[: meta.num_decode], scale, window, softcap))
    for seg in meta.prefill:
        rows = slice(seg.offset, seg.offset + seg.length)
        outputs.append(_prefill(pool, layer, seg, q[rows], k[rows], v[rows], scale, window, softcap))
    if meta.packed is not None:
        slots = meta.packed.context_slots
        keys = pool.keys(layer).index_select(1, slots)[None]  # [1, Hkv, C, D]
        values = pool.values(layer).index_select(1, slots)[None]
        query = q[meta.num_decode :].transpose(0, 1)[None]  # [1, Hq, L, D]
        mask = meta.packed.mask(window)[None, None]
        outputs.append(_sdpa(query, keys, values, mask, scale, softcap)[0].transpose(0, 1))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _prefill(
    pool: KVPool,
    layer: int,
    seg: PrefillSegment,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """One chunk: q [L, Hq, D] against its context; a fresh prompt attends only its own k/v [L, Hkv, D]."""
    if seg.start == 0:
        keys, values = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, L, D]
    else:
        keys = pool.keys(layer).index_select(1, seg.context_slots)  # [Hkv, C, D]
        values = pool.values(layer).index_select(1, seg.context_slots)
    query = q.transpose(0, 1)[None]  # [1, Hq, L, D]
    if seg.start == 0 and window is None and softcap is None:
        out = F.scaled_dot_product_attention(
            query, keys[None], values[None], is_causal=True, scale=scale, enable_gqa=True
        )
    else:
        q_pos = torch.arange(seg.start, seg.start + seg.length, device=q.device)[:, None]
        k_pos = torch.arange(keys.shape[1], device=q.device)[None, :]
        mask = _visible(q_pos, k_pos, window)  # [L, C]
        out = _sdpa(query, keys[None], values[None], mask[None, None], scale, softcap)
    return out[0].transpose(0, 1)  # [L, Hq, D]


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal visibility, with an optional sliding window; broadcasts q_pos against k_pos."""
    visible = k_pos <= q_pos
    if window is not None:
        visible = visible & (q_pos - k_pos < window)
    return visible


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float | None
) -> torch.Tensor:
    """q [B, Hq, L, D], k/v [B, Hkv, C, D], mask [B or 1, 1, L, C] bool.

    On CUDA, SDPA implements `enable_gqa` only in its flash kernel (no masks) and its math kernel, which
    materialises float32 scores [B, Hq, L, C]. So a masked call folds each KV head's query heads into the
    query length instead — q [B, Hkv, G * L, D] against the unexpanded k/v, the mask repeated G times — which
    the memory-efficient kernel computes (query head h uses KV head h // G, as transformers' repeat_kv).
    """
    batch, heads, length, dim = q.shape
    groups = heads // k.shape[1]
    if softcap is None:
        if groups == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        folded = q.reshape(batch, k.shape[1], groups * length, dim)
        masks = mask.expand(mask.shape[0], 1, length, mask.shape[-1]).repeat(1, 1, groups, 1)  # [B|1, 1, G*L, C]
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=masks, scale=scale)
        return out.reshape(batch, heads, length, dim)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = softcap * torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap)
    scores = scores.masked_fill(~mask, float("-inf")).float().softmax(dim=-1).to(q.dtype)
    return scores @ v


class GatherDecode:
    """Decode attention for any device: each row's context gathered from the pool, SDPA with a per-row mask.

    slots [rows, C] int64: the pool slot of each row's positions 0 .. C-1 (C = longest context in the step;
    shorter rows point their tail at the scratch block); lengths [rows] int64: each row's context length.
    """

    def __init__(self, slots: torch.Tensor, lengths: torch.Tensor, *, equal_lengths: bool) -> None:
        self.slots = slots
        self.lengths = lengths
        self._equal_lengths = equal_lengths  # known on the host: no mask needed without a window
        self._masks: dict[int | None, torch.Tensor | None] = {}

    def __call__(
        self, pool: KVPool, layer: int, q: torch.Tensor, scale: float, window: int | None, softcap: float | None
    ) -> torch.Tensor:
        rows, context = self.slots.shape
        flat = self.slots.reshape(-1)
        keys = pool.keys(layer).index_select(1, flat).unflatten(1, (rows, context)).transpose(0, 1)  # [B, Hkv, C, D]
        values = pool.values(layer).index_select(1, flat).unflatten(1, (rows, context)).transpose(0, 1)
        mask = self._mask(window)
        query = q[:, :, None, :]  # [B, Hq, 1, D]
        if mask is None and softcap is None:
            out = F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True)
        else:
            full = torch.ones(rows, 1, 1, context, dtype=torch.bool, device=q.device) if mask is None else mask
            out = _sdpa(query, keys, values, full, scale, softcap)
        return out[:, :, 0, :]

    def _mask(self, window: int | None) -> torch.Tensor | None:
        """[B, 1, 1, C] bool, or None when every row sees its whole (equally long) context."""
        if window not in self._masks:
            if self._equal_lengths and (window is None or window >= self.slots.shape[1]):
                self._masks[window] = None
            else:
                k_pos = torch.arange(self.slots.shape[1], device=self.slots.device)[None, :]
                q_pos = (self.lengths - 1)[:, None]
                self._masks[window] = _visible(q_pos, k_pos, window)[:, None, None, :]
        return self._masks[window]


class FlexDecode:
    """Decode attention on CUDA: flex_attention over the whole pool with a block mask per batch-size bucket.

    A row's block table becomes its block mask: flex_attention visits only those blocks, and the mask drops
    the slots past the query (and before a sliding window), using `logical_index[block]`, the block's index in
    every table that holds it (see kv_blocks.py). With `full_blocks`, every block but the last is declared
    "full" (no mask evaluated there): on CPU, whose flex template needs full blocks; not on CUDA, where the
    decoding kernel then splits only a fixed share of the pool across thread blocks instead of a row's blocks.
    The masks' tensors are static buffers that `fill` updates before each step, so a step can be captured in a
    CUDA graph: [rows, 1, 1] block counts, [rows, 1, 1, num_blocks] block ids. Padding rows attend the scratch
    block.
    """

    def __init__(self, *, max_rows: int, num_blocks: int, block_size: int, device: torch.device) -> None:
        from torch.nn.attention.flex_attention import flex_attention

        self.full_blocks = device.type == "cpu"
        self.block_size = block_size
        self.num_slots = num_blocks * block_size

        def counts() -> torch.Tensor:
            return torch.zeros(max_rows, 1, 1, dtype=torch.int32, device=device)

        def indices() -> torch.Tensor:
            return torch.zeros(max_rows, 1, 1, num_blocks, dtype=torch.int32, device=device)

        self.full_count, self.full_index = counts(), indices()  # blocks[:-1]
        self.last_count, self.last_index = counts() + 1, indices()  # blocks[-1]
        self.all_count, self.all_index = counts(), indices()  # every block (sliding-window layers)
        self.no_count = counts()
        self.q_pos = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.logical_index = torch.zeros(num_blocks, dtype=torch.int32, device=device)
        # one compiled kernel per (bucket, window): more than dynamo's default recompile limit of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
        self._flex = torch.compile(flex_attention, dynamic=False)
        self._masks: dict[tuple[int, int | None], object] = {}

    def fill(self, tables: torch.Tensor, counts: torch.Tensor, q_pos: torch.Tensor) -> None:
        """tables [rows, max_blocks] int32 (each row's blocks, padded), counts [rows] (blocks held), q_pos [rows]."""
        rows, width = tables.shape
        last = tables.gather(1, (counts - 1).long()[:, None])
        self.full_index[:rows, 0, 0, :width].copy_(tables)
        self.full_count[:rows, 0, 0].copy_(counts - 1)
        self.last_index[:rows, 0, 0, :1].copy_(last)
        self.all_index[:rows, 0, 0, :width].copy_(tables)
        self.all_count[:rows, 0, 0].copy_(counts)
        self.q_pos[:rows].copy_(q_pos)

    def __call__(
        self, pool: KVPool, layer: int, q: torch.Tensor, scale: float, window: int | None, softcap: float | None
    ) -> torch.Tensor:
        if softcap is not None:
            raise ValueError("attention logit soft-capping is not implemented for flex decoding; use GatherDecode")
        rows = q.shape[0]
        out = self._flex(
            q[:, :, None, :],  # [B, Hq, 1, D]
            pool.keys(layer)[None],  # [1, Hkv, slots, D]
            pool.values(layer)[None],
            block_mask=self.block_mask(rows, window),
            scale=scale,
            enable_gqa=True,
        )
        return out[:, :, 0, :]

    def block_mask(self, rows: int, window: int | None) -> object:
        key = (rows, window)
        if key not in self._masks:
            from torch.nn.attention.flex_attention import BlockMask

            full: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
            if window is None and self.full_blocks:
                partial = (self.last_count[:rows], self.last_index[:rows])
                full = (self.full_count[:rows], self.full_index[:rows])
            else:
                partial = (self.all_count[:rows], self.all_index[:rows])
                if self.full_blocks:
                    full = (self.no_count[:rows], self.full_index[:rows])
            self._masks[key] = BlockMask.from_kv_blocks(
                *partial,
                *full,
                BLOCK_SIZE=(128, self.block_size),
                mask_mod=self._mask_mod(window),
                seq_lengths=(1, self.num_slots),
                compute_q_blocks=False,
            )
        return self._masks[key]

    def _mask_mod(self, window: int | None) -> Callable:
        logical, q_pos, size = self.logical_index, self.q_pos, self.block_size

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            k_pos = logical[kv_idx // size] * size + kv_idx % size
            return _visible(q_pos[b], k_pos, window)

        return mask_mod
