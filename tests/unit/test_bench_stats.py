"""The load generator's statistics on scripted chunk timelines: TTFT, ITL, E2E, percentiles, errors."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.benchmarks.stats import RequestRecord, RunSummary, distribution, summarize


def timeline(task_id: int, start: float, chunks: list[float], tokens: int, error: str | None = None) -> RequestRecord:
    """A request sent at `start` whose pieces arrived at `chunks`; it ends with the last piece."""
    end = chunks[-1] if chunks else start + 0.5
    return RequestRecord(task_id, 10, start, end, list(chunks), tokens if error is None else 0, error)


def test_ttft_itl_e2e_follow_genai_perf() -> None:
    # Sent at t=1.0; first piece at 1.2; 5 tokens in 3 pieces, the last at 2.0.
    record = timeline(0, 1.0, [1.2, 1.6, 2.0], tokens=5)
    assert record.ttft == pytest.approx(0.2)
    assert record.e2e == pytest.approx(1.0)
    # (end - first piece) / (tokens - 1): pieces carrying several tokens do not shrink the gap.
    assert record.itl == pytest.approx(0.8 / 4)


def test_single_token_output_has_no_itl() -> None:
    assert timeline(0, 0.0, [0.3], tokens=1).itl is None


def test_distribution_matches_numpy_linear_percentiles() -> None:
    values = list(np.random.default_rng(1).exponential(50.0, 1000))
    stats = distribution(values)
    assert stats["mean"] == pytest.approx(np.mean(values))
    for p in (50, 90, 95, 99):
        assert stats[f"p{p}"] == pytest.approx(np.percentile(values, p))


def test_distribution_of_nothing_is_none() -> None:
    assert set(distribution([]).values()) == {None}


def test_summary_counts_errors_by_kind_and_keeps_them_out_of_latencies() -> None:
    records = [
        timeline(0, 0.0, [0.1, 0.5], tokens=5),
        timeline(1, 0.5, [0.8, 1.5], tokens=5),
        timeline(2, 1.0, [], tokens=0, error="http_429"),
        timeline(3, 1.2, [], tokens=0, error="http_429"),
        timeline(4, 1.5, [], tokens=0, error="timeout"),
    ]
    records[4].end = 4.0  # a timeout ends late: the run lasts until it is given up
    summary = summarize(records, label="c=2", mode="http", concurrency=2)
    assert (summary.num_requests, summary.completed, summary.failed) == (5, 2, 3)
    assert summary.errors == {"http_429": 2, "timeout": 1}
    assert summary.duration_s == pytest.approx(4.0)
    assert summary.requests_per_s == pytest.approx(2 / 4.0)
    assert summary.output_tokens_per_s == pytest.approx(10 / 4.0)
    assert summary.ttft_ms["mean"] == pytest.approx((100 + 300) / 2)
    assert summary.e2e_ms["p50"] == pytest.approx((500 + 1000) / 2)
    assert summary.output_tps_per_user["mean"] == pytest.approx((5 / 0.5 + 5 / 1.0) / 2)


def test_summary_of_only_failures_has_no_latencies() -> None:
    summary = summarize([timeline(0, 0.0, [], 0, error="connection")], label="c=1", mode="http")
    assert summary.completed == 0 and summary.output_tokens_per_s == 0.0
    assert summary.ttft_ms["p99"] is None


def test_flat_row_and_dict_round_trip() -> None:
    summary = summarize([timeline(0, 0.0, [0.1, 0.3], 3), timeline(1, 0.0, [], 0, "http_500")], label="c=1", mode="x")
    row = summary.flat()
    assert row["ttft_ms_p99"] == pytest.approx(100.0)
    assert row["errors"] == "http_500=1"
    assert RunSummary.from_dict(summary.to_dict()) == summary
