"""Fuzz the three POST routes of the real (guarded) server: no 5xx, no dropped connection, and a normal
request still succeeds afterwards.

The families: wrong types, out-of-range numbers, unknown fields, huge strings, non-UTF-8 bytes, deep
nesting, huge integers, lone surrogates, bad chat roles and content parts, truncated and random bytes.
CI runs FUZZ_EXAMPLES (default 120) per route; `FUZZ_EXAMPLES=3400 pytest tests/e2e/test_fuzz.py -s`
is the 10,200-case run (it prints the statuses it saw).
"""

from __future__ import annotations

import collections
import json
import os

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import AUTH, Server

ROUTES = ["/v1/models/model:predict", "/v1/chat/completions", "/v1/completions"]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
FIELDS = [
    "prompt", "messages", "max_new_tokens", "max_tokens", "max_completion_tokens", "temperature", "top_k", "top_p",
    "repetition_penalty", "seed", "stop", "stream", "ignore_eos", "model", "n", "logprobs", "stream_options",
    "frequency_penalty", "presence_penalty", "user",
]  # fmt: skip

characters = st.one_of(st.characters(), st.characters(categories=["Cs"]))  # Cs: lone surrogates
text = st.text(characters, max_size=40)
huge_text = st.builds(
    lambda c, n: c * n, st.sampled_from(["x", " ", "风", "🤖", "<|im_start|>"]), st.integers(500, 9000)
)
numbers = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, -1, 1e-300])
)
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=8
)
parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", 3]), "text": values}), max_size=3)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "robot", "tool", "", 1]),
            "content": text | parts | values,
        }
    ),
    max_size=3,
)
field_value = {"prompt": text | huge_text | values, "messages": messages | values}
bodies = st.dictionaries(st.sampled_from(FIELDS) | text, values, max_size=6).flatmap(
    lambda body: st.fixed_dictionaries({k: field_value.get(k, values) for k in body})
)
valid_looking = st.fixed_dictionaries(
    {"prompt": text | huge_text}, optional={k: values for k in ("max_tokens", "temperature", "stop", "stream")}
) | st.fixed_dictionaries({"messages": messages}, optional={"stream": st.booleans(), "model": text})


def _encode(body: object) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: a lone surrogate goes out as its \\ud800 escape


raw_bodies = st.one_of(
    st.builds(_encode, bodies | valid_looking),
    st.builds(lambda b, i, x: b[:i] + bytes([x]) + b[i:], st.builds(_encode, valid_looking), st.integers(0, 30),
              st.integers(0x80, 0xFF)),  # non-UTF-8
    st.builds(lambda n: b"[" * n + b"]" * n, st.integers(60, 20_000)),  # deep nesting
    st.builds(lambda n: b'{"prompt": ' + b"[" * n + b'"hi"' + b"]" * n + b"}", st.integers(60, 3000)),
    st.builds(lambda n: b'{"prompt": "hi", "seed": ' + b"9" * n + b"}", st.integers(4000, 6000)),  # huge integer
    st.builds(lambda b, i: b[:i], st.builds(_encode, bodies), st.integers(0, 40)),  # truncated
    st.binary(max_size=200),
)  # fmt: skip


@pytest.mark.parametrize("route", ROUTES)
def test_fuzzed_bodies_never_get_a_5xx_or_a_dropped_connection(guarded: Server, route: str) -> None:
    session = requests.Session()
    statuses: collections.Counter[int] = collections.Counter()

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )  # fmt: skip
    @given(raw=raw_bodies)
    def check(raw: bytes) -> None:
        try:
            response = session.post(f"{guarded.url}{route}", data=raw, headers=AUTH, timeout=120)
        except requests.ConnectionError as exc:
            pytest.fail(f"connection dropped on {raw[:200]!r}: {exc}")
        statuses[response.status_code] += 1
        assert response.status_code < 500, f"{response.status_code} {response.text[:300]} for {raw[:200]!r}"
        if response.status_code >= 400:
            assert "error" in response.json()

    check()
    print(f"\n{route}: {sum(statuses.values())} cases, statuses {dict(sorted(statuses.items()))}")
    normal = {"messages": [{"role": "user", "content": "Say hi."}]} if "chat" in route else {"prompt": "Say hi."}
    assert session.post(f"{guarded.url}{route}", json=normal, headers=AUTH, timeout=120).status_code == 200
