"""Prometheus metrics, named as operators and autoscalers read them (vLLM / Triton style), served at `/metrics`.

Counted on the request path (generation.py, http_io.py): `llm_requests_total{outcome}` (completed,
disconnected, failed, or the error class of a refused request), `llm_prompt_tokens_total`,
`llm_generation_tokens_total`, and the histograms `llm_time_to_first_token_seconds` (request start to the first
text piece), `llm_inter_token_latency_seconds` (per token) and `llm_e2e_request_latency_seconds` (completed
requests). Read from the engine at every scrape (`BatchingBackend.stats()`): the gauges `llm_requests_running`,
`llm_requests_waiting`, `llm_kv_cache_usage_ratio` (0..1, only from engines that know it) and the counters
`llm_prefix_cache_queries_total` / `llm_prefix_cache_hits_total` (prompt tokens looked up / reused).

truss's server mounts the default registry at `/metrics/` and redirects `/metrics` there; `metrics_route` answers
`/metrics` itself (installed by server_app.py), since scrapers and probes often do not follow redirects.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from model.backends.base import BatchingBackend

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600)

REQUESTS = Counter("llm_requests_total", "Generation requests by outcome", ["outcome"])
GENERATED_TOKENS = Counter("llm_generation_tokens", "Tokens generated for clients")
PROMPT_TOKENS = Counter("llm_prompt_tokens", "Prompt tokens processed")
TIME_TO_FIRST_TOKEN = Histogram(
    "llm_time_to_first_token_seconds", "From request start to the first text piece", buckets=LATENCY_BUCKETS
)
INTER_TOKEN_LATENCY = Histogram(
    "llm_inter_token_latency_seconds", "Between consecutive generated tokens of a request", buckets=TOKEN_GAP_BUCKETS
)
E2E_REQUEST_LATENCY = Histogram(
    "llm_e2e_request_latency_seconds", "From request start to its last piece (completed requests)", buckets=E2E_BUCKETS
)


class EngineCollector(Collector):
    """The engine's own figures, read at scrape time."""

    def __init__(self, backend: BatchingBackend) -> None:
        self.backend = backend

    def collect(self) -> Iterator[Metric]:
        stats = self.backend.stats()
        yield GaugeMetricFamily("llm_requests_running", "Requests generating in the engine", value=stats.running)
        yield GaugeMetricFamily("llm_requests_waiting", "Requests accepted, not yet running", value=stats.waiting)
        if stats.kv_cache_usage is not None:
            yield GaugeMetricFamily("llm_kv_cache_usage_ratio", "KV cache in use, 0..1", value=stats.kv_cache_usage)
        yield CounterMetricFamily(
            "llm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", value=stats.prefix_cache_queries
        )
        yield CounterMetricFamily(
            "llm_prefix_cache_hits", "Prompt tokens whose KV was reused", value=stats.prefix_cache_hits
        )


_collector: EngineCollector | None = None


def track_backend(backend: BatchingBackend) -> None:
    """Export `backend`'s stats (once per process: a reload replaces the engine the collector reads)."""
    global _collector
    if _collector is None:
        _collector = EngineCollector(backend)
        REGISTRY.register(_collector)
    _collector.backend = backend


async def _metrics(request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def metrics_route() -> Route:
    """`GET /metrics` answered in place (no redirect to `/metrics/`)."""
    return Route("/metrics", _metrics, methods=["GET"])
