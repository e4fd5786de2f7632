"""Per-request timings in, one run's summary out: the numbers genai-perf and trtllm-bench report.

A `RequestRecord` holds what a client can observe about one request: when it was sent, when each
non-empty piece of output arrived, when it ended, how many output tokens it produced, and the kind
of error if it failed. Everything else is derived here, the same way for the HTTP and the direct mode:

- TTFT: first output piece - send time.
- ITL (inter-token latency, genai-perf's definition): (end - first piece) / (output tokens - 1), so a
  server that sends several tokens in one piece is not rewarded with a zero gap.
- E2E: end - send time.
- per-user output tokens/s: output tokens / E2E, what one client sees.
- requests/s and output tokens/s: successful requests and their tokens over the wall time of the run
  (first send to last end), which counts queueing and client turnaround as a user would.

Failed requests count in `errors` by kind and in the duration, never in the latency percentiles.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)
LATENCY_METRICS = ("ttft_ms", "itl_ms", "e2e_ms", "output_tps_per_user")


@dataclass
class RequestRecord:
    """One request as the client saw it; times are `time.perf_counter()` seconds."""

    task_id: int
    input_tokens: int
    start: float
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each non-empty piece
    output_tokens: int = 0
    error: str | None = None  # the kind: "http_429", "timeout", "connection", ...
    error_detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def itl(self) -> float | None:
        """None for a single-token output: there is no gap to measure."""
        if self.output_tokens < 2:
            return None
        return (self.end - self.chunk_times[0]) / (self.output_tokens - 1)


def distribution(values: list[float]) -> dict[str, float | None]:
    """Mean and percentiles (numpy's linear interpolation, as genai-perf); None when there is no sample."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    array = np.asarray(values, dtype=float)
    points = np.percentile(array, PERCENTILES)
    return {"mean": float(array.mean()), **{f"p{p}": float(v) for p, v in zip(PERCENTILES, points, strict=True)}}


@dataclass
class RunSummary:
    """One load level (a concurrency or a request rate) of one mode; `to_dict` is what JSON/CSV hold."""

    label: str
    mode: str  # "http" or "direct"
    concurrency: int | None
    request_rate: float | None
    num_requests: int
    completed: int
    errors: dict[str, int]
    duration_s: float
    requests_per_s: float
    input_tokens_per_s: float
    output_tokens_per_s: float
    output_tokens_total: int
    ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    e2e_ms: dict[str, float | None]
    output_tps_per_user: dict[str, float | None]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        return cls(**data)

    def flat(self) -> dict[str, Any]:
        """One CSV row: nested distributions become `ttft_ms_p99` etc., errors one `kind=count` cell."""
        row: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if key in LATENCY_METRICS:
                row.update({f"{key}_{stat}": v for stat, v in value.items()})
            elif key == "errors":
                row[key] = ";".join(f"{kind}={n}" for kind, n in sorted(value.items()))
            elif key == "extra":
                row.update(value)
            else:
                row[key] = value
        return row


def summarize(
    records: list[RequestRecord],
    *,
    label: str,
    mode: str,
    concurrency: int | None = None,
    request_rate: float | None = None,
    duration_s: float | None = None,
) -> RunSummary:
    """Reduce one run's records to its summary (see the module docstring for each definition).

    `duration_s` overrides the wall time (first send to last end) for records pooled from several runs.
    """
    ok = [r for r in records if r.ok]
    errors = Counter(r.error for r in records if not r.ok)
    if duration_s is not None:
        duration = duration_s
    else:
        duration = max(r.end for r in records) - min(r.start for r in records) if records else 0.0
    rate = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    output_total = sum(r.output_tokens for r in ok)
    itls = [r.itl for r in ok if r.itl is not None]
    return RunSummary(
        label=label,
        mode=mode,
        concurrency=concurrency,
        request_rate=request_rate,
        num_requests=len(records),
        completed=len(ok),
        errors=dict(sorted(errors.items())),
        duration_s=duration,
        requests_per_s=rate(len(ok)),
        input_tokens_per_s=rate(sum(r.input_tokens for r in ok)),
        output_tokens_per_s=rate(output_total),
        output_tokens_total=output_total,
        ttft_ms=distribution([1e3 * r.ttft for r in ok]),
        itl_ms=distribution([1e3 * v for v in itls]),
        e2e_ms=distribution([1e3 * r.e2e for r in ok]),
        output_tps_per_user=distribution([r.output_tokens / r.e2e for r in ok if r.e2e > 0]),
    )
