"""Backpressure and event-loop figures against a running server (`python main.py serve` first).

    python -m scripts.benchmarks.overload burst --url http://127.0.0.1:8080 --requests 600 --max-new-tokens 4
    python -m scripts.benchmarks.overload probe --url http://127.0.0.1:8080 --prompt-mb 10

`burst`: N concurrent /predict requests at once; prints how many got 200 / 429, the 429s' latency and
whether each carried Retry-After, and whether every 200 equals a solo run's output. `probe`: readiness
probe latency (every 50 ms) while big prompts are sent. Both end with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests


def burst(url: str, count: int, max_new_tokens: int) -> dict:
    body = {"prompt": "Count from one to five.", "max_new_tokens": max_new_tokens, "ignore_eos": True}
    expected = requests.post(f"{url}/v1/models/model:predict", json=body, timeout=600).json()["output"]
    gate = threading.Barrier(count)

    def one(_: int) -> tuple[int, float, bool, bool]:
        session = requests.Session()
        gate.wait()
        started = time.perf_counter()
        try:
            response = session.post(f"{url}/v1/models/model:predict", json=body, timeout=900)
        except requests.RequestException:
            return 0, time.perf_counter() - started, False, False  # status 0: no answer (timeout, dropped)
        elapsed = time.perf_counter() - started
        whole = response.status_code == 200 and response.json()["output"] == expected
        return response.status_code, elapsed, "retry-after" in response.headers, whole

    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(one, range(count)))
    refused = [r for r in results if r[0] == 429]
    served = [r for r in results if r[0] == 200]
    return {
        "requests": count,
        "status_counts": {str(s): sum(r[0] == s for r in results) for s in sorted({r[0] for r in results})},
        "429_with_retry_after": sum(r[2] for r in refused),
        "429_latency_s": _summary([r[1] for r in refused]),
        "200_latency_s": _summary([r[1] for r in served]),
        "200_whole_and_correct": sum(r[3] for r in served),
    }


def probe(url: str, prompt_mb: float, senders: int) -> dict:
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            started = time.perf_counter()
            requests.get(f"{url}/v1/models/model", timeout=60)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)

    def send(_: int) -> tuple[int, float]:
        started = time.perf_counter()
        prompt = "word " * int(prompt_mb * 1024 * 1024 / 5)
        response = requests.post(f"{url}/v1/models/model:predict", json={"prompt": prompt}, timeout=600)
        return response.status_code, time.perf_counter() - started

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)
    with ThreadPoolExecutor(senders) as pool:
        sent = list(pool.map(send, range(senders)))
    time.sleep(0.5)
    done.set()
    poller.join()
    return {"prompt_mb": prompt_mb, "senders": sent, "probe_latency_s": _summary(latencies)}


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    return {"n": len(values), "p50": round(statistics.median(ordered), 4), "max": round(ordered[-1], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["burst", "probe"])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--prompt-mb", type=float, default=10.0)
    parser.add_argument("--senders", type=int, default=3)
    args = parser.parse_args()
    result = (
        burst(args.url, args.requests, args.max_new_tokens)
        if args.mode == "burst"
        else probe(args.url, args.prompt_mb, args.senders)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
