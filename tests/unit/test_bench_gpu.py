"""`bench gpu` as a whole on CPU, on a tiny Mistral: every step the device run takes (identity, levels on fresh
prompts, TTFT probe, arrivals, the architecture checks in their child process, the one JSON line), minus CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import MistralConfig

from scripts.benchmarks.gpu import GpuPlan, median_gap_ms, run_gpu_suite
from scripts.benchmarks.stats import RequestRecord

TINY_MISTRAL = MistralConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    sliding_window=None,
)


def test_the_gpu_suite_runs_end_to_end_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = GpuPlan(
        concurrencies=(1, 4),
        input_len=16,
        output_len=8,
        ttft_requests=4,
        arrival_requests=6,
        arrival_rate=50.0,
        identity_tokens=4,
        model=TINY_MISTRAL,
        device="cpu",
        bandwidth_bytes=1 << 24,
        architectures=("mistral-window",),
    )
    rows = run_gpu_suite(plan, tmp_path)
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r.concurrency for r in rows] == [1, 4] and all(r.backend_failed == 0 for r in rows)
    assert line["identity_ok"] is True  # float32 on CPU: the same tokens and logprobs as transformers
    assert line["identity_float32"]["engine"]["clear_mismatches"] == 0
    assert line["architectures"] == {"mistral-window": True}
    assert set(line["decode_tok_s"]) == {"1", "4"} and line["backend_ttft_c1_p50_ms"] > 0
    assert set(line["targets"]) == {
        "batch1_decode_ge_200",
        "c64_decode_ge_10000",
        "ttft_c1_p50_le_30ms",
        "arrivals_itl_p99_le_3x_median",
        "warmup_lt_120s",
    }
    assert line["targets"]["c64_decode_ge_10000"] is None  # no c=64 level in this run
    assert sum(line["steps_by_path"].values()) > 0
    meta = json.loads((tmp_path / "gpu.json").read_text())["meta"]
    assert meta["arrivals"]["requests"] == 6
    assert json.loads((tmp_path / "architectures.json").read_text())["mistral-window"]["poisoned_row_ok"]


def test_the_decode_gap_is_the_median_gap_between_consecutive_tokens_pooled_over_requests() -> None:
    steady = RequestRecord(0, 8, start=0.0, end=1.0, chunk_times=[0.1, 0.11, 0.12, 0.13], output_tokens=4)
    stalled = RequestRecord(1, 8, start=0.0, end=1.0, chunk_times=[0.2, 0.21, 0.51], output_tokens=3)  # one long gap
    failed = RequestRecord(2, 8, start=0.0, chunk_times=[0.3, 0.9], error="timeout")
    assert median_gap_ms([steady, stalled, failed]) == pytest.approx(10.0)
    assert np.isclose(median_gap_ms([stalled]), 155.0) and median_gap_ms([failed]) is None
