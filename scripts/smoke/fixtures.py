"""What the smoke checks run on: a tiny Llama checkpoint and four engines built from it.

`tiny_checkpoint` writes a 2-layer Llama (hidden 256, random weights, seed 0) in bf16 with the embedded
SmolLM2's tokenizer, as a Hugging Face folder. `build_engines` converts it once and runs trtllm-build
for each ENGINE_BUILDS variant with the same command builders as scripts/build_engine.py (a continuous-KV
engine, which specs refuse, by editing the generated command), copies the tokenizer next to each engine
and stamps build_meta.json, so the server can load them as it loads published engines.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from model import engine_meta
from model.artifacts import embedded_model_dir
from scripts.engine_spec import BuildPaths, EngineSpec, build_command, checkpoint_command
from scripts.smoke.engine_checks import (
    ENGINE_BUILDS,
    TINY_DRAFT_LEN,
    TINY_MAX_INPUT_LEN,
    TINY_MAX_NUM_TOKENS,
    TINY_MAX_SEQ_LEN,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def tiny_checkpoint(work_dir: Path) -> Path:
    """A Hugging Face folder a few MB large: every code path of a Llama, none of its knowledge."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = work_dir / "tiny-llama"
    if (folder / "config.json").is_file():
        return folder
    source = embedded_model_dir(work_dir / "cache")
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, torch_dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.copy(source / "generation_config.json", folder / "generation_config.json")
    return folder


def tiny_spec(variant: dict[str, object]) -> EngineSpec:
    """An engine spec for the tiny checkpoint (only the command builders read it)."""
    build = {"max_batch_size": 8, "max_input_len": TINY_MAX_INPUT_LEN, "max_seq_len": TINY_MAX_SEQ_LEN,
             "max_num_tokens": TINY_MAX_NUM_TOKENS}  # fmt: skip
    speculative = {}
    if variant.get("speculative"):
        speculative = {"mode": "draft_tokens_external", "max_draft_len": TINY_DRAFT_LEN, "draft": "tiny-llama"}
    if variant.get("paged_context_fmha") is False:  # without chunked context prompts must fit max_num_tokens
        build.update(paged_context_fmha=False, max_input_len=TINY_MAX_NUM_TOKENS)
    return EngineSpec.model_validate({
        "name": "tiny-llama", "tensorrt_llm_version": "1.2.0", "dtype": "bfloat16", "build": build,
        "checkpoint": {"repo": "local/tiny-llama", "architecture": "LlamaForCausalLM", "params_billion": 0.03},
        "speculative": speculative, "gpu": {"type": "a100-80gb"}, "publish": {"repo": "local/tiny-llama"},
    })  # fmt: skip


def build_engines(
    work_dir: Path, checkpoint: Path, examples: Path, run: Callable[[list[str], Path], None]
) -> dict[str, Path]:
    """ENGINE_BUILDS name -> engine folder; `run(argv, log)` runs one tool and raises on failure."""
    engines: dict[str, Path] = {}
    for name, variant in ENGINE_BUILDS.items():
        paths = BuildPaths(work_dir / "engines" / name, examples)
        paths.hf_dir.parent.mkdir(parents=True, exist_ok=True)
        if not paths.hf_dir.exists():
            paths.hf_dir.symlink_to(checkpoint)
        spec = tiny_spec(variant)
        if not (paths.engine_dir / "config.json").is_file():
            run(checkpoint_command(spec, paths), work_dir / "logs" / f"{name}-convert.log")
            command = build_command(spec, paths)
            if variant.get("kv_cache_type") == "continuous":
                command[command.index("--kv_cache_type") + 1] = "continuous"
            run(command, work_dir / "logs" / f"{name}-build.log")
        for file in TOKENIZER_FILES:
            if (checkpoint / file).is_file():
                shutil.copy(checkpoint / file, paths.engine_dir / file)
        _stamp(paths.engine_dir, spec)
        engines[name] = paths.engine_dir
    return engines


def _stamp(engine_dir: Path, spec: EngineSpec) -> None:
    capability = engine_meta.gpu_compute_capability()
    assert capability is not None, "the smoke test needs a GPU"
    data = spec.model_dump(mode="json")
    meta = engine_meta.BuildMeta(
        engine_name=spec.name, spec_file="(smoke test)", spec=data, spec_sha256=engine_meta.spec_sha256(data),
        tensorrt_llm_version=engine_meta.installed_trtllm_version() or "unknown",
        tensorrt_version=engine_meta.installed_tensorrt_version(), gpu_name=engine_meta.gpu_name(),
        compute_capability=capability, source_repo="local/tiny-llama", source_revision="random-weights-seed-0",
        built_at=datetime.now(UTC),
    )  # fmt: skip
    engine_meta.write_build_meta(engine_dir, meta)


def run_tool(argv: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited with {result.returncode}; see {log}")
