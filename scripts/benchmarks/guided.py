"""`bench guided`: what structured output costs per generated token, through the torch backend in process.

The same chat prompt runs constrained (a JSON schema, compiled once and cached, as the server does) and free
(greedy, EOS ignored, exactly as many tokens as the constrained run produced), alternately, `--repeats` times,
at concurrency 1 and at `--concurrency` (that many identical requests batched together). The figure per run is
decode time per token: (last token time - first token time) / (tokens - 1), so prefill and grammar compilation
are left out; the median over repeats is reported for each side, and the overhead is constrained - free.

The weights are the configured server model's (default: the embedded SmolLM2), or, with `--random-weights`,
random ones of its architecture, or of Mistral-7B's shape with this tokenizer's vocabulary
(`--random-weights mistral-7b`): a GPU machine without the weights still measures the real tokenizer's grammar.
"""

from __future__ import annotations

import asyncio
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from model.backends.base import GuidedDecoding, SamplingParams
from model.backends.torch import TorchBackend
from model.guided import GuideCompiler
from model.prompting import prompt_encoder, stop_token_ids
from model.settings import load_settings
from scripts.benchmarks.report import console, machine_info

XGRAMMAR_VERSION = version("xgrammar")
PROMPT = "Describe a city as JSON: its name, country, population, whether it is a capital, and three landmarks."
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "country": {"type": "string"},
        "population": {"type": "integer", "minimum": 0},
        "capital": {"type": "boolean"},
        "landmarks": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3},
    },
    "required": ["name", "country", "population", "capital", "landmarks"],
}


@dataclass(frozen=True)
class GuidedPlan:
    model_dir: Path
    device: str = "cpu"
    random_weights: str | None = None  # None: the folder's weights; "config": its architecture; "mistral-7b"
    max_tokens: int = 96
    repeats: int = 3
    concurrency: int = 8


@dataclass(frozen=True)
class GuidedRow:
    concurrency: int
    tokens: int  # per request, both sides
    constrained_ms: float  # decode ms/token, median over repeats
    free_ms: float

    @property
    def overhead_ms(self) -> float:
        return self.constrained_ms - self.free_ms


def load_model(plan: GuidedPlan, vocab_size: int) -> PreTrainedModel:
    dtype = torch.bfloat16 if plan.device == "cuda" else torch.float32
    if plan.random_weights is None:
        model = AutoModelForCausalLM.from_pretrained(plan.model_dir, dtype=dtype)
    else:
        from scripts.benchmarks.gpu import MISTRAL_7B  # the shape `bench gpu` measures

        shape = AutoConfig.from_pretrained(plan.model_dir) if plan.random_weights == "config" else MISTRAL_7B
        config = copy.deepcopy(shape)
        config.vocab_size = max(config.vocab_size, vocab_size)
        torch.manual_seed(0)
        with torch.device(plan.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(plan.device).eval()


def run_guided_bench(plan: GuidedPlan) -> list[GuidedRow]:
    tokenizer = AutoTokenizer.from_pretrained(plan.model_dir)
    stops = stop_token_ids(tokenizer, plan.model_dir)
    model = load_model(plan, len(tokenizer))
    guides = GuideCompiler(tokenizer, model.get_output_embeddings().out_features, stops)
    settings = load_settings({"device": plan.device, "max_batch_size": max(plan.concurrency, 2)}, environ={})
    backend = TorchBackend.from_hf_model(model, settings, stops, guides=guides)  # the server's engine, as configured
    backend.start()
    try:
        ids = prompt_encoder(tokenizer, "chat").encode_chat([{"role": "user", "content": PROMPT}])
        guided = GuidedDecoding("json_schema", json.dumps(SCHEMA))
        return [asyncio.run(_measure(backend, ids, guided, plan, c)) for c in sorted({1, plan.concurrency})]
    finally:
        backend.shutdown()


async def _measure(
    backend: TorchBackend, ids: list[int], guided: GuidedDecoding, plan: GuidedPlan, n: int
) -> GuidedRow:
    constrained_params = SamplingParams(max_new_tokens=plan.max_tokens, guided=guided)
    await backend.prepare(constrained_params)  # compiled here, outside the timed runs, as the server does
    constrained, free, tokens = [], [], 0
    for _ in range(plan.repeats + 1):  # the first round warms up
        runs = await asyncio.gather(*(_timed(backend, ids, constrained_params) for _ in range(n)))
        tokens = min(count for count, _ in runs)
        free_params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
        free_runs = await asyncio.gather(*(_timed(backend, ids, free_params) for _ in range(n)))
        constrained.append(statistics.median(ms for _, ms in runs))
        free.append(statistics.median(ms for _, ms in free_runs))
    return GuidedRow(n, tokens, statistics.median(constrained[1:]), statistics.median(free[1:]))


async def _timed(backend: TorchBackend, ids: list[int], params: SamplingParams) -> tuple[int, float]:
    """Tokens generated and decode ms per token."""
    times: list[float] = []
    async for chunk in backend.generate(ids, params):
        times.extend(time.perf_counter() for _ in chunk.token_ids)
    return len(times), (1000 * (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0)


def print_rows(rows: list[GuidedRow], plan: GuidedPlan) -> dict[str, Any]:
    table = Table(title=f"structured output overhead, xgrammar {XGRAMMAR_VERSION}, {plan.device}")
    for column in ("concurrency", "tokens", "constrained ms/token", "free ms/token", "overhead ms/token", "overhead"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row.concurrency),
            str(row.tokens),
            f"{row.constrained_ms:.2f}",
            f"{row.free_ms:.2f}",
            f"{row.overhead_ms:+.2f}",
            f"{100 * row.overhead_ms / row.free_ms:+.1f}%" if row.free_ms else "-",
        )
    console.print(table)
    return {
        "xgrammar": XGRAMMAR_VERSION,
        "device": plan.device,
        "weights": plan.random_weights or "pretrained",
        "machine": machine_info(),
        "rows": [asdict(row) | {"overhead_ms": round(row.overhead_ms, 3)} for row in rows],
    }
