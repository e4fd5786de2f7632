"""The engine against transformers on the bench's device: tiny random models of each architecture it serves.

`bench gpu` runs this in a child process (a device fault here cannot take the 7B run with it); on CUDA each
native model gets the whole engine: bf16, flex-attention decoding, CUDA graphs for decode and mixed steps.
Per architecture (Llama with llama3 rope scaling, Mistral with a sliding window, Qwen2 with q/k/v bias, and
Gemma on the transformers path):
1. identity (identity.py): greedy tokens and logprobs of the identity prompts (short, chunked, a cached
   prefix) against transformers' `generate` on the same weights, and each bf16 side against float32;
2. a seeded sampled request alone, then in a batch beside a greedy one and a poisoned one (temperature 9e-38,
   repetition penalty 1e-300): the poisoned row must end normally; whether the other two keep their solo
   tokens is reported (in bf16, GEMMs of another batch size may round differently, so it is a figure here and
   an assertion only in the float32 unit tests);
3. the engine's steps per path (on CUDA the native models must take graphs only).
`python -m scripts.benchmarks.gpu_checks --device cuda --out FILE` prints and writes one JSON object:
architecture -> result, or the error's traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import traceback
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

from model.backends.base import SamplingParams
from model.backends.torch import TorchBackend
from model.settings import load_settings
from scripts.benchmarks import identity

SIZES = {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 4096}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024,
}
ARCHITECTURES: dict[str, PretrainedConfig] = {
    "llama3-rope": LlamaConfig(**SIZES, **HEADS, rope_parameters=LLAMA3_ROPE),
    "mistral-window": MistralConfig(**SIZES, **HEADS, sliding_window=100),
    "qwen2-bias": Qwen2Config(**SIZES, **HEADS),
    "gemma-transformers-path": GemmaConfig(**SIZES, **HEADS, head_dim=32),
}
NEW_TOKENS = 12
BUDGET = 64  # tokens per step: the 252-token identity prompt is prefilled in chunks


def check_architecture(config: PretrainedConfig, device: str) -> dict[str, Any]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    settings = load_settings(
        {"device": device, "max_batch_size": 4, "max_seq_len": 2048, "max_num_batched_tokens": BUDGET}, environ={}
    )
    prompts = identity.identity_prompts(config.vocab_size, BUDGET, settings.kv_page_size)
    references = [identity.reference(model, p, NEW_TOKENS) for p in prompts]
    float32 = copy.deepcopy(model).float()
    backend = TorchBackend.from_hf_model(model, settings, frozenset({config.vocab_size - 1}))
    backend.start()
    try:
        outputs = identity.engine_outputs(backend, prompts, NEW_TOKENS)
        sampled = SamplingParams(NEW_TOKENS, temperature=0.8, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
        greedy = SamplingParams(NEW_TOKENS, ignore_eos=True)
        poisoned = SamplingParams(NEW_TOKENS, temperature=9e-38, repetition_penalty=1e-300, ignore_eos=True)
        alone = [_tokens(backend, [(prompts[1], sampled)])[0], _tokens(backend, [(prompts[0], greedy)])[0]]
        batch = _tokens(backend, [(prompts[1], sampled), (prompts[0], greedy), (prompts[2], poisoned)])
        steps = dict(backend.runner.steps_by_path)
        report = backend.load_report
    finally:
        backend.shutdown()
    summary = identity.summary(identity.compare_all(references, prompts, outputs))
    gaps = identity.float32_gaps(float32, references, prompts, outputs)
    graphs_only = device != "cuda" or not report["graph_buckets"] or steps.get("eager", 0) == 0
    poisoned_ok = len(batch[2]) == NEW_TOKENS
    return {
        "ok": summary["ok"] and poisoned_ok and graphs_only,
        "identity": [
            (p["prompt_tokens"], p["compared"], p["mismatches"], p["max_logprob_diff"]) for p in summary["prompts"]
        ],
        "identity_ok": summary["ok"],
        "float32": identity.float32_summary(gaps),
        "seeded_same_in_batch": batch[0] == alone[0],
        "greedy_same_in_batch": batch[1] == alone[1],
        "poisoned_row_ok": poisoned_ok,
        "steps_by_path": steps,
        "engine": {k: report[k] for k in ("model_impl", "decode_attention", "graph_buckets", "prefill_graphs")},
    }


def _tokens(backend: TorchBackend, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    async def one(ids: list[int], params: SamplingParams) -> list[int]:
        out: list[int] = []
        async for chunk in backend.generate(ids, params):
            out.extend(chunk.token_ids)
        return out

    async def together() -> list[list[int]]:
        return list(await asyncio.gather(*(one(ids, params) for ids, params in requests)))

    return asyncio.run(together())


def run_checks(device: str, names: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in names:
        try:
            results[name] = check_architecture(ARCHITECTURES[name], device)
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default=",".join(ARCHITECTURES), help="comma-separated names (default: all)")
    args = parser.parse_args()
    names = args.only.split(",")
    unknown = sorted(set(names) - set(ARCHITECTURES))
    if unknown:
        parser.error(f"unknown architectures {unknown}; known: {', '.join(ARCHITECTURES)}")
    results = run_checks(args.device, names)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
