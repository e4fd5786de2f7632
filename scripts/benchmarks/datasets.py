"""Benchmark prompts: synthetic token-length distributions or TensorRT-LLM's `prepare_dataset.py` JSON lines.

The file format is the one trtllm-bench reads, so one dataset drives both tools; one JSON object a line:

    {"task_id": 0, "input_ids": [9906, 1917, ...], "output_tokens": 128}
    {"task_id": 1, "prompt": "Summarize ...", "output_tokens": 64}

Every request is resolved by a `PromptCodec` (the server's tokenizer and prompt format, through the server's
own `model.prompting.encode_prompt`) into a `BenchRequest` holding the text the HTTP mode sends and the ids
the server makes of it, which the direct mode feeds the backend: both modes run exactly the same prompts.
A line with a `prompt` is sent as that text; a line with only `input_ids` is decoded to text first.
`write_jsonl` writes both, and trtllm-bench, which prefers `input_ids`, then runs the server's exact ids.

Synthetic prompts are windows of natural text (the articles shipped in data/) cut so that, with the chat
template the server may wrap them in, they have the sampled number of tokens; random token ids would decode
to strings that re-tokenize to other lengths.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from model.prompting import encode_prompt
from model.schema import GenerateRequest
from scripts import REPO_ROOT
from scripts.cli import CliError

SUMMARIZATION_DATASET = REPO_ROOT / "data" / "summarization.jsonl"
DISTRIBUTIONS = ("fixed", "normal", "uniform")


@dataclass(frozen=True)
class PromptCodec:
    """The server's view of a prompt: its tokenizer and `prompt_format` (auto / chat / raw)."""

    tokenizer: PreTrainedTokenizerBase
    prompt_format: str = "raw"

    def encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, GenerateRequest(prompt=text), self.prompt_format)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def template_tokens(self) -> int:
        """Tokens the server adds around a prompt's own (the chat template, a BOS token)."""
        return len(self.encode("x")) - len(self.tokenizer("x", add_special_tokens=False).input_ids)


@dataclass(frozen=True)
class BenchRequest:
    task_id: int
    prompt: str  # sent by the HTTP mode
    input_ids: tuple[int, ...]  # the server's tokenization of `prompt`; fed to the backend by the direct mode
    output_tokens: int  # max_new_tokens; exact when the run ignores EOS


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: `fixed:128`, `normal:128,16` (mean, std), `uniform:64,192` (low, high)."""

    kind: str
    a: int
    b: int = 0

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        kind, _, args = spec.partition(":") if ":" in spec else ("fixed", "", spec)
        try:
            numbers = [int(x) for x in args.split(",")]
        except ValueError:
            numbers = []
        wanted = 1 if kind == "fixed" else 2
        if kind not in DISTRIBUTIONS or len(numbers) != wanted or numbers[0] < 1 or min(numbers) < 0:
            raise CliError(
                f"bad token-length spec '{spec}': use fixed:N, normal:MEAN,STD or uniform:LOW,HIGH (positive integers)"
            )
        if kind == "uniform" and numbers[1] < numbers[0]:
            raise CliError(f"bad token-length spec '{spec}': uniform needs LOW <= HIGH")
        return cls(kind, *numbers)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            values = np.full(n, self.a)
        elif self.kind == "normal":
            values = np.rint(rng.normal(self.a, self.b, n))
        else:
            values = rng.integers(self.a, self.b + 1, n)
        return np.maximum(values, 1).astype(int)

    def __str__(self) -> str:
        return f"{self.kind}:{self.a}" + (f",{self.b}" if self.kind != "fixed" else "")


def synthetic(
    codec: PromptCodec,
    num_requests: int,
    input_len: LengthDist,
    output_len: LengthDist,
    seed: int = 0,
    corpus: str | None = None,
) -> list[BenchRequest]:
    """Prompts of sampled token lengths (as the server counts them), cut from random offsets of a corpus."""
    rng = np.random.default_rng(seed)
    corpus_ids = codec.tokenizer(corpus or default_corpus(), add_special_tokens=False).input_ids
    inputs, outputs = input_len.sample(rng, num_requests), output_len.sample(rng, num_requests)
    wrapper = codec.template_tokens()
    requests = []
    for task_id, (n_in, n_out) in enumerate(zip(inputs, outputs, strict=True)):
        offset = int(rng.integers(len(corpus_ids)))
        size = max(1, n_in - wrapper)
        ids = np.resize(corpus_ids, offset + size)[offset:]  # np.resize repeats: long prompts wrap the corpus
        requests.append(resolve(codec, task_id, codec.decode(ids.tolist()), int(n_out)))
    return requests


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Whitespace-separated words `w0`..`w{n-2}` plus `<eos>`, for random-weight models (the GPU bench, tests).

    Every id sequence decodes to text that encodes back to exactly the same ids, so HTTP and direct runs and
    trtllm-bench see identical prompts; `random_corpus` makes prompts of it.
    """
    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<eos>": vocab_size - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def random_corpus(vocab_size: int, words: int = 20_000, seed: int = 0) -> str:
    """Random words of `word_tokenizer(vocab_size)`: the prompt text for a model with random weights."""
    ids = np.random.default_rng(seed).integers(0, vocab_size - 1, words)
    return " ".join(f"w{i}" for i in ids)


def default_corpus() -> str:
    return " ".join(json.loads(line)["article"] for line in SUMMARIZATION_DATASET.read_text().splitlines() if line)


def resolve(codec: PromptCodec, task_id: int, prompt: str, output_tokens: int) -> BenchRequest:
    return BenchRequest(task_id, prompt, tuple(codec.encode(prompt)), output_tokens)


def load_jsonl(path: Path, codec: PromptCodec) -> list[BenchRequest]:
    """Read a prepare_dataset.py file; a line without `prompt` has its `input_ids` decoded to text."""
    if not path.is_file():
        raise CliError(f"dataset {path} does not exist; write one with `python main.py bench dataset --out {path}`")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            task_id, output_tokens = int(row["task_id"]), int(row["output_tokens"])
            prompt = row["prompt"] if row.get("prompt") is not None else codec.decode(row["input_ids"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CliError(
                f"{path}:{number}: expected a JSON object with task_id, output_tokens and prompt or input_ids ({exc})"
            ) from None
        requests.append(resolve(codec, task_id, prompt, output_tokens))
    if not requests:
        raise CliError(f"dataset {path} holds no requests")
    return requests


def write_jsonl(path: Path, requests: Iterable[BenchRequest]) -> None:
    """The text (read back by this tool) and the server's ids for it (run as they are by trtllm-bench)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (
        json.dumps(
            {"task_id": r.task_id, "prompt": r.prompt, "input_ids": list(r.input_ids), "output_tokens": r.output_tokens}
        )
        for r in requests
    )
    path.write_text("\n".join(lines) + "\n")
