"""Request validation and server settings: what is accepted, and what the error says otherwise."""

from __future__ import annotations

import pytest

from model.backends.base import Limits, SamplingParams
from model.errors import InvalidRequest
from model.prompting import encode_prompt, stop_token_ids
from model.schema import check_limits, parse_request
from model.settings import Backend, SettingsError, load_settings

LIMITS = Limits(max_input_len=100, max_seq_len=120, max_new_tokens=50, max_batch_size=4)


def test_defaults_and_aliases() -> None:
    request = parse_request({"prompt": "hi", "max_tokens": 7, "stop": "###", "temperature": 1})
    params = request.sampling_params(default_max_new_tokens=256)
    assert params == SamplingParams(max_new_tokens=7, temperature=1.0)
    assert request.stop_strings == ["###"]
    assert parse_request({"prompt": "hi"}).sampling_params(99).max_new_tokens == 99
    assert parse_request({"prompt": "hi"}).sampling_params(99).greedy


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "hi", "top_k": 1.5}, "top_k"),
        ({"prompt": "hi", "stream": 1}, "stream"),
        ({"prompt": "hi", "stop": ["a"] * 17}, "at most 16 stop strings"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "hi", "name": "x"}]}, "unknown field 'messages.0.name'"),
        ({"messages": [{"role": "user", "content": " "}]}, "every message in 'messages' is empty"),
        ("a string", "must be a JSON object"),
    ],
)
def test_invalid_requests_name_the_field(body: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as info:
        parse_request(body)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("prompt_len", "max_new", "message"),
    [(101, 1, "accepts at most 100"), (10, 51, "exceeds the limit of 50"), (90, 40, "lower max_new_tokens to 30")],
)
def test_limits(prompt_len: int, max_new: int, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        check_limits(prompt_len, SamplingParams(max_new_tokens=max_new), LIMITS)


def test_within_limits_passes() -> None:
    check_limits(100, SamplingParams(max_new_tokens=20), LIMITS)


def test_prompt_formats(tokenizer) -> None:
    request = parse_request({"prompt": "What is a mistral?"})
    raw = encode_prompt(tokenizer, request, "raw")
    assert raw == tokenizer("What is a mistral?").input_ids
    chat = encode_prompt(tokenizer, request, "auto")
    messages = parse_request({"messages": [{"role": "user", "content": "What is a mistral?"}]})
    as_messages = encode_prompt(tokenizer, messages, "raw")
    assert chat == as_messages != raw
    assert tokenizer.decode(chat).rstrip().endswith("<|im_start|>assistant")


def test_stop_token_ids_include_generation_config(tokenizer, embedded_dir) -> None:
    ids = stop_token_ids(tokenizer, embedded_dir)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert tokenizer.eos_token_id in ids


def test_settings_defaults_serve_the_embedded_model() -> None:
    settings = load_settings({}, environ={})
    assert settings.backend is Backend.TORCH and settings.uses_embedded_model


def test_environment_overrides_model_metadata() -> None:
    settings = load_settings(
        {"backend": "torch", "max_batch_size": 8, "example_model_input": {"prompt": "x"}},
        environ={"LLM_BACKEND": "tensorrt_llm", "LLM_MAX_BATCH_SIZE": "64", "LLM_ALLOW_PATTERNS": "a/*, b/*"},
    )
    assert settings.backend is Backend.TENSORRT_LLM
    assert settings.max_batch_size == 64
    assert settings.allow_patterns == ["a/*", "b/*"]


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"max_batch_sise": 8}, "max_batch_sise: Extra inputs are not permitted"),
        ({"backend": "vllm"}, "backend"),
        ({"default_max_new_tokens": 500, "max_new_tokens_limit": 100}, "default_max_new_tokens"),
        ({"max_input_len": 4096, "max_seq_len": 4096}, "must be below max_seq_len"),
        ({"kv_cache_free_gpu_memory_fraction": 1.5}, "kv_cache_free_gpu_memory_fraction"),
    ],
)
def test_bad_settings_are_refused_with_the_field(metadata: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(metadata, environ={})
