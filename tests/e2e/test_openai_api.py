"""OpenAI-compatible routes, driven by the official `openai` client against the real server."""

from __future__ import annotations

import openai
import pytest
import requests

from tests.e2e.conftest import Server

MESSAGES = [{"role": "user", "content": "What is a mistral?"}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed")


def test_chat_completion_matches_predict(server: Server, client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=24)
    ours = server.predict({"messages": MESSAGES, "max_new_tokens": 24}).json()
    assert completion.choices[0].message.content == ours["output"]
    assert completion.choices[0].finish_reason == ours["finish_reason"]
    assert completion.usage.prompt_tokens == ours["usage"]["prompt_tokens"]
    assert completion.usage.completion_tokens == ours["usage"]["completion_tokens"]
    assert completion.model == "smollm2"


def test_chat_stream_joins_to_the_same_text(server: Server, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=24, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == server.predict({"messages": MESSAGES, "max_new_tokens": 24}).json()["output"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5
    assert finish in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens > 0


def test_completion_with_stop(server: Server, client: openai.OpenAI) -> None:
    full = client.completions.create(model="m", prompt="List three winds:", max_tokens=32).choices[0].text
    stop = full.split()[2]
    stopped = client.completions.create(model="m", prompt="List three winds:", max_tokens=32, stop=[stop])
    assert stopped.choices[0].text == full[: full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": MESSAGES, "n": 2}, "n:"),
        ({"messages": MESSAGES, "logprobs": True}, "logprobs"),
        ({"messages": MESSAGES, "tools": []}, "unknown field 'tools'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text content parts"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"messages": MESSAGES, "max_tokens": 10**6}, "exceeds the limit"),
    ],
)
def test_unsupported_options_are_refused(server: Server, body: dict, message: str) -> None:
    response = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
