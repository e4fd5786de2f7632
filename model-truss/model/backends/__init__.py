"""Backend selection: chosen once in `load()`, the chosen module imported only then.

`tensorrt_llm` cannot be imported where it is not installed (CPU machines, CI), so each
backend module is imported lazily; asking for an unavailable backend fails loudly in load().
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from model.artifacts import Artifacts
from model.backends.base import BatchingBackend
from model.settings import Backend, ServerSettings

logger = logging.getLogger(__name__)


def load_backend(
    settings: ServerSettings,
    artifacts: Artifacts,
    tokenizer: PreTrainedTokenizerBase,
    fetch: Callable[[ServerSettings], Artifacts],
) -> BatchingBackend:
    """Build and start the configured backend; `fetch` resolves further artifacts (a draft engine)."""
    if settings.backend is Backend.TENSORRT_LLM:
        from model.backends.trtllm import TrtllmBackend

        backend: BatchingBackend = TrtllmBackend.load(settings, artifacts, tokenizer, fetch)
    elif settings.backend is Backend.TENSORRT_LLM_LLMAPI:
        from model.backends.trtllm_llmapi import LlmApiBackend

        backend = LlmApiBackend.load(settings, artifacts, tokenizer, fetch)
    else:
        from model.backends.torch import TorchBackend

        backend = TorchBackend.load(settings, artifacts, tokenizer)
    logger.info("backend %s loaded from %s (%s)", backend.name, artifacts.model_dir, backend.limits)
    backend.start()
    return backend
