"""The real server: `python main.py serve` in a subprocess on a free port, shared by the session."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.conftest import MODEL_CACHE, REPO_ROOT

STARTUP_TIMEOUT_S = 600
API_KEY = "test-key-7f3a"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BYTES = 65536
# The "guarded" server: an API key, a small body limit, a queue of 4 (max_batch_size 2) so overload is
# cheap to reach, and short prompts and outputs so a fuzz's valid requests stay quick.
GUARDED_ENV = {
    "TRUSS_SECRET_llm_api_key": API_KEY,  # how truss reads a secret outside a pod
    "LLM_MAX_BATCH_SIZE": "2",
    "LLM_MAX_INPUT_LEN": "512",
    "LLM_MAX_NEW_TOKENS_LIMIT": "4",
    "LLM_DEFAULT_MAX_NEW_TOKENS": "2",
    "LLM_MAX_REQUEST_BYTES": str(MAX_BYTES),
}


@dataclass
class Server:
    url: str
    log: Path
    readiness_codes: list[int] = field(default_factory=list)

    @property
    def predict_url(self) -> str:
        return f"{self.url}/v1/models/model:predict"

    def predict(self, body: dict, **kwargs) -> requests.Response:
        return requests.post(self.predict_url, json=body, timeout=300, **kwargs)

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric on /metrics."""
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} missing from /metrics"
        return float(match.group(1))


def in_turn_and_at_once(server: Server, ask: Callable[[str], str], prompts: list[str]) -> tuple[list, list, float]:
    """(answers one after another, answers all at once, most requests seen generating at once)."""
    sequential = [ask(p) for p in prompts]
    running = [0.0]
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = [pool.submit(ask, p) for p in prompts]
        while not all(answer.done() for answer in answers):
            running.append(server.metric("llm_requests_running"))
            time.sleep(0.05)
        concurrent = [answer.result() for answer in answers]
    return sequential, concurrent, max(running)


def assert_a_dropped_stream_stops(server: Server, request: dict, within_s: float) -> None:
    """Drop `request`'s stream after its first piece; no request may still generate `within_s` later."""
    with server.predict({**request, "stream": True}, stream=True) as response:
        chunks = response.iter_content(chunk_size=None)  # kept: a discarded iterator closes the connection
        next(chunks)
        assert server.metric("llm_requests_running") >= 1
    deadline = time.monotonic() + within_s
    while server.metric("llm_requests_running") > 0:
        assert time.monotonic() < deadline, "the dropped request is still generating"
        time.sleep(0.2)


def _log_excerpt(log: Path) -> str:
    """The server log without the readiness-poll noise, last lines first in importance."""
    lines = [line for line in log.read_text().splitlines() if "Health check failed" not in line]
    return "\n".join(lines[-60:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def launch(run_dir: Path, env: dict[str, str] | None = None) -> Iterator[tuple[Server, subprocess.Popen]]:
    """`main.py serve` with these extra environment variables, once ready; stopped on exit."""
    port = _free_port()
    log = run_dir / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "main.py", "serve", "--port", str(port), "--run-dir", str(run_dir / "app")],
            cwd=REPO_ROOT,
            env={**os.environ, "LLM_CACHE_DIR": str(MODEL_CACHE), **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(url=f"http://127.0.0.1:{port}", log=log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode} during start-up:\n{_log_excerpt(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{_log_excerpt(log)}")
            try:
                code = requests.get(f"{server.url}/v1/models/model", timeout=5).status_code
                server.readiness_codes.append(code)
                if code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        yield server, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path) -> Iterator[Server]:
    """Started once; records every readiness status it saw until the model was ready."""
    with launch(tmp_path_factory.mktemp("serve")) as (server, _):
        yield server


@pytest.fixture(scope="session")
def guarded(tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path) -> Iterator[Server]:
    with launch(tmp_path_factory.mktemp("guarded"), GUARDED_ENV) as (server, _):
        yield server
