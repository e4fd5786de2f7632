"""Benchmark datasets: length distributions, prepare_dataset.py JSON lines, synthetic prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scripts.benchmarks.datasets import (
    LengthDist,
    PromptCodec,
    load_jsonl,
    random_corpus,
    synthetic,
    word_tokenizer,
    write_jsonl,
)
from scripts.cli import CliError

VOCAB = 500


@pytest.fixture(scope="module")
def codec() -> PromptCodec:
    return PromptCodec(word_tokenizer(VOCAB), "raw")


@pytest.fixture(scope="module")
def chat_codec() -> PromptCodec:
    """A server that wraps every prompt in a chat template (prompt_format auto/chat)."""
    tokenizer = word_tokenizer(VOCAB)
    tokenizer.chat_template = "{% for m in messages %}w1 w2 {{ m['content'] }} w3{% endfor %}{{ ' w4' }}"
    return PromptCodec(tokenizer, "chat")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("128", LengthDist("fixed", 128)),
        ("normal:128,16", LengthDist("normal", 128, 16)),
        ("uniform:64,192", LengthDist("uniform", 64, 192)),
    ],
)
def test_length_specs_parse(spec: str, expected: LengthDist) -> None:
    assert LengthDist.parse(spec) == expected


@pytest.mark.parametrize("spec", ["", "fixed:0", "normal:128", "uniform:9,3", "poisson:3,4", "fixed:abc"])
def test_bad_length_specs_say_the_syntax(spec: str) -> None:
    with pytest.raises(CliError, match=r"fixed:N, normal:MEAN,STD or uniform:LOW,HIGH|LOW <= HIGH"):
        LengthDist.parse(spec)


def test_samples_follow_their_distribution() -> None:
    rng = np.random.default_rng(0)
    assert set(LengthDist.parse("fixed:7").sample(rng, 50)) == {7}
    uniform = LengthDist.parse("uniform:10,20").sample(rng, 2000)
    assert uniform.min() >= 10 and uniform.max() <= 20 and len(set(uniform)) == 11
    normal = LengthDist.parse("normal:100,10").sample(rng, 4000)
    assert abs(normal.mean() - 100) < 1 and abs(normal.std() - 10) < 1
    assert LengthDist.parse("normal:2,50").sample(rng, 500).min() >= 1  # never an empty prompt


def test_synthetic_prompts_have_the_sampled_token_lengths(codec: PromptCodec) -> None:
    requests = synthetic(
        codec,
        20,
        LengthDist.parse("uniform:5,40"),
        LengthDist.parse("fixed:9"),
        seed=3,
        corpus=random_corpus(VOCAB),
    )
    assert all(5 <= len(r.input_ids) <= 40 and r.output_tokens == 9 for r in requests)
    assert [r.task_id for r in requests] == list(range(20))
    # The text the HTTP mode sends encodes to exactly the ids the direct mode feeds the backend.
    assert all(tuple(codec.tokenizer(r.prompt).input_ids) == r.input_ids for r in requests)


def test_synthetic_lengths_include_the_servers_chat_template(chat_codec: PromptCodec) -> None:
    requests = synthetic(
        chat_codec, 5, LengthDist.parse("fixed:30"), LengthDist.parse("fixed:1"), corpus=random_corpus(VOCAB)
    )
    assert chat_codec.template_tokens() == 4
    assert all(len(r.input_ids) == 30 and r.input_ids[:2] == (1, 2) for r in requests)
    assert all(len(r.prompt.split()) == 26 for r in requests)


def test_synthetic_prompts_longer_than_the_corpus_wrap_around(codec: PromptCodec) -> None:
    (request,) = synthetic(codec, 1, LengthDist.parse("fixed:50"), LengthDist.parse("fixed:1"), corpus="w1 w2 w3")
    assert len(request.input_ids) == 50


def test_prepare_dataset_lines_with_ids_or_prompts(tmp_path: Path, codec: PromptCodec) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps({"task_id": 0, "input_ids": [4, 5, 6], "output_tokens": 8})
        + "\n\n"
        + json.dumps({"task_id": 1, "prompt": "w7 w8", "output_tokens": 2})
        + "\n"
    )
    first, second = load_jsonl(path, codec)
    assert (first.prompt, first.input_ids, first.output_tokens) == ("w4 w5 w6", (4, 5, 6), 8)
    assert (second.task_id, second.input_ids, second.output_tokens) == (1, (7, 8), 2)


def test_written_datasets_read_back_identically(tmp_path: Path, codec: PromptCodec) -> None:
    requests = synthetic(
        codec, 5, LengthDist.parse("fixed:12"), LengthDist.parse("normal:30,5"), corpus=random_corpus(VOCAB)
    )
    write_jsonl(tmp_path / "out.jsonl", requests)
    assert load_jsonl(tmp_path / "out.jsonl", codec) == requests


def test_a_bad_line_is_named(tmp_path: Path, codec: PromptCodec) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task_id": 0, "prompt": "w1", "output_tokens": 3}\n{"task_id": 1, "prompt": "w2"}\n')
    with pytest.raises(CliError, match=r"bad.jsonl:2: expected a JSON object with task_id, output_tokens"):
        load_jsonl(path, codec)


def test_a_missing_dataset_says_how_to_make_one(tmp_path: Path, codec: PromptCodec) -> None:
    with pytest.raises(CliError, match="bench dataset --out"):
        load_jsonl(tmp_path / "nope.jsonl", codec)
