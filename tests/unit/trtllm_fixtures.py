"""Fixtures and helpers for the TensorRT-LLM backend tests: a fake package, an engine folder, a loader.

Test modules import the fixtures by name (pytest finds them in the importing module's namespace).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from model import engine_meta
from model.artifacts import Artifacts, resolve_artifacts
from model.backends.base import BatchingBackend, SamplingParams, TokenChunk
from model.backends.trtllm import TrtllmBackend
from model.settings import Backend, ServerSettings
from tests.doubles.trtllm import FakeTrtllm, write_engine_config

PAD, END, IM_END = 0, 2, 3  # IM_END: a chat model's end-of-turn token, listed in generation_config.json
GREEDY = SamplingParams(max_new_tokens=12)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTrtllm:
    fake = FakeTrtllm().install(monkeypatch)
    monkeypatch.setattr(engine_meta, "verify_engine_compatible", lambda d: fake.events.append(("verify", str(d))))
    return fake


@pytest.fixture
def engine_dir(tmp_path: Path) -> Path:
    write_engine_config(tmp_path / "engine", max_batch_size=8, max_input_len=64, max_seq_len=128)
    return tmp_path / "engine"


@pytest.fixture
def artifacts(tmp_path: Path, engine_dir: Path) -> Artifacts:
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [END, IM_END]}))
    return Artifacts(model_dir=engine_dir, tokenizer_dir=tokenizer_dir)


@pytest.fixture
def make_backend(artifacts: Artifacts, tmp_path: Path) -> Iterator[Callable[..., TrtllmBackend]]:
    """Loads a backend (not started, so tests can queue requests first); shuts every one down after."""
    loaded: list[TrtllmBackend] = []

    def fetch(settings: ServerSettings) -> Artifacts:  # what model.py binds: the real resolver, cache and token
        return resolve_artifacts(settings, tmp_path / "cache", None)

    def make(found: Artifacts | None = None, **settings: Any) -> TrtllmBackend:
        """`found`: other artifacts than the fixture's (another tokenizer)."""
        values = {"backend": Backend.TENSORRT_LLM, "max_batch_size": 8, **settings}
        tokenizer = SimpleNamespace(eos_token_id=END, pad_token_id=PAD)
        loaded.append(TrtllmBackend.load(ServerSettings(**values), found or artifacts, tokenizer, fetch))
        return loaded[-1]

    yield make
    for backend in loaded:
        backend.shutdown()


async def collect(backend: BatchingBackend, prompt: list[int], params: SamplingParams) -> list[TokenChunk]:
    return [chunk async for chunk in backend.generate(prompt, params)]


def serve_all(backend: BatchingBackend, requests: list[tuple[list[int], SamplingParams]]) -> list[Any]:
    """Queue every request, then start the engine thread, so its first step sees them all at once."""

    async def main() -> list[Any]:
        tasks = [asyncio.create_task(collect(backend, prompt, params)) for prompt, params in requests]
        for _ in range(3):
            await asyncio.sleep(0)  # each task runs up to its first await: its Submission is queued
        backend.start()
        return await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(main())


def tokens_of(chunks: list[TokenChunk]) -> list[int]:
    return [token for chunk in chunks for token in chunk.token_ids]


def prompts(count: int) -> list[list[int]]:
    return [[100 + i, 200 + 3 * i, 300 + i * i][: 1 + i % 3] for i in range(count)]


def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def answer(chunks: list[TokenChunk]) -> tuple[list[int], str | None]:
    return tokens_of(chunks), chunks[-1].finish_reason
