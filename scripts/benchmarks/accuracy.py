"""Accuracy against the Hugging Face reference, as TensorRT-LLM's examples/summarize.py measures it.

The same prompts go through this server (HTTP, non-streaming, greedy) and through plain transformers
`generate` (greedy) on the same weights, device and dtype, with the server's own prompt encoding and stop
tokens. Reported: how many outputs are identical, and ROUGE-1/2/L/Lsum (the `rouge-score` package, F-measure
x 100, stemmed) of each side against the reference summaries, with the difference server - HF.

A dataset is JSON lines `{"id": ..., "article": ..., "summary": ...}`; data/summarization.jsonl ships one.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
from rich.table import Table
from rouge_score import rouge_scorer
from transformers import GenerationConfig, PreTrainedModel

from model.artifacts import resolve_artifacts
from model.backends.torch import load_hf_model
from model.prompting import stop_token_ids
from model.settings import ServerSettings, load_settings
from scripts.benchmarks.datasets import PromptCodec
from scripts.benchmarks.direct import model_cache_dir, server_codec, server_config
from scripts.benchmarks.loadgen import PREDICT_PATH
from scripts.benchmarks.report import console, print_json_line, run_meta
from scripts.benchmarks.server import local_server
from scripts.cli import CliError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
DEFAULT_TEMPLATE = "Summarize this news article in one or two sentences.\n\n{article}"


@dataclass(frozen=True)
class Article:
    id: str
    article: str
    summary: str


@dataclass(frozen=True)
class Comparison:
    """One prompt's outputs on both sides."""

    id: str
    server: str
    hf: str
    server_tokens: int
    hf_tokens: int

    @property
    def identical(self) -> bool:
        return self.server == self.hf and self.server_tokens == self.hf_tokens


class HfReference:
    """Plain transformers `generate`, greedy, stopping on the server's stop tokens."""

    def __init__(self, model: PreTrainedModel, stop_ids: frozenset[int]) -> None:
        self.model = model
        self.stop_ids = stop_ids

    @classmethod
    def for_settings(cls, settings: ServerSettings, codec: PromptCodec, cache_dir: Path) -> HfReference:
        """The weights the server serves, on the device and in the dtype its torch backend picks."""
        artifacts = resolve_artifacts(settings, settings.cache_dir or cache_dir, None)
        stops = stop_token_ids(codec.tokenizer, artifacts.model_dir, artifacts.tokenizer_dir)
        return cls(load_hf_model(settings, artifacts.model_dir), stops)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """New token ids, without the stop token that ended them (the server never emits it)."""
        # A batch of one is never padded; pad_token_id only keeps generate from warning.
        stops = sorted(self.stop_ids)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=stops[0]
        )
        ids = torch.tensor([prompt_ids], device=self.model.device)
        output = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        tokens = output[0, len(prompt_ids) :].tolist()
        return tokens[:-1] if tokens and tokens[-1] in self.stop_ids else tokens


def load_articles(path: Path, limit: int | None = None) -> list[Article]:
    if not path.is_file():
        raise CliError(f"dataset {path} does not exist; pass JSON lines with id, article and summary")
    try:
        articles = [Article(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    except (ValueError, TypeError) as exc:
        raise CliError(f"{path}: every line must be a JSON object with id, article and summary ({exc})") from None
    return articles[:limit]


def server_generate(base_url: str, prompts: list[str], max_new_tokens: int, concurrency: int) -> list[dict[str, Any]]:
    """Non-streaming greedy responses, in prompt order; an error response stops the run with its message."""

    def one(prompt: str) -> dict[str, Any]:
        body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0.0}
        response = requests.post(base_url + PREDICT_PATH, json=body, timeout=600)
        if response.status_code != 200:
            raise CliError(f"the server answered {response.status_code}: {response.text[:300]}")
        return response.json()

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, prompts))


def compare_outputs(
    base_url: str,
    codec: PromptCodec,
    reference: HfReference,
    prompts: dict[str, str],
    max_new_tokens: int,
    concurrency: int = 1,
) -> list[Comparison]:
    """Both sides' outputs for each (id, prompt)."""
    responses = server_generate(base_url, list(prompts.values()), max_new_tokens, concurrency)
    comparisons = []
    for (key, prompt), response in zip(prompts.items(), responses, strict=True):
        hf_ids = reference.generate(codec.encode(prompt), max_new_tokens)
        usage = response["usage"]["completion_tokens"]
        comparisons.append(Comparison(key, response["output"], codec.decode(hf_ids), usage, len(hf_ids)))
    return comparisons


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean F-measure x 100 per ROUGE type, as summarize.py reports it."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {kind: float(100 * np.mean([s[kind].fmeasure for s in scores])) for kind in ROUGE_TYPES}


@dataclass(frozen=True)
class AccuracyReport:
    server: dict[str, float]
    hf: dict[str, float]
    identical: int
    total: int
    items: list[Comparison]

    @property
    def diff(self) -> dict[str, float]:
        return {kind: self.server[kind] - self.hf[kind] for kind in ROUGE_TYPES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "rouge_server": self.server,
            "rouge_hf": self.hf,
            "rouge_diff": self.diff,
            "identical": self.identical,
            "total": self.total,
            "items": [asdict(item) | {"identical": item.identical} for item in self.items],
        }


def summarization_accuracy(
    base_url: str,
    codec: PromptCodec,
    reference: HfReference,
    articles: list[Article],
    template: str,
    max_new_tokens: int,
    concurrency: int = 1,
) -> AccuracyReport:
    prompts = {a.id: template.format(article=a.article) for a in articles}
    items = compare_outputs(base_url, codec, reference, prompts, max_new_tokens, concurrency)
    summaries = [a.summary for a in articles]
    return AccuracyReport(
        server=rouge([i.server for i in items], summaries),
        hf=rouge([i.hf for i in items], summaries),
        identical=sum(i.identical for i in items),
        total=len(items),
        items=items,
    )


def print_report(report: AccuracyReport) -> None:
    table = Table(title=f"ROUGE vs reference summaries ({report.total} articles), F-measure x 100")
    for column in ("metric", "server", "HF transformers", "server - HF"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for kind in ROUGE_TYPES:
        table.add_row(kind, f"{report.server[kind]:.2f}", f"{report.hf[kind]:.2f}", f"{report.diff[kind]:+.2f}")
    console.print(table)
    different = ", ".join(item.id for item in report.items if not item.identical) or "none"
    console.print(f"identical greedy outputs: {report.identical}/{report.total}; different: {different}")


def run_summarization_check(
    url: str | None, articles: list[Article], template: str, max_new_tokens: int, concurrency: int, out: Path
) -> AccuracyReport:
    """Against `url`, or a server this starts with the configured settings; prints, writes `out`, one JSON line."""
    settings = load_settings(server_config().get("model_metadata"))
    codec = server_codec()
    reference = HfReference.for_settings(settings, codec, model_cache_dir())
    with ExitStack() as stack:
        base_url = url or stack.enter_context(local_server(out.with_suffix(".server.log")))
        report = summarization_accuracy(
            base_url.rstrip("/"), codec, reference, articles, template, max_new_tokens, concurrency
        )
    print_report(report)
    meta = run_meta(url=url or "local server", template=template, max_new_tokens=max_new_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, **report.to_dict()}, indent=2) + "\n")
    console.print(f"results: {out}")
    print_json_line({"accuracy": str(out), **{k: v for k, v in report.to_dict().items() if k != "items"}})
    return report
