"""Where results go: a terminal table, JSON (meta + one summary per run), CSV (one row per run) and PNG plots.

A results JSON is `{"meta": {...}, "runs": [RunSummary.to_dict(), ...]}`; `bench compare` reads two of them.
Every command ends its output with one JSON line (`print_json_line`) that scripts can parse.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from scripts.benchmarks.stats import PERCENTILES, RunSummary

PLOT_DPI = 120  # 7 x 4.5 in -> 840 x 540 px
console = Console(width=None if sys.stdout.isatty() else 200)  # logs and pipes: no 80-column wrapping


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on; a GPU is named when torch sees one."""
    import torch

    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def run_meta(**fields: Any) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(),
        **fields,
    }


def print_table(summaries: list[RunSummary], title: str) -> None:
    table = Table(title=title)
    for column in (
        "run",
        "mode",
        "ok/sent",
        "errors",
        "req/s",
        "out tok/s",
        "tok/s/user p50",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "ITL p50 ms",
        "ITL p99 ms",
        "E2E p50 ms",
        "E2E p99 ms",
    ):
        table.add_column(column, justify="left" if column in {"run", "mode", "errors"} else "right")
    for s in summaries:
        table.add_row(
            s.label,
            s.mode,
            f"{s.completed}/{s.num_requests}",
            ", ".join(f"{k}={v}" for k, v in s.errors.items()) or "-",
            _fmt(s.requests_per_s, 2),
            _fmt(s.output_tokens_per_s, 1),
            _fmt(s.output_tps_per_user["p50"], 1),
            _fmt(s.ttft_ms["p50"], 1),
            _fmt(s.ttft_ms["p99"], 1),
            _fmt(s.itl_ms["p50"], 2),
            _fmt(s.itl_ms["p99"], 2),
            _fmt(s.e2e_ms["p50"], 0),
            _fmt(s.e2e_ms["p99"], 0),
        )
    console.print(table)


def write_results(out_prefix: Path, meta: dict[str, Any], summaries: list[RunSummary]) -> list[Path]:
    """`<prefix>.json`, `<prefix>.csv`, `<prefix>-throughput.png`, `<prefix>-latency.png`."""
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_prefix.with_suffix(".json"), out_prefix.with_suffix(".csv")
    json_path.write_text(json.dumps({"meta": meta, "runs": [s.to_dict() for s in summaries]}, indent=2) + "\n")
    rows = [s.flat() for s in summaries]
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path, *plot_results(summaries, out_prefix)]


def load_results(path: Path) -> tuple[dict[str, Any], list[RunSummary]]:
    data = json.loads(path.read_text())
    return data.get("meta", {}), [RunSummary.from_dict(run) for run in data["runs"]]


def plot_results(summaries: list[RunSummary], out_prefix: Path, dpi: int = PLOT_DPI) -> list[Path]:
    """`<prefix>-throughput.png` and `<prefix>-latency.png`; also how docs/benchmarks/ is drawn from its JSON."""
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    throughput_png, latency_png = Path(f"{out_prefix}-throughput.png"), Path(f"{out_prefix}-latency.png")
    plot_throughput(summaries, throughput_png, dpi)
    plot_latency(summaries, latency_png, dpi)
    return [throughput_png, latency_png]


def plot_throughput(summaries: list[RunSummary], path: Path, dpi: int = PLOT_DPI) -> None:
    """Aggregate and per-user output tokens/s against the load level, one line per mode (probes left out)."""
    summaries = [s for s in summaries if "probe" not in s.extra]
    by_rate = all(s.request_rate for s in summaries)
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    total_axis = figure.subplots()
    user_axis = total_axis.twinx()
    for mode in dict.fromkeys(s.mode for s in summaries):
        runs = sorted((s for s in summaries if s.mode == mode), key=lambda s: _load_of(s, by_rate))
        x = [_load_of(s, by_rate) for s in runs]
        total_axis.plot(x, [s.output_tokens_per_s for s in runs], marker="o", label=f"{mode}: total")
        user_axis.plot(
            x,
            [s.output_tps_per_user["p50"] or 0 for s in runs],
            marker="s",
            linestyle="--",
            label=f"{mode}: per user (p50)",
        )
    total_axis.set_xlabel("request rate (req/s)" if by_rate else "concurrency")
    total_axis.set_ylabel("output tokens/s (total)")
    user_axis.set_ylabel("output tokens/s per user (p50)")
    if not by_rate:
        total_axis.set_xscale("log", base=2)
    lines = total_axis.get_legend_handles_labels()
    more = user_axis.get_legend_handles_labels()
    total_axis.legend(lines[0] + more[0], lines[1] + more[1], loc="best", fontsize="small")
    total_axis.set_title("Throughput vs load")
    figure.savefig(path, dpi=dpi)


def plot_latency(summaries: list[RunSummary], path: Path, dpi: int = PLOT_DPI) -> None:
    """TTFT, ITL and E2E percentiles, grouped by run."""
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    axes = figure.subplots(1, 3)
    stats = [f"p{p}" for p in PERCENTILES]
    width = 0.8 / max(len(summaries), 1)
    for axis, (metric, title) in zip(axes, (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")), strict=True):
        for i, s in enumerate(summaries):
            values = [getattr(s, metric)[stat] or 0.0 for stat in stats]
            axis.bar([j + i * width for j in range(len(stats))], values, width, label=f"{s.mode} {s.label}")
        axis.set_xticks([j + width * (len(summaries) - 1) / 2 for j in range(len(stats))], stats)
        axis.set_title(f"{title} (ms)")
    axes[0].legend(fontsize="small")
    figure.savefig(path, dpi=dpi)


def print_json_line(payload: dict[str, Any]) -> None:
    """The last line of every benchmark's output: one JSON object."""
    print(json.dumps(payload, separators=(",", ":")), flush=True)


def headline(summary: RunSummary) -> dict[str, Any]:
    """The figures a one-line summary carries for one run."""
    return {
        "label": summary.label,
        "mode": summary.mode,
        "ok": summary.completed,
        "failed": summary.failed,
        "req_s": round(summary.requests_per_s, 3),
        "out_tok_s": round(summary.output_tokens_per_s, 2),
        "ttft_p50_ms": _round(summary.ttft_ms["p50"]),
        "itl_p50_ms": _round(summary.itl_ms["p50"]),
        "e2e_p99_ms": _round(summary.e2e_ms["p99"]),
    }


def _load_of(summary: RunSummary, by_rate: bool) -> float:
    return (summary.request_rate if by_rate else summary.concurrency) or 1


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _cpu_model() -> str:
    """/proc/cpuinfo names the model on Linux; platform.processor() is often empty there."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown"
