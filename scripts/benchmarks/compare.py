"""Two result files side by side: for every run both share, each headline metric as B/A and B - A.

Runs are paired by label (`c=8`, `rate=4/s c=16`), so a direct run and an HTTP run of the same level pair
up; files with no label in common are paired in order. B/A > 1 is better for throughput, worse for latency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.table import Table

from scripts.benchmarks.report import console
from scripts.benchmarks.stats import RunSummary

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
    label: str
    metric: str
    a: float | None
    b: float | None

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


def pair_runs(a: list[RunSummary], b: list[RunSummary]) -> list[tuple[RunSummary, RunSummary]]:
    b_by_label = {s.label: s for s in b}
    by_label = [(s, b_by_label[s.label]) for s in a if s.label in b_by_label]
    return by_label or list(zip(a, b, strict=False))


def compare(a: list[RunSummary], b: list[RunSummary]) -> list[Comparison]:
    return [
        Comparison(
            run_a.label,
            f"{field}.{stat}" if stat else field,
            metric_value(run_a, field, stat),
            metric_value(run_b, field, stat),
        )
        for run_a, run_b in pair_runs(a, b)
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
