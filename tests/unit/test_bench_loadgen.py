"""The load generator against a scripted streaming server and a scripted backend.

The stub server answers `/v1/models/model:predict` the way the real one does (raw text pieces, chunked;
4xx/5xx with `{"error": ...}`), with each piece sent after a scripted delay, so the measured TTFT/ITL and
the error accounting can be checked against known timings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from model.backends.base import SamplingParams, TokenChunk
from model.errors import EngineOverloaded
from scripts.benchmarks.datasets import BenchRequest
from scripts.benchmarks.direct import generate_request
from scripts.benchmarks.loadgen import (
    LoadLevel,
    RunPlan,
    drive,
    http_sender,
    run_interleaved,
    run_levels,
    summarize_level,
    take,
)
from scripts.benchmarks.stats import RequestRecord

FIRST_DELAY, GAP = 0.05, 0.02
PIECES = ["Hel", "lo", " wor", "ld"]


def bench_request(task_id: int = 0, output_tokens: int = 4, prompt: str = "hi") -> BenchRequest:
    return BenchRequest(task_id=task_id, prompt=prompt, input_ids=(1, 2, 3), output_tokens=output_tokens)


class StubServer:
    """Streams PIECES with scripted delays; prompts starting with `status:` or `break` misbehave."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []

    async def predict(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        prompt = body["prompt"]
        if prompt.startswith("status:"):
            status = int(prompt.split(":")[1])
            return web.json_response({"error": f"scripted {status}"}, status=status)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            await asyncio.sleep(FIRST_DELAY)
            for i, piece in enumerate(PIECES):
                if i:
                    await asyncio.sleep(GAP)
                await response.write(piece.encode())
                if prompt == "break" and i == 1:
                    request.transport.close()  # the connection drops mid-stream
                    return response
            await response.write_eof()
            return response
        finally:
            self.in_flight -= 1


@asynccontextmanager
async def stub_server() -> AsyncIterator[tuple[str, StubServer]]:
    stub = StubServer()
    app = web.Application()
    app.router.add_post("/v1/models/model:predict", stub.predict)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", stub
    finally:
        await runner.cleanup()


async def send_all(requests: list[BenchRequest], level: LoadLevel, **kwargs) -> tuple[list[RequestRecord], StubServer]:
    async with stub_server() as (url, stub), http_sender(url, **kwargs)() as send:
        return await drive(requests, send, level), stub


def test_streamed_timings_match_the_script() -> None:
    (record,), stub = asyncio.run(send_all([bench_request(output_tokens=4)], LoadLevel(concurrency=1)))
    assert record.ok and record.output_tokens == 4
    assert len(record.chunk_times) == len(PIECES)
    assert FIRST_DELAY <= record.ttft < FIRST_DELAY + 0.05
    assert GAP * 0.9 <= record.itl < GAP + 0.02
    assert stub.bodies[0] == {
        "prompt": "hi",
        "max_new_tokens": 4,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
    }


def words(text: str) -> int:
    """A stand-in tokenizer."""
    return len(text.split())


def test_without_ignore_eos_the_text_is_counted() -> None:
    (record,), stub = asyncio.run(
        send_all([bench_request(output_tokens=50)], LoadLevel(concurrency=1), count_tokens=words, ignore_eos=False)
    )
    assert record.output_tokens == 2  # "Hello world"
    assert stub.bodies[0]["ignore_eos"] is False


def test_errors_are_recorded_by_kind_not_raised() -> None:
    requests = [
        bench_request(0, prompt="status:429"),
        bench_request(1, prompt="status:400"),
        bench_request(2, prompt="break"),
        bench_request(3),
    ]
    records, _ = asyncio.run(send_all(requests, LoadLevel(concurrency=2)))
    by_task = {r.task_id: r for r in records}
    assert by_task[0].error == "http_429" and by_task[0].error_detail == "scripted 429"
    assert by_task[1].error == "http_400"
    assert by_task[2].error == "stream_broken"
    assert by_task[3].ok and by_task[3].output_tokens == 4


def test_a_refused_connection_is_an_error_kind() -> None:
    async def main() -> RequestRecord:
        async with http_sender("http://127.0.0.1:9")() as send:  # nothing listens on the discard port
            return await send(bench_request())

    assert asyncio.run(main()).error == "connection"


@pytest.mark.parametrize("concurrency", [1, 3])
def test_closed_loop_keeps_exactly_n_in_flight(concurrency: int) -> None:
    requests = [bench_request(i) for i in range(7)]
    records, stub = asyncio.run(send_all(requests, LoadLevel(concurrency=concurrency)))
    assert sorted(r.task_id for r in records) == list(range(7))
    assert stub.max_in_flight == concurrency


def test_poisson_rate_spreads_arrivals_and_respects_the_cap() -> None:
    requests = [bench_request(i) for i in range(12)]
    started = time.perf_counter()
    records, stub = asyncio.run(send_all(requests, LoadLevel(concurrency=2, rate=40.0)))
    assert len(records) == 12 and all(r.ok for r in records)
    assert stub.max_in_flight <= 2
    starts = sorted(r.start for r in records)
    assert starts[-1] - started > 0.1  # 11 gaps of mean 25 ms: not all at once


def test_max_duration_stops_new_requests() -> None:
    async def main() -> list[RequestRecord]:
        async with stub_server() as (url, _), http_sender(url)() as send:
            return await drive(
                [bench_request(i) for i in range(50)], send, LoadLevel(concurrency=1), max_duration_s=0.3
            )

    assert 1 <= len(asyncio.run(main())) < 10


def test_take_cycles_a_short_dataset_with_fresh_ids() -> None:
    taken = take([bench_request(7, prompt="a"), bench_request(8, prompt="b")], 5)
    assert [r.task_id for r in taken] == [0, 1, 2, 3, 4]
    assert [r.prompt for r in taken] == ["a", "b", "a", "b", "a"]


def test_run_levels_warms_up_then_summarizes_each_level() -> None:
    async def main():
        async with stub_server() as (url, stub):
            plan = RunPlan(num_requests=4, warmup_waves=1)
            levels = [LoadLevel(concurrency=1), LoadLevel(concurrency=2)]
            summaries = await asyncio.to_thread(run_levels, [bench_request()], http_sender(url), levels, plan, "http")
            return summaries, stub

    summaries, stub = asyncio.run(main())
    assert [s.label for s in summaries] == ["c=1", "c=2"]
    assert all(s.completed == 4 and s.output_tokens_total == 16 for s in summaries)
    assert len(stub.bodies) == (1 + 4) + (2 + 4)  # each level: a warm-up wave of its concurrency, then 4


def test_interleaved_rounds_alternate_modes_and_pool_them() -> None:
    async def main():
        async with stub_server() as (url, stub):
            senders = {"a": http_sender(url), "b": http_sender(url)}
            plan = RunPlan(num_requests=2, warmup_waves=0)
            run = asyncio.to_thread(run_interleaved, [bench_request()], senders, LoadLevel(concurrency=1), plan, 3)
            return await run, stub

    summaries, stub = asyncio.run(main())
    assert list(summaries) == ["a", "b"] and len(stub.bodies) == 2 * 3 * 2
    assert all(s.completed == 6 and s.label == "c=1" for s in summaries.values())
    # Six sequential requests of ~0.11 s each: the pooled duration excludes the other mode's rounds in between.
    assert all(0.6 < s.duration_s < 1.2 for s in summaries.values())


def test_pooled_throughput_uses_the_summed_run_times() -> None:
    first = [RequestRecord(0, 1, start=0.0, end=1.0, chunk_times=[0.5, 1.0], output_tokens=10)]
    second = [RequestRecord(1, 1, start=100.0, end=103.0, chunk_times=[101.0, 103.0], output_tokens=30)]
    summary = summarize_level(LoadLevel(concurrency=1), "x", [first, second])
    assert summary.duration_s == pytest.approx(4.0) and summary.output_tokens_per_s == pytest.approx(10.0)
    assert summary.ttft_ms["p50"] == pytest.approx(750.0)


class ScriptedBackend:
    """A backend double that follows the contract: chunks of new ids, the last one with a finish_reason."""

    def __init__(self, chunks: list[TokenChunk], fail: Exception | None = None) -> None:
        self.chunks, self.fail, self.seen = chunks, fail, []

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenChunk]:
        self.seen.append((prompt_ids, params))
        if self.fail:
            raise self.fail
        for chunk in self.chunks:
            await asyncio.sleep(0.01)
            yield chunk


def test_direct_mode_counts_backend_tokens_exactly() -> None:
    backend = ScriptedBackend([TokenChunk((5,)), TokenChunk((6, 7)), TokenChunk((), None), TokenChunk((8,), "length")])
    record = asyncio.run(generate_request(backend, bench_request(output_tokens=4), ignore_eos=True))
    assert record.ok and record.output_tokens == 4 and len(record.chunk_times) == 3
    prompt_ids, params = backend.seen[0]
    assert prompt_ids == [1, 2, 3]
    assert params == SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)


def test_direct_mode_records_serving_errors() -> None:
    backend = ScriptedBackend([], fail=EngineOverloaded("64 requests are in flight"))
    record = asyncio.run(generate_request(backend, bench_request(), ignore_eos=True))
    assert record.error == "EngineOverloaded" and "in flight" in record.error_detail
