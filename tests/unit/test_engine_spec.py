"""Engine specs: the shipped ones load and pin their exact TensorRT-LLM 1.2 command lines; bad ones are refused.

Two independent checks of the commands: `SHIPPED_COMMANDS` pins every command line character for
character, and `TRTLLM_1_2` (argparse definitions transcribed from TensorRT-LLM 1.2's own scripts)
must accept every generated command, so a flag or value TensorRT-LLM does not know fails here.
"""

from __future__ import annotations

import argparse
import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.engine_spec import (
    BuildPaths,
    CheckpointSpec,
    EngineSpec,
    SpecError,
    build_command,
    check_draft_pairing,
    checkpoint_command,
    load_draft,
    load_spec,
    serve_settings,
)

ENGINES = Path(__file__).resolve().parents[2] / "engines"
EXAMPLES = Path("/app/tensorrt_llm/examples")

# -- TensorRT-LLM 1.2's command lines, transcribed ---------------------------------------------
# Only flag names, types and choices, from NVIDIA/TensorRT-LLM:
#   examples/models/core/llama/convert_checkpoint.py @ 368f8f2a (has emit_engine_arch_deprecation, 1.x)
#   examples/quantization/quantize.py @ 059c97c1 and c8c6df08 (qformat choices common to both)
#   tensorrt_llm/commands/build.py @ 65f1d153 (no auto_parallel: the 1.x line) and
#   tensorrt_llm/plugin/plugin.py @ c20322ff (cli_plugin_args: dtype choices or enable/disable)
# build.py's deprecated `--paged_kv_cache` is left out on purpose, so generating it fails here.


def _parser(*flags: tuple[str, dict[str, Any]]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False, add_help=False)
    for name, options in flags:
        parser.add_argument(name, **options)
    return parser


DTYPES = ["auto", "float16", "bfloat16", "float32"]
PLUGIN_DTYPES = ["auto", "float16", "float32", "bfloat16", "int32", "disable"]
SWITCH = {"choices": ["enable", "disable"]}
QFORMATS = ["nvfp4", "fp8", "int8_sq", "int4_awq", "w4a8_awq", "int8_wo", "int4_wo", "full_prec"]
SPECULATIVE_MODES = ["draft_tokens_external", "lookahead_decoding", "medusa", "explicit_draft_tokens", "eagle"]
TRTLLM_1_2 = {
    "convert_checkpoint.py": _parser(
        ("--model_dir", {}),
        ("--output_dir", {}),
        ("--dtype", {"choices": DTYPES}),
        ("--tp_size", {"type": int}),
        ("--pp_size", {"type": int}),
        ("--use_weight_only", {"action": "store_true"}),
        ("--weight_only_precision", {"choices": ["int8", "int4", "int8_gptq", "int4_gptq", "int4_awq"]}),
        ("--smoothquant", {"type": float}),
        ("--per_token", {"action": "store_true"}),
        ("--per_channel", {"action": "store_true"}),
        ("--int8_kv_cache", {"action": "store_true"}),
        ("--fp8_kv_cache", {"action": "store_true"}),
        ("--calib_size", {"type": int}),
        ("--workers", {"type": int}),
    ),
    "quantize.py": _parser(
        ("--model_dir", {}),
        ("--output_dir", {}),
        ("--dtype", {"choices": DTYPES}),
        ("--qformat", {"choices": QFORMATS}),
        ("--kv_cache_dtype", {"choices": ["int8", "fp8"]}),
        ("--awq_block_size", {"type": int}),
        ("--calib_size", {"type": int}),
        ("--tp_size", {"type": int}),
        ("--pp_size", {"type": int}),
    ),
    "trtllm-build": _parser(
        ("--checkpoint_dir", {}),
        ("--output_dir", {}),
        ("--max_batch_size", {"type": int}),
        ("--max_input_len", {"type": int}),
        ("--max_seq_len", {"type": int}),
        ("--max_num_tokens", {"type": int}),
        ("--kv_cache_type", {"type": str.upper, "choices": ["CONTINUOUS", "PAGED", "DISABLED"]}),
        ("--workers", {"type": int}),
        ("--speculative_decoding_mode", {"choices": SPECULATIVE_MODES}),
        ("--max_draft_len", {"type": int}),
        ("--gpt_attention_plugin", {"choices": PLUGIN_DTYPES}),
        ("--gemm_plugin", {"choices": ["auto", "float16", "float32", "bfloat16", "int32", "fp8", "nvfp4", "disable"]}),
        ("--low_latency_gemm_plugin", {"choices": ["fp8", "disable"]}),
        ("--context_fmha", SWITCH),
        ("--use_paged_context_fmha", SWITCH),
        ("--use_fp8_context_fmha", SWITCH),
        ("--remove_input_padding", SWITCH),
        ("--multiple_profiles", SWITCH),
    ),
}


def trtllm_parse(command: list[str]) -> argparse.Namespace:
    """Parse a generated command as TensorRT-LLM 1.2 would; unknown flags and bad values raise."""
    if command[0] == "trtllm-build":
        tool, arguments = "trtllm-build", command[1:]
    else:
        assert command[0] == "python3" and command[1].startswith(str(EXAMPLES)), command[:2]
        tool, arguments = Path(command[1]).name, command[2:]
    namespace, unknown = TRTLLM_1_2[tool].parse_known_args(arguments)
    assert not unknown, f"{tool} has no flags {unknown}"
    return namespace


def paths_for(spec: EngineSpec) -> BuildPaths:
    return BuildPaths(Path("/build") / spec.name, EXAMPLES)


def squash(text: str) -> str:
    return " ".join(text.split())


# -- every shipped spec, pinned ------------------------------------------------------------------

SHIPPED_COMMANDS = {
    "llama-2-7b-int8-wo-a100": (
        """
        python3 /app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py
        --model_dir /build/llama-2-7b-int8-wo-a100/hf
        --output_dir /build/llama-2-7b-int8-wo-a100/checkpoint --dtype float16 --tp_size 1 --pp_size 1
        --use_weight_only --weight_only_precision int8
        """,
        """
        trtllm-build
        --checkpoint_dir /build/llama-2-7b-int8-wo-a100/checkpoint
        --output_dir /build/llama-2-7b-int8-wo-a100/engine --gpt_attention_plugin float16
        --gemm_plugin float16 --kv_cache_type paged --context_fmha enable
        --use_paged_context_fmha enable --remove_input_padding enable --max_batch_size 16
        --max_input_len 2048 --max_seq_len 4096 --workers 1
        """,
    ),
    "llama-2-7b-int8-wo-tp4-a100": (
        """
        python3 /app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py
        --model_dir /build/llama-2-7b-int8-wo-tp4-a100/hf
        --output_dir /build/llama-2-7b-int8-wo-tp4-a100/checkpoint --dtype float16 --tp_size 4
        --pp_size 1 --use_weight_only --weight_only_precision int8 --workers 4
        """,
        """
        trtllm-build
        --checkpoint_dir /build/llama-2-7b-int8-wo-tp4-a100/checkpoint
        --output_dir /build/llama-2-7b-int8-wo-tp4-a100/engine --gpt_attention_plugin float16
        --gemm_plugin float16 --kv_cache_type paged --context_fmha enable
        --use_paged_context_fmha enable --remove_input_padding enable --max_batch_size 64
        --max_input_len 2048 --max_seq_len 4096 --workers 4
        """,
    ),
    "llama-3.2-1b-instruct-fp8-draft-h200": (
        """
        python3 /app/tensorrt_llm/examples/quantization/quantize.py
        --model_dir /build/llama-3.2-1b-instruct-fp8-draft-h200/hf
        --output_dir /build/llama-3.2-1b-instruct-fp8-draft-h200/checkpoint --dtype float16
        --qformat fp8 --kv_cache_dtype fp8 --calib_size 512 --tp_size 1 --pp_size 1
        """,
        """
        trtllm-build
        --checkpoint_dir /build/llama-3.2-1b-instruct-fp8-draft-h200/checkpoint
        --output_dir /build/llama-3.2-1b-instruct-fp8-draft-h200/engine --gpt_attention_plugin float16
        --gemm_plugin fp8 --kv_cache_type paged --context_fmha enable --use_paged_context_fmha enable
        --remove_input_padding enable --use_fp8_context_fmha enable --multiple_profiles enable
        --max_batch_size 32 --max_input_len 122880 --max_seq_len 131072 --max_num_tokens 8192
        --workers 1
        """,
    ),
    "llama-3.3-70b-instruct-fp8-h200": (
        """
        python3 /app/tensorrt_llm/examples/quantization/quantize.py
        --model_dir /build/llama-3.3-70b-instruct-fp8-h200/hf
        --output_dir /build/llama-3.3-70b-instruct-fp8-h200/checkpoint --dtype float16 --qformat fp8
        --kv_cache_dtype fp8 --calib_size 512 --tp_size 1 --pp_size 1
        """,
        """
        trtllm-build
        --checkpoint_dir /build/llama-3.3-70b-instruct-fp8-h200/checkpoint
        --output_dir /build/llama-3.3-70b-instruct-fp8-h200/engine --gpt_attention_plugin float16
        --gemm_plugin fp8 --kv_cache_type paged --context_fmha enable --use_paged_context_fmha enable
        --remove_input_padding enable --use_fp8_context_fmha enable --low_latency_gemm_plugin fp8
        --multiple_profiles enable --max_batch_size 32 --max_input_len 122880 --max_seq_len 131072
        --max_num_tokens 8192 --speculative_decoding_mode draft_tokens_external --max_draft_len 10
        --workers 1
        """,
    ),
    "llama-7b-int4-wo-a10": (
        """
        python3 /app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py
        --model_dir /build/llama-7b-int4-wo-a10/hf --output_dir /build/llama-7b-int4-wo-a10/checkpoint
        --dtype float16 --tp_size 1 --pp_size 1 --use_weight_only --weight_only_precision int4
        """,
        """
        trtllm-build
        --checkpoint_dir /build/llama-7b-int4-wo-a10/checkpoint
        --output_dir /build/llama-7b-int4-wo-a10/engine --gpt_attention_plugin float16
        --gemm_plugin float16 --kv_cache_type paged --context_fmha enable
        --use_paged_context_fmha enable --remove_input_padding enable --max_batch_size 8
        --max_input_len 1024 --max_seq_len 2048 --workers 1
        """,
    ),
    "llama-7b-int8-kv-a10": (
        """
        python3 /app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py
        --model_dir /build/llama-7b-int8-kv-a10/hf --output_dir /build/llama-7b-int8-kv-a10/checkpoint
        --dtype float16 --tp_size 1 --pp_size 1 --int8_kv_cache --calib_size 512
        """,
        """
        trtllm-build
        --checkpoint_dir /build/llama-7b-int8-kv-a10/checkpoint
        --output_dir /build/llama-7b-int8-kv-a10/engine --gpt_attention_plugin float16
        --gemm_plugin float16 --kv_cache_type paged --context_fmha enable
        --use_paged_context_fmha disable --remove_input_padding enable --max_batch_size 8
        --max_input_len 1024 --max_seq_len 2048 --workers 1
        """,
    ),
    "llama-7b-smoothquant-a10": (
        """
        python3 /app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py
        --model_dir /build/llama-7b-smoothquant-a10/hf
        --output_dir /build/llama-7b-smoothquant-a10/checkpoint --dtype float16 --tp_size 1 --pp_size 1
        --smoothquant 0.5 --per_token --per_channel --calib_size 512
        """,
        """
        trtllm-build
        --checkpoint_dir /build/llama-7b-smoothquant-a10/checkpoint
        --output_dir /build/llama-7b-smoothquant-a10/engine --gpt_attention_plugin float16
        --gemm_plugin float16 --kv_cache_type paged --context_fmha enable
        --use_paged_context_fmha enable --remove_input_padding enable --max_batch_size 8
        --max_input_len 1024 --max_seq_len 2048 --workers 1
        """,
    ),
    "mistral-7b-instruct-v0.2-fp16-a100": (
        """
        python3 /app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py
        --model_dir /build/mistral-7b-instruct-v0.2-fp16-a100/hf
        --output_dir /build/mistral-7b-instruct-v0.2-fp16-a100/checkpoint --dtype float16 --tp_size 1
        --pp_size 1
        """,
        """
        trtllm-build
        --checkpoint_dir /build/mistral-7b-instruct-v0.2-fp16-a100/checkpoint
        --output_dir /build/mistral-7b-instruct-v0.2-fp16-a100/engine --gpt_attention_plugin float16
        --gemm_plugin float16 --kv_cache_type paged --context_fmha enable
        --use_paged_context_fmha enable --remove_input_padding enable --max_batch_size 32
        --max_input_len 32256 --max_seq_len 32768 --max_num_tokens 8192 --workers 1
        """,
    ),
    "mistral-7b-instruct-v0.2-fp16-h100": (
        """
        python3 /app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py
        --model_dir /build/mistral-7b-instruct-v0.2-fp16-h100/hf
        --output_dir /build/mistral-7b-instruct-v0.2-fp16-h100/checkpoint --dtype float16 --tp_size 1
        --pp_size 1
        """,
        """
        trtllm-build
        --checkpoint_dir /build/mistral-7b-instruct-v0.2-fp16-h100/checkpoint
        --output_dir /build/mistral-7b-instruct-v0.2-fp16-h100/engine --gpt_attention_plugin float16
        --gemm_plugin float16 --kv_cache_type paged --context_fmha enable
        --use_paged_context_fmha enable --remove_input_padding enable --max_batch_size 32
        --max_input_len 32256 --max_seq_len 32768 --max_num_tokens 8192 --workers 1
        """,
    ),
    "smollm2-135m-instruct-bf16-a100": (
        """
        python3 /app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py
        --model_dir /build/smollm2-135m-instruct-bf16-a100/hf
        --output_dir /build/smollm2-135m-instruct-bf16-a100/checkpoint --dtype bfloat16 --tp_size 1
        --pp_size 1
        """,
        """
        trtllm-build
        --checkpoint_dir /build/smollm2-135m-instruct-bf16-a100/checkpoint
        --output_dir /build/smollm2-135m-instruct-bf16-a100/engine --gpt_attention_plugin bfloat16
        --gemm_plugin bfloat16 --kv_cache_type paged --context_fmha enable
        --use_paged_context_fmha enable --remove_input_padding enable --max_batch_size 32
        --max_input_len 6144 --max_seq_len 8192 --workers 1
        """,
    ),
}


def shipped_specs() -> list[Path]:
    return sorted(ENGINES.glob("*.yaml"))


def test_every_shipped_spec_has_pinned_commands() -> None:
    assert {path.stem for path in shipped_specs()} == set(SHIPPED_COMMANDS)


@pytest.mark.parametrize("path", shipped_specs(), ids=lambda path: path.stem)
def test_shipped_spec_commands_are_pinned(path: Path) -> None:
    spec = load_spec(path)
    expected_checkpoint, expected_build = SHIPPED_COMMANDS[spec.name]
    assert shlex.join(checkpoint_command(spec, paths_for(spec))) == squash(expected_checkpoint)
    assert shlex.join(build_command(spec, paths_for(spec))) == squash(expected_build)


@pytest.mark.parametrize("path", shipped_specs(), ids=lambda path: path.stem)
def test_shipped_spec_commands_parse_as_tensorrt_llm_1_2(path: Path) -> None:
    spec = load_spec(path)
    checkpoint = trtllm_parse(checkpoint_command(spec, paths_for(spec)))
    build = trtllm_parse(build_command(spec, paths_for(spec)))
    assert (checkpoint.tp_size, checkpoint.pp_size) == (spec.parallelism.tensor, spec.parallelism.pipeline)
    assert checkpoint.output_dir == build.checkpoint_dir
    assert (build.max_batch_size, build.max_input_len, build.max_seq_len) == (
        spec.build.max_batch_size,
        spec.build.max_input_len,
        spec.build.max_seq_len,
    )
    assert build.workers == spec.parallelism.world_size
    assert build.kv_cache_type == "PAGED"


def test_shipped_drafts_pair_with_their_targets() -> None:
    targets = [load_spec(path) for path in shipped_specs() if load_spec(path).speculative.draft]
    assert [target.name for target in targets] == ["llama-3.3-70b-instruct-fp8-h200"]
    draft = load_draft(targets[0], ENGINES)
    assert draft is not None and draft.name == "llama-3.2-1b-instruct-fp8-draft-h200"


def test_seed_003_target_builds_for_draft_target_decoding() -> None:
    spec = load_spec(ENGINES / "llama-3.3-70b-instruct-fp8-h200.yaml")
    build = trtllm_parse(build_command(spec, paths_for(spec)))
    assert (build.speculative_decoding_mode, build.max_draft_len) == ("draft_tokens_external", 10)
    assert (build.gemm_plugin, build.low_latency_gemm_plugin, build.use_paged_context_fmha) == ("fp8", "fp8", "enable")


# -- commands for quantizations no shipped spec uses --------------------------------------------

VALID: dict[str, Any] = {
    "name": "test-engine",
    "tensorrt_llm_version": "1.2.0",
    "checkpoint": {"repo": "org/model", "architecture": "LlamaForCausalLM", "params_billion": 7.0},
    "dtype": "float16",
    "build": {"max_batch_size": 8, "max_input_len": 1024, "max_seq_len": 2048},
    "gpu": {"type": "a100-40gb"},
    "publish": {"repo": "org/model-trtllm"},
}


def spec_with(base: dict[str, Any] | None = None, /, **changes: Any) -> dict[str, Any]:
    """`base` (default VALID) with nested changes: spec_with(quantization={"weights": "fp8"}, gpu={"type": "h200"})."""
    data = copy.deepcopy(VALID if base is None else base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return data


def write_spec(folder: Path, data: dict[str, Any]) -> Path:
    path = folder / f"{data.get('name', 'unnamed')}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_int4_awq_uses_modelopt_with_its_block_size(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, spec_with(quantization={"weights": "int4_awq", "calib_size": 32})))
    command = checkpoint_command(spec, paths_for(spec))
    parsed = trtllm_parse(command)
    assert Path(command[1]).name == "quantize.py"
    assert (parsed.qformat, parsed.awq_block_size, parsed.calib_size, parsed.kv_cache_dtype) == (
        "int4_awq",
        128,
        32,
        None,
    )
    assert trtllm_parse(build_command(spec, paths_for(spec))).gemm_plugin == "float16"


def test_fp8_kv_cache_on_weight_only_weights_goes_through_modelopt(tmp_path: Path) -> None:
    data = spec_with(
        quantization={"weights": "int8_weight_only", "kv_cache": "fp8"},
        build={"paged_context_fmha": False},
        gpu={"type": "l4"},
    )
    spec = load_spec(write_spec(tmp_path, data))
    parsed = trtllm_parse(checkpoint_command(spec, paths_for(spec)))
    assert (parsed.qformat, parsed.kv_cache_dtype) == ("int8_wo", "fp8")


def test_pipeline_parallel_and_smoothquant_per_tensor(tmp_path: Path) -> None:
    data = spec_with(
        quantization={"weights": "smoothquant", "smoothquant_alpha": 0.8, "per_token": False, "per_channel": False},
        parallelism={"pipeline": 2},
        gpu={"count": 2},
        build={"workers": 1, "gemm_plugin": "disable"},
    )
    spec = load_spec(write_spec(tmp_path, data))
    checkpoint = trtllm_parse(checkpoint_command(spec, paths_for(spec)))
    build = trtllm_parse(build_command(spec, paths_for(spec)))
    assert (checkpoint.smoothquant, checkpoint.per_token, checkpoint.per_channel) == (0.8, False, False)
    assert (checkpoint.pp_size, checkpoint.workers, build.workers, build.gemm_plugin) == (2, 2, 1, "disable")


# -- bad specs ------------------------------------------------------------------------------------

BAD_SPECS = {
    "unknown top-level key": (
        {**VALID, "max_batch": 8},
        "unknown key 'max_batch'; remove it or fix its spelling (allowed here: name, description,",
    ),
    "unknown nested key": (
        spec_with(build={"max_batchsize": 8}),
        "unknown key 'build.max_batchsize'",
    ),
    "missing section": (
        {key: value for key, value in VALID.items() if key != "publish"},
        "'publish' is required",
    ),
    "fp8 weights on an A100": (
        spec_with(quantization={"weights": "fp8"}, build={"fp8_context_fmha": True}),
        "fp8 (weights: fp8, kv_cache: auto) needs sm_89 or newer but a100-40gb is sm_80",
    ),
    "fp8 KV cache on an A10": (
        spec_with(quantization={"kv_cache": "fp8"}, gpu={"type": "a10"}),
        "needs sm_89 or newer but a10 is sm_86",
    ),
    "V100": (
        spec_with(gpu={"type": "v100-32gb"}),
        "gpu v100-32gb is sm_70; TensorRT-LLM 1.2 supports Ampere (sm_80) and newer",
    ),
    "integer quantization on Blackwell": (
        spec_with(quantization={"weights": "int4_weight_only"}, gpu={"type": "b200"}),
        "TensorRT-LLM refuses int8/int4 weight-only, SmoothQuant and int8 KV cache on sm_100",
    ),
    "tensor parallel without the GPUs": (
        spec_with(parallelism={"tensor": 4}),
        "makes 4 ranks but gpu.count is 1; one rank runs per GPU, so set gpu.count: 4",
    ),
    "more build workers than GPUs": (
        spec_with(build={"workers": 2}),
        "build.workers (2) exceeds gpu.count (1)",
    ),
    "max_draft_len without a speculative mode": (
        spec_with(speculative={"max_draft_len": 10}),
        "max_draft_len and draft need a speculative mode; set mode: draft_tokens_external",
    ),
    "speculative mode without max_draft_len": (
        spec_with(speculative={"mode": "draft_tokens_external", "draft": "small"}),
        "needs max_draft_len >= 1",
    ),
    "draft-target mode without a draft": (
        spec_with(speculative={"mode": "draft_tokens_external", "max_draft_len": 4}),
        "needs draft: the name of the draft model's engine spec",
    ),
    "unsupported speculative mode": (
        spec_with(speculative={"mode": "medusa", "max_draft_len": 4}),
        "speculative.mode: Input should be 'draft_tokens_external'",
    ),
    "draft-target without paged context FMHA": (
        spec_with(
            speculative={"mode": "draft_tokens_external", "max_draft_len": 4, "draft": "small"},
            build={"paged_context_fmha": False},
        ),
        "draft-target decoding reuses the KV cache, which needs build.paged_context_fmha: true",
    ),
    "input as long as the sequence": (
        spec_with(build={"max_input_len": 2048}),
        "max_input_len (2048) must be below max_seq_len (2048)",
    ),
    "long prompts without chunked context": (
        spec_with(build={"max_input_len": 16384, "max_seq_len": 32768, "paged_context_fmha": False}),
        "max_num_tokens (8192) is below max_input_len (16384), so long prompts need chunked context",
    ),
    "a contiguous KV cache, which the C++ Executor refuses": (
        spec_with(build={"kv_cache_type": "continuous", "paged_context_fmha": False}),
        "refuses engines without a paged KV cache or packed input at load; keep kv_cache_type: paged",
    ),
    "padded input, which the C++ Executor refuses": (
        spec_with(build={"remove_input_padding": False}),
        "keep kv_cache_type: paged and remove_input_padding: true",
    ),
    "paged context FMHA without context FMHA": (
        spec_with(build={"context_fmha": False}),
        "paged_context_fmha needs context_fmha: true and kv_cache_type: paged",
    ),
    "70B in fp16 on one H200": (
        spec_with(checkpoint={"params_billion": 70.6}, gpu={"type": "h200"}),
        "70.6B parameters at 16 bits need ~141 GB per GPU but a h200 leaves 127 GB for weights",
    ),
    "int8 KV cache with paged context FMHA": (
        spec_with(quantization={"kv_cache": "int8"}),
        "TensorRT-LLM turns paged context FMHA off with an int8 KV cache; set build.paged_context_fmha: false",
    ),
    "fp8 KV cache without saying FP8 context FMHA": (
        spec_with(quantization={"weights": "fp8", "kv_cache": "fp8"}, gpu={"type": "h100-80gb"}),
        "say so in the spec: build.fp8_context_fmha: true",
    ),
    "fp8 KV cache beside int4 weights with paged context FMHA": (
        spec_with(quantization={"weights": "int4_awq", "kv_cache": "fp8"}, gpu={"type": "h100-80gb"}),
        "TensorRT-LLM turns paged context FMHA off for an fp8 KV cache with int4_awq weights",
    ),
    "low-latency fp8 GEMM on int8 weights": (
        spec_with(quantization={"weights": "int8_weight_only"}, build={"low_latency_gemm_plugin": True}),
        "low_latency_gemm_plugin and fp8_context_fmha work on fp8 weights only",
    ),
    "SmoothQuant without alpha": (
        spec_with(quantization={"weights": "smoothquant"}),
        "weights: smoothquant needs smoothquant_alpha",
    ),
    "alpha without SmoothQuant": (
        spec_with(quantization={"smoothquant_alpha": 0.5}),
        "smoothquant_alpha is set but weights is none",
    ),
    "version read as a number": (
        spec_with(tensorrt_llm_version=1.2),
        'quote the version (1.2 was read as a number): tensorrt_llm_version: "1.2.0"',
    ),
    "another TensorRT-LLM release": (
        spec_with(tensorrt_llm_version="0.15.0"),
        "tensorrt_llm_version: String should match pattern",
    ),
    "GPU outside the catalogue": (
        spec_with(gpu={"type": "a100"}),
        "gpu.type: unknown GPU type 'a100'; use one of v100-32gb, t4, a10, a100-40gb,",
    ),
    "architecture outside the llama example": (
        spec_with(checkpoint={"architecture": "GPT2LMHeadModel"}),
        "checkpoint.architecture: Input should be 'LlamaForCausalLM' or 'MistralForCausalLM'",
    ),
}


@pytest.mark.parametrize(("data", "message"), BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_spec_is_refused_with_the_fix(tmp_path: Path, data: dict[str, Any], message: str) -> None:
    path = write_spec(tmp_path, data)
    with pytest.raises(SpecError) as error:
        load_spec(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


@pytest.mark.parametrize("version", ["1.2.0", "1.2.0rc6", "1.2.0rc6.post3", "1.2.1.post1", "1.2.0.dev2025120200"])
def test_every_pep_440_spelling_of_a_1_2_release_is_accepted(tmp_path: Path, version: str) -> None:
    assert load_spec(write_spec(tmp_path, spec_with(tensorrt_llm_version=version))).tensorrt_llm_version == version


def test_integer_quantization_is_refused_on_sm_100_only_up_to_sm_120(tmp_path: Path) -> None:
    """builder.py: `if get_sm_version() >= 100 and get_sm_version() < 120`; the RTX PRO 6000 is sm_120."""
    spec = load_spec(write_spec(tmp_path, spec_with(quantization={"weights": "int8_weight_only"},
                                                    gpu={"type": "rtx-pro-6000"})))  # fmt: skip
    assert spec.gpu.gpu.sm == "sm_120"


def test_valid_spec_loads(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, VALID))
    assert (spec.engine_subfolder, spec.workers, spec.gemm_plugin) == ("test-engine", 1, "float16")


def test_name_must_match_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "other-name.yaml"
    path.write_text(yaml.safe_dump(VALID))
    with pytest.raises(SpecError, match="name 'test-engine' must equal the file name"):
        load_spec(path)


def test_spec_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- name: x\n")
    with pytest.raises(SpecError, match="a spec is a YAML mapping"):
        load_spec(path)


# -- draft-target pairs ----------------------------------------------------------------------------

TARGET = spec_with(
    name="target",
    checkpoint={"params_billion": 70.0},
    quantization={"weights": "fp8", "kv_cache": "fp8"},
    build={"fp8_context_fmha": True},
    speculative={"mode": "draft_tokens_external", "max_draft_len": 10, "draft": "draft"},
    gpu={"type": "h200"},
)
DRAFT = spec_with(
    name="draft",
    checkpoint={"params_billion": 1.2},
    quantization={"weights": "fp8", "kv_cache": "fp8"},
    build={"fp8_context_fmha": True},
    gpu={"type": "h200"},
)


def test_target_loads_its_draft(tmp_path: Path) -> None:
    target = load_spec(write_spec(tmp_path, TARGET))
    write_spec(tmp_path, DRAFT)
    draft = load_draft(target, tmp_path)
    assert draft is not None and draft.name == "draft"


def test_missing_draft_spec_is_refused(tmp_path: Path) -> None:
    target = load_spec(write_spec(tmp_path, TARGET))
    with pytest.raises(SpecError, match=r"speculative\.draft 'draft' has no spec at"):
        load_draft(target, tmp_path)


BAD_PAIRS = {
    "draft for another GPU": (spec_with(DRAFT, gpu={"type": "h100-80gb"}), "both are served by one pod"),
    "draft with a shorter context": (spec_with(DRAFT, build={"max_seq_len": 1536}), "must reach the target's"),
    "speculative draft": (
        spec_with(DRAFT, speculative={"mode": "draft_tokens_external", "max_draft_len": 4, "draft": "x"}),
        "a draft engine cannot itself be speculative",
    ),
    "pair too big for one GPU": (
        spec_with(DRAFT, checkpoint={"params_billion": 60.0}),
        "GB of weights per GPU exceed the 127 GB budget of a h200",
    ),
}


@pytest.mark.parametrize(("draft", "message"), BAD_PAIRS.values(), ids=BAD_PAIRS.keys())
def test_bad_draft_pairing_is_refused(tmp_path: Path, draft: dict[str, Any], message: str) -> None:
    target = EngineSpec.model_validate(TARGET)
    with pytest.raises(SpecError, match=message):
        check_draft_pairing(target, EngineSpec.model_validate(draft))


# -- checkpoint specs: no build ---------------------------------------------------------------------

CHECKPOINT_SPECS = ENGINES / "checkpoint"
VALID_CHECKPOINT: dict[str, Any] = {
    "name": "test-checkpoint",
    "tensorrt_llm_version": "1.2.0",
    "serve": "checkpoint",
    "checkpoint": {"repo": "org/model-fp8", "architecture": "LlamaForCausalLM", "params_billion": 8.0},
    "quantization": "fp8",
    "limits": {"max_batch_size": 16, "max_seq_len": 8192},
    "gpu": {"type": "h100-80gb"},
}


@pytest.mark.parametrize("path", sorted(CHECKPOINT_SPECS.glob("*.yaml")), ids=lambda path: path.stem)
def test_shipped_checkpoint_specs_load_and_name_their_serving_settings(path: Path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, CheckpointSpec)
    settings = serve_settings(spec)
    assert settings["LLM_BACKEND"] == "tensorrt_llm_llmapi" and settings["LLM_MODEL_REPO"] == spec.checkpoint.repo
    assert settings["LLM_MAX_SEQ_LEN"] == str(spec.limits.max_seq_len)


def test_the_70b_checkpoint_spec_serves_fp8_with_an_eagle3_head() -> None:
    spec = load_spec(CHECKPOINT_SPECS / "llama-3.3-70b-instruct-fp8-checkpoint-h200.yaml")
    assert serve_settings(spec) == {
        "LLM_BACKEND": "tensorrt_llm_llmapi",
        "LLM_MODEL_REPO": "nvidia/Llama-3.3-70B-Instruct-FP8",
        "LLM_TENSOR_PARALLEL_SIZE": "1",
        "LLM_MAX_BATCH_SIZE": "32",
        "LLM_MAX_SEQ_LEN": "131072",
        "LLM_MAX_NUM_TOKENS": "8192",
        "LLM_DRAFT_MODEL_REPO": "yuhuili/EAGLE3-LLaMA3.3-Instruct-70B",
        "LLM_SPECULATIVE_MODE": "eagle3",
        "LLM_MAX_DRAFT_LEN": "3",
    }


def test_an_engine_spec_names_its_published_engine_and_draft() -> None:
    target = load_spec(ENGINES / "llama-3.3-70b-instruct-fp8-h200.yaml")
    assert isinstance(target, EngineSpec)
    settings = serve_settings(target, load_draft(target, ENGINES))
    assert (settings["LLM_BACKEND"], settings["LLM_SUBFOLDER"]) == ("tensorrt_llm", "llama-3.3-70b-instruct-fp8-h200")
    assert settings["LLM_DRAFT_SUBFOLDER"] == "llama-3.2-1b-instruct-fp8-draft-h200"


BAD_CHECKPOINT_SPECS = {
    "fp8 checkpoint on an A100": (
        spec_with(VALID_CHECKPOINT, gpu={"type": "a100-80gb"}),
        "an FP8 checkpoint needs sm_89 or newer but a100-80gb is sm_80",
    ),
    "tensor parallel without the GPUs": (
        spec_with(VALID_CHECKPOINT, tensor_parallel=2),
        "tensor_parallel (2) must equal gpu.count (1)",
    ),
    "70B in bf16 on one H100": (
        spec_with(VALID_CHECKPOINT, quantization="none", checkpoint={"params_billion": 70.6}),
        "70.6B parameters at 16 bits need ~141 GB per GPU",
    ),
    "a build section in a checkpoint spec": (
        spec_with(VALID_CHECKPOINT, build={"max_batch_size": 8}),
        "unknown key 'build'",
    ),
    "speculation without a draft": (
        spec_with(VALID_CHECKPOINT, speculative={"mode": "eagle3", "max_draft_len": 3}),
        "'speculative.draft_repo' is required",
    ),
}


@pytest.mark.parametrize(("data", "message"), BAD_CHECKPOINT_SPECS.values(), ids=BAD_CHECKPOINT_SPECS.keys())
def test_bad_checkpoint_spec_is_refused_with_the_fix(tmp_path: Path, data: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        load_spec(write_spec(tmp_path, data))
