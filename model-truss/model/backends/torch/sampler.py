"""Batched sampling on the device, inside the step: every row its own parameters, no host sync, no failure.

`Sampler.sample(logits [B, V], rows, bitmask [B, ceil(V/32)])` runs the processors in transformers' order
— repetition penalty (HF/CTRL semantics over prompt + output), presence/frequency penalties (OpenAI, over
the output), bans (end tokens before `min_new_tokens`, tokens a structured-output guide forbids),
temperature, top-k, top-p — then picks each row's token: argmax for greedy rows, Gumbel-max for the others.

Safe for every value the schema accepts: a temperature below base.py's `GREEDY_TEMPERATURE` is greedy
(vLLM's threshold), penalised scores are clamped to ±`SCORE_LIMIT` (a repetition penalty of 1e-300 saturates instead
of dividing by zero), the noise is finite, and no op mixes rows, so one row's values never touch another's.

Seeds are reproducible whatever the batch: the Gumbel noise of token v at output index t of a request is a
hash of (seed, t, v) (counter-based, like Philox), not a draw from a shared generator.

Per-slot state (a slot is a request's row in these tables, see scheduler.py): `prompt_seen` [slots, V] bool
(tokens of the prompt), `output_counts` [slots, V] int32 (generated tokens), `last_token` [slots] (the
input of the row's next decode step). The last slot is scratch, for the padding rows of a CUDA graph.

Row inputs are packed so one host-to-device copy carries them (`RowInputs`): ints [B, 7] =
(slot, output index, top_k, min_new_tokens, seed low 32 bits, seed high bits, greedy), floats [B, 5] =
(temperature, top_p, repetition, presence, frequency). Outputs: ints [B, 1 + K] = (token, top-K ids),
floats [B, 1 + K] = (token logprob, top-K logprobs), K = MAX_TOP_LOGPROBS, logprobs from the raw
log-softmax of the model's logits (zero when the step did not ask for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.backends.base import GREEDY_TEMPERATURE, MAX_TOP_LOGPROBS, SamplingParams

SCORE_LIMIT = 1e30  # |score| after penalties; / GREEDY_TEMPERATURE stays finite in float32
INT_FIELDS, FLOAT_FIELDS = 7, 5
_MASK32 = 0xFFFFFFFF


def needs_full(params: SamplingParams) -> bool:
    """Whether the row needs more than argmax: noise, penalties or filters."""
    return not params.greedy or (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


def row_values(params: SamplingParams, slot: int, step: int, seed: int) -> tuple[list[int], list[float]]:
    """One row of RowInputs, from the request's parameters (see the module docstring for the layout)."""
    ints = [slot, step, params.top_k, params.min_new_tokens, seed & _MASK32, seed >> 32, int(params.greedy)]
    floats = [
        max(params.temperature, GREEDY_TEMPERATURE),
        params.top_p,
        params.repetition_penalty,
        params.presence_penalty,
        params.frequency_penalty,
    ]
    return ints, floats


@dataclass(frozen=True)
class RowInputs:
    ints: torch.Tensor  # [B, INT_FIELDS] int64
    floats: torch.Tensor  # [B, FLOAT_FIELDS] float32
    bitmask: torch.Tensor  # [B, ceil(V / 32)] int32; all bits set for unguided rows


class Sampler:
    def __init__(self, *, slots: int, vocab_size: int, stop_ids: frozenset[int], device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.prompt_seen = torch.zeros(slots + 1, vocab_size, dtype=torch.bool, device=device)
        self.output_counts = torch.zeros(slots + 1, vocab_size, dtype=torch.int32, device=device)
        self.last_token = torch.zeros(slots + 1, dtype=torch.int64, device=device)
        self.scratch_slot = slots
        tokens = torch.arange(vocab_size, device=device)
        self._word, self._bit = tokens // 32, tokens % 32
        self._is_stop = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        stops = [t for t in stop_ids if 0 <= t < vocab_size]
        if stops:
            self._is_stop[torch.tensor(stops, device=device)] = True
        self._token_hash = _fmix32(_mul32(tokens + 1, 0x9E3779B1))  # [V]

    @property
    def bitmask_words(self) -> int:
        return -(-self.vocab_size // 32)

    def reset_slot(self, slot: int) -> None:
        """A new request takes the slot: forget the previous one's tokens (device ops, no sync)."""
        self.prompt_seen[slot].zero_()
        self.output_counts[slot].zero_()

    def mark_seen(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Prompt tokens (and recomputed ones) count for the repetition penalty: slots, tokens [N] int64."""
        self.prompt_seen[slots, tokens] = True

    def sample(
        self, logits: torch.Tensor, rows: RowInputs, *, full: bool, logprobs: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] float32 -> (ints [B, 1 + K], floats [B, 1 + K]); updates the rows' slot state."""
        ints, floats = rows.ints, rows.floats
        slots, step, greedy = ints[:, 0], ints[:, 1], ints[:, 6].bool()
        scores = logits.nan_to_num(nan=float("-inf"), posinf=SCORE_LIMIT, neginf=-SCORE_LIMIT)
        if full:
            scores = self._penalise(scores, slots, floats)
        banned = (step < ints[:, 3])[:, None] & self._is_stop[None, :]  # min_new_tokens
        banned |= ((rows.bitmask[:, self._word] >> self._bit) & 1) == 0  # structured output
        scores = scores.masked_fill(banned, float("-inf"))
        tokens = scores.argmax(dim=-1)
        if full:
            scaled = _top_k_top_p(scores / floats[:, 0:1], ints[:, 2], floats[:, 1])
            noise = self._gumbel(ints[:, 4], ints[:, 5], step)
            tokens = torch.where(greedy, tokens, (scaled + noise).argmax(dim=-1))
            self.output_counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        self.last_token[slots] = tokens
        return _outputs(logits, tokens, logprobs)

    def _penalise(self, scores: torch.Tensor, slots: torch.Tensor, floats: torch.Tensor) -> torch.Tensor:
        counts = self.output_counts[slots]  # [B, V]
        generated = counts > 0
        seen = self.prompt_seen[slots] | generated
        penalty = floats[:, 2:3]
        scores = torch.where(seen, torch.where(scores > 0, scores / penalty, scores * penalty), scores)
        scores = scores - floats[:, 4:5] * counts - floats[:, 3:4] * generated
        return scores.nan_to_num(nan=0.0).clamp(-SCORE_LIMIT, SCORE_LIMIT)

    def _gumbel(self, seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """[B, V] Gumbel(0, 1) noise, a pure function of (seed, step, token)."""
        key = _fmix32(_fmix32(seed_lo ^ _fmix32(seed_hi & _MASK32)) ^ _mul32(step + 1, 0x85EBCA77))  # [B]
        bits = _fmix32(_fmix32(key[:, None] ^ self._token_hash[None, :]) ^ key[:, None])
        uniform = ((bits >> 9).float() + 0.5) * 2.0**-23  # in (0, 1), both ends excluded
        return -torch.log(-torch.log(uniform))


def _top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """transformers' TopKLogitsWarper then TopPLogitsWarper, per row (top_k 0 / top_p 1: off)."""
    vocab = scaled.shape[-1]
    ordered, order = scaled.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = ordered.gather(1, (k - 1)[:, None])
    keep = ordered >= kth  # ties with the k-th score stay, as in transformers
    probs = ordered.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    keep &= probs.cumsum(dim=-1) - probs < top_p[:, None]  # the mass before a token is under top_p
    keep[:, 0] = True
    return scaled.masked_fill(~torch.zeros_like(keep).scatter(1, order, keep), float("-inf"))


def _outputs(logits: torch.Tensor, tokens: torch.Tensor, logprobs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows = logits.shape[0]
    if not logprobs:
        ints = torch.zeros(rows, 1 + MAX_TOP_LOGPROBS, dtype=torch.int64, device=logits.device)
        ints[:, 0] = tokens
        return ints, torch.zeros(rows, 1 + MAX_TOP_LOGPROBS, dtype=torch.float32, device=logits.device)
    log_probs = logits.log_softmax(dim=-1)
    top = log_probs.topk(min(MAX_TOP_LOGPROBS, logits.shape[1]), dim=-1)
    ints = torch.zeros(rows, 1 + MAX_TOP_LOGPROBS, dtype=torch.int64, device=logits.device)
    floats = torch.zeros(rows, 1 + MAX_TOP_LOGPROBS, dtype=torch.float32, device=logits.device)
    ints[:, 0], ints[:, 1 : 1 + top.indices.shape[1]] = tokens, top.indices
    floats[:, 0], floats[:, 1 : 1 + top.values.shape[1]] = log_probs.gather(1, tokens[:, None])[:, 0], top.values
    return ints, floats


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for 0 <= x < 2**32 in int64, without overflowing (16-bit halves)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)
