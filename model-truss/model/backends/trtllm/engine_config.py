"""What a TensorRT-LLM engine folder says, and the launch layout that follows from it.

`EngineSpec.read` parses the `config.json` trtllm-build wrote (build limits, plugin switches, parallel
layout, speculative mode, the model's KV-cache shape); `launch_layout` says which MPI
rank this process is and whether the Executor runs in orchestrator mode (see the package
docstring's Multi-GPU section). What the C++ runtime derives from these fields, or refuses, is in
`runtime_rules`.

Checked against NVIDIA/TensorRT-LLM through the code index:
- _utils.py (000a01de, 1.0.0rc4): mpi_rank, mpi_world_size.
- tensorrt_llm/builder.py (008b2b8d): `BuildConfig` fields and `to_dict` (kv_cache_type written as its enum
  name, plugin_config as a dict), `build()` raising max_seq_len by max_draft_len for every speculative mode
  ("Maximum number of generated tokens remains the same"); models/modeling_utils.py (`SpeculativeDecodingMode`
  IntFlag: NONE 1, DRAFT_TOKENS_EXTERNAL 2, MEDUSA 4, LOOKAHEAD_DECODING 8, EXPLICIT_DRAFT_TOKENS 16, EAGLE 32).
Only against the double (tests/doubles/trtllm.py): how config.json spells the speculative mode (the int and
the name are both accepted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import ArtifactError, EngineMismatchError

# SpeculativeDecodingMode, an IntFlag that config.json stores as its int value.
SPECULATIVE_MODES = {1: "none", 2: "draft_tokens_external", 4: "medusa", 8: "lookahead_decoding",
                     16: "explicit_draft_tokens", 32: "eagle"}  # fmt: skip
KV_BYTES = {"FP8": 1, "INT8": 1}  # KV-cache element size by kv_cache_quant_algo; else the model dtype's
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class EngineSpec:
    """What trtllm-build wrote to the engine's `config.json`."""

    max_batch_size: int
    max_input_len: int
    max_seq_len: int  # as config.json says, i.e. as the runtime sees it (raised by max_draft_len: built_max_seq_len)
    max_num_tokens: int
    vocab_size: int
    tp_size: int
    pp_size: int
    world_size: int  # ranks, one per GPU
    kv_bytes_per_token: int  # one token's KV cache on one rank: 2 (K, V) x layers x kv heads x head size x bytes
    context_fmha: bool = True
    paged_context_fmha: bool = False
    remove_input_padding: bool = True
    paged_kv_cache: bool = True
    gpt_attention_plugin: bool = True
    gather_context_logits: bool = False
    max_draft_len: int = 0  # draft tokens one target step can verify (trtllm-build --max_draft_len)
    speculative_mode: str = "none"  # a SPECULATIVE_MODES value

    @property
    def draft_tokens_external(self) -> bool:
        return self.speculative_mode == "draft_tokens_external"

    @property
    def built_max_seq_len(self) -> int:
        """The max_seq_len trtllm-build was given: a speculative build adds max_draft_len to what it writes."""
        return self.max_seq_len - (self.max_draft_len if self.speculative_mode != "none" else 0)

    @classmethod
    def read(cls, engine_dir: Path) -> EngineSpec:
        path = Path(engine_dir) / "config.json"
        try:
            config = json.loads(path.read_text())
            build, pretrained = config["build_config"], config["pretrained_config"]
            plugins = build.get("plugin_config") or {}
            mapping = pretrained.get("mapping", {})
            tp_size, pp_size = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
            return cls(
                max_batch_size=int(build["max_batch_size"]),
                max_input_len=int(build["max_input_len"]),
                max_seq_len=int(build["max_seq_len"]),
                max_num_tokens=int(build["max_num_tokens"]),
                vocab_size=int(pretrained["vocab_size"]),
                tp_size=tp_size,
                pp_size=pp_size,
                world_size=int(mapping.get("world_size", tp_size * pp_size)),
                kv_bytes_per_token=_kv_bytes_per_token(pretrained, tp_size, pp_size),
                context_fmha=bool(plugins.get("context_fmha", True)),
                paged_context_fmha=bool(plugins.get("use_paged_context_fmha", False)),
                remove_input_padding=bool(plugins.get("remove_input_padding", True)),
                paged_kv_cache=_paged_kv_cache(build, plugins),
                gpt_attention_plugin=plugins.get("gpt_attention_plugin") not in (None, "disable"),
                gather_context_logits=bool(build.get("gather_context_logits", False)),
                max_draft_len=int(build.get("max_draft_len") or 0),
                speculative_mode=_speculative_mode(build.get("speculative_decoding_mode")),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(
                f"{path} is not a trtllm-build engine config ({type(exc).__name__}: {exc}); point model_repo "
                "(and subfolder) at the folder trtllm-build wrote, with config.json and rank<N>.engine"
            ) from exc


def _speculative_mode(mode: Any) -> str:
    """The IntFlag's value, or its name should a TensorRT-LLM version write the enum as a string."""
    if mode is None:
        return "none"
    if isinstance(mode, int):
        if mode not in SPECULATIVE_MODES:
            raise ValueError(f"unknown speculative_decoding_mode {mode}")
        return SPECULATIVE_MODES[mode]
    name = str(mode).lower().removeprefix("speculativedecodingmode.")
    if name not in SPECULATIVE_MODES.values():
        raise ValueError(f"unknown speculative_decoding_mode {mode!r}")
    return name


def _paged_kv_cache(build: dict[str, Any], plugins: dict[str, Any]) -> bool:
    kv_cache_type = build.get("kv_cache_type")
    if kv_cache_type is not None:
        return str(kv_cache_type).upper() == "PAGED"
    return bool(plugins.get("paged_kv_cache", True))


def _kv_bytes_per_token(pretrained: dict[str, Any], tp_size: int, pp_size: int) -> int:
    heads = int(pretrained["num_attention_heads"])
    kv_heads = int(pretrained.get("num_key_value_heads") or heads)
    head_size = int(pretrained.get("head_size") or int(pretrained["hidden_size"]) // heads)
    layers = -(-int(pretrained["num_hidden_layers"]) // pp_size)  # ceil: the first ranks get the extra layers
    kv_algo = (pretrained.get("quantization") or {}).get("kv_cache_quant_algo")
    element = KV_BYTES.get(str(kv_algo).upper(), DTYPE_BYTES.get(pretrained.get("dtype", "float16"), 2))
    return 2 * layers * max(1, kv_heads // tp_size) * head_size * element


def launch_layout(spec: EngineSpec) -> tuple[int, bool]:
    """(this process's MPI rank, orchestrator mode?) for the engine's ranks and how we were launched."""
    from tensorrt_llm._utils import mpi_rank, mpi_world_size

    world = mpi_world_size()
    if world == spec.world_size:
        return mpi_rank(), False
    if world == 1:
        return 0, True
    raise EngineMismatchError(
        f"this process is one of {world} MPI ranks but the engine has {spec.world_size} "
        f"(tp_size={spec.tp_size}, pp_size={spec.pp_size}); launch it under `mpirun -n {spec.world_size}` "
        "(leader mode) or without mpirun (orchestrator mode: the Executor spawns its own workers)"
    )
