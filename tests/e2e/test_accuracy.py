"""The embedded default against plain transformers `generate`: greedy outputs must be token-identical.

Two implementations, one input, asserted equal (as nanochat tests its engine): the torch backend's continuous
batcher, alone and with the prompts batched together (left padding, merged KV caches), and over HTTP through
truss's server and the detokenizer; the reference is `HfReference`, the weights loaded again on their own.
"""

from __future__ import annotations

import asyncio

import pytest

from model.backends.base import SamplingParams
from scripts.benchmarks.accuracy import DEFAULT_TEMPLATE, HfReference, load_articles, summarization_accuracy
from scripts.benchmarks.datasets import SUMMARIZATION_DATASET, PromptCodec
from scripts.benchmarks.direct import loaded_model, model_cache_dir, model_codec
from tests.e2e.conftest import Server

MAX_NEW_TOKENS = 32
ARTICLES = load_articles(SUMMARIZATION_DATASET, limit=3)
PROMPTS = [
    "What is a mistral?",
    "Write a haiku about the sea.",
    *(DEFAULT_TEMPLATE.format(article=a.article) for a in ARTICLES),
]


@pytest.fixture(scope="module")
def model(embedded_dir):
    with loaded_model() as loaded:
        yield loaded


@pytest.fixture(scope="module")
def codec(model) -> PromptCodec:
    return model_codec(model)


@pytest.fixture(scope="module")
def reference(model, codec: PromptCodec) -> HfReference:
    return HfReference.for_settings(model.settings, codec, model_cache_dir())


@pytest.fixture(scope="module")
def expected(reference: HfReference, codec: PromptCodec) -> list[list[int]]:
    return [reference.generate(codec.encode(prompt), MAX_NEW_TOKENS) for prompt in PROMPTS]


async def backend_ids(backend, prompt_ids: list[int]) -> list[int]:
    ids: list[int] = []
    async for chunk in backend.generate(prompt_ids, SamplingParams(max_new_tokens=MAX_NEW_TOKENS)):
        ids.extend(chunk.token_ids)
    return ids


def test_backend_alone_matches_generate(model, codec: PromptCodec, expected: list[list[int]]) -> None:
    got = [asyncio.run(backend_ids(model.backend, codec.encode(prompt))) for prompt in PROMPTS]
    assert got == expected


def test_backend_batched_matches_generate(model, codec: PromptCodec, expected: list[list[int]]) -> None:
    """All prompts at once, of different lengths: left padding and cache merging must not change a token."""

    async def together() -> list[list[int]]:
        return list(await asyncio.gather(*(backend_ids(model.backend, codec.encode(p)) for p in PROMPTS)))

    assert asyncio.run(together()) == expected


def test_server_over_http_matches_generate(server: Server, codec: PromptCodec, reference: HfReference) -> None:
    report = summarization_accuracy(server.url, codec, reference, ARTICLES, DEFAULT_TEMPLATE, MAX_NEW_TOKENS)
    assert [item.id for item in report.items if not item.identical] == []
    assert report.identical == report.total == len(ARTICLES)
    assert report.server == report.hf and all(score > 0 for score in report.server.values())
