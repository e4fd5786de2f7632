"""The generic path: any transformers causal LM whose attention is pluggable, on the engine's paged KV pool.

transformers 5 calls attention through `AttentionInterface`; registering `paged_attention_forward` under
`ATTENTION_NAME` and switching the model to it makes every layer hand its rotated q/k/v to `attention.attend`,
which writes them into the pool and attends the right context. The model then runs on the same packed token
list as the native forward (one sequence of T tokens, `position_ids` restarting per request), with no
DynamicCache, padding or 4D mask. Sliding windows and logit soft-capping arrive as keyword arguments and are
honoured; a layer that never calls the interface is caught at load (`check_calls`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel

from model.backends.torch.attention import AttentionMeta, KVPool, attend

ATTENTION_NAME = "llm_engine_paged"
_UNSUPPORTED_KWARGS = ("s_aux",)  # attention sinks (gpt-oss): not implemented on the pool


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    engine_attention: tuple[AttentionMeta, KVPool, list[int]],
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None), as transformers' interface wants."""
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"the engine's paged attention does not implement {name}")
    meta, pool, calls = engine_attention
    layer = module.layer_idx
    calls[layer] += 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(
        pool,
        layer,
        meta,
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        scale=scale,
        window=sliding_window,
        softcap=softcap,
    )
    return out[None], None


class HFCausalLM:
    """`compute_logits` as NativeLlama has it, over a transformers model (eager only: no CUDA graphs)."""

    def __init__(self, model: PreTrainedModel) -> None:
        if not model._can_set_attn_implementation():
            raise ValueError(
                f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
                "so the torch backend cannot give it a paged KV cache"
            )
        AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
        model.set_attn_implementation(ATTENTION_NAME)
        self.model = model
        config = model.config.get_text_config()
        self.num_layers = config.num_hidden_layers
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.vocab_size = model.get_output_embeddings().out_features
        self._calls = [0] * self.num_layers

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
        self._calls = [0] * self.num_layers
        out = self.model(
            input_ids=tokens[None],
            position_ids=positions[None],
            use_cache=False,
            logits_to_keep=index,
            engine_attention=(meta, pool, self._calls),
        )
        return out.logits[0].float()

    def check_calls(self) -> None:
        """After a forward: every layer attended through the pool, else the model bypasses the interface."""
        missing = [layer for layer, count in enumerate(self._calls) if count == 0]
        if missing:
            raise ValueError(
                f"layers {missing[:8]} of {type(self.model).__name__} did not call the attention interface; "
                "this architecture cannot run on the paged KV cache"
            )
