"""Two result files side by side: for every run both share, each headline metric as B/A and B - A.

Runs are paired by label (`c=8`, `rate=4/s c=16`), so a direct run and an HTTP run of the same level pair
up. Runs whose labels differ measure different loads, so a ratio between them means nothing: unless asked
to pair in order (`--in-order`), a run without a partner of the same label is an error that names it.
B/A > 1 is better for throughput, worse for latency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.table import Table

from scripts.benchmarks.report import console
from scripts.benchmarks.stats import RunSummary
from scripts.cli import CliError

# (field, statistic or None for a scalar field)
METRICS: tuple[tuple[str, str | None], ...] = (
    ("output_tokens_per_s", None),
    ("requests_per_s", None),
    ("output_tps_per_user", "p50"),
    ("ttft_ms", "p50"),
    ("ttft_ms", "p99"),
    ("itl_ms", "p50"),
    ("itl_ms", "p99"),
    ("e2e_ms", "p50"),
    ("e2e_ms", "p99"),
)


@dataclass(frozen=True)
class Comparison:
    a_label: str
    b_label: str  # the same as a_label unless the runs were paired in order
    metric: str
    a: float | None
    b: float | None

    @property
    def label(self) -> str:
        return self.a_label if self.a_label == self.b_label else f"{self.a_label} vs {self.b_label}"

    @property
    def ratio(self) -> float | None:
        return None if self.a in (None, 0) or self.b is None else self.b / self.a

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "metric": self.metric,
            "a": self.a,
            "b": self.b,
            "ratio": self.ratio,
            "delta": self.delta,
        }


def metric_value(summary: RunSummary, field: str, stat: str | None) -> float | None:
    value = getattr(summary, field)
    return value[stat] if stat else value


def pair_runs(a: list[RunSummary], b: list[RunSummary], in_order: bool = False) -> list[tuple[RunSummary, RunSummary]]:
    """Runs of A and B with the same label; with `in_order`, the i-th of A with the i-th of B, whatever their labels."""
    if in_order:
        if len(a) != len(b):
            raise CliError(f"A has {len(a)} runs and B has {len(b)}; --in-order pairs files with as many runs")
        return list(zip(a, b, strict=True))
    a_labels, b_labels = [s.label for s in a], [s.label for s in b]
    unpaired = [f"A's {x!r}" for x in a_labels if x not in b_labels]
    unpaired += [f"B's {x!r}" for x in b_labels if x not in a_labels]
    if unpaired:
        raise CliError(
            f"no run of the same label for {', '.join(unpaired)} (A has {', '.join(a_labels)}; B has "
            f"{', '.join(b_labels)}); compare files of the same load levels, or pass --in-order to pair by position"
        )
    b_by_label = {s.label: s for s in b}
    return [(s, b_by_label[s.label]) for s in a]


def compare(a: list[RunSummary], b: list[RunSummary], in_order: bool = False) -> list[Comparison]:
    return [
        Comparison(
            run_a.label,
            run_b.label,
            f"{field}.{stat}" if stat else field,
            metric_value(run_a, field, stat),
            metric_value(run_b, field, stat),
        )
        for run_a, run_b in pair_runs(a, b, in_order)
        for field, stat in METRICS
    ]


def print_comparison(rows: list[Comparison], a_name: str, b_name: str) -> None:
    table = Table(title=f"A = {a_name}   B = {b_name}")
    for column in ("run", "metric", "A", "B", "B/A", "B - A"):
        table.add_column(column, justify="left" if column in {"run", "metric"} else "right")
    for row in rows:
        table.add_row(
            row.label,
            row.metric,
            _fmt(row.a),
            _fmt(row.b),
            "-" if row.ratio is None else f"{row.ratio:.3f}",
            _fmt(row.delta),
        )
    console.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"
