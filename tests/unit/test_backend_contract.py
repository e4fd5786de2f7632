"""The optional features of `SamplingParams`: a backend refuses what it cannot honour, naming the field."""

from __future__ import annotations

import asyncio

import pytest

from model.backends.base import (
    FEATURE_FIELDS,
    BatchingBackend,
    GuidedDecoding,
    Limits,
    Outbox,
    SamplingParams,
    TokenStream,
    used_features,
)
from model.errors import InvalidRequest


class _Engine(BatchingBackend):
    name = "test"

    def _has_work(self) -> bool:
        return False

    def _step(self, new, cancelled) -> None:
        raise AssertionError("never started")

    def _fail_all(self, exc) -> None:
        raise AssertionError("never started")


LIMITS = Limits(max_input_len=8, max_seq_len=16, max_new_tokens=8, max_batch_size=1)
EVERY_FEATURE = SamplingParams(
    max_new_tokens=1,
    presence_penalty=0.5,
    frequency_penalty=0.5,
    min_new_tokens=1,
    logprobs=0,
    guided=GuidedDecoding("json_object"),
)


def test_plain_params_use_no_optional_feature() -> None:
    assert used_features(SamplingParams(max_new_tokens=4, temperature=0.7, top_k=5, seed=1)) == []
    assert sorted(used_features(EVERY_FEATURE)) == sorted(FEATURE_FIELDS)


def test_a_backend_refuses_each_feature_it_lacks_by_its_request_field() -> None:
    engine = _Engine(LIMITS, frozenset())
    with pytest.raises(InvalidRequest) as refused:
        engine.check_supported(EVERY_FEATURE)
    for field in FEATURE_FIELDS.values():
        assert field in str(refused.value)
    engine.check_supported(SamplingParams(max_new_tokens=1))


def test_a_backend_accepts_the_features_it_declares() -> None:
    engine = _Engine(LIMITS, frozenset())
    engine.supports = frozenset(FEATURE_FIELDS) - {"guided_decoding"}
    with pytest.raises(InvalidRequest, match=r"structured output") as refused:
        engine.check_supported(EVERY_FEATURE)
    assert "logprobs" not in str(refused.value)


def test_an_outbox_hands_a_steps_items_over_in_one_call_per_loop_in_order() -> None:
    """The engine thread gathers a step's stream items and wakes each event loop once, not once per token."""

    async def scenario() -> tuple[list, list, int]:
        loop = asyncio.get_running_loop()
        first, second = TokenStream(loop), TokenStream(loop)
        outbox = Outbox()
        calls = 0
        schedule = loop.call_soon_threadsafe

        def counting(*args):
            nonlocal calls
            calls += 1
            return schedule(*args)

        loop.call_soon_threadsafe = counting
        first.put([1], outbox=outbox)
        second.put([7], outbox=outbox)
        first.put([2], "length", outbox=outbox)
        second.fail(InvalidRequest("bad"), outbox=outbox)
        assert first.finished and second.finished  # set when queued: a consumer leaving now does not cancel
        outbox.flush()
        chunks = [c.token_ids async for c in first]
        before_error = []
        with pytest.raises(InvalidRequest):
            async for chunk in second:
                before_error.append(chunk.token_ids)
        return chunks, before_error, calls

    chunks, before_error, calls = asyncio.run(scenario())
    assert chunks == [(1,), (2,)] and before_error == [(7,)] and calls == 1
