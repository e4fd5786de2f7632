"""End-to-end: the real server on backend tensorrt_llm_llmapi, with the LLM-API double in its process.

`python main.py serve` runs with a `sitecustomize.py` on PYTHONPATH that installs
tests/doubles/trtllm_llmapi.py as `tensorrt_llm` (the double's steps take 10 ms, so requests overlap).
The checkpoint is the embedded SmolLM2 folder: its config.json, generation_config.json and tokenizer
are real; the double makes the tokens. Checked over HTTP: streaming, cancellation on disconnect,
concurrent requests batched and not mixed up, and errors as clear 400s while the server keeps serving.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO_ROOT
from tests.doubles.trtllm_llmapi import sitecustomize_source
from tests.e2e.conftest import Server, assert_a_dropped_stream_stops, in_turn_and_at_once, launch

MAX_INPUT_LEN = 64


@pytest.fixture(scope="module")
def llmapi_server(tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path) -> Iterator[Server]:
    site = tmp_path_factory.mktemp("llmapi-site")
    (site / "sitecustomize.py").write_text(sitecustomize_source(REPO_ROOT))
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        "LLM_BACKEND": "tensorrt_llm_llmapi",
        "LLM_MODEL_REPO": str(embedded_dir),
        "LLM_MAX_INPUT_LEN": str(MAX_INPUT_LEN),
        "FAKE_TRTLLM_ITERATION_SECONDS": "0.01",
    }
    with launch(tmp_path_factory.mktemp("serve-llmapi"), env) as (server, _):
        yield server


def _stream(server: Server, body: dict) -> list[str]:
    with server.predict({**body, "stream": True}, stream=True) as response:
        assert response.status_code == 200, response.text
        return [chunk.decode("utf-8") for chunk in response.iter_content(chunk_size=None)]


def test_the_llm_api_backend_loads_and_generates(llmapi_server: Server) -> None:
    assert "tensorrt_llm_llmapi backend" in llmapi_server.log.read_text()
    body = llmapi_server.predict({"prompt": "Hello", "max_new_tokens": 12, "ignore_eos": True}).json()
    assert body["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 12
    assert body["output"]


def test_streamed_pieces_join_to_the_non_streaming_text(llmapi_server: Server) -> None:
    request = {"prompt": "Tell me about mistrals.", "max_new_tokens": 40, "ignore_eos": True}
    pieces = _stream(llmapi_server, request)
    assert len(pieces) > 5
    assert "".join(pieces) == llmapi_server.predict(request).json()["output"]


def test_concurrent_requests_are_batched_and_not_mixed_up(llmapi_server: Server) -> None:
    prompts = [f"Count to {n}." for n in range(8)]

    def ask(prompt: str) -> str:
        return llmapi_server.predict({"prompt": prompt, "max_new_tokens": 30, "ignore_eos": True}).json()["output"]

    sequential, concurrent, running = in_turn_and_at_once(llmapi_server, ask, prompts)
    assert concurrent == sequential and len(set(sequential)) == len(prompts)
    assert running >= 2, "never more than one request generating at once"


def test_a_client_disconnect_aborts_the_request(llmapi_server: Server) -> None:
    request = {"prompt": "Tell me a long story.", "max_new_tokens": 2000, "ignore_eos": True}
    assert_a_dropped_stream_stops(llmapi_server, request, within_s=15)  # the whole answer would take 20 s


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "word " * 200}, f"accepts at most {MAX_INPUT_LEN}"),
        ({"prompt": "hi", "repetition_penalty": 1.3}, "repetition_penalty"),
        ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "hi", "temperture": 0.5}, "unknown field 'temperture'"),
    ],
)
def test_bad_requests_get_a_clear_400_and_the_server_keeps_serving(llmapi_server: Server, body, message) -> None:
    response = requests.post(llmapi_server.predict_url, json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert llmapi_server.predict({"prompt": "Say hello.", "max_new_tokens": 4}).status_code == 200
