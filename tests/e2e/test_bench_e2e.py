"""The load generator end to end: a short run against the real server, through the library and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from main import main
from scripts.benchmarks.datasets import LengthDist, synthetic
from scripts.benchmarks.direct import server_codec
from scripts.benchmarks.loadgen import LoadLevel, RunPlan, http_sender, run_levels
from tests.e2e.conftest import Server

OUTPUT_TOKENS = 6


def test_short_sweep_streams_every_token(server: Server) -> None:
    codec = server_codec()
    requests = synthetic(codec, 4, LengthDist.parse("fixed:24"), LengthDist.parse(f"fixed:{OUTPUT_TOKENS}"))
    levels = [LoadLevel(concurrency=1), LoadLevel(concurrency=2)]
    summaries = run_levels(requests, http_sender(server.url), levels, RunPlan(num_requests=4), "http")
    for summary in summaries:
        assert summary.errors == {} and summary.completed == 4
        assert summary.output_tokens_total == 4 * OUTPUT_TOKENS
        assert 0 < summary.ttft_ms["p50"] < summary.e2e_ms["p50"]
        assert summary.itl_ms["p99"] > 0
    # Counting by max_new_tokens is exact only if the server honours ignore_eos; its usage says so.
    body = server.predict({"prompt": requests[0].prompt, "max_new_tokens": OUTPUT_TOKENS, "ignore_eos": True}).json()
    assert body["usage"] == {
        "prompt_tokens": len(requests[0].input_ids),
        "completion_tokens": OUTPUT_TOKENS,
        "total_tokens": len(requests[0].input_ids) + OUTPUT_TOKENS,
    }


def test_errors_are_counted_not_fatal(server: Server) -> None:
    """A request the server refuses (max_new_tokens over the limit) is an error of its kind in the summary."""
    (request,) = synthetic(server_codec(), 1, LengthDist.parse("fixed:8"), LengthDist.parse("fixed:100000"))
    plan = RunPlan(num_requests=2, warmup_waves=0)
    (summary,) = run_levels([request], http_sender(server.url), [LoadLevel(concurrency=1)], plan, "http")
    assert summary.errors == {"http_400": 2} and summary.completed == 0


def test_cli_run_writes_results_and_ends_with_json(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    argv = [
        "bench",
        "run",
        "--url",
        server.url,
        "--concurrency",
        "1,2",
        "--num-requests",
        "2",
        "--input-tokens",
        "uniform:8,16",
        "--output-tokens",
        "fixed:4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    headline = json.loads(last)
    assert [run["label"] for run in headline["runs"]] == ["c=1", "c=2"]
    assert all(run["failed"] == 0 and run["ok"] == 2 for run in headline["runs"])
    for suffix in (".json", ".csv", "-throughput.png", "-latency.png"):
        assert Path(f"{out}{suffix}").stat().st_size > 0
    assert main(["bench", "compare", f"{out}.json", f"{out}.json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert {row["ratio"] for row in rows if row["ratio"] is not None} == {1.0}


@pytest.mark.parametrize("api", ["openai-chat", "openai-completions"])
def test_openai_mode_measures_any_openai_server(
    server: Server, api: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The same run over the OpenAI routes: every token counted (from usage), the API named in the report."""
    argv = ["bench", "run", "--api", api, "--base-url", server.url, "--model", "smollm2", "--concurrency", "2"]
    argv += ["--num-requests", "2", "--input-tokens", "fixed:12", "--output-tokens", f"fixed:{OUTPUT_TOKENS}"]
    assert main([*argv, "--out", str(tmp_path / "openai")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    headline = json.loads(lines[-1])
    assert headline["api"] == api and f"({api} API)" in "\n".join(lines)
    (run,) = headline["runs"]
    assert run["ok"] == 2 and run["failed"] == 0 and run["out_tok_s"] > 0
