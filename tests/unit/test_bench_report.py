"""Result files (JSON, CSV, PNG), the compare mode's ratios and the CPU suite's verdicts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from main import main
from scripts.benchmarks.compare import compare, pair_runs
from scripts.benchmarks.cpu import mark_probe, verdicts
from scripts.benchmarks.report import load_results, write_results
from scripts.benchmarks.stats import RequestRecord, RunSummary, summarize
from scripts.cli import CliError


def run(mode: str, concurrency: int, tokens_per_s: float, ttft_s: float, failures: int = 0) -> RunSummary:
    """A run of 4 requests of 10 tokens, timed so that the summary has the given throughput and TTFT."""
    duration = 40 / tokens_per_s
    records = [
        RequestRecord(i, 5, start=0.0, end=duration, chunk_times=[ttft_s, duration], output_tokens=10) for i in range(4)
    ]
    records += [RequestRecord(9, 5, start=0.0, end=0.1, error="http_500") for _ in range(failures)]
    return summarize(records, label=f"c={concurrency}", mode=mode, concurrency=concurrency)


def test_results_are_written_and_read_back(tmp_path: Path) -> None:
    runs = [run("http", 1, 10.0, 0.2), run("http", 8, 50.0, 0.4, failures=1)]
    paths = write_results(tmp_path / "res", {"suite": "test"}, runs)
    assert [p.name for p in paths] == ["res.json", "res.csv", "res-throughput.png", "res-latency.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths[2:])
    meta, loaded = load_results(paths[0])
    assert meta == {"suite": "test"} and loaded == runs
    rows = list(csv.DictReader(paths[1].open()))
    assert [r["label"] for r in rows] == ["c=1", "c=8"]
    assert float(rows[1]["output_tokens_per_s"]) == pytest.approx(40 / 0.8) and rows[1]["errors"] == "http_500=1"
    assert json.loads(paths[0].read_text())["runs"][0]["ttft_ms"]["p50"] == pytest.approx(200.0)


def test_compare_pairs_runs_by_label_and_gives_ratios() -> None:
    a = [run("direct", 1, 10.0, 0.2), run("direct", 8, 40.0, 0.5)]
    b = [run("http", 8, 30.0, 0.6), run("http", 1, 9.0, 0.21)]
    assert [(x.label, y.label) for x, y in pair_runs(a, b)] == [("c=1", "c=1"), ("c=8", "c=8")]
    rows = {(r.label, r.metric): r for r in compare(a, b)}
    assert rows["c=1", "output_tokens_per_s"].ratio == pytest.approx(0.9)
    assert rows["c=8", "ttft_ms.p50"].ratio == pytest.approx(1.2)
    assert rows["c=1", "ttft_ms.p50"].delta == pytest.approx(10.0)


def test_compare_refuses_runs_without_a_partner_of_the_same_label() -> None:
    """c=1 against c=2 measures two loads, not one thing two ways: refused, naming the labels."""
    a, b = [run("x", 1, 10.0, 0.1), run("x", 8, 40.0, 0.2)], [run("y", 1, 9.0, 0.1), run("y", 2, 20.0, 0.1)]
    with pytest.raises(CliError, match=r"no run of the same label for A's 'c=8', B's 'c=2'.*--in-order"):
        pair_runs(a, b)


def test_compare_in_order_pairs_by_position_and_labels_both_runs() -> None:
    a, b = [run("x", 1, 10.0, 0.1)], [run("y", 2, 20.0, 0.1)]
    assert pair_runs(a, b, in_order=True) == [(a[0], b[0])]
    rows = compare(a, b, in_order=True)
    assert {r.label for r in rows} == {"c=1 vs c=2"}
    assert rows[0].to_dict()["label"] == "c=1 vs c=2"
    with pytest.raises(CliError, match="A has 1 runs and B has 2"):
        pair_runs(a, [*b, b[0]], in_order=True)


def probe(mode: str, ttft_s: float) -> RunSummary:
    return mark_probe(run(mode, 1, 1.0, ttft_s))


def test_cpu_verdicts_are_computed_from_the_raw_figures() -> None:
    direct = [run("direct", 1, 10.0, 0.3), probe("direct", 0.200), run("direct", 8, 50.0, 0.5)]
    met = verdicts(direct, [run("http", 1, 9.6, 0.3), probe("http", 0.215), run("http", 8, 25.0, 0.6)])
    assert [(v.value, v.met) for v in met] == [(0.96, True), (15.0, True), (2.604, True), (0, True)]
    http = [run("http", 1, 9.0, 0.3), probe("http", 0.250), run("http", 8, 17.0, 0.6, failures=2)]
    missed = verdicts(direct, http)
    assert [(v.value, v.met) for v in missed] == [(0.9, False), (50.0, False), (1.889, False), (2, False)]


def test_probes_are_labelled_and_kept_in_the_result_files(tmp_path: Path) -> None:
    marked = probe("http", 0.2)
    assert marked.label == "c=1 ttft probe" and marked.extra == {"probe": "ttft"}
    paths = write_results(tmp_path / "p", {}, [run("http", 1, 10.0, 0.2), marked, run("http", 8, 40.0, 0.2)])
    assert [r["label"] for r in csv.DictReader(paths[1].open())] == ["c=1", "c=1 ttft probe", "c=8"]


def test_cli_compare_refuses_different_levels_and_warns_when_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = write_results(tmp_path / "a", {}, [run("direct", 1, 10.0, 0.2)])[0]
    b = write_results(tmp_path / "b", {}, [run("http", 4, 30.0, 0.3)])[0]
    assert main(["bench", "compare", str(a), str(b)]) == 2
    assert "no run of the same label for A's 'c=1', B's 'c=4'" in capsys.readouterr().err
    assert main(["bench", "compare", "--in-order", str(a), str(b)]) == 0
    captured = capsys.readouterr()
    assert "warning: --in-order paired runs of different load levels: c=1 vs c=4" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["rows"][0]["label"] == "c=1 vs c=4"
