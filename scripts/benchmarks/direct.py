"""The direct mode: the same requests through the backend in-process, no HTTP, server or detokenizer.

`loaded_model` builds the Truss `Model` exactly as the server does (config.yaml's `model_metadata`, the
`LLM_*` environment, the server's model cache), so the backend, weights and warm-up are the server's own.
`direct_sender` then times the backend's token chunks with the clock the HTTP mode uses for text pieces;
the HTTP/direct ratio of a metric is the serving overhead (HTTP, truss server, streaming, tokenization
and detokenization).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from transformers import AutoTokenizer

from model.artifacts import embedded_model_dir
from model.backends.base import BatchingBackend, SamplingParams
from model.errors import ServingError
from model.settings import load_settings
from scripts import TRUSS_DIR
from scripts.benchmarks.datasets import BenchRequest, PromptCodec
from scripts.benchmarks.loadgen import OpenSender, Sender
from scripts.benchmarks.stats import RequestRecord
from scripts.serve import server_env

if TYPE_CHECKING:
    from model.model import Model


def server_config(truss_dir: Path = TRUSS_DIR) -> dict:
    return yaml.safe_load((truss_dir / "config.yaml").read_text())


def model_cache_dir() -> Path:
    """The folder `main.py serve` keeps downloaded and converted models in, so both share one copy."""
    return Path(server_env(0)["LLM_CACHE_DIR"])


def server_codec(tokenizer: str | None = None, prompt_format: str | None = None) -> PromptCodec:
    """How the configured server tokenizes a prompt; `tokenizer` (a folder or Hub id) and `prompt_format` override."""
    settings = load_settings(server_config().get("model_metadata"))
    if tokenizer:
        loaded = AutoTokenizer.from_pretrained(tokenizer)
    elif settings.uses_embedded_model:
        loaded = AutoTokenizer.from_pretrained(embedded_model_dir(settings.cache_dir or model_cache_dir()))
    else:
        loaded = AutoTokenizer.from_pretrained(
            settings.tokenizer_repo or settings.model_repo, revision=settings.revision
        )
    return PromptCodec(loaded, prompt_format or settings.prompt_format)


def model_codec(model: Model) -> PromptCodec:
    """How a loaded Model tokenizes a prompt: exactly what its predict() does."""
    return PromptCodec(model.tokenizer, model.settings.prompt_format)


@contextmanager
def loaded_model(truss_dir: Path = TRUSS_DIR) -> Iterator[Model]:
    """The server's Model, loaded and warmed up in this process; the backend always shuts down."""
    from model.model import Model  # imports truss's server stack (fastapi); the GPU bench needs only backends

    model = Model(config=server_config(truss_dir), data_dir=model_cache_dir(), secrets={})
    model.load()
    try:
        yield model
    finally:
        assert model.backend is not None
        model.backend.shutdown()


def direct_sender(backend: BatchingBackend, *, ignore_eos: bool = True) -> OpenSender:
    """Feeds each request's token ids to `backend.generate`; output tokens are counted exactly."""

    @asynccontextmanager
    async def open_sender() -> AsyncIterator[Sender]:
        async def send(request: BenchRequest) -> RequestRecord:
            return await generate_request(backend, request, ignore_eos=ignore_eos)

        yield send

    return open_sender


async def generate_request(backend: BatchingBackend, request: BenchRequest, *, ignore_eos: bool) -> RequestRecord:
    """One request through the backend; a `ServingError` is recorded by its class name, never raised."""
    params = SamplingParams(max_new_tokens=request.output_tokens, temperature=0.0, ignore_eos=ignore_eos)
    record = RequestRecord(task_id=request.task_id, input_tokens=len(request.input_ids), start=time.perf_counter())
    try:
        async for chunk in backend.generate(list(request.input_ids), params):
            if chunk.token_ids:
                record.chunk_times.append(time.perf_counter())
                record.output_tokens += len(chunk.token_ids)
    except ServingError as exc:
        record.error, record.error_detail = type(exc).__name__, str(exc)
    record.end = time.perf_counter()
    if record.ok and not record.chunk_times:
        record.error = "empty_stream"
    return record
