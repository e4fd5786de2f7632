"""The engine's own forward for the Llama family (Llama, Mistral, Qwen2, SmolLM2), on the paged KV pool.

Built from a loaded transformers model: the projections are fused (q/k/v into one matmul, gate/up into
another), the other modules and every weight tensor are reused as they are, and the transformers layers are
dropped one by one so the weights are never held twice. RoPE uses the checkpoint's own `inv_freq` and
attention scaling (so every static rope scaling transformers implements — linear, llama3, yarn — is
honoured) from a table of all positions; Mistral's sliding window and Qwen2's per-layer windows are kept.

`native_unsupported_reason` says why a checkpoint must take the generic transformers path instead.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from model.backends.torch.attention import AttentionMeta, KVPool, attend
from model.backends.torch.layers import Ops, rope_table

NATIVE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})  # inv_freq does not change with length


def native_unsupported_reason(model: PreTrainedModel) -> str | None:
    """None if `NativeLlama` computes what this transformers model computes; else why not."""
    config = model.config
    if config.model_type not in NATIVE_MODEL_TYPES:
        return f"architecture {config.model_type!r} is not one of {sorted(NATIVE_MODEL_TYPES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the native MLP is SiLU-gated)"
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} changes its frequencies with the sequence length"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1 (sliced projections)"
    return None


class _Attention(nn.Module):
    def __init__(self, hf_attention: nn.Module, heads: int, kv_heads: int, window: int | None) -> None:
        super().__init__()
        q, k, v = hf_attention.q_proj, hf_attention.k_proj, hf_attention.v_proj
        self.qkv = _fused_linear(q, k, v)
        self.o_proj = hf_attention.o_proj
        self.head_dim = hf_attention.head_dim
        self.heads, self.kv_heads = heads, kv_heads
        self.scale = hf_attention.scaling
        self.window = window
        self.splits = [heads * self.head_dim, kv_heads * self.head_dim, kv_heads * self.head_dim]

    def forward(
        self,
        ops: Ops,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        pool: KVPool,
        layer: int,
        meta: AttentionMeta,
    ) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]"""
        tokens = x.shape[0]
        q, k, v = self.qkv(x).split(self.splits, dim=-1)
        q = q.view(tokens, self.heads, self.head_dim)
        k = k.view(tokens, self.kv_heads, self.head_dim)
        q, k = ops.rope(q, k, cos, sin)
        out = attend(
            pool, layer, meta, q, k, v.view(tokens, self.kv_heads, self.head_dim), scale=self.scale, window=self.window
        )
        return self.o_proj(out.reshape(tokens, self.heads * self.head_dim))


class _Layer(nn.Module):
    def __init__(self, hf_layer: nn.Module, heads: int, kv_heads: int, window: int | None) -> None:
        super().__init__()
        self.attention = _Attention(hf_layer.self_attn, heads, kv_heads, window)
        mlp = hf_layer.mlp
        self.gate_up = _fused_linear(mlp.gate_proj, mlp.up_proj)
        self.down = mlp.down_proj
        self.input_norm = hf_layer.input_layernorm.weight
        self.post_norm = hf_layer.post_attention_layernorm.weight


class NativeLlama(nn.Module):
    """forward(tokens [T], positions [T], meta) -> final-normed hidden states [T, hidden]."""

    def __init__(self, hf_model: PreTrainedModel, max_positions: int, graph_ops: Ops) -> None:
        super().__init__()
        config = hf_model.config
        # Eager steps launch every op from Python, and a compiled region's guards cost more host time than the
        # few kernels it saves; CUDA graphs replay without the host, so there the fused (compiled) ops pay.
        self.eager_ops, self.graph_ops = Ops.eager(), graph_ops
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        body = hf_model.model
        self.head_dim = body.layers[0].self_attn.head_dim
        self.eps = body.norm.variance_epsilon
        self.embed = body.embed_tokens
        self.final_norm = body.norm.weight
        self.lm_head = hf_model.lm_head
        self.vocab_size = self.lm_head.out_features
        layers = []
        for index in range(len(body.layers)):
            layers.append(
                _Layer(body.layers[index], self.heads, self.kv_heads, _window(hf_model, index, max_positions))
            )
            body.layers[index] = nn.Identity()  # the fused copies replace q/k/v and gate/up: free them now
        self.layers = nn.ModuleList(layers)
        rotary = body.rotary_emb
        self.cos, self.sin = rope_table(
            rotary.inv_freq, rotary.attention_scaling, max_positions, self.embed.weight.dtype
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta, pool: KVPool, ops: Ops
    ) -> torch.Tensor:
        eps = self.eps
        cos, sin = self.cos[positions], self.sin[positions]  # [T, head_dim]
        h = self.embed(tokens)  # [T, hidden]
        x = ops.rms_norm(h, self.layers[0].input_norm, eps)
        for index, layer in enumerate(self.layers):
            attn = layer.attention(ops, x, cos, sin, pool, index, meta)
            h, x = ops.add_rms_norm(h, attn, layer.post_norm, eps)
            mlp = layer.down(ops.silu_and_mul(layer.gate_up(x)))
            after = self.layers[index + 1].input_norm if index + 1 < len(self.layers) else self.final_norm
            h, x = ops.add_rms_norm(h, mlp, after, eps)
        return x

    def compute_logits(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMeta,
        pool: KVPool,
        index: torch.Tensor,
        *,
        graphed: bool = False,
    ) -> torch.Tensor:
        """tokens/positions [T] packed -> float32 logits [B, vocab] at packed positions `index` [B]."""
        ops = self.graph_ops if graphed else self.eager_ops
        return self.lm_head(self.forward(tokens, positions, meta, pool, ops)[index]).float()


def _fused_linear(*parts: nn.Linear) -> nn.Linear:
    """One Linear computing the given ones side by side (their outputs concatenated)."""
    weight = torch.cat([p.weight.detach() for p in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if parts[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    return fused


def _window(model: PreTrainedModel, layer: int, max_positions: int) -> int | None:
    """The layer's sliding window as transformers applies it (None: full attention, or a window past every position)."""
    config = model.config
    if config.model_type == "mistral":
        window = getattr(config, "sliding_window", None)
    else:
        window = getattr(model.model.layers[layer].self_attn, "sliding_window", None)
    return window if window is not None and window < max_positions else None
