"""What a prebuilt TensorRT-LLM engine was built for, and the load-time check that refuses a mismatch.

A serialized TensorRT engine runs only on the GPU architecture (compute capability) and the
TensorRT-LLM/TensorRT versions it was built with; deserializing it anywhere else fails deep inside
TensorRT or, worse, seems to work and crashes later. So the build (`scripts/build_engine.py`, the
writer) records those facts in `build_meta.json` next to the engine, and the Truss (the reader)
calls `verify_engine_compatible(engine_dir)` before it touches the engine. `BuildMeta` is the one
schema both sides share; this module is inside `model-truss/` because only that folder ships in
the serving image.

The probes (installed TensorRT-LLM version from package metadata; GPU compute capability and count
from torch, imported lazily) can be replaced by arguments, so the check runs in tests without a GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.errors import EngineMismatchError

logger = logging.getLogger(__name__)

BUILD_META_FILE = "build_meta.json"
ENGINE_CONFIG_FILE = "config.json"  # written by trtllm-build next to rank<N>.engine

ComputeCapability = tuple[int, int]


class BuildMeta(BaseModel):
    """Contents of `build_meta.json`: the build's spec and the machine and versions that built it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    engine_name: str = Field(description="The spec's `name`; also the engines/<name>.yaml file to rebuild from.")
    spec_file: str = Field(description="Spec path relative to the repo root, e.g. engines/mistral-7b-fp16.yaml.")
    spec: dict[str, Any] = Field(description="The validated spec, as plain JSON data.")
    spec_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tensorrt_llm_version: str
    tensorrt_version: str | None = None
    gpu_name: str
    compute_capability: ComputeCapability
    tp_size: int = Field(default=1, ge=1)
    pp_size: int = Field(default=1, ge=1)
    source_repo: str = Field(description="Hub repo of the checkpoint the engine was compiled from.")
    source_revision: str = Field(description="The checkpoint's resolved commit, even when the spec said `main`.")
    built_at: datetime

    @property
    def sm(self) -> str:
        return sm_name(self.compute_capability)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def rebuild_hint(self) -> str:
        return f"rebuild it with `python scripts/build_engine.py {self.spec_file}`"


def sm_name(capability: ComputeCapability) -> str:
    """(8, 0) -> "sm_80", the name TensorRT and CUDA use for an architecture."""
    return f"sm_{capability[0]}{capability[1]}"


def spec_sha256(spec: Mapping[str, Any]) -> str:
    """Hash of the spec's canonical JSON, so two engines built from equal specs share it."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_build_meta(engine_dir: Path, meta: BuildMeta) -> Path:
    path = Path(engine_dir) / BUILD_META_FILE
    path.write_text(meta.model_dump_json(indent=2) + "\n")
    return path


def read_build_meta(engine_dir: Path) -> BuildMeta:
    """Parse `build_meta.json`; a missing or malformed file is a mismatch, never a silent pass."""
    path = Path(engine_dir) / BUILD_META_FILE
    if not path.is_file():
        raise EngineMismatchError(
            f"{path} is missing, so this engine's GPU architecture and TensorRT-LLM version are unknown; "
            "build engines with `python scripts/build_engine.py engines/<spec>.yaml`, which writes it"
        )
    try:
        return BuildMeta.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise EngineMismatchError(
            f"{path} is not a valid build record ({exc.error_count()} problems, first: {exc.errors()[0]['msg']}); "
            "rebuild the engine with `python scripts/build_engine.py engines/<spec>.yaml`"
        ) from exc


def installed_trtllm_version() -> str | None:
    """The installed TensorRT-LLM version, from package metadata (no CUDA initialisation)."""
    return _installed_version("tensorrt_llm")


def installed_tensorrt_version() -> str | None:
    return _installed_version("tensorrt", "tensorrt_cu12", "tensorrt_cu13")


def _installed_version(*distributions: str) -> str | None:
    """The first of these distributions that is installed (names are normalised: `-` or `_` alike)."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def gpu_compute_capability() -> ComputeCapability | None:
    """Compute capability of GPU 0, None without one. torch comes with TensorRT-LLM, so it is here wherever
    an engine can run; the version check runs first, so it is only imported once TensorRT-LLM is known."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return (major, minor)


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def verify_engine_compatible(
    engine_dir: Path,
    *,
    trtllm_version: Callable[[], str | None] = installed_trtllm_version,
    compute_capability: Callable[[], ComputeCapability | None] = gpu_compute_capability,
    visible_gpus: Callable[[], int] = gpu_count,
) -> None:
    """Refuse, before TensorRT deserializes anything, an engine this process cannot run.

    Checks, in order: the build record and the engine config exist and agree; the installed
    TensorRT-LLM version equals the building one; this GPU's compute capability equals the
    building GPU's; enough GPUs are visible for the engine's tensor x pipeline parallel ranks,
    and every rank's engine file is present. Raises `EngineMismatchError` naming what to rebuild.
    """
    engine_dir = Path(engine_dir)
    meta = read_build_meta(engine_dir)
    check_engine_files(engine_dir, meta)

    installed = trtllm_version()
    if installed is None:
        raise EngineMismatchError(
            f"TensorRT-LLM is not installed but {engine_dir} is a TensorRT-LLM engine; serve it from an image with "
            f"tensorrt_llm=={meta.tensorrt_llm_version}, or use backend torch"
        )
    if installed != meta.tensorrt_llm_version:
        raise EngineMismatchError(
            f"engine '{meta.engine_name}' was built with TensorRT-LLM {meta.tensorrt_llm_version} but "
            f"{installed} is installed; {meta.rebuild_hint} with TensorRT-LLM {installed}, "
            f"or serve it with tensorrt_llm=={meta.tensorrt_llm_version}"
        )

    capability = compute_capability()
    if capability is None:
        raise EngineMismatchError(
            f"no CUDA GPU is visible but engine '{meta.engine_name}' needs a {meta.gpu_name} ({meta.sm}); "
            "schedule the pod on a GPU node (nvidia.com/gpu limit) or use backend torch"
        )
    if tuple(capability) != tuple(meta.compute_capability):
        raise EngineMismatchError(
            f"engine '{meta.engine_name}' was built on a {meta.gpu_name} ({meta.sm}) but this GPU is "
            f"{sm_name(capability)}; {meta.rebuild_hint} on a node with this GPU (set `gpu:` in the spec to match), "
            f"or schedule this deployment on {meta.sm} nodes"
        )

    available = visible_gpus()
    if available < meta.world_size:
        raise EngineMismatchError(
            f"engine '{meta.engine_name}' has {meta.world_size} ranks (tp_size={meta.tp_size}, "
            f"pp_size={meta.pp_size}) but {available} GPU(s) are visible; request nvidia.com/gpu: {meta.world_size} "
            f"(see k8s/overlays/gke-a100x4-tp4) or rebuild with a smaller tensor_parallel in {meta.spec_file}"
        )
    logger.info(
        "engine '%s' matches this node: TensorRT-LLM %s, %s, %d rank(s)",
        meta.engine_name,
        installed,
        meta.sm,
        meta.world_size,
    )


def check_engine_files(engine_dir: Path, meta: BuildMeta) -> None:
    """`build_meta.json` must describe these engine files, not a copy left from another build."""
    engine_dir = Path(engine_dir)
    config_path = engine_dir / ENGINE_CONFIG_FILE
    if not config_path.is_file():
        raise EngineMismatchError(
            f"{config_path} is missing, so {engine_dir} is not a trtllm-build output; {meta.rebuild_hint}"
        )
    engine_config = json.loads(config_path.read_text())
    version = engine_config.get("version")
    if version is not None and version != meta.tensorrt_llm_version:
        raise EngineMismatchError(
            f"{config_path} says TensorRT-LLM {version} but {BUILD_META_FILE} says "
            f"{meta.tensorrt_llm_version}; the folder mixes two builds, {meta.rebuild_hint}"
        )
    mapping = engine_config.get("pretrained_config", {}).get("mapping", {})
    tp_size, pp_size = mapping.get("tp_size", 1), mapping.get("pp_size", 1)
    if (tp_size, pp_size) != (meta.tp_size, meta.pp_size):
        raise EngineMismatchError(
            f"{config_path} has tp_size={tp_size}, pp_size={pp_size} but {BUILD_META_FILE} "
            f"has tp_size={meta.tp_size}, pp_size={meta.pp_size}; the folder mixes two builds, {meta.rebuild_hint}"
        )
    missing = [name for name in engine_file_names(meta.world_size) if not (engine_dir / name).is_file()]
    if missing:
        raise EngineMismatchError(
            f"{engine_dir} lacks {', '.join(missing)} of a {meta.world_size}-rank engine; "
            f"download the whole engine folder or {meta.rebuild_hint}"
        )


def engine_file_names(world_size: int) -> list[str]:
    """trtllm-build writes one serialized engine per rank."""
    return [f"rank{rank}.engine" for rank in range(world_size)]
