"""Both TensorRT-LLM backends through the real server (`python main.py serve`), on the tiny model.

Each check starts the server on a free port with the backend's settings, waits until
/v1/models/model is ready, sends one streaming and one non-streaming greedy request and checks
that both succeed and say the same, then stops the server. Needs `truss` installed (the server).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from scripts.smoke import Check, CheckSkipped, SmokeContext, require

READY_TIMEOUT_S = 900  # a first LLM-API load compiles kernels
REQUEST = {"prompt": "Hello there", "max_new_tokens": 16, "ignore_eos": True}


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_and_ask(context: SmokeContext, name: str, settings: dict[str, str]) -> str:
    if importlib.util.find_spec("truss") is None:
        raise CheckSkipped("truss is not installed here; `pip install truss==0.18.35` to run the server checks")
    repo_root = context.repo_root or Path(__file__).resolve().parents[2]
    port, run_dir = _port(), context.work_dir / f"serve-{name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LLM_CACHE_DIR": str(context.work_dir / "cache"), "LLM_MAX_BATCH_SIZE": "4", **settings}
    with (run_dir / "server.log").open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "main.py", "serve", "--port", str(port), "--run-dir", str(run_dir / "app")],
            cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            require(server.poll() is None, f"the server exited with {server.returncode}; see {run_dir / 'server.log'}")
            require(time.monotonic() < deadline, f"not ready after {READY_TIMEOUT_S} s; see {run_dir / 'server.log'}")
            try:
                if requests.get(f"{url}/v1/models/model", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        predict = f"{url}/v1/models/model:predict"
        whole = requests.post(predict, json=REQUEST, timeout=300)
        require(whole.status_code == 200, f"non-streaming: {whole.status_code} {whole.text}")
        with requests.post(predict, json={**REQUEST, "stream": True}, stream=True, timeout=300) as streamed:
            require(streamed.status_code == 200, f"streaming: {streamed.status_code}")
            text = "".join(chunk.decode() for chunk in streamed.iter_content(chunk_size=None))
        body = whole.json()
        require(text == body["output"], "the stream and the non-streaming answer differ")
        require(body["usage"]["completion_tokens"] == 16 and body["finish_reason"] == "length", str(body))
        return f"200 streaming and not, 16 tokens, same text ({settings['LLM_BACKEND']})"
    finally:
        server.terminate()
        server.wait(timeout=60)


def llmapi_through_the_server(context: SmokeContext) -> str:
    settings = {
        "LLM_BACKEND": "tensorrt_llm_llmapi",
        "LLM_MODEL_REPO": str(context.checkpoint_dir),
        "LLM_MAX_SEQ_LEN": "512",
    }
    return _serve_and_ask(context, "llmapi", settings)


def engine_through_the_server(context: SmokeContext) -> str:
    if "plain" not in context.engines:
        raise CheckSkipped("no 'plain' engine was built (run without --only llmapi)")
    settings = {"LLM_BACKEND": "tensorrt_llm", "LLM_MODEL_REPO": str(context.engines["plain"])}
    return _serve_and_ask(context, "engine", settings)


CHECKS = [
    Check(
        "server.llmapi",
        "backend tensorrt_llm_llmapi serves the checkpoint through main.py serve",
        llmapi_through_the_server,
    ),
    Check("server.engine", "backend tensorrt_llm serves the engine through main.py serve", engine_through_the_server),
]
