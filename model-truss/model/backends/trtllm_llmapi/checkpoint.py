"""What a Hugging Face checkpoint folder says, and what TensorRT-LLM's LLM API is built with to serve it.

`Checkpoint.read` takes the context length, vocabulary and ModelOpt quantization (FP8, NVFP4) from the
folder; `check_runtime` refuses a TensorRT-LLM other than 1.2 and a quantization this GPU cannot run;
`llm_plan` turns the settings into the `LLM(...)` keyword arguments and the request limits, deriving the
prompt limit as the LLM API does (without chunked prefill a prompt may not exceed max_num_tokens; with
it, max_seq_len - 1). Prefix caching (KV-cache block reuse) and chunked prefill are on unless turned off.

Checked against NVIDIA/TensorRT-LLM through the code index: tensorrt_llm/llmapi/llm.py (the 1.x revision with
`_check_arguments(..., is_gen_only)`: the PyTorch backend's max_num_tokens check), llmapi/llm_args.py (the
revision with `eagle3_one_model`: `KvCacheConfig`, `DecodingBaseConfig.speculative_model_dir`,
`DraftTargetDecodingConfig`, `EagleDecodingConfig`, `fail_fast_on_attention_window_too_large`,
`max_num_tokens` default 8192); ModelOpt's `hf_quant_config.json` layout ({"quantization": {"quant_algo": ...}})
as quantization/quantize.py writes it. Only against the double (tests/doubles/trtllm_llmapi.py): that 1.2
reads the checkpoint's own max_position_embeddings when max_seq_len is given, the FP8/NVFP4 GPU floors
(TensorRT-LLM's support matrix, not code), and that the PyTorch backend acts on
`fail_fast_on_attention_window_too_large` (the sources pass it to the C++ runtime's ExecutorConfig on the
TensorRT path; where the PyTorch path reads it was not found), so a KV cache that cannot hold one max_seq_len
sequence fails the load; scripts/trtllm_smoke.py checks it (llmapi.fail_fast_attention_window).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from model.backends.base import Limits
from model.engine_meta import ComputeCapability, sm_name
from model.errors import ArtifactError, EngineMismatchError
from model.settings import ServerSettings, SettingsError

SUPPORTED_VERSION = re.compile(r"^1\.2\.")  # the LLM API this backend and its double follow
DEFAULT_MAX_NUM_TOKENS = 8192  # BaseLlmArgs.max_num_tokens
DEFAULT_DRAFT_LEN = 4  # draft tokens per step when max_draft_len is not set
QUANT_MIN_CC: dict[str, ComputeCapability] = {"FP8": (8, 9), "NVFP4": (10, 0)}  # Ada for FP8, Blackwell for FP4


@dataclass(frozen=True)
class Checkpoint:
    """The facts of a Hugging Face checkpoint folder this backend needs."""

    model_dir: Path
    max_position_embeddings: int
    vocab_size: int
    quant_algo: str | None  # ModelOpt's quant_algo (FP8, NVFP4, ...), None for a plain checkpoint

    @classmethod
    def read(cls, model_dir: Path) -> Checkpoint:
        path = Path(model_dir) / "config.json"
        try:
            config = json.loads(path.read_text())
            if "build_config" in config:
                raise ArtifactError(
                    f"{model_dir} holds a TensorRT engine (trtllm-build output); serve it with backend tensorrt_llm, "
                    "or point model_repo at the Hugging Face checkpoint"
                )
            text = config.get("text_config", config)  # multimodal configs nest the language model's
            return cls(
                model_dir=Path(model_dir),
                max_position_embeddings=int(text["max_position_embeddings"]),
                vocab_size=int(text["vocab_size"]),
                quant_algo=_quant_algo(Path(model_dir), config),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(
                f"{path} is not a Hugging Face model config ({type(exc).__name__}: {exc}); point model_repo (and "
                "subfolder) at a checkpoint folder with config.json and safetensors weights"
            ) from exc


def _quant_algo(model_dir: Path, config: dict[str, Any]) -> str | None:
    """ModelOpt writes hf_quant_config.json; newer exports put quantization_config into config.json."""
    quant_file = model_dir / "hf_quant_config.json"
    if quant_file.is_file():
        return json.loads(quant_file.read_text())["quantization"].get("quant_algo")
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") == "modelopt":
        return quantization.get("quant_algo")
    return None


def check_runtime(
    version: str, checkpoint: Checkpoint, compute_capability: Callable[[], ComputeCapability | None]
) -> None:
    """Refuse a TensorRT-LLM this backend was not written for, and a quantization this GPU cannot run."""
    if not SUPPORTED_VERSION.match(version):
        raise EngineMismatchError(
            f"TensorRT-LLM {version} is installed but this backend follows the 1.2 LLM API (its sampling, logprobs "
            "and stats change between releases); serve from nvcr.io/nvidia/tensorrt-llm/release:1.2.x"
        )
    floor = QUANT_MIN_CC.get(str(checkpoint.quant_algo).upper())
    if floor is None:
        return
    capability = compute_capability()
    if capability is None or tuple(capability) < floor:
        found = "no GPU" if capability is None else sm_name(capability)
        raise EngineMismatchError(
            f"{checkpoint.model_dir} is a ModelOpt {checkpoint.quant_algo} checkpoint, which needs {sm_name(floor)} or "
            f"newer, and this machine has {found}; serve the unquantized checkpoint, or schedule on newer GPUs"
        )


@dataclass(frozen=True)
class LlmPlan:
    """How the LLM is built, and what requests may ask of it."""

    kwargs: dict[str, Any]  # for tensorrt_llm.LLM(model, **kwargs)
    limits: Limits
    input_rule: str  # why max_input_len is what it is, for the log
    speculative: str | None  # "draft_target" or "eagle3" with a draft, else None


def llm_plan(
    settings: ServerSettings, checkpoint: Checkpoint, tokenizer_dir: Path, draft_dir: Path | None, llmapi: ModuleType
) -> LlmPlan:
    """The LLM's arguments and the limits that follow from them; settings the checkpoint cannot serve are refused."""
    max_seq_len = settings.max_seq_len or checkpoint.max_position_embeddings
    if max_seq_len > checkpoint.max_position_embeddings:
        raise SettingsError(
            f"max_seq_len={max_seq_len} exceeds the checkpoint's max_position_embeddings "
            f"({checkpoint.max_position_embeddings}); set max_seq_len (LLM_MAX_SEQ_LEN) to at most that"
        )
    max_num_tokens = settings.max_num_tokens or DEFAULT_MAX_NUM_TOKENS
    chunked = settings.enable_chunked_context is not False
    if chunked:
        input_limit, rule = max_seq_len - 1, "max_seq_len - 1, with chunked prefill"
    else:
        input_limit = min(max_seq_len - 1, max_num_tokens)
        rule = f"min(max_seq_len - 1, max_num_tokens {max_num_tokens}), without chunked prefill"
    if settings.max_input_len is not None and settings.max_input_len > input_limit:
        raise SettingsError(
            f"max_input_len={settings.max_input_len} exceeds the {input_limit} prompt tokens the LLM accepts ({rule}); "
            "set max_input_len (LLM_MAX_INPUT_LEN) lower, or turn on enable_chunked_context / raise max_num_tokens"
        )
    limits = Limits(
        max_input_len=min(settings.max_input_len or input_limit, input_limit),
        max_seq_len=max_seq_len,
        max_new_tokens=min(settings.max_new_tokens_limit, max_seq_len - 1),
        max_batch_size=settings.max_batch_size,
    )
    kwargs: dict[str, Any] = {
        "tokenizer": str(tokenizer_dir),
        "tensor_parallel_size": settings.tensor_parallel_size,
        "max_batch_size": settings.max_batch_size,
        "max_num_tokens": max_num_tokens,
        "max_seq_len": max_seq_len,
        "enable_chunked_prefill": chunked,
        "kv_cache_config": llmapi.KvCacheConfig(
            enable_block_reuse=settings.enable_block_reuse is not False,
            free_gpu_memory_fraction=settings.kv_cache_free_gpu_memory_fraction,
        ),
        "enable_iter_perf_stats": True,  # get_stats() feeds stats(): KV use and prefix-cache hits
        "fail_fast_on_attention_window_too_large": True,  # fail at load, never clamp the window silently
    }
    speculative = settings.speculative_mode if draft_dir is not None else None
    if draft_dir is None:
        kwargs["guided_decoding_backend"] = "xgrammar"
    else:
        kwargs["speculative_config"] = _speculative_config(settings, draft_dir, llmapi)
    return LlmPlan(kwargs, limits, rule, speculative)


def _speculative_config(settings: ServerSettings, draft_dir: Path, llmapi: ModuleType) -> Any:
    draft_len = settings.max_draft_len or DEFAULT_DRAFT_LEN
    if settings.speculative_mode == "eagle3":
        return llmapi.EagleDecodingConfig(
            max_draft_len=draft_len, speculative_model_dir=str(draft_dir), eagle3_one_model=True
        )
    return llmapi.DraftTargetDecodingConfig(max_draft_len=draft_len, speculative_model_dir=str(draft_dir))
