"""The `torch` backend: a paged-KV, continuously batching engine for Hugging Face causal LMs.

Layout (each module one job, as in nano-vllm): `engine.py` (the BatchingBackend loop), `scheduler.py`
(admission, decode rows, chunked prefill, preemption), `kv_blocks.py` (paged blocks and prefix caching),
`runner.py` (packed inputs, CUDA graphs, non-blocking readback), `attention.py` (the KV pool and attention
over it), `llama.py` + `layers.py` (the native Llama-family forward), `hf_model.py` (any other transformers
model on the same pool), `sampler.py` (batched sampling on the device), `config.py` (settings resolved for
the device, KV pool sizing). docs/torch-engine.md describes the design and what is measured where.
"""

from model.backends.torch.config import load_hf_model
from model.backends.torch.engine import TorchBackend

__all__ = ["TorchBackend", "load_hf_model"]
