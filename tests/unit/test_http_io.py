"""Body parsing that cannot 500: every malformed body is an InvalidRequest (400) or PayloadTooLarge (413)."""

from __future__ import annotations

import asyncio
import json

import pytest

from model.errors import InvalidRequest, PayloadTooLarge
from model.http_io import MAX_JSON_DEPTH, parse_json, read_json
from tests.unit.test_model import http_request


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"prompt": "\xff"}', "not UTF-8 text (byte 12)"),
        (b"[" * 100_000, "nested deeper than"),
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), f"nested deeper than {MAX_JSON_DEPTH} levels"),
        (
            b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}",
            "an integer has more than 4300 digits; send a smaller number",
        ),
        (b'{"prompt": "hi", "temperature": NaN}', "NaN is not a JSON number"),
        (b'{"prompt": "hi", "temperature": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"prompt": "hi \\ud800 there"}', "prompt: a lone UTF-16 surrogate (\\ud800) at character 3"),
        (b'{"messages": [{"role": "user", "content": "a\\udfff"}]}', "messages[0].content: a lone UTF-16 surrogate"),
        (b'{"model": "\\ud800", "stream": true}', "model: a lone UTF-16 surrogate"),
        (b'{"stop": ["ok", "\\ud83d"]}', "stop[1]: a lone UTF-16 surrogate"),
        (b'{"\\ud800": 1}', "a key in the body: a lone UTF-16 surrogate"),
        (b'"\\ud800"', "body: a lone UTF-16 surrogate"),
        (b'{"prompt": ', "Invalid JSON: Expecting value"),
    ],
)
def test_malformed_bodies_say_what_to_fix(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        parse_json(raw)
    assert message in str(error.value)


def test_valid_unicode_and_nesting_pass() -> None:
    deep = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json(deep) is not None
    assert parse_json('{"prompt": "caf\\u00e9 \\ud83e\\udd16 风"}'.encode()) == {"prompt": "café 🤖 风"}
    assert parse_json(b'{"seed": ' + b"9" * 4000 + b"}")["seed"] == int("9" * 4000)  # refused later by the schema


def test_a_body_over_the_limit_is_a_413() -> None:
    body = json.dumps({"prompt": "x" * 2000}).encode()
    with pytest.raises(PayloadTooLarge) as error:
        asyncio.run(read_json(http_request("/", body), max_bytes=1024))
    assert "larger than 1024 bytes" in str(error.value) and error.value.status == 413
    assert asyncio.run(read_json(http_request("/", body), max_bytes=len(body))) == {"prompt": "x" * 2000}
