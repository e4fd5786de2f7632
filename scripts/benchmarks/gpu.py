"""`bench gpu`: the torch backend on one GPU against plain transformers `generate` and the bandwidth limit.

All in one process, on one set of weights, so the figures of a row differ only in who drives the model:
1. bandwidth: a 4 GiB device-to-device copy, bytes read + written over the median of 20 timed copies;
2. a Mistral-7B-shaped model (MistralConfig: 32 layers, hidden 4096, MLP 14336, 32 heads, 8 KV heads,
   vocab 32000) with random bf16 weights, and a word-level tokenizer whose prompts are exactly N tokens;
3. the identity reference (identity.py): transformers' greedy tokens and logprobs for a few prompts;
4. `model.generate` on a static batch of each size (greedy, exactly `output` new tokens after `input` prompt
   tokens), each step timed by a streamer, so it gets the same TTFT / ITL / E2E statistics as a server run;
   both sides first run once at full length, untimed;
5. the torch backend built on the same weights (`TorchBackend.from_hf_model`, which takes the transformers
   model apart, so this comes after 3 and 4): its load report (KV pool, graph buckets, compile/capture time,
   peak memory), the identity comparison, then the direct mode at each concurrency: two waves of requests
   of the same lengths (EOS ignored);
   Every level warms up with its own prompts and measures with prompts no earlier request sent, so no
   measured request is served from the prefix cache;
6. a TTFT probe: `ttft_requests` fresh prompts of `input` tokens at concurrency 1, `ttft_output` new tokens each;
7. arrivals: `arrival_requests` requests with prompts uniform in 64..2,048 tokens arriving as a Poisson
   process; per request, the ratio of its inter-token gaps' p99 to their median (target: <= 3, while the long
   prompts are prefilled in chunks beside the decoding streams);
8. the architecture checks (gpu_checks.py, in a child process so that a device fault there cannot take this
   run with it): tiny random Llama / Mistral / Qwen2 / Gemma models against transformers on the same device;
9. the limit: each decode step reads every weight once (the input embedding only for the rows it looks up),
   so aggregate tokens/s <= batch x bandwidth / weight bytes; the KV cache a step also reads makes the second,
   tighter limit. Utilisation is measured tokens/s over the weights-only limit.
Output tokens/s of a row is tokens over the wall time of the run (prefill included). Decode tokens/s is
concurrency / the median gap between consecutive tokens of a stream, pooled over the level's requests: the
time of a decoding step, where ITL p50 (genai-perf's per-request mean gap) also averages in the steps that
prefilled other requests' prompts. The batch-1 figure is 1 / ITL p50 at batch 1, the same way for both sides.
Peak memory is `torch.cuda.max_memory_allocated` during each run (the 13.5 GiB of weights included).
"""

from __future__ import annotations

import asyncio
import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table
from transformers import AutoModelForCausalLM, GenerationConfig, MistralConfig, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from model.backends.torch import TorchBackend
from model.backends.torch.config import EngineConfig
from model.settings import load_settings
from scripts import REPO_ROOT
from scripts.benchmarks import identity
from scripts.benchmarks.datasets import BenchRequest, LengthDist, PromptCodec, random_corpus, synthetic, word_tokenizer
from scripts.benchmarks.direct import direct_sender
from scripts.benchmarks.gpu_checks import ARCHITECTURES
from scripts.benchmarks.loadgen import LoadLevel, drive, summarize_level
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
    # None in results recorded before these columns existed
    backend_gap_ms: float | None = None  # median gap between consecutive tokens of a stream
    backend_decode_tok_s: float | None = None  # concurrency / backend_gap_ms
    backend_ttft_ms: float | None = None  # p50

    @property
    def utilisation(self) -> float:
        return self.backend_tok_s / self.limit_tok_s


def measure_bandwidth(device: str = "cuda", size_bytes: int = 4 * GIB, repeats: int = 20) -> float:
    """Device memory bandwidth in bytes/s, counting each copied byte read once and written once."""
    src = torch.randint(0, 255, (size_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = [_seconds(lambda: dst.copy_(src), device) for _ in range(repeats)]
    return 2 * size_bytes / statistics.median(times)


def random_model(
    config: MistralConfig = MISTRAL_7B, dtype: torch.dtype = torch.bfloat16, device: str = "cuda"
) -> PreTrainedModel:
    """Random weights of the given shape, built directly on the device."""
    torch.manual_seed(0)
    with torch.device(device):
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
    _sync(model.device)
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=clock)
    _sync(model.device)
    end = time.perf_counter()
    return [RequestRecord(row, input_len, start, end, clock.times[1:], new_tokens) for row in range(batch)]


@dataclass(frozen=True)
class GpuPlan:
    concurrencies: tuple[int, ...] = (1, 8, 32, 64)
    input_len: int = 128
    output_len: int = 128
    waves: int = 2
    ttft_requests: int = 16
    ttft_output: int = 4
    arrival_requests: int = 64
    arrival_rate: float = 16.0  # requests/s
    identity_tokens: int = 16
    architectures: tuple[str, ...] = tuple(ARCHITECTURES)  # step 8 (gpu_checks.py); () skips it
    model: MistralConfig = field(default_factory=lambda: MISTRAL_7B)
    device: str = "cuda"  # "cpu" runs the same suite on a small `model` (the unit test of this module)
    bandwidth_bytes: int = 4 * GIB


@dataclass(frozen=True)
class Ceiling:
    """What bounds a decode step: measured bandwidth and the bytes a step must read."""

    bandwidth: float  # bytes/s
    weight_bytes: int
    kv_bytes_per_token: int

    def tokens_per_s(self, batch: int, context: float = 0.0) -> float:
        """Aggregate tokens/s if a step of `batch` rows (each `context` tokens long) only read memory."""
        return batch * self.bandwidth / (self.weight_bytes + batch * context * self.kv_bytes_per_token)


TARGETS = {  # issue targets, checked on the raw figures (a 7B model on one H200)
    "batch1_decode_tok_s": 200.0,  # >=
    "c64_decode_tok_s": 10_000.0,  # >=
    "ttft_c1_p50_ms": 30.0,  # <=
    "warmup_s": 120.0,  # <
}
CORPUS_WORDS = 400_000  # prompts start at random offsets: with this many, two of a few hundred rarely share a block


def run_gpu_suite(plan: GpuPlan, out_dir: Path) -> list[GpuRow]:
    """Steps 1-9 of the module docstring; prints the tables, writes `<out>/gpu.*`, ends with one JSON line."""
    bandwidth = measure_bandwidth(plan.device, plan.bandwidth_bytes)
    dtype = torch.bfloat16 if plan.device == "cuda" else torch.float32
    model = random_model(plan.model, dtype, plan.device)
    ceiling = Ceiling(bandwidth, weight_bytes_per_step(model), kv_bytes_per_token(model.config))
    vocab = model.config.vocab_size
    settings = load_settings(
        {"device": plan.device, "max_batch_size": max(plan.concurrencies), "max_seq_len": 8192, "warmup": False},
        environ={},
    )
    budget = EngineConfig.from_settings(settings).token_budget
    check_prompts = identity.identity_prompts(vocab, budget, settings.kv_page_size)
    references = [identity.reference(model, p, plan.identity_tokens) for p in check_prompts]
    # identity step 4's float32 copy waits in host memory while the engine loads, so that the load report's peak
    # is the engine's own; it is on the device only for the identity comparison, before the timed runs
    float32 = copy.deepcopy(model).to("cpu", torch.float32)
    hf_runs = [_hf_level(model, concurrency, plan) for concurrency in plan.concurrencies]
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    backend = TorchBackend.from_hf_model(model, settings, frozenset({vocab - 1}))
    backend.start()
    try:
        float32.to(plan.device)
        engine_out = identity.engine_outputs(backend, check_prompts, plan.identity_tokens)
        checks = identity.compare_all(references, check_prompts, engine_out)
        float32_gaps = identity.float32_gaps(float32, references, check_prompts, engine_out)
        del float32
        if plan.device == "cuda":
            torch.cuda.empty_cache()
        codec = PromptCodec(word_tokenizer(vocab), "raw")
        fresh = _FreshPrompts(codec, random_corpus(vocab, CORPUS_WORDS))
        backend_runs = [_backend_level(backend, fresh, concurrency, plan) for concurrency in plan.concurrencies]
        probe = _ttft_probe(backend, fresh, plan)
        arrivals = _arrivals(backend, fresh, plan)
        steps_by_path = dict(backend.runner.steps_by_path)
    finally:
        backend.shutdown()
    architectures = run_architecture_checks(plan.device, plan.architectures, out_dir) if plan.architectures else {}
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
            backend_gap_ms=backend_run.extra["gap_ms"],
            backend_decode_tok_s=concurrency * 1000.0 / backend_run.extra["gap_ms"],
            backend_ttft_ms=backend_run.ttft_ms["p50"] or 0.0,
        )
        for concurrency, backend_run, hf_run in zip(plan.concurrencies, backend_runs, hf_runs, strict=True)
    ]
    decode = {
        "backend_batch1_decode_tok_s": 1000.0 / rows[0].backend_itl_ms,
        "hf_batch1_decode_tok_s": 1000.0 / rows[0].hf_itl_ms,
        "limit_batch1_decode_tok_s": ceiling.tokens_per_s(1),
        "backend_ttft_c1_p50_ms": probe.ttft_ms["p50"] or 0.0,
        "backend_ttft_c1_p99_ms": probe.ttft_ms["p99"] or 0.0,
        "hf_ttft_c1_ms": hf_runs[0].ttft_ms["p50"] or 0.0,
    }
    decode_by_concurrency = {str(r.concurrency): round(r.backend_decode_tok_s or 0.0, 1) for r in rows}
    float32_summary = identity.float32_summary(float32_gaps)
    targets = target_verdicts(decode, decode_by_concurrency, backend.load_report, arrivals.extra["itl_ratio"])
    meta = run_meta(
        suite="gpu",
        model="Mistral-7B shape, random weights, bf16",
        bandwidth_gb_s=bandwidth / 1e9,
        weight_bytes_per_step=ceiling.weight_bytes,
        kv_bytes_per_token=ceiling.kv_bytes_per_token,
        input_len=plan.input_len,
        output_len=plan.output_len,
        engine=backend.load_report,
        steps_by_path=steps_by_path,
        identity=identity.summary(checks) | {"against_float32": float32_gaps, "float32": float32_summary},
        arrivals=arrivals.extra["itl_ratio"],
        architectures=architectures,
        targets=targets,
        rows=[asdict(r) | {"utilisation": r.utilisation} for r in rows],
        **decode,
    )
    paths = write_results(out_dir / "gpu", meta, [*backend_runs, probe, arrivals, *hf_runs])
    print_gpu_table(rows, meta)
    print(markdown_table(rows))
    console.print("results: " + ", ".join(map(str, paths)))
    headline = {"suite": "gpu", "gpu": meta["machine"]["gpu"], "bandwidth_gb_s": round(bandwidth / 1e9, 1)}
    print_json_line(
        headline
        | {k: round(v, 1) for k, v in decode.items()}
        | {"decode_tok_s": decode_by_concurrency, "targets": targets}
        | {"engine": backend.load_report, "steps_by_path": steps_by_path}
        | {"identity_ok": meta["identity"]["ok"], "identity_float32": float32_summary}
        | {"arrivals": meta["arrivals"], "architectures": _architecture_headline(architectures)}
        | {"rows": meta["rows"]}
    )
    return rows


def target_verdicts(
    decode: dict[str, float], by_concurrency: dict[str, float], report: dict[str, Any], arrivals: dict[str, Any]
) -> dict[str, bool | None]:
    """Each target met or not, from the raw figures (None: the run has no such figure)."""
    c64 = by_concurrency.get("64")
    return {
        "batch1_decode_ge_200": decode["backend_batch1_decode_tok_s"] >= TARGETS["batch1_decode_tok_s"],
        "c64_decode_ge_10000": None if c64 is None else c64 >= TARGETS["c64_decode_tok_s"],
        "ttft_c1_p50_le_30ms": decode["backend_ttft_c1_p50_ms"] <= TARGETS["ttft_c1_p50_ms"],
        "arrivals_itl_p99_le_3x_median": arrivals["requests"] > 0 and arrivals["over_limit"] == 0,
        "warmup_lt_120s": report["warmup_s"] < TARGETS["warmup_s"],
    }


class _FreshPrompts:
    """Hands out prompts no earlier request of the run sent (each from its own random corpus offset)."""

    def __init__(self, codec: PromptCodec, corpus: str) -> None:
        self.codec, self.corpus, self._batches = codec, corpus, 0

    def take(self, count: int, inputs: LengthDist, output_tokens: int) -> list[BenchRequest]:
        self._batches += 1
        outputs = LengthDist("fixed", output_tokens)
        return synthetic(self.codec, count, inputs, outputs, seed=self._batches, corpus=self.corpus)


def _hf_level(model: PreTrainedModel, batch: int, plan: GpuPlan) -> RunSummary:
    hf_generate(model, batch, plan.input_len, plan.output_len)  # warm-up: every KV size this run meets
    _reset_peak(plan.device)
    records = hf_generate(model, batch, plan.input_len, plan.output_len)
    summary = summarize(records, label=f"c={batch}", mode="hf-generate", concurrency=batch)
    summary.extra["peak_gib"] = _peak_gib(plan.device)
    return summary


def _backend_level(backend: TorchBackend, fresh: _FreshPrompts, concurrency: int, plan: GpuPlan) -> RunSummary:
    """One full-length warm-up wave, then `waves` waves at `concurrency`, all on prompts not sent before."""
    inputs = LengthDist("fixed", plan.input_len)
    warm = fresh.take(concurrency, inputs, plan.output_len)
    measured = fresh.take(plan.waves * concurrency, inputs, plan.output_len)
    level = LoadLevel(concurrency=concurrency)
    asyncio.run(_drive(backend, warm, level))
    _reset_peak(plan.device)
    records = asyncio.run(_drive(backend, measured, level))
    summary = summarize_level(level, "direct", [records])
    summary.extra["peak_gib"] = _peak_gib(plan.device)
    summary.extra["gap_ms"] = median_gap_ms(records)
    return summary


def _ttft_probe(backend: TorchBackend, fresh: _FreshPrompts, plan: GpuPlan) -> RunSummary:
    """Step 6: short requests one at a time, so each TTFT is one prompt's prefill and its first token."""
    requests = fresh.take(plan.ttft_requests, LengthDist("fixed", plan.input_len), plan.ttft_output)
    level = LoadLevel(concurrency=1)
    summary = summarize_level(level, "direct", [asyncio.run(_drive(backend, requests, level))])
    summary.label = "c=1 TTFT probe"
    return summary


def _arrivals(backend: TorchBackend, fresh: _FreshPrompts, plan: GpuPlan) -> RunSummary:
    """Step 7: Poisson arrivals of mixed prompt lengths; each request's ITL p99 / median."""
    requests = fresh.take(plan.arrival_requests, LengthDist("uniform", 64, 2048), plan.output_len)
    level = LoadLevel(rate=plan.arrival_rate)
    records = asyncio.run(_drive(backend, requests, level, seed=1))
    summary = summarize(records, label=level.label + " arrivals", mode="direct", request_rate=plan.arrival_rate)
    summary.extra["itl_ratio"] = itl_ratios(records)
    summary.extra["gap_ms"] = median_gap_ms(records)
    return summary


async def _drive(
    backend: TorchBackend, requests: list[BenchRequest], level: LoadLevel, seed: int = 0
) -> list[RequestRecord]:
    async with direct_sender(backend)() as send:
        return await drive(requests, send, level, seed=seed)


def median_gap_ms(records: list[RequestRecord]) -> float | None:
    """Median of the gaps between consecutive tokens of each stream, pooled over requests (ms)."""
    gaps = np.concatenate([np.diff(r.chunk_times) for r in records if r.ok] or [np.zeros(0)])
    return float(np.median(gaps)) * 1000.0 if gaps.size else None


def run_architecture_checks(
    device: str, names: tuple[str, ...], out_dir: Path, timeout_s: float = 200.0
) -> dict[str, Any]:
    """Step 8 in a child process (gpu_checks.py); its results, or what went wrong (never raises)."""
    out = out_dir / "architectures.json"
    command = [sys.executable, "-m", "scripts.benchmarks.gpu_checks", "--device", device, "--out", str(out)]
    command += ["--only", ",".join(names)]
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)
        if done.returncode != 0:
            return {"error": f"exit status {done.returncode}: {(done.stderr or done.stdout)[-2000:]}"}
        return json.loads(out.read_text())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    except (OSError, ValueError) as exc:
        return {"error": f"no results from {out}: {exc}"}


def _architecture_headline(results: dict[str, Any]) -> dict[str, Any]:
    """Per architecture: ok, or the error's last line."""
    if "error" in results:
        return {"error": results["error"].strip().splitlines()[-1:]}
    return {name: r.get("ok", r.get("error", "").strip().splitlines()[-1:]) for name, r in results.items()}


def itl_ratios(records: list[RequestRecord], limit: float = 3.0) -> dict[str, Any]:
    """Per request: p99 / median of the gaps between its tokens; how many exceed `limit`."""
    ratios = []
    for record in records:
        gaps = np.diff(record.chunk_times)
        if record.ok and gaps.size >= 2:
            ratios.append(float(np.percentile(gaps, 99) / np.median(gaps)))
    return {
        "requests": len(ratios),
        "limit": limit,
        "over_limit": sum(r > limit for r in ratios),
        "max_ratio": round(max(ratios), 3) if ratios else None,
        "median_ratio": round(float(np.median(ratios)), 3) if ratios else None,
    }


COLUMNS = (
    "concurrency",
    "torch backend tok/s",
    "HF generate tok/s",
    "backend / HF",
    "backend decode tok/s",
    "TTFT ms p50",
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
        "—" if r.backend_decode_tok_s is None else f"{r.backend_decode_tok_s:,.0f}",
        "—" if r.backend_ttft_ms is None else f"{r.backend_ttft_ms:.1f}",
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
        f"HF generate {meta['hf_batch1_decode_tok_s']:.1f}, limit {meta['limit_batch1_decode_tok_s']:.1f}; "
        f"TTFT at c=1 (probe): p50 {meta['backend_ttft_c1_p50_ms']:.1f} ms, "
        f"p99 {meta['backend_ttft_c1_p99_ms']:.1f} ms "
        f"(HF generate {meta['hf_ttft_c1_ms']:.1f} ms)"
    )
    console.print("engine: " + ", ".join(f"{k}={v}" for k, v in meta["engine"].items()))
    console.print(f"engine steps by path: {meta['steps_by_path']}")
    identity_rows = [
        (p["prompt_tokens"], p["compared"], p["mismatches"], p["max_logprob_diff"]) for p in meta["identity"]["prompts"]
    ]
    console.print(
        f"identity vs transformers: ok={meta['identity']['ok']}; "
        f"(prompt tokens, steps compared, mismatches, max logprob diff): {identity_rows}"
    )
    console.print(f"each bf16 side against float32: {meta['identity']['float32']}")
    console.print(f"arrivals, per-request ITL p99 / median: {meta['arrivals']}")
    console.print(f"architectures: {_architecture_headline(meta['architectures'])}")
    console.print(f"targets: {meta['targets']}")


def markdown_table(rows: list[GpuRow]) -> str:
    """The same table as README.md's Benchmarks section shows it."""
    lines = [list(COLUMNS), ["---:"] * len(COLUMNS), *(_cells(r) for r in rows)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _seconds(work: Callable[[], object], device: str) -> float:
    if device != "cuda":
        started = time.perf_counter()
        work()
        return time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / GIB if device == "cuda" else 0.0
