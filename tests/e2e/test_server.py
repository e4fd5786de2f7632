"""End-to-end: the real truss server with the real SmolLM2, over HTTP, as a client sees it."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.e2e.conftest import Server, assert_a_dropped_stream_stops, in_turn_and_at_once

CHAT = [{"role": "user", "content": "What is a mistral?"}]


def _stream(server: Server, body: dict) -> tuple[list[str], float, float]:
    """Pieces of a streamed response, the time the first arrived and the time the stream ended."""
    started = time.perf_counter()
    first_at = None
    pieces = []
    with server.predict({**body, "stream": True}, stream=True) as response:
        assert response.status_code == 200, response.text
        for chunk in response.iter_content(chunk_size=None):
            first_at = first_at or time.perf_counter() - started
            pieces.append(chunk.decode("utf-8"))  # strict: a split multi-byte character would raise
    return pieces, first_at or 0.0, time.perf_counter() - started


def test_readiness_is_503_until_loaded(server: Server) -> None:
    assert server.readiness_codes[-1] == 200
    assert 503 in server.readiness_codes, f"never saw 503 while loading: {server.readiness_codes[:5]}"
    assert requests.get(f"{server.url}/", timeout=10).status_code == 200


def test_quick_start_request_returns_text(server: Server) -> None:
    """The README's quick-start client, unchanged."""
    response = requests.post(server.predict_url, json={"prompt": "What is a mistral?"}, timeout=300)
    body = response.json()
    assert response.status_code == 200
    assert len(body["output"].split()) >= 5, body
    assert "wind" in body["output"].lower()  # SmolLM2 knows the mistral is a wind
    assert body["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 256


def test_chat_messages_use_the_chat_template(server: Server, tokenizer) -> None:
    messages = [{"role": "system", "content": "You answer in one sentence."}, *CHAT]
    body = server.predict({"messages": messages, "max_new_tokens": 24}).json()
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert body["usage"]["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False).input_ids)
    assert body["output"].strip()


def test_stream_starts_early_and_joins_to_the_non_streaming_text(server: Server) -> None:
    request = {"messages": CHAT, "max_new_tokens": 48, "ignore_eos": True}
    pieces, first_at, total = _stream(server, request)
    assert len(pieces) > 10
    assert first_at < total / 3, f"first piece at {first_at:.2f}s of {total:.2f}s"
    assert "".join(pieces) == server.predict(request).json()["output"]
    assert not any("\ufffd" in piece for piece in pieces)


def test_stop_strings_end_the_output_even_across_pieces(server: Server) -> None:
    request = {"messages": CHAT, "max_new_tokens": 48, "ignore_eos": True}
    pieces, _, _ = _stream(server, request)
    full = "".join(pieces)
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    spanning = pieces[k][-2:] + pieces[k + 1][:2]  # begins in one piece, ends in the next
    expected = full[: full.index(spanning)]
    for stop in (spanning, [spanning, "never-in-output"]):
        body = server.predict({**request, "stop": stop}).json()
        assert body["output"] == expected
        assert body["finish_reason"] == "stop"
        streamed, _, _ = _stream(server, {**request, "stop": stop})
        assert "".join(streamed) == expected


def test_seed_makes_sampling_reproducible(server: Server) -> None:
    request = {"messages": CHAT, "max_new_tokens": 32, "temperature": 1.0, "top_p": 0.95, "top_k": 50}
    first = server.predict({**request, "seed": 1234}).json()["output"]
    assert server.predict({**request, "seed": 1234}).json()["output"] == first
    others = {server.predict({**request, "seed": seed}).json()["output"] for seed in (1, 2, 3)}
    assert others - {first}, "different seeds all gave the same sample"


def test_max_tokens_alias_and_length_finish(server: Server) -> None:
    body = server.predict({"messages": CHAT, "max_tokens": 5, "ignore_eos": True}).json()
    assert body["usage"]["completion_tokens"] == 5
    assert body["finish_reason"] == "length"


def test_concurrent_requests_are_batched_and_not_mixed_up(server: Server) -> None:
    """Requests sent together generate together in the engine (seen in its running-requests gauge), each its own."""
    prompts = [f"Write the number {n} in words, then say goodbye." for n in range(8)]

    def ask(prompt: str) -> str:
        return server.predict({"prompt": prompt, "max_new_tokens": 24, "ignore_eos": True}).json()["output"]

    sequential, concurrent, running = in_turn_and_at_once(server, ask, prompts)
    assert concurrent == sequential  # each request got its own answer
    assert running >= 2, "never more than one request generating at once"


BAD_REQUESTS = [
    ({"prompt": ""}, "'prompt' is empty"),
    ({"prompt": "   "}, "'prompt' is empty"),
    ({"prompt": 42}, "prompt: Input should be a valid string"),
    ({}, "exactly one of 'prompt'"),
    ({"prompt": "hi", "messages": CHAT}, "exactly one of 'prompt'"),
    ({"prompt": "hi", "temperture": 0.5}, "unknown field 'temperture'"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"prompt": "hi", "temperature": -0.1}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_k": -1}, "top_k"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 1_000_000}, "exceeds the limit"),
    ({"prompt": "hi", "max_new_tokens": 10, "max_tokens": 20}, "disagree"),
    ({"prompt": "hi", "stop": ""}, "stop strings must not be empty"),
    ({"prompt": "hi", "stop": [1]}, "stop"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "seed": -1}, "seed"),
    ({"prompt": "word " * 9000}, "accepts at most"),
    (["not", "an", "object"], "must be a JSON object"),
]


@pytest.mark.parametrize(("body", "message"), BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_input_gets_a_clear_400(server: Server, body: object, message: str) -> None:
    response = requests.post(server.predict_url, json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_malformed_json_is_a_400_and_the_server_keeps_serving(server: Server) -> None:
    response = requests.post(server.predict_url, data=b'{"prompt": ', timeout=60)
    assert response.status_code == 400
    assert "Invalid JSON" in response.json()["error"]
    assert server.predict({"prompt": "Say hello.", "max_new_tokens": 4}).status_code == 200


def test_client_disconnect_cancels_generation(server: Server) -> None:
    """A 2000-token stream dropped after its first piece leaves no request in flight."""
    request = {"prompt": "Tell me a long story.", "max_new_tokens": 2000, "ignore_eos": True}
    assert_a_dropped_stream_stops(server, request, within_s=20)  # the full generation would take minutes on CPU


def test_local_serve_listens_on_loopback_only(server: Server) -> None:
    """`main.py serve` binds 127.0.0.1 by default (truss alone binds 0.0.0.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # UDP connect sends nothing
        probe.connect(("10.255.255.255", 1))
        outward = probe.getsockname()[0]
    if outward.startswith("127."):
        pytest.skip("this machine has no non-loopback address to try")
    port = int(server.url.rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection((outward, port), timeout=5):
        pass


POISONED = [
    {"temperature": 9e-38},
    {"temperature": 1.0, "repetition_penalty": 1e-300, "seed": 3},
    {"temperature": 2.0, "top_p": 1e-300, "top_k": 10**12},
]


def test_poisoned_requests_leave_batched_neighbours_byte_identical(server: Server) -> None:
    """Extreme (schema-valid) sampling values batched with innocent streams: every stream is whole and equal
    to its solo output, and the poisoned requests themselves succeed."""
    innocent = [{"prompt": f"Name {n} colours.", "max_new_tokens": 16, "ignore_eos": True} for n in (2, 3, 4)]
    solo = ["".join(_stream(server, body)[0]) for body in innocent]
    poisoned = [{"prompt": "Tell me a story.", "max_new_tokens": 16, **values} for values in POISONED]
    with ThreadPoolExecutor(len(innocent) + len(poisoned)) as pool:
        streams = [pool.submit(lambda b=body: "".join(_stream(server, b)[0])) for body in innocent]
        others = [pool.submit(server.predict, body) for body in poisoned]
        assert [s.result() for s in streams] == solo
        assert [o.result().status_code for o in others] == [200] * len(poisoned)
