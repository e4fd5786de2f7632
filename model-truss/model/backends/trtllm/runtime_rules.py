"""What TensorRT-LLM 1.2's C++ runtime derives from an engine, and what it refuses at load: checked here first.

An Executor built with options the engine cannot honour either crashes at load with a message about
plugins, or silently runs differently (block reuse switched off, a window clamped). So before any
engine is deserialized, `check_executor_build` refuses an engine the Executor cannot serve,
`runtime_options` resolves prefix caching (KV-cache block reuse) and chunked context (both on by
default wherever the engine supports them) and refuses impossible settings, and `engine_limits`
derives the prompt limit exactly as the runtime does, so a prompt the engine would refuse gets a 400
naming the limit instead of failing inside the engine. Every message names the setting or spec to change.

Checked against NVIDIA/TensorRT-LLM through the code index (1.2.0rc2 is commit b35ac1b6):
- batch_manager/trtGptModelInflightBatching.cpp at b35ac1b6: `supportsInflightBatching()` ("requires GPT
  attention/Mamba Conv 1d plugin with packed input and paged KV cache"), "KV cache block reuse must be enabled
  for speculative decoding target model", "Chunked context requires context FMHA, paged kv_cache and paged
  context FMHA", `fixExecutorConfig` (block reuse switched off with a warning without paged context FMHA or
  with context logits), "Without enabling chunked context, the max context length ... <= max number of tokens"
  (max context = max_num_tokens with context FMHA, else max_input_len), and `clampWindowSizesToFitAtLeastOneSequence`
  (throws with `fail_fast_on_attention_window_too_large`, else lowers the window, max_seq_len and max_input_len).
- executor/executorImpl.cpp at b35ac1b6 `createModel`: the executor config goes through `fixExecutorConfig`;
  no chunked-context fallback (older revisions had `checkOptionalParams`).
- batch_manager/trtGptModel.h (c8c6df08, the ExecutorConfig revision): max input length = max_seq_len - 1 with
  chunked context; else min(max_seq_len - 1, max_num_tokens) with context FMHA and packed input; else the
  build's max_input_len.
- batch_manager/llmRequest.cpp (119c6e60) `validate`: "Prompt length (%d) exceeds maximum input length";
  prompt + draft tokens above the input limit truncates the draft; prompt + max_new + draft length above
  max_seq_len lowers max_new.
Only against the double (tests/doubles/trtllm.py): that these rules are all the load-time checks there are.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.backends.base import Limits
from model.backends.trtllm.engine_config import EngineSpec
from model.errors import EngineMismatchError
from model.settings import ServerSettings, SettingsError

SERVABLE_SPECULATIVE_MODES = ("none", "draft_tokens_external")  # others need decoding configs this server never sends


@dataclass(frozen=True)
class RuntimeOptions:
    """What the Executor is built with, resolved from the settings and what the engine supports."""

    chunked_context: bool
    block_reuse: bool


@dataclass(frozen=True)
class InputLimit:
    """The longest prompt the runtime accepts, and the rule that set it (for messages)."""

    tokens: int
    rule: str
    fix: str  # how to accept longer prompts


def supports_chunked_context(spec: EngineSpec) -> bool:
    return spec.paged_kv_cache and spec.context_fmha and spec.paged_context_fmha


def supports_block_reuse(spec: EngineSpec) -> bool:
    """What fixExecutorConfig keeps: reuse needs paged context FMHA, and no context logits."""
    return spec.paged_context_fmha and not spec.gather_context_logits


def check_executor_build(spec: EngineSpec) -> None:
    """Refuse an engine the C++ Executor (in-flight batching) cannot load or drive."""
    if not (spec.gpt_attention_plugin and spec.remove_input_padding and spec.paged_kv_cache):
        raise EngineMismatchError(
            "the C++ Executor batches in flight, which needs the GPT attention plugin, packed input and a paged KV "
            f"cache, and this engine has gpt_attention_plugin={spec.gpt_attention_plugin}, "
            f"remove_input_padding={spec.remove_input_padding}, paged_kv_cache={spec.paged_kv_cache}; rebuild it "
            "with build.kv_cache_type: paged and build.remove_input_padding: true in its engines/ spec, or serve it "
            "with trtllm_runner: python"
        )
    if spec.speculative_mode not in SERVABLE_SPECULATIVE_MODES:
        raise EngineMismatchError(
            f"the engine was built with --speculative_decoding_mode {spec.speculative_mode}, which this server does "
            "not drive; rebuild it without a speculative mode or with draft_tokens_external, or serve the checkpoint "
            "with backend tensorrt_llm_llmapi (speculative_mode: eagle3 for EAGLE-3)"
        )


def runtime_options(settings: ServerSettings, spec: EngineSpec) -> RuntimeOptions:
    """Chunked context and block reuse: on by default where supported; asking for the impossible is refused."""
    chunked_ok = supports_chunked_context(spec)
    if settings.enable_chunked_context and not chunked_ok:
        raise SettingsError(
            "enable_chunked_context=true, but TensorRT-LLM runs chunked context only on engines with context FMHA, "
            f"a paged KV cache and paged context FMHA (this engine: context_fmha={spec.context_fmha}, "
            f"paged_context_fmha={spec.paged_context_fmha}); rebuild with build.paged_context_fmha: true or unset "
            "enable_chunked_context (LLM_ENABLE_CHUNKED_CONTEXT)"
        )
    chunked = chunked_ok if settings.enable_chunked_context is None else settings.enable_chunked_context
    if not chunked and not spec.context_fmha and spec.max_input_len > spec.max_num_tokens:
        raise EngineMismatchError(
            f"without context FMHA and chunked context the runtime needs max_input_len ({spec.max_input_len}) <= "
            f"max_num_tokens ({spec.max_num_tokens}); rebuild with build.context_fmha: true or a larger "
            "build.max_num_tokens"
        )
    reuse_ok = supports_block_reuse(spec)
    if spec.draft_tokens_external and not reuse_ok:
        raise EngineMismatchError(
            "this is a draft-target target engine (draft_tokens_external), which TensorRT-LLM loads only with KV-cache "
            "block reuse, and reuse needs paged context FMHA without context logits; rebuild it with "
            "build.paged_context_fmha: true"
        )
    if spec.draft_tokens_external and settings.enable_block_reuse is False:
        raise SettingsError(
            "enable_block_reuse=false, but TensorRT-LLM loads a draft-target target engine (draft_tokens_external) "
            "only with KV-cache block reuse; unset enable_block_reuse (LLM_ENABLE_BLOCK_REUSE)"
        )
    if settings.enable_block_reuse and not reuse_ok:
        raise SettingsError(
            "enable_block_reuse=true, but TensorRT-LLM switches block reuse off on engines without paged context FMHA "
            "or with context logits; rebuild with build.paged_context_fmha: true or unset enable_block_reuse "
            "(LLM_ENABLE_BLOCK_REUSE)"
        )
    block_reuse = reuse_ok if settings.enable_block_reuse is None else settings.enable_block_reuse
    return RuntimeOptions(chunked_context=chunked, block_reuse=block_reuse)


def executor_input_limit(spec: EngineSpec, options: RuntimeOptions) -> InputLimit:
    """trtGptModel.h's max input length; max_seq_len is config.json's (what the runtime reads)."""
    if options.chunked_context:
        return InputLimit(spec.max_seq_len - 1, "max_seq_len - 1, with chunked context", "build a longer max_seq_len")
    if spec.context_fmha and spec.remove_input_padding:
        chunk_hint = (
            "turn on enable_chunked_context (LLM_ENABLE_CHUNKED_CONTEXT)"
            if supports_chunked_context(spec)
            else "rebuild with build.paged_context_fmha: true to allow chunked context"
        )
        return InputLimit(
            min(spec.max_seq_len - 1, spec.max_num_tokens),
            f"min(max_seq_len - 1, max_num_tokens {spec.max_num_tokens}), without chunked context",
            f"{chunk_hint}, or rebuild with a larger build.max_num_tokens",
        )
    return InputLimit(spec.max_input_len, "the build's max_input_len", "rebuild with a larger build.max_input_len")


def session_input_limit(spec: EngineSpec) -> InputLimit:
    """The Python session (ModelRunner) checks prompts against the build's max_input_len."""
    return InputLimit(spec.max_input_len, "the build's max_input_len (python runner)", "rebuild with a larger one")


def engine_limits(settings: ServerSettings, spec: EngineSpec, input_limit: InputLimit) -> Limits:
    """The engine's limits as the runtime derives them, lowered by the settings; settings above them are refused."""
    max_batch_size = _within_engine("max_batch_size", settings.max_batch_size, spec.max_batch_size)
    max_seq_len = _within_engine("max_seq_len", settings.max_seq_len, spec.built_max_seq_len)
    if settings.max_input_len is not None and settings.max_input_len > input_limit.tokens:
        raise SettingsError(
            f"max_input_len={settings.max_input_len} exceeds the {input_limit.tokens} prompt tokens this engine "
            f"accepts ({input_limit.rule}); set max_input_len (LLM_MAX_INPUT_LEN) to at most {input_limit.tokens}, "
            f"or {input_limit.fix}"
        )
    max_input_len = min(settings.max_input_len or input_limit.tokens, input_limit.tokens, max_seq_len - 1)
    return Limits(
        max_input_len=max_input_len,
        max_seq_len=max_seq_len,
        max_new_tokens=min(settings.max_new_tokens_limit, max_seq_len - 1),
        max_batch_size=max_batch_size,
    )


def _within_engine(name: str, wanted: int | None, built: int) -> int:
    if wanted is None:
        return built
    if wanted > built:
        raise SettingsError(
            f"{name}={wanted} exceeds this engine's build limit {built} (build_config.{name} in config.json); "
            f"set {name} (LLM_{name.upper()}) to at most {built}, or rebuild the engine with a larger {name}"
        )
    return wanted


LOAD_FAILURE_HINTS = {
    "Attention window too large": "the KV cache left by kv_cache_free_gpu_memory_fraction cannot hold one sequence of "
    "max_seq_len; raise kv_cache_free_gpu_memory_fraction (LLM_KV_CACHE_FREE_GPU_MEMORY_FRACTION), serve on a GPU with "
    "more memory, or {shorter}",
    "out of memory": "the model does not fit next to what is already on the GPU; lower "
    "kv_cache_free_gpu_memory_fraction, use a smaller draft, or more GPUs",
}
ENGINE_SHORTER = "rebuild with a smaller build.max_seq_len"


def load_failure_hint(message: str, shorter: str = ENGINE_SHORTER) -> str:
    """The fix for a runtime error raised while a model loads, where this module knows one.

    `shorter` says how to serve shorter sequences: an engine's max_seq_len is built in, a checkpoint's is a setting.
    """
    for marker, hint in LOAD_FAILURE_HINTS.items():
        if marker.lower() in message.lower():
            return hint.format(shorter=shorter)
    return "see the TensorRT-LLM log above"
