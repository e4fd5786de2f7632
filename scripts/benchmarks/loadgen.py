"""The load generator: schedules requests at a concurrency or a Poisson rate against a `Sender`.

A `Sender` turns one `BenchRequest` into a `RequestRecord`; `http_sender` streams from a server over one of
three APIs (`API_PATHS`): this server's `/v1/models/model:predict`, or the OpenAI `/v1/chat/completions` /
`/v1/completions` that any OpenAI-compatible server (vLLM, trtllm-serve, SGLang, TGI) answers, so the same
command measures them side by side; `scripts.benchmarks.direct.direct_sender` drives the backend in-process. The
scheduling, warm-up, progress bar and statistics are shared, so the two modes differ only in the path a
request takes — which is what the serving-overhead ratio measures.

- Closed loop (`concurrency=N`): N workers, each sends its next request as soon as the last one ended.
- Open loop (`rate=R`): arrivals with exponential gaps of mean 1/R s (a Poisson process), as genai-perf's
  `--request-rate`; `concurrency`, if also given, caps the requests in flight.

Every level is bounded by its request count and, optionally, a duration after which no request is started.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from itertools import cycle, islice
from typing import Any

import aiohttp
import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from scripts.benchmarks.datasets import BenchRequest
from scripts.benchmarks.report import console
from scripts.benchmarks.stats import RequestRecord, RunSummary, summarize

PREDICT_PATH = "/v1/models/model:predict"
API_PATHS = {"predict": PREDICT_PATH, "openai-chat": "/v1/chat/completions", "openai-completions": "/v1/completions"}

Sender = Callable[[BenchRequest], Awaitable[RequestRecord]]
OpenSender = Callable[[], AbstractAsyncContextManager[Sender]]


@dataclass(frozen=True)
class LoadLevel:
    concurrency: int | None = None
    rate: float | None = None  # requests/s; None means closed loop

    @property
    def label(self) -> str:
        parts = ([f"rate={self.rate:g}/s"] if self.rate else []) + (
            [f"c={self.concurrency}"] if self.concurrency else []
        )
        return " ".join(parts)

    @property
    def warmup_size(self) -> int:
        return self.concurrency or 1


@dataclass(frozen=True)
class RunPlan:
    num_requests: int
    warmup_waves: int = 1
    # Warm-up requests are cut to this many new tokens (None: full length). Enough for a CPU; on a GPU the first
    # full-length run at a batch size is much slower per step (CUDA caching allocator), so warm up at full length.
    warmup_tokens: int | None = 16
    max_duration_s: float | None = None
    seed: int = 0


def take(requests: list[BenchRequest], n: int) -> list[BenchRequest]:
    """The first n requests, cycling through a shorter dataset with fresh task ids."""
    return [replace(r, task_id=i) for i, r in enumerate(islice(cycle(requests), n))]


async def drive(
    requests: list[BenchRequest],
    send: Sender,
    level: LoadLevel,
    *,
    seed: int = 0,
    max_duration_s: float | None = None,
    on_done: Callable[[RequestRecord], None] = lambda record: None,
) -> list[RequestRecord]:
    """Send `requests` at `level`; returns one record per request started, in completion order."""
    deadline = time.perf_counter() + max_duration_s if max_duration_s else float("inf")
    records: list[RequestRecord] = []

    async def one(request: BenchRequest) -> None:
        record = await send(request)
        records.append(record)
        on_done(record)

    if level.rate is None:
        pending = iter(requests)

        async def worker() -> None:
            for request in pending:  # shared iterator: every worker takes the next unsent request
                if time.perf_counter() > deadline:
                    return
                await one(request)

        await asyncio.gather(*(worker() for _ in range(level.concurrency or 1)))
        return records

    gate = asyncio.Semaphore(level.concurrency) if level.concurrency else None

    async def gated(request: BenchRequest) -> None:
        if gate is None:
            return await one(request)
        async with gate:
            await one(request)

    gaps = np.random.default_rng(seed).exponential(1.0 / level.rate, len(requests))
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    start, tasks = time.perf_counter(), []
    for request, at in zip(requests, arrivals, strict=True):
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        if time.perf_counter() > deadline:
            break
        tasks.append(asyncio.create_task(gated(request)))
    await asyncio.gather(*tasks)
    return records


def run_levels(
    requests: list[BenchRequest], open_sender: OpenSender, levels: list[LoadLevel], plan: RunPlan, mode: str
) -> list[RunSummary]:
    """Warm up and measure every level in turn, with a progress bar."""
    return [
        summarize_level(level, mode, [asyncio.run(measure(requests, open_sender, level, plan, mode))])
        for level in levels
    ]


def run_interleaved(
    requests: list[BenchRequest], senders: dict[str, OpenSender], level: LoadLevel, plan: RunPlan, rounds: int
) -> dict[str, RunSummary]:
    """Each mode `rounds` times in turn (A B A B ...), pooled per mode: drift of a shared machine hits all alike."""
    runs: dict[str, list[list[RequestRecord]]] = {mode: [] for mode in senders}
    for _ in range(rounds):
        for mode, open_sender in senders.items():
            runs[mode].append(asyncio.run(measure(requests, open_sender, level, plan, mode)))
    return {mode: summarize_level(level, mode, records) for mode, records in runs.items()}


def summarize_level(level: LoadLevel, mode: str, runs: list[list[RequestRecord]]) -> RunSummary:
    """Pooled latencies; throughput over the summed wall time of the runs (the gaps between them excluded)."""
    records = [record for run in runs for record in run]
    duration = sum(max(r.end for r in run) - min(r.start for r in run) for run in runs if run)
    return summarize(
        records,
        label=level.label,
        mode=mode,
        concurrency=level.concurrency,
        request_rate=level.rate,
        duration_s=duration,
    )


async def measure(
    requests: list[BenchRequest], open_sender: OpenSender, level: LoadLevel, plan: RunPlan, mode: str
) -> list[RequestRecord]:
    """Warm-up waves at the level's concurrency (results dropped), then the measured requests."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    async with open_sender() as send:
        warm = [replace(r, output_tokens=min(r.output_tokens, plan.warmup_tokens or r.output_tokens)) for r in requests]
        await drive(take(warm, plan.warmup_waves * level.warmup_size), send, LoadLevel(concurrency=level.warmup_size))
        measured = take(requests, plan.num_requests)
        # No refresh thread: in the direct mode it would compete with the engine thread for the GIL.
        with Progress(*columns, console=console, auto_refresh=False) as progress:
            bar = progress.add_task(f"{mode} {level.label}", total=len(measured))

            def advance(record: RequestRecord) -> None:
                progress.update(bar, advance=1, refresh=True)

            return await drive(
                measured, send, level, seed=plan.seed, max_duration_s=plan.max_duration_s, on_done=advance
            )


def http_sender(
    base_url: str,
    count_tokens: Callable[[str], int] | None = None,
    *,
    ignore_eos: bool = True,
    timeout_s: float = 600.0,
    api: str = "predict",
    model: str | None = None,
) -> OpenSender:
    """Streams each request from the server over `api` (an `API_PATHS` key); `model` names the OpenAI model.

    Output tokens: an OpenAI server's `usage` when it sends one; else max_new_tokens when EOS is ignored (exact);
    otherwise `count_tokens` counts the text.
    """
    if not ignore_eos and count_tokens is None:
        raise ValueError("counting output tokens without ignore_eos needs count_tokens (the model's tokenizer)")
    counter = None if ignore_eos else count_tokens

    @asynccontextmanager
    async def open_sender() -> AsyncIterator[Sender]:
        connector = aiohttp.TCPConnector(limit=0)  # the scheduler alone decides how many are in flight
        async with aiohttp.ClientSession(
            base_url, connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as session:

            async def send(request: BenchRequest) -> RequestRecord:
                if api == "predict":
                    return await stream_request(session, request, counter, ignore_eos=ignore_eos)
                return await stream_openai(session, request, counter, api=api, model=model, ignore_eos=ignore_eos)

            yield send

    return open_sender


async def stream_request(
    session: aiohttp.ClientSession,
    request: BenchRequest,
    count_tokens: Callable[[str], int] | None,
    *,
    ignore_eos: bool,
) -> RequestRecord:
    """One streamed request; every failure is recorded by kind, never raised.

    Output tokens: `count_tokens(text)` when given, else max_new_tokens (exact when EOS is ignored).
    """
    payload = {
        "prompt": request.prompt,
        "max_new_tokens": request.output_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": ignore_eos,
    }
    record = RequestRecord(task_id=request.task_id, input_tokens=len(request.input_ids), start=time.perf_counter())
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a piece may end inside a character
    pieces = []
    with _network_failures(record):
        async with session.post(PREDICT_PATH, json=payload) as response:
            if response.status != 200:
                record.error, record.error_detail = f"http_{response.status}", _error_message(await response.text())
            else:
                async for data in response.content.iter_any():
                    if data:
                        record.chunk_times.append(time.perf_counter())
                        pieces.append(decoder.decode(data))
                pieces.append(decoder.decode(b"", final=True))
    return _finished(record, lambda: count_tokens("".join(pieces)) if count_tokens else request.output_tokens)


async def stream_openai(
    session: aiohttp.ClientSession,
    request: BenchRequest,
    count_tokens: Callable[[str], int] | None,
    *,
    api: str,
    model: str | None,
    ignore_eos: bool,
) -> RequestRecord:
    """One streamed OpenAI request (server-sent events); every failure is recorded by kind, never raised.

    `ignore_eos` is sent as the extra field vLLM, trtllm-serve and this server read; a chat request sends the
    prompt as one user turn, a completions request sends it raw. A chunk counts when it carries text.
    """
    payload: dict[str, Any] = {
        "model": model or "model",
        "max_tokens": request.output_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **({"ignore_eos": True} if ignore_eos else {}),
    }
    if api == "openai-chat":
        payload["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        payload["prompt"] = request.prompt
    record = RequestRecord(task_id=request.task_id, input_tokens=len(request.input_ids), start=time.perf_counter())
    pieces, usage = [], None
    with _network_failures(record):
        async with session.post(API_PATHS[api], json=payload) as response:
            if response.status != 200:
                record.error, record.error_detail = f"http_{response.status}", _error_message(await response.text())
            else:
                async for raw in response.content:
                    line = raw.decode("utf-8").strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    event = json.loads(line.removeprefix("data:"))
                    if "error" in event:
                        record.error, record.error_detail = "stream_error", _error_message(json.dumps(event))
                        break
                    usage = event.get("usage") or usage
                    text = "".join(_choice_text(choice) for choice in event.get("choices") or [])
                    if text:
                        record.chunk_times.append(time.perf_counter())
                        pieces.append(text)
    text = "".join(pieces)
    return _finished(
        record,
        lambda: usage["completion_tokens"] if usage else count_tokens(text) if count_tokens else request.output_tokens,
    )


@contextmanager
def _network_failures(record: RequestRecord) -> Iterator[None]:
    """A timeout, a stream broken off mid-body or a lost connection is recorded by kind, never raised."""
    try:
        yield
    except TimeoutError:
        record.error = "timeout"
    except aiohttp.ClientPayloadError as exc:
        record.error, record.error_detail = "stream_broken", str(exc)
    except aiohttp.ClientConnectionError as exc:
        record.error, record.error_detail = "connection", str(exc)


def _finished(record: RequestRecord, output_tokens: Callable[[], int]) -> RequestRecord:
    record.end = time.perf_counter()
    if record.ok and not record.chunk_times:
        record.error = "empty_stream"
    if record.ok:
        record.output_tokens = output_tokens()
    return record


def _choice_text(choice: dict[str, Any]) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def _error_message(body: str) -> str:
    """The server's `{"error": ...}` message (OpenAI's `{"error": {"message"}}` too), or the raw body."""
    try:
        error = json.loads(body)["error"]
        return str(error["message"] if isinstance(error, dict) and "message" in error else error)
    except (ValueError, KeyError, TypeError):
        return body[:200]
