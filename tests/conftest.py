"""Fixtures shared by unit and end-to-end tests: the embedded model, converted once per cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.artifacts import embedded_model_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_CACHE = REPO_ROOT / ".cache" / "models"  # the same cache `main.py serve` uses


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (first call converts the GGUF, ~20 s)."""
    return embedded_model_dir(MODEL_CACHE)


@pytest.fixture(scope="session")
def tokenizer(embedded_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)
