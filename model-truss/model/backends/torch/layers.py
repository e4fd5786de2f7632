"""The elementwise pieces of a Llama-family layer, written to compute exactly what transformers computes.

Each is a plain function of tensors (x: [T, hidden], packed tokens), so `Ops.compiled()` can hand them to
torch.compile, which fuses each into one kernel; `Ops.eager()` runs them as written (CPU, and the reference
the compiled ones are tested against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in float32, cast back, then scale."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rms_norm(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + delta, rms_norm of it): a layer's residual add and the next norm in one kernel when compiled."""
    summed = residual + delta
    return summed, rms_norm(summed, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D], cos/sin [T, D] -> rotated q, k (transformers' apply_rotary_pos_emb)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 * I] (gate and up projections side by side) -> silu(gate) * up, [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_table(
    inv_freq: torch.Tensor, scaling: float, positions: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [positions, D] for every position, as transformers' rotary embedding computes them per step."""
    freqs = torch.arange(positions, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


@dataclass(frozen=True)
class Ops:
    """The fused elementwise ops a layer calls; the same functions, eager or compiled."""

    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[..., torch.Tensor]

    @classmethod
    def eager(cls) -> Ops:
        return cls(rms_norm, add_rms_norm, rope, silu_and_mul)

    @classmethod
    def compiled(cls) -> Ops:
        """Shape-generic (dynamic) compiles: one kernel set serves prefill chunks and every decode bucket."""

        def compile_(fn: Callable) -> Callable:
            return torch.compile(fn, dynamic=True, fullgraph=True)

        return cls(compile_(rms_norm), compile_(add_rms_norm), compile_(rope), compile_(silu_and_mul))
