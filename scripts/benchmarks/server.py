"""A local `main.py serve` for the benchmarks that start their own server (`bench cpu`, `bench accuracy`).

The server runs in its own process group on a free port with its own app folder, so it never collides
with a server someone else runs on 8080, and stopping it stops truss's server process with it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from scripts import REPO_ROOT
from scripts.cli import CliError

READY_PATH = "/v1/models/model"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def local_server(log_path: Path, *, port: int | None = None, ready_timeout_s: float = 900.0) -> Iterator[str]:
    """Start `main.py serve`, wait until it answers 200 on readiness, yield its base URL, always stop it."""
    port = port or free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run_dir = REPO_ROOT / ".cache" / f"bench-serve-{port}"
    command = [sys.executable, "main.py", "serve", "--port", str(port), "--run-dir", str(run_dir)]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, process, log_path, ready_timeout_s)
        yield base_url
    finally:
        _stop(process)
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh app folder per port; keep .cache/ from filling up


def wait_ready(base_url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Poll readiness (503 while loading and warming up, 200 once ready); fail fast if the server died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CliError(f"the server exited with code {process.returncode} while starting; see {log_path}")
        try:
            if requests.get(base_url + READY_PATH, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass  # not listening yet
        time.sleep(0.5)
    raise CliError(f"the server was not ready after {timeout_s:.0f} s; see {log_path}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (serve and truss's server under it), SIGKILL if it lingers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # every process of the group has exited already
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
