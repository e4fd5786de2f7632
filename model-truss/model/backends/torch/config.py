"""The torch engine's settings resolved once for the device it runs on, and the KV pool's size.

KV pool size (tokens), as TensorRT-LLM sizes its cache:
- CUDA: `kv_cache_free_gpu_memory_fraction` of the GPU memory free after the weights are loaded and a
  warm-up step of `max_num_batched_tokens` tokens measured the activations' peak;
- CPU: `cpu_kv_cache_gib` (as vLLM's VLLM_CPU_KVCACHE_SPACE);
then capped by `kv_cache_max_tokens` and by what `max_batch_size` rows of the longest sequence can use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from model.errors import BackendError
from model.settings import ServerSettings

GIB = 1024**3
# max_num_batched_tokens when the setting is None, or twice max_batch_size if that is more (decoding rows take
# one token each). 256 on CUDA: a 7B model's step is compute-bound from about 256 tokens on an H100/H200, so a
# larger chunk only lengthens the steps that decoding streams wait through while a long prompt is prefilled.
DEFAULT_TOKEN_BUDGET = {"cuda": 256, "cpu": 256}


@dataclass(frozen=True)
class EngineConfig:
    device: torch.device
    dtype: torch.dtype
    max_rows: int  # sampling slots: requests running at once
    token_budget: int  # tokens computed per step
    block_size: int
    prefix_caching: bool
    model_impl: str  # auto | native | transformers
    compile_ops: bool  # torch.compile the fused elementwise ops
    flex_decode: bool  # decode attention through compiled flex_attention (static shapes) instead of gather + SDPA
    graphs: bool  # capture decode steps per batch-size bucket (needs flex_decode)
    prefill_graphs: bool  # and prefill chunks per (tokens, context) bucket
    kv_fraction: float
    kv_max_tokens: int | None
    cpu_kv_bytes: int
    max_seq_len: int | None  # the setting; the model's own limit applies too

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> EngineConfig:
        device = pick_device(settings.device)
        on_cuda = device.type == "cuda"
        return cls(
            device=device,
            dtype=pick_dtype(settings.dtype, device),
            max_rows=settings.max_batch_size,
            token_budget=settings.max_num_batched_tokens
            or max(DEFAULT_TOKEN_BUDGET[device.type], 2 * settings.max_batch_size),
            block_size=settings.kv_page_size,
            prefix_caching=settings.enable_prefix_caching,
            model_impl=settings.torch_model_impl,
            compile_ops=on_cuda and settings.torch_compile,
            flex_decode=on_cuda and settings.torch_compile,
            graphs=on_cuda and settings.torch_compile and settings.cuda_graphs,
            prefill_graphs=settings.cuda_graph_prefill,
            kv_fraction=settings.kv_cache_free_gpu_memory_fraction,
            kv_max_tokens=settings.kv_cache_max_tokens,
            cpu_kv_bytes=int(settings.cpu_kv_cache_gib * GIB),
            max_seq_len=settings.max_seq_len,
        )

    def pool_tokens(self, bytes_per_token: int, activation_bytes: int, max_seq_len: int) -> int:
        """How many tokens the KV pool holds (see the module docstring)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(self.kv_fraction * max(0, free - activation_bytes))
        else:
            budget = self.cpu_kv_bytes
        tokens = min(budget // bytes_per_token, self.max_rows * max_seq_len)
        if self.kv_max_tokens is not None:
            tokens = min(tokens, self.kv_max_tokens)
        if tokens < 2 * self.block_size:
            raise BackendError(
                f"the KV cache would hold only {tokens} tokens; free device memory, raise "
                "kv_cache_free_gpu_memory_fraction / cpu_kv_cache_gib / kv_cache_max_tokens, or lower max_batch_size"
            )
        return tokens


def load_hf_model(settings: ServerSettings, model_dir: Path) -> PreTrainedModel:
    """The weights on the configured device, in the configured dtype (shared with the accuracy reference)."""
    device = pick_device(settings.device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=pick_dtype(settings.dtype, device))
    return model.to(device).eval()


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise BackendError("device=cuda was asked for but no CUDA GPU is visible; set LLM_DEVICE=cpu or fix the node")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, choice)
