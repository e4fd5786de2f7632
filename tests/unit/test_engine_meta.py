"""build_meta.json: written by the build, read by `load()`, which refuses engines this node cannot run."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from model import engine_meta
from model.engine_meta import BuildMeta, verify_engine_compatible, write_build_meta
from model.errors import EngineMismatchError

SPEC_FILE = "engines/llama-2-7b-int8-wo-tp4-a100.yaml"


def make_meta(**overrides: object) -> BuildMeta:
    spec = {"name": "llama-2-7b-int8-wo-tp4-a100", "dtype": "float16"}
    values: dict[str, object] = {
        "engine_name": "llama-2-7b-int8-wo-tp4-a100",
        "spec_file": SPEC_FILE,
        "spec": spec,
        "spec_sha256": engine_meta.spec_sha256(spec),
        "tensorrt_llm_version": "1.2.0",
        "tensorrt_version": "10.13.2.6",
        "gpu_name": "NVIDIA A100-SXM4-40GB",
        "compute_capability": (8, 0),
        "tp_size": 4,
        "source_repo": "meta-llama/Llama-2-7b-hf",
        "source_revision": "01c7f73d771dfac7d292323805ebc428287df4f9",
        "built_at": datetime(2025, 11, 21, 12, 0, tzinfo=UTC),
    }
    values.update(overrides)
    return BuildMeta.model_validate(values)


def write_engine(
    engine_dir: Path, meta: BuildMeta, *, config_version: str | None = None, ranks: int | None = None
) -> Path:
    """An engine folder as trtllm-build leaves it (config.json, rank<N>.engine), stamped with `meta`."""
    engine_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "version": config_version or meta.tensorrt_llm_version,
        "pretrained_config": {"mapping": {"world_size": meta.world_size, "tp_size": meta.tp_size, "pp_size": 1}},
        "build_config": {"max_batch_size": 64, "max_input_len": 2048, "max_seq_len": 4096},
    }
    (engine_dir / "config.json").write_text(json.dumps(config))
    for name in engine_meta.engine_file_names(meta.world_size if ranks is None else ranks):
        (engine_dir / name).write_bytes(b"serialized engine")
    write_build_meta(engine_dir, meta)
    return engine_dir


def probes(version: str | None = "1.2.0", capability: tuple[int, int] | None = (8, 0), gpus: int = 4) -> dict:
    return {
        "trtllm_version": lambda: version,
        "compute_capability": lambda: capability,
        "visible_gpus": lambda: gpus,
    }


@pytest.fixture
def engine_dir(tmp_path: Path) -> Path:
    return write_engine(tmp_path / "engine", make_meta())


def test_matching_engine_passes(engine_dir: Path) -> None:
    verify_engine_compatible(engine_dir, **probes())


def test_build_meta_round_trips_through_json(engine_dir: Path) -> None:
    written = json.loads((engine_dir / "build_meta.json").read_text())
    assert written["compute_capability"] == [8, 0]
    assert written["tensorrt_llm_version"] == "1.2.0"
    assert written["source_revision"] == "01c7f73d771dfac7d292323805ebc428287df4f9"
    assert engine_meta.read_build_meta(engine_dir) == make_meta()


def test_spec_hash_ignores_key_order_but_not_values() -> None:
    assert engine_meta.spec_sha256({"a": 1, "b": [1, 2]}) == engine_meta.spec_sha256({"b": [1, 2], "a": 1})
    assert engine_meta.spec_sha256({"a": 1}) != engine_meta.spec_sha256({"a": 2})


def test_other_gpu_architecture_is_refused_with_what_to_rebuild(engine_dir: Path) -> None:
    with pytest.raises(EngineMismatchError) as error:
        verify_engine_compatible(engine_dir, **probes(capability=(9, 0)))
    message = str(error.value)
    assert "sm_80" in message and "sm_90" in message
    assert f"python scripts/build_engine.py {SPEC_FILE}" in message


def test_other_tensorrt_llm_version_is_refused_with_both_versions(engine_dir: Path) -> None:
    with pytest.raises(EngineMismatchError) as error:
        verify_engine_compatible(engine_dir, **probes(version="1.1.0"))
    message = str(error.value)
    assert "built with TensorRT-LLM 1.2.0 but 1.1.0 is installed" in message
    assert f"python scripts/build_engine.py {SPEC_FILE}" in message


def test_version_is_checked_before_the_gpu(engine_dir: Path) -> None:
    """The GPU probe may initialise CUDA; a wrong version must be reported without touching it."""

    def no_gpu_probe() -> tuple[int, int]:
        raise AssertionError("the GPU was probed before the version check")

    with pytest.raises(EngineMismatchError, match=r"1.1.0 is installed"):
        verify_engine_compatible(
            engine_dir, trtllm_version=lambda: "1.1.0", compute_capability=no_gpu_probe, visible_gpus=lambda: 4
        )


def test_missing_tensorrt_llm_is_refused_by_the_real_probe(engine_dir: Path) -> None:
    """TensorRT-LLM is not installed here, so the default version probe itself must say so."""
    assert engine_meta.installed_trtllm_version() is None
    with pytest.raises(EngineMismatchError, match=r"TensorRT-LLM is not installed.*tensorrt_llm==1.2.0"):
        verify_engine_compatible(engine_dir)


def test_no_gpu_is_refused(engine_dir: Path) -> None:
    with pytest.raises(EngineMismatchError, match=r"no CUDA GPU is visible.*sm_80"):
        verify_engine_compatible(engine_dir, **probes(capability=None))


def test_tensor_parallel_engine_needs_one_gpu_per_rank(engine_dir: Path) -> None:
    with pytest.raises(EngineMismatchError) as error:
        verify_engine_compatible(engine_dir, **probes(gpus=1))
    message = str(error.value)
    assert "4 ranks (tp_size=4, pp_size=1) but 1 GPU(s) are visible" in message
    assert "nvidia.com/gpu: 4" in message and "gke-a100x4-tp4" in message


def test_missing_build_meta_is_refused(tmp_path: Path) -> None:
    engine_dir = write_engine(tmp_path / "engine", make_meta())
    (engine_dir / "build_meta.json").unlink()
    with pytest.raises(EngineMismatchError, match=r"build_meta.json is missing.*scripts/build_engine.py"):
        verify_engine_compatible(engine_dir, **probes())


def test_malformed_build_meta_is_refused(engine_dir: Path) -> None:
    (engine_dir / "build_meta.json").write_text(json.dumps({"engine_name": "x"}))
    with pytest.raises(EngineMismatchError, match=r"not a valid build record"):
        verify_engine_compatible(engine_dir, **probes())


def test_missing_rank_file_is_refused(tmp_path: Path) -> None:
    engine_dir = write_engine(tmp_path / "engine", make_meta(), ranks=2)
    with pytest.raises(EngineMismatchError, match=r"lacks rank2.engine, rank3.engine of a 4-rank engine"):
        verify_engine_compatible(engine_dir, **probes())


def test_build_meta_from_another_build_is_refused(tmp_path: Path) -> None:
    engine_dir = write_engine(tmp_path / "engine", make_meta(), config_version="1.1.0")
    with pytest.raises(EngineMismatchError, match=r"config.json says TensorRT-LLM 1.1.0 .* mixes two builds"):
        verify_engine_compatible(engine_dir, **probes())


def test_parallel_layout_must_match_the_engine_config(tmp_path: Path) -> None:
    engine_dir = write_engine(tmp_path / "engine", make_meta())
    write_build_meta(engine_dir, make_meta(tp_size=2))
    with pytest.raises(EngineMismatchError, match=r"tp_size=4, pp_size=1 but build_meta.json has tp_size=2"):
        verify_engine_compatible(engine_dir, **probes())
