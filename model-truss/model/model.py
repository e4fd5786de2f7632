"""The Truss model: load() builds one backend, the routes hand each request to its API module.

(No `from __future__ import annotations` here: truss inspects the `Request` annotations at runtime.
Each route takes only the request, so truss leaves the body to us (http_io.py) and passes our
responses through unchanged.)

A request's path: the route's API module (predict_api.py, or openai_api/ for the OpenAI routes)
reads and validates the body (http_io.py, schema.py) -> `TextGenerator.start` (generation.py):
prompt -> token ids -> limits -> `backend.generate` (token ids, backends/) -> text pieces
(streaming.py) -> a JSON response, or a stream of the pieces.
"""

import asyncio
import atexit
import functools
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from model import metrics, predict_api
from model.artifacts import resolve_artifacts
from model.backends import load_backend
from model.backends.base import BatchingBackend
from model.generation import TextGenerator
from model.openai_api.models import served_model_name
from model.openai_api.routes import OpenAIRoutes
from model.schema import parse_request
from model.settings import SettingsError, load_settings

logger = logging.getLogger(__name__)

WARMUP_REQUEST = {"prompt": "Hello", "max_new_tokens": 4}


class Model:
    def __init__(self, **kwargs: Any) -> None:
        self._config: dict = kwargs["config"]
        self._data_dir = Path(kwargs.get("data_dir") or "data")
        self._secrets: Mapping[str, str] = kwargs.get("secrets") or {}
        self.settings = load_settings(self._config.get("model_metadata"))
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.backend: BatchingBackend | None = None
        self.generator: TextGenerator | None = None
        self.openai: OpenAIRoutes | None = None

    def load(self) -> None:
        fetch = functools.partial(
            resolve_artifacts, cache_dir=self.settings.cache_dir or self._data_dir, hf_token=self._hf_token()
        )
        artifacts = fetch(self.settings)
        self.tokenizer = tokenizer = AutoTokenizer.from_pretrained(artifacts.tokenizer_dir)
        self.backend = load_backend(self.settings, artifacts, tokenizer, fetch)
        atexit.register(self.backend.shutdown)
        self._check_predict_concurrency(self.backend)
        metrics.track_backend(self.backend)
        self.generator = TextGenerator(self.backend, tokenizer, self.settings)
        self.openai = OpenAIRoutes(self.generator, served_model_name(self.settings))
        if self.settings.warmup:
            started = time.perf_counter()
            asyncio.run(self._warm_up())
            logger.info("warm-up generation took %.0f ms", 1000 * (time.perf_counter() - started))

    def is_healthy(self) -> bool:
        """Readiness (and liveness): False until loaded, and while the engine thread is dead or wedged."""
        if self.backend is None or not self.backend.is_healthy():
            return False
        stalled = self.backend.stalled_s()
        if stalled > self.settings.engine_stall_timeout_s:
            logger.error("the engine has not finished a step for %.0f s; reporting unhealthy", stalled)
            return False
        return True

    def _check_predict_concurrency(self, backend: BatchingBackend) -> None:
        """truss's /predict semaphore queues without bound once full: it must never fill before the engine's queue."""
        concurrency = int((self._config.get("runtime") or {}).get("predict_concurrency", 1))
        if concurrency <= 2 * backend.max_queued:
            raise SettingsError(
                f"runtime.predict_concurrency ({concurrency}) must exceed twice the engine's queue "
                f"({backend.max_queued} = 2 x max_batch_size), or /predict requests wait in truss without bound "
                "instead of getting a 429; raise it in config.yaml"
            )

    async def predict(self, request: Request) -> Response:
        """This server's API: `{"output", "finish_reason", "usage"}`, or a stream of text pieces."""
        return await predict_api.predict(self._generator(), request)

    async def chat_completions(self, request: Request) -> Response:
        """OpenAI `/v1/chat/completions`."""
        return await self._openai().chat_completions(request)

    async def completions(self, request: Request) -> Response:
        """OpenAI `/v1/completions`."""
        return await self._openai().completions(request)

    def _generator(self) -> TextGenerator:
        assert self.generator is not None, "a route was called before load()"
        return self.generator

    def _openai(self) -> OpenAIRoutes:
        assert self.openai is not None, "a route was called before load()"
        return self.openai

    async def _warm_up(self) -> None:
        """One generation through the whole path, without HTTP."""
        generation = await self._generator().start(parse_request(WARMUP_REQUEST))
        await generation.complete()

    def _hf_token(self) -> str | None:
        try:
            token = self._secrets[self.settings.hf_token_secret]
        except Exception:  # truss raises its own SecretNotFound, not KeyError
            return None
        return token.strip() if token else None
