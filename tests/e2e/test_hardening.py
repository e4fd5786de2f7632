"""The server as an exposed service: API key, limits, keep-alive after bad input, backpressure, closed
routes, logs, and the bounded SIGTERM drain — against a real server with small limits."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.e2e.conftest import API_KEY, AUTH, MAX_BYTES, Server, launch

SECRET_PROMPT = "zebra-quartz-prompt-marker"


def _post(server: Server, path: str, session: requests.Session | None = None, **kwargs) -> requests.Response:
    return (session or requests).post(f"{server.url}{path}", headers=AUTH, timeout=120, **kwargs)


MALFORMED = [
    (b'{"prompt": "\xff"}', "not UTF-8"),
    (b"[" * 50_000, "nested deeper than"),
    (b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", "4300 digits"),
    (b'{"prompt": "hi \\ud800 there"}', "prompt: a lone UTF-16 surrogate"),
    (b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "messages[0].content: a lone UTF-16 surrogate"),
    (b'{"prompt": "hi", "temperature": NaN}', "NaN is not a JSON number"),
]


@pytest.mark.parametrize("path", ["/v1/models/model:predict", "/v1/chat/completions", "/v1/completions"])
def test_malformed_bodies_are_400s_on_one_kept_alive_connection(guarded: Server, path: str) -> None:
    port = int(guarded.url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.connect()
    local = connection.sock.getsockname()
    session = requests.Session()
    for raw, message in MALFORMED:
        connection.request("POST", path, body=raw, headers=AUTH)
        response = connection.getresponse()
        body = json.loads(response.read())
        assert response.status == 400, body
        assert message in json.dumps(body)
        assert connection.sock is not None and connection.sock.getsockname() == local  # the same connection
        assert _post(guarded, path, session, data=raw).status_code == 400  # and a pooled client's next request
    good = (
        {"prompt": "Say hi."} if path != "/v1/chat/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    )
    assert _post(guarded, path, session, json=good).status_code == 200


def test_chat_stream_with_a_surrogate_model_name_is_a_400_not_a_broken_200(guarded: Server) -> None:
    raw = b'{"model": "\\ud800", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    response = _post(guarded, "/v1/chat/completions", data=raw)
    assert response.status_code == 400 and "model: a lone UTF-16 surrogate" in response.json()["error"]["message"]


def test_bodies_over_the_limit_are_413s(guarded: Server) -> None:
    session = requests.Session()
    big = json.dumps({"prompt": "x" * MAX_BYTES}).encode()
    response = _post(guarded, "/v1/models/model:predict", session, data=big)
    assert response.status_code == 413 and f"larger than {MAX_BYTES} bytes" in response.json()["error"]
    assert response.headers["connection"] == "close"
    chunked = _post(guarded, "/v1/completions", session, data=iter([big[:40_000], big[40_000:]]))
    assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "invalid_request_error"
    assert _post(guarded, "/v1/models/model:predict", session, json={"prompt": "Say hi."}).status_code == 200


def test_the_api_key_guards_every_route_but_the_probes_and_metrics(guarded: Server) -> None:
    for path in ("/v1/models/model:predict", "/v1/chat/completions", "/v1/completions"):
        response = requests.post(f"{guarded.url}{path}", json={"prompt": "hi"}, timeout=30)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        wrong = requests.post(f"{guarded.url}{path}", json={}, headers={"Authorization": "Bearer no"}, timeout=30)
        assert wrong.status_code == 401
    for path in ("/", "/v1/models/model", "/metrics"):
        assert requests.get(f"{guarded.url}{path}", timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/hot-reload"),
        ("GET", "/v1/websocket"),
        ("POST", "/invocations"),
        ("GET", "/ping"),
        ("POST", "/v1/models/model:predict_binary"),
        ("GET", "/v1/models/model/schema"),
        ("GET", "/v1/models/model/loaded"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/messages"),
        ("POST", "/v1/responses"),
        ("GET", "/openapi.json"),
    ],
)
def test_routes_we_do_not_serve_are_closed(guarded: Server, method: str, path: str) -> None:
    response = requests.request(method, f"{guarded.url}{path}", headers=AUTH, json={}, timeout=30)
    # 405 where the path also matches the readiness route `/v1/models/{name}` (GET only)
    assert response.status_code in (404, 405), response.text
    assert "this server serves" in json.dumps(response.json())


def test_overload_gets_429_with_retry_after_fast_and_every_200_is_whole(guarded: Server) -> None:
    """Ten times the queue at once on /predict: the excess is refused at once, nothing admitted is lost."""
    body = {"prompt": "Count from one to ten.", "max_new_tokens": 4, "ignore_eos": True}
    expected = _post(guarded, "/v1/models/model:predict", json=body).json()["output"]

    def one(_: int) -> tuple[int, float, dict, str]:
        started = time.perf_counter()
        response = requests.post(guarded.predict_url, json=body, headers=AUTH, timeout=300)
        return response.status_code, time.perf_counter() - started, dict(response.headers), response.text

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one, range(40)))
    refused = [r for r in results if r[0] == 429]
    served = [r for r in results if r[0] == 200]
    assert len(refused) + len(served) == len(results), {r[0] for r in results}
    assert refused and served
    assert all(r[2]["retry-after"] == "1" and "retry shortly" in r[3] for r in refused)
    assert max(r[1] for r in refused) < 10  # a generous bound for a loaded CI machine; figures: docs/security.md
    assert all(json.loads(r[3])["output"] == expected for r in served)


def test_logs_carry_no_prompt_query_string_or_key(guarded: Server) -> None:
    _post(guarded, "/v1/models/model:predict?token=query-marker-91", json={"prompt": SECRET_PROMPT})
    _post(guarded, "/v1/models/model:predict", json={"prompt": SECRET_PROMPT, "temperature": "bad"})
    time.sleep(0.5)
    log = guarded.log.read_text()
    assert "Handled request: POST /v1/models/model:predict HTTP/1.1 200" in log
    for secret in (SECRET_PROMPT, "query-marker-91", API_KEY):
        assert secret not in log


def test_sigterm_drain_finishes_short_streams_and_ends_long_ones_by_the_deadline(
    tmp_path: Path, embedded_dir: Path
) -> None:
    drain_s = 20
    with launch(tmp_path, {"LLM_DRAIN_TIMEOUT_S": str(drain_s)}) as (server, process):
        results: dict[str, object] = {}
        streaming = {name: threading.Event() for name in ("short", "long")}

        def stream(name: str, body: dict) -> None:
            text = ""
            try:
                with server.predict({**body, "stream": True}, stream=True) as response:
                    for chunk in response.iter_content(chunk_size=None):
                        streaming[name].set()
                        text += chunk.decode()
                results[name] = text
            except requests.RequestException as exc:
                results[name] = exc

        bodies = {
            "short": {"prompt": "Say hi.", "max_new_tokens": 3, "ignore_eos": True},
            "long": {"prompt": "Tell a story.", "max_new_tokens": 2000, "ignore_eos": True},  # minutes on CPU
        }
        threads = [threading.Thread(target=stream, args=item) for item in bodies.items()]
        for thread in threads:
            thread.start()
        assert all(event.wait(timeout=120) for event in streaming.values()), results
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=drain_s + 60)
        exited_after = time.monotonic() - signalled
        for thread in threads:
            thread.join(timeout=30)
        log = server.log.read_text()
    # uvicorn re-raises the SIGTERM it caught once its graceful shutdown is done
    assert process.returncode == -signal.SIGTERM and "Application shutdown complete" in log, log[-2000:]
    assert "timeout graceful shutdown exceeded" in log
    assert exited_after < drain_s + 30, exited_after
    assert isinstance(results["short"], str) and results["short"], results  # finished during the drain
    assert isinstance(results["long"], requests.RequestException), results  # cut off: an incomplete chunked body
