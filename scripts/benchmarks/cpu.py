"""`bench cpu`: the CPU targets against the embedded default, measured in one command.

1. Load the server's Model in this process (the direct mode) and start `main.py serve` on a free port.
2. Three stages, each run directly, then over HTTP, for several rounds (direct, HTTP, direct, HTTP, ...),
   pooled per mode, so that drift of a shared machine hits both modes alike; every request ignores EOS, so it
   produces exactly its `output_tokens` in both modes:
   - c=1 and c=8 with the plan's lengths (throughput, ITL, E2E);
   - a TTFT probe at c=1: many 2-token requests. TTFT on a 2-core machine varies by tens of ms from request
     to request, so the 20 ms target needs ~30 samples a mode, which full-length requests would make slow.
3. Write `<out>/direct.*`, `<out>/http.*` (each also readable by `bench compare`) and `<out>/cpu.*` (both
   modes, the verdicts in its meta), print the table and verdicts, and end with one JSON line.

Targets (issue 5): at c=1, HTTP output tokens/s >= 95% of direct and HTTP p50 TTFT (probe) within 20 ms of
direct; over HTTP, aggregate output tokens/s at c=8 >= 2x c=1; no failed request anywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.table import Table

from scripts.benchmarks.datasets import LengthDist, synthetic
from scripts.benchmarks.direct import direct_sender, loaded_model, model_codec
from scripts.benchmarks.loadgen import LoadLevel, RunPlan, http_sender, run_interleaved
from scripts.benchmarks.report import console, headline, print_json_line, print_table, run_meta, write_results
from scripts.benchmarks.server import local_server
from scripts.benchmarks.stats import RunSummary

SINGLE, BATCHED = LoadLevel(concurrency=1), LoadLevel(concurrency=8)
PROBE_LABEL, PROBE_TOKENS = "c=1 ttft probe", 2


@dataclass(frozen=True)
class CpuPlan:
    input_len: LengthDist
    output_len: LengthDist
    requests_single: int  # per round
    requests_batched: int  # per round
    requests_probe: int = 10  # per round
    rounds: int = 3
    seed: int = 0


@dataclass(frozen=True)
class Verdict:
    target: str
    value: float
    requirement: str
    met: bool


def run_cpu_suite(plan: CpuPlan, out_dir: Path) -> bool:
    """Measure, write every result file, print the verdicts; True when every target is met."""
    with loaded_model() as model:
        requests = synthetic(model_codec(model), plan.requests_batched, plan.input_len, plan.output_len, plan.seed)
        with local_server(out_dir / "server.log") as base_url:
            senders = {"direct": direct_sender(model.backend), "http": http_sender(base_url)}
            summaries: dict[str, list[RunSummary]] = {"direct": [], "http": []}
            probe = [replace(r, output_tokens=PROBE_TOKENS) for r in requests]
            stages = (  # (level, requests, requests per round, is the TTFT probe)
                (SINGLE, requests, plan.requests_single, False),
                (SINGLE, probe, plan.requests_probe, True),
                (BATCHED, requests, plan.requests_batched, False),
            )
            for level, stage_requests, count, is_probe in stages:
                run_plan = RunPlan(num_requests=count, seed=plan.seed)
                for mode, summary in run_interleaved(stage_requests, senders, level, run_plan, plan.rounds).items():
                    summaries[mode].append(mark_probe(summary) if is_probe else summary)
    results = verdicts(summaries["direct"], summaries["http"])
    meta = run_meta(
        suite="cpu",
        model="embedded default (SmolLM2-135M-Instruct, torch backend, CPU)",
        dataset=f"synthetic input {plan.input_len}, output {plan.output_len}, EOS ignored",
        rounds=plan.rounds,
    )
    for mode, runs in summaries.items():
        write_results(out_dir / mode, {**meta, "mode": mode}, runs)
    every_run = summaries["direct"] + summaries["http"]
    paths = write_results(out_dir / "cpu", {**meta, "verdicts": [asdict(v) for v in results]}, every_run)
    print_table(every_run, "CPU benchmark: embedded default, direct vs HTTP")
    print_verdicts(results)
    console.print("results: " + ", ".join(str(p) for p in paths))
    passed = all(v.met for v in results)
    print_json_line(
        {
            "suite": "cpu",
            "passed": passed,
            "verdicts": [asdict(v) for v in results],
            "runs": [headline(s) for s in every_run],
        }
    )
    return passed


def verdicts(direct: list[RunSummary], http: list[RunSummary]) -> list[Verdict]:
    d1, h1 = _at(direct, SINGLE.label), _at(http, SINGLE.label)
    h8 = _at(http, BATCHED.label)
    speed = h1.output_tokens_per_s / d1.output_tokens_per_s
    ttft_gap = (_at(http, PROBE_LABEL).ttft_ms["p50"] or 0.0) - (_at(direct, PROBE_LABEL).ttft_ms["p50"] or 0.0)
    scaling = h8.output_tokens_per_s / h1.output_tokens_per_s
    failures = sum(s.failed for s in direct + http)
    return [
        Verdict("c=1 HTTP/direct output tokens/s", round(speed, 4), ">= 0.95", speed >= 0.95),
        Verdict("c=1 HTTP - direct p50 TTFT, probe (ms)", round(ttft_gap, 2), "<= 20", ttft_gap <= 20.0),
        Verdict("HTTP c=8 / c=1 output tokens/s", round(scaling, 3), ">= 2", scaling >= 2.0),
        Verdict("failed requests", failures, "== 0", failures == 0),
    ]


def print_verdicts(results: list[Verdict]) -> None:
    table = Table(title="Targets")
    for column in ("target", "measured", "required", "met"):
        table.add_column(column)
    for v in results:
        table.add_row(v.target, f"{v.value:g}", v.requirement, "[green]yes[/]" if v.met else "[red]NO[/]")
    console.print(table)


def _at(summaries: list[RunSummary], label: str) -> RunSummary:
    return next(s for s in summaries if s.label == label)


def mark_probe(summary: RunSummary) -> RunSummary:
    """Marked so that plots of throughput against load leave it out: its 2-token requests say nothing there."""
    return replace(summary, label=PROBE_LABEL, extra={**summary.extra, "probe": "ttft"})
