"""What a TensorRT-LLM engine folder says, and what follows from it for this server.

`EngineSpec.read` parses the `config.json` trtllm-build wrote (build limits, parallel layout, draft
support); `engine_limits` lowers those limits by the settings and refuses settings above them;
`token_ids` takes the end, pad and stop ids from the tokenizer and checks them against the engine's
vocabulary; `launch_layout` says which MPI rank this process is and whether the Executor runs in
orchestrator mode (see the package docstring's Multi-GPU section).

Checked against NVIDIA/TensorRT-LLM through the code index:
- examples/run.py and examples/utils.py (pad_id falls back to end_id), _utils.py (000a01de, 1.0.0rc4).
- Draft-target: models/modeling_utils.py and builder.py (`SpeculativeDecodingMode` IntFlag,
  DRAFT_TOKENS_EXTERNAL = 2; `build_config.max_draft_len` / `speculative_decoding_mode` in config.json).
Only against the double (tests/doubles/trtllm.py): how config.json spells the draft-target mode (the int
and the name are both accepted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from model.artifacts import Artifacts
from model.backends.base import Limits
from model.errors import ArtifactError, EngineMismatchError
from model.prompting import stop_token_ids
from model.settings import ServerSettings, SettingsError

DRAFT_TOKENS_EXTERNAL = 2  # SpeculativeDecodingMode.DRAFT_TOKENS_EXTERNAL, an IntFlag (NONE = 1) in config.json


@dataclass(frozen=True)
class EngineSpec:
    """What trtllm-build wrote to the engine's `config.json`: build limits and parallel layout."""

    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    vocab_size: int
    tp_size: int
    pp_size: int
    world_size: int  # ranks, one per GPU
    max_draft_len: int = 0  # draft tokens one target step can verify (trtllm-build --max_draft_len)
    draft_tokens_external: bool = False  # built with --speculative_decoding_mode draft_tokens_external

    @classmethod
    def read(cls, engine_dir: Path) -> EngineSpec:
        path = Path(engine_dir) / "config.json"
        try:
            config = json.loads(path.read_text())
            build, pretrained = config["build_config"], config["pretrained_config"]
            mapping = pretrained.get("mapping", {})
            tp_size, pp_size = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
            return cls(
                max_batch_size=int(build["max_batch_size"]),
                max_input_len=int(build["max_input_len"]),
                max_seq_len=int(build["max_seq_len"]),
                vocab_size=int(pretrained["vocab_size"]),
                tp_size=tp_size,
                pp_size=pp_size,
                world_size=int(mapping.get("world_size", tp_size * pp_size)),
                max_draft_len=int(build.get("max_draft_len") or 0),
                draft_tokens_external=_is_draft_tokens_external(build.get("speculative_decoding_mode")),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(
                f"{path} is not a trtllm-build engine config ({type(exc).__name__}: {exc}); point model_repo "
                "(and subfolder) at the folder trtllm-build wrote, with config.json and rank<N>.engine"
            ) from exc


def _is_draft_tokens_external(mode: Any) -> bool:
    """The IntFlag's value, or its name should a TensorRT-LLM version write the enum as a string."""
    return mode == DRAFT_TOKENS_EXTERNAL or "draft_tokens_external" in str(mode).lower()


def engine_limits(settings: ServerSettings, engine: EngineSpec) -> Limits:
    """The engine's build limits, lowered by the settings; settings above the engine are refused."""
    max_batch_size = _within_engine("max_batch_size", settings.max_batch_size, engine.max_batch_size)
    max_seq_len = _within_engine("max_seq_len", settings.max_seq_len, engine.max_seq_len)
    max_input_len = _within_engine("max_input_len", settings.max_input_len, engine.max_input_len)
    max_input_len = min(max_input_len, max_seq_len - 1)  # leave room for at least one new token
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


@dataclass(frozen=True)
class TokenIds:
    end_id: int
    pad_id: int
    stop_ids: frozenset[int]  # end_id included


def token_ids(tokenizer: PreTrainedTokenizerBase, artifacts: Artifacts, engine: EngineSpec) -> TokenIds:
    """end_id = the tokenizer's EOS; pad_id = its pad token, else end_id (as examples/utils.py does)."""
    stops = stop_token_ids(tokenizer, artifacts.model_dir, artifacts.tokenizer_dir)
    end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(stops, default=None)
    if end_id is None:
        raise ArtifactError(
            f"the tokenizer at {artifacts.tokenizer_dir} has no EOS token and no generation_config.json lists one, "
            "so generation could never stop; use the tokenizer the engine was built from (tokenizer_repo)"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    outside = sorted(t for t in {end_id, *stops} if not 0 <= t < engine.vocab_size)  # pad may be an added token
    if outside:
        raise EngineMismatchError(
            f"special token ids {outside} of the tokenizer at {artifacts.tokenizer_dir} are outside this engine's "
            f"vocabulary ({engine.vocab_size}), so it is not the engine's tokenizer; set tokenizer_repo to the "
            "model the engine was built from"
        )
    return TokenIds(int(end_id), int(pad_id), frozenset({int(end_id), *stops}))


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
