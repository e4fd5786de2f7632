"""OpenAI-compatible routes, driven by the official `openai` client against the real server."""

from __future__ import annotations

import json
import math

import jsonschema
import openai
import pytest
import requests

from tests.e2e.conftest import Server

MESSAGES = [{"role": "user", "content": "What is a mistral?"}]
SERVED = "smollm2-135m-instruct"  # the embedded model's folder name, the default served name
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "status": {"enum": ["open", "shipped", "closed"]},
            "paid": {"type": "boolean"},
            "items": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 2},
        },
        "required": ["status", "paid", "items"],
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed")


def test_models_list_and_retrieve(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [SERVED]
    assert client.models.retrieve(SERVED).owned_by == "llm-trtllm-server"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("no-such-model")
    assert requests.get(f"{server.url}/v1/models/model", timeout=10).status_code == 200  # readiness unchanged


def test_the_client_shows_the_reason_of_an_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", messages=MESSAGES, logit_bias={"42": 5})
    assert "logit_bias is not supported" in str(refused.value)
    assert refused.value.body["param"] == "logit_bias"


def test_chat_completion_matches_predict(server: Server, client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=24, temperature=0)
    ours = server.predict({"messages": MESSAGES, "max_new_tokens": 24}).json()
    assert completion.choices[0].message.content == ours["output"]
    assert completion.choices[0].finish_reason == ours["finish_reason"]
    assert completion.usage.prompt_tokens == ours["usage"]["prompt_tokens"]
    assert completion.usage.completion_tokens == ours["usage"]["completion_tokens"]
    assert completion.model == "smollm2"


def test_chat_stream_is_event_stream_and_joins_to_the_same_text(server: Server, client: openai.OpenAI) -> None:
    request = {"model": "m", "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    with client.chat.completions.with_streaming_response.create(
        **request, stream=True, stream_options={"include_usage": True}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == server.predict({"messages": MESSAGES, "max_new_tokens": 24}).json()["output"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5
    assert finish in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens > 0


def test_completions_prompt_is_raw(tokenizer, client: openai.OpenAI) -> None:
    prompt = "The mistral is a wind"
    ids = tokenizer(prompt).input_ids
    completion = client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0)
    assert completion.usage.prompt_tokens == len(ids)  # no chat template around it
    by_ids = client.completions.create(model="m", prompt=ids, max_tokens=4, temperature=0, echo=True)
    assert by_ids.choices[0].text == tokenizer.decode(ids) + completion.choices[0].text


def test_completion_with_stop(client: openai.OpenAI) -> None:
    full = client.completions.create(model="m", prompt="List three winds:", max_tokens=24, temperature=0)
    stop = full.choices[0].text.split()[2]
    stopped = client.completions.create(
        model="m", prompt="List three winds:", max_tokens=24, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == full.choices[0].text[: full.choices[0].text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_greedy_logprobs_pick_the_most_likely_token(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.bytes
        best = max(entry.top_logprobs, key=lambda top: top.logprob)
        assert math.exp(entry.logprob) == pytest.approx(math.exp(best.logprob)) and entry.token == best.token
        assert 0 < math.exp(entry.logprob) <= 1
    text = client.completions.create(model="m", prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
    logprobs = text.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert logprobs.text_offset[0] == 0
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert logprob == pytest.approx(max(top.values())) and top[token] == pytest.approx(logprob)


def test_n_choices_are_independent_and_reproducible_with_a_seed(client: openai.OpenAI) -> None:
    request = {"model": "m", "messages": MESSAGES, "max_tokens": 8, "n": 3, "seed": 11, "temperature": 1.0}
    first = client.chat.completions.create(**request)
    again = client.chat.completions.create(**request)
    texts = [choice.message.content for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert texts == [choice.message.content for choice in again.choices]
    assert len(set(texts)) > 1
    assert first.usage.completion_tokens == sum(
        client.chat.completions.create(**{**request, "n": 1, "seed": 11 + i}).usage.completion_tokens for i in range(3)
    )


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_output_validates(client: openai.OpenAI, name: str) -> None:
    schema = SCHEMAS[name]
    response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": f"Describe an example {name} as JSON."}]
    completion = client.chat.completions.create(
        model="m", messages=messages, max_tokens=80, temperature=0, response_format=response_format
    )
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].message.content), schema)
    stream = client.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=80,
        temperature=0.8,
        seed=3,
        response_format=response_format,
        stream=True,
    )
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), schema)


def test_json_object_output_is_an_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "A JSON object, please."}], max_tokens=40, temperature=0,
        response_format={"type": "json_object"},
    )  # fmt: skip
    text = completion.choices[0].message.content
    assert text.startswith("{") and (
        completion.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict)
    )


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_required_tool_call_is_parsed_into_tool_calls(client: openai.OpenAI, tool_choice) -> None:
    completion = client.chat.completions.create(
        model="m", messages=ASK_WEATHER, max_tokens=40, temperature=0, tools=[WEATHER], tool_choice=tool_choice
    )
    choice = completion.choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    stream = client.chat.completions.create(
        model="m",
        messages=ASK_WEATHER,
        max_tokens=40,
        temperature=0,
        tools=[WEATHER],
        tool_choice=tool_choice,
        stream=True,
    )
    deltas = [c.choices[0].delta for c in stream if c.choices]
    (streamed,) = [call for delta in deltas for call in delta.tool_calls or []]
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)


def test_a_tool_result_turn_is_answered(client: openai.OpenAI) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees Celsius."},
    ]
    completion = client.chat.completions.create(
        model="m", messages=messages, max_tokens=24, temperature=0, tools=[WEATHER], tool_choice="none"
    )
    assert completion.choices[0].message.content and completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens > 40  # the call and its result are in the prompt


def test_metrics_are_served_without_redirect(server: Server) -> None:
    response = requests.get(f"{server.url}/metrics", timeout=10, allow_redirects=False)
    assert response.status_code == 200
    for name in (
        "llm_requests_running",
        "llm_requests_waiting",
        "llm_time_to_first_token_seconds_bucket",
        "llm_inter_token_latency_seconds_bucket",
        "llm_e2e_request_latency_seconds_bucket",
        "llm_requests_total",
        "llm_prompt_tokens_total",
        "llm_generation_tokens_total",
        "llm_prefix_cache_queries_total",
        "llm_prefix_cache_hits_total",
    ):
        assert f"\n{name}" in response.text, name
