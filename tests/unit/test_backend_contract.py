"""The optional features of `SamplingParams`: a backend refuses what it cannot honour, naming the field."""

from __future__ import annotations

import pytest

from model.backends.base import FEATURE_FIELDS, BatchingBackend, GuidedDecoding, Limits, SamplingParams, used_features
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
