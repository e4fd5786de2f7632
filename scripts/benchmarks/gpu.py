"""`bench gpu`: the torch backend on one GPU against plain transformers `generate` and the bandwidth limit.

All in one process, on one model object, so the three figures of a row differ only in who drives the model:
1. bandwidth: a 4 GiB device-to-device copy, bytes read + written over the median of 20 timed copies;
2. a Mistral-7B-shaped model (MistralConfig: 32 layers, hidden 4096, MLP 14336, 32 heads, 8 KV heads,
   vocab 32000) with random bf16 weights, and a word-level tokenizer whose prompts are exactly N tokens;
3. `model.generate` on a static batch of each size (greedy, exactly `output` new tokens after `input` prompt
   tokens), each step timed by a streamer, so it gets the same TTFT / ITL / E2E statistics as a server run;
   both sides first run once at full length, untimed: the first run at a new batch size was up to 3x slower
   per step (H200: 59 ms, then 20.5 ms), most likely while the CUDA caching allocator met each KV-cache size;
4. the torch backend (its public constructor, this model; started only after step 3, so its idle engine
   thread is not there while generate runs) driven by the direct mode: at each concurrency, two waves of
   requests of the same lengths (EOS ignored);
5. the limit: each decode step reads every weight once (the input embedding only for the rows it looks up),
   so aggregate tokens/s <= batch x bandwidth / weight bytes; the KV cache a step also reads makes the second,
   tighter limit. Utilisation is measured tokens/s over the weights-only limit.
Batch-1 decode tokens/s is 1 / ITL at batch 1 (decode only, no prefill), the same way for both.
Peak memory is `torch.cuda.max_memory_allocated` during each run (the 13.5 GiB of weights included).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from transformers import AutoModelForCausalLM, GenerationConfig, MistralConfig, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from model.backends.base import Limits
from model.backends.torch_batcher import TorchBackend
from scripts.benchmarks.datasets import BenchRequest, LengthDist, PromptCodec, random_corpus, synthetic, word_tokenizer
from scripts.benchmarks.direct import direct_sender
from scripts.benchmarks.loadgen import LoadLevel, RunPlan, run_levels
from scripts.benchmarks.report import console, print_json_line, run_meta, write_results
from scripts.benchmarks.stats import RequestRecord, RunSummary, summarize

GIB = 1024**3
MISTRAL_7B = MistralConfig(max_position_embeddings=32768, sliding_window=None)  # Mistral-7B-Instruct-v0.2


@dataclass(frozen=True)
class GpuRow:
    concurrency: int
    backend_tok_s: float
    hf_generate_tok_s: float
    backend_itl_ms: float  # p50
    hf_itl_ms: float
    limit_tok_s: float  # weights only
    limit_kv_tok_s: float  # weights + the KV cache a step reads, at the run's mean context
    backend_peak_gib: float
    hf_peak_gib: float
    backend_failed: int

    @property
    def utilisation(self) -> float:
        return self.backend_tok_s / self.limit_tok_s


def measure_bandwidth(size_bytes: int = 4 * GIB, repeats: int = 20) -> float:
    """Device memory bandwidth in bytes/s, counting each copied byte read once and written once."""
    src = torch.randint(0, 255, (size_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = [_cuda_seconds(lambda: dst.copy_(src)) for _ in range(repeats)]
    return 2 * size_bytes / statistics.median(times)


def random_model(config: MistralConfig = MISTRAL_7B, dtype: torch.dtype = torch.bfloat16) -> PreTrainedModel:
    """Random weights of the given shape, built directly on the GPU."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def weight_bytes_per_step(model: PreTrainedModel) -> int:
    """Bytes of weights a decode step reads: all of them but the input embedding table (a few rows are read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    return total - embedding.numel() * embedding.element_size()


def kv_bytes_per_token(config: MistralConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Keys and values of one token in every layer."""
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8


class _StepClock(BaseStreamer):
    """When each step's tokens reached the host: generate puts the prompt first, then once per step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """Nothing is held back."""


def hf_generate(model: PreTrainedModel, batch: int, input_len: int, new_tokens: int) -> list[RequestRecord]:
    """One greedy `generate` on a static batch, exactly `new_tokens` each; a record per row, timed per step."""
    ids = torch.randint(0, model.config.vocab_size - 1, (batch, input_len), device=model.device)
    eos = model.config.vocab_size - 1
    config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos
    )
    clock = _StepClock()
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=clock)
    torch.cuda.synchronize()
    end = time.perf_counter()
    return [RequestRecord(row, input_len, start, end, clock.times[1:], new_tokens) for row in range(batch)]


@dataclass(frozen=True)
class GpuPlan:
    concurrencies: tuple[int, ...] = (1, 8, 32, 64)
    input_len: int = 128
    output_len: int = 128
    waves: int = 2


@dataclass(frozen=True)
class Ceiling:
    """What bounds a decode step: measured bandwidth and the bytes a step must read."""

    bandwidth: float  # bytes/s
    weight_bytes: int
    kv_bytes_per_token: int

    def tokens_per_s(self, batch: int, context: float = 0.0) -> float:
        """Aggregate tokens/s if a step of `batch` rows (each `context` tokens long) only read memory."""
        return batch * self.bandwidth / (self.weight_bytes + batch * context * self.kv_bytes_per_token)


def run_gpu_suite(plan: GpuPlan, out_dir: Path) -> list[GpuRow]:
    """Steps 1-5 of the module docstring; prints the table, writes `<out>/gpu.*`, ends with one JSON line."""
    bandwidth = measure_bandwidth()
    model = random_model()
    ceiling = Ceiling(bandwidth, weight_bytes_per_step(model), kv_bytes_per_token(model.config))
    hf_runs = [_hf_level(model, concurrency, plan) for concurrency in plan.concurrencies]
    vocab = model.config.vocab_size
    inputs, outputs = LengthDist("fixed", plan.input_len), LengthDist("fixed", plan.output_len)
    codec = PromptCodec(word_tokenizer(vocab), "raw")
    prompts = synthetic(codec, plan.waves * max(plan.concurrencies), inputs, outputs, corpus=random_corpus(vocab))
    limits = Limits(max_input_len=4096, max_seq_len=8192, max_new_tokens=4096, max_batch_size=max(plan.concurrencies))
    backend = TorchBackend(model, limits, frozenset({vocab - 1}), pad_id=vocab - 1)
    backend.start()
    try:
        backend_runs = [_backend_level(backend, prompts, concurrency, plan) for concurrency in plan.concurrencies]
    finally:
        backend.shutdown()
    mean_context = plan.input_len + plan.output_len / 2
    rows = [
        GpuRow(
            concurrency=concurrency,
            backend_tok_s=backend_run.output_tokens_per_s,
            hf_generate_tok_s=hf_run.output_tokens_per_s,
            backend_itl_ms=backend_run.itl_ms["p50"] or 0.0,
            hf_itl_ms=hf_run.itl_ms["p50"] or 0.0,
            limit_tok_s=ceiling.tokens_per_s(concurrency),
            limit_kv_tok_s=ceiling.tokens_per_s(concurrency, mean_context),
            backend_peak_gib=backend_run.extra["peak_gib"],
            hf_peak_gib=hf_run.extra["peak_gib"],
            backend_failed=backend_run.failed,
        )
        for concurrency, backend_run, hf_run in zip(plan.concurrencies, backend_runs, hf_runs, strict=True)
    ]
    decode = {
        "backend_batch1_decode_tok_s": 1000.0 / rows[0].backend_itl_ms,
        "hf_batch1_decode_tok_s": 1000.0 / rows[0].hf_itl_ms,
        "limit_batch1_decode_tok_s": ceiling.tokens_per_s(1),
    }
    meta = run_meta(
        suite="gpu",
        model="Mistral-7B shape, random weights, bf16",
        bandwidth_gb_s=bandwidth / 1e9,
        weight_bytes_per_step=ceiling.weight_bytes,
        kv_bytes_per_token=ceiling.kv_bytes_per_token,
        input_len=plan.input_len,
        output_len=plan.output_len,
        rows=[asdict(r) | {"utilisation": r.utilisation} for r in rows],
        **decode,
    )
    paths = write_results(out_dir / "gpu", meta, backend_runs + hf_runs)
    print_gpu_table(rows, meta)
    print(markdown_table(rows))
    console.print("results: " + ", ".join(map(str, paths)))
    headline = {"suite": "gpu", "gpu": meta["machine"]["gpu"], "bandwidth_gb_s": round(bandwidth / 1e9, 1)}
    print_json_line(headline | {k: round(v, 1) for k, v in decode.items()} | {"rows": meta["rows"]})
    return rows


def _hf_level(model: PreTrainedModel, batch: int, plan: GpuPlan) -> RunSummary:
    hf_generate(model, batch, plan.input_len, plan.output_len)  # warm-up: every KV size this run meets
    torch.cuda.reset_peak_memory_stats()
    records = hf_generate(model, batch, plan.input_len, plan.output_len)
    summary = summarize(records, label=f"c={batch}", mode="hf-generate", concurrency=batch)
    summary.extra["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    return summary


def _backend_level(backend: TorchBackend, prompts: list[BenchRequest], concurrency: int, plan: GpuPlan) -> RunSummary:
    torch.cuda.reset_peak_memory_stats()
    run_plan = RunPlan(num_requests=plan.waves * concurrency, warmup_tokens=None)
    (summary,) = run_levels(prompts, direct_sender(backend), [LoadLevel(concurrency=concurrency)], run_plan, "direct")
    summary.extra["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    return summary


COLUMNS = (
    "concurrency",
    "torch backend tok/s",
    "HF generate tok/s",
    "backend / HF",
    "ITL ms p50 (backend / HF)",
    "limit tok/s (weights)",
    "limit (weights + KV)",
    "utilisation",
    "peak GiB (backend / HF)",
    "failed",
)


def _cells(r: GpuRow) -> list[str]:
    return [
        str(r.concurrency),
        f"{r.backend_tok_s:,.0f}",
        f"{r.hf_generate_tok_s:,.0f}",
        f"{r.backend_tok_s / r.hf_generate_tok_s:.2f}",
        f"{r.backend_itl_ms:.1f} / {r.hf_itl_ms:.1f}",
        f"{r.limit_tok_s:,.0f}",
        f"{r.limit_kv_tok_s:,.0f}",
        f"{r.utilisation:.0%}",
        f"{r.backend_peak_gib:.1f} / {r.hf_peak_gib:.1f}",
        str(r.backend_failed),
    ]


def print_gpu_table(rows: list[GpuRow], meta: dict[str, Any]) -> None:
    gpu, bandwidth = meta["machine"]["gpu"], meta["bandwidth_gb_s"]
    table = Table(title=f"{gpu}, {bandwidth:.0f} GB/s measured; in {meta['input_len']} / out {meta['output_len']}")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*_cells(row))
    console.print(table)
    console.print(
        f"batch-1 decode tok/s: backend {meta['backend_batch1_decode_tok_s']:.1f}, "
        f"HF generate {meta['hf_batch1_decode_tok_s']:.1f}, limit {meta['limit_batch1_decode_tok_s']:.1f}"
    )


def markdown_table(rows: list[GpuRow]) -> str:
    """The same table as README.md's Benchmarks section shows it."""
    lines = [list(COLUMNS), ["---:"] * len(COLUMNS), *(_cells(r) for r in rows)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _cuda_seconds(work: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000
