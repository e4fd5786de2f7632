"""Prometheus metrics, served by truss's server at `/metrics` (it mounts the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from model.backends.base import BatchingBackend

REQUESTS = Counter("llm_requests_total", "Generation requests by outcome", ["outcome"])
GENERATED_TOKENS = Counter("llm_generated_tokens_total", "Tokens generated for clients")
PROMPT_TOKENS = Counter("llm_prompt_tokens_total", "Prompt tokens processed")
TIME_TO_FIRST_PIECE = Histogram(
    "llm_time_to_first_piece_seconds",
    "From request start to the first text piece",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
IN_FLIGHT = Gauge("llm_requests_in_flight", "Requests admitted to the engine and not yet finished or cancelled")


def track_backend(backend: BatchingBackend) -> None:
    IN_FLIGHT.set_function(lambda: backend.in_flight)
