"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from model.artifacts import Artifacts
from model.backends.torch import TorchBackend
from model.settings import load_settings
from tests.unit.trtllm_fixtures import artifacts, engine_dir, fake, make_backend  # noqa: F401 - pytest fixtures


@pytest.fixture(scope="module")
def backend(embedded_dir: Path, tokenizer) -> Iterator[TorchBackend]:
    """The torch engine on the embedded SmolLM2 (CPU, batches of 8), one per test module."""
    settings = load_settings({"device": "cpu", "max_batch_size": 8, "kv_cache_max_tokens": 8192}, environ={})
    engine = TorchBackend.load(settings, Artifacts(embedded_dir, embedded_dir), tokenizer)
    engine.start()
    yield engine
    engine.shutdown()
