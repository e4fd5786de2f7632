"""scripts/build_engine.py: dry run, the stage pipeline against a recording Hub stand-in, failures, upload.

The Hub double records every `HfApi` call with its arguments and keeps a repo's files per branch, so
the tests check what would be committed, in how many commits, on top of which head. The TensorRT-LLM
tools are replaced by a runner that writes what they write (a checkpoint; config.json + rank files).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete

from model import engine_meta
from scripts import build_engine
from scripts.build_engine import EngineBuild, Machine, StageError, main, run_command
from scripts.engine_spec import BuildPaths, build_command, checkpoint_command, load_spec

ENGINES = Path(__file__).resolve().parents[2] / "engines"
TP4_SPEC = ENGINES / "llama-2-7b-int8-wo-tp4-a100.yaml"
SOURCE_SHA = "8cca527612d856d7d32bd94f8103728d614eb852"
HEAD_SHA = "0" * 40


@dataclass
class FakeHub:
    """The `HfApi` methods the build uses; a commit either applies whole or raises and changes nothing."""

    files: dict[str, set[str]] = field(default_factory=lambda: {"main": set()})
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    fail_commit: bool = False
    token: bool = True

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))

    def called(self, name: str) -> list[dict[str, Any]]:
        return [{"args": args, **kwargs} for call, args, kwargs in self.calls if call == name]

    def whoami(self) -> dict[str, str]:
        self._record("whoami")
        if not self.token:
            from huggingface_hub.errors import LocalTokenNotFoundError

            raise LocalTokenNotFoundError("Token is required")
        return {"name": "builder"}

    def model_info(self, repo_id: str, *, revision: str | None = None) -> SimpleNamespace:
        self._record("model_info", repo_id, revision=revision)
        if repo_id.startswith("llm-trtllm-server/"):  # the publish repo
            siblings = [SimpleNamespace(rfilename=name) for name in sorted(self.files[revision or "main"])]
            return SimpleNamespace(sha=HEAD_SHA, siblings=siblings)
        return SimpleNamespace(sha=SOURCE_SHA, siblings=[])

    def snapshot_download(self, repo_id: str, *, revision: str, local_dir: Path, allow_patterns: list[str]) -> str:
        self._record(
            "snapshot_download", repo_id, revision=revision, local_dir=local_dir, allow_patterns=allow_patterns
        )
        local_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model-00001-of-00002.safetensors"):
            (local_dir / name).write_text("{}")
        return str(local_dir)

    def create_repo(self, repo_id: str, *, private: bool, exist_ok: bool) -> None:
        self._record("create_repo", repo_id, private=private, exist_ok=exist_ok)

    def create_branch(self, repo_id: str, *, branch: str, exist_ok: bool) -> None:
        self._record("create_branch", repo_id, branch=branch, exist_ok=exist_ok)
        self.files.setdefault(branch, set(self.files["main"]))

    def create_commit(self, repo_id: str, *, operations: list[Any], revision: str, **kwargs: Any) -> SimpleNamespace:
        self._record("create_commit", repo_id, operations=operations, revision=revision, **kwargs)
        if self.fail_commit:
            raise OSError("connection reset while uploading rank2.engine")
        for operation in operations:
            if isinstance(operation, CommitOperationDelete):
                self.files[revision].discard(operation.path_in_repo)
            else:
                assert Path(operation.path_or_fileobj).is_file()
                self.files[revision].add(operation.path_in_repo)
        return SimpleNamespace(oid="c" * 40, commit_url=f"https://huggingface.co/{repo_id}/commit/{'c' * 40}")


@dataclass
class FakeTools:
    """Stands in for convert_checkpoint.py / quantize.py / trtllm-build: writes what they write."""

    fail_on: str | None = None
    commands: list[list[str]] = field(default_factory=list)

    def __call__(self, argv: Sequence[str], log_path: Path, echo: Callable[[str], None]) -> None:
        argv = list(argv)
        self.commands.append(argv)
        tool = "trtllm-build" if argv[0] == "trtllm-build" else Path(argv[1]).name
        if tool == self.fail_on:
            raise RuntimeError(f"{argv[0]} exited with 1; full log: {log_path}\n  | CUDA out of memory")
        output = Path(argv[argv.index("--output_dir") + 1])
        output.mkdir(parents=True)
        if tool == "trtllm-build":
            tp_size = int(argv[argv.index("--workers") + 1])
            mapping = {"world_size": tp_size, "tp_size": tp_size, "pp_size": 1}
            config = {"version": "1.2.0", "pretrained_config": {"mapping": mapping}, "build_config": {}}
            (output / "config.json").write_text(json.dumps(config))
            for name in engine_meta.engine_file_names(tp_size):
                (output / name).write_bytes(b"engine")
        else:
            (output / "config.json").write_text("{}")
        echo(f"{tool} done")


def a100_machine(capability: tuple[int, int] = (8, 0), gpus: int = 4, version: str | None = "1.2.0") -> Machine:
    return Machine(
        trtllm_version=lambda: version,
        tensorrt_version=lambda: "10.13.2.6",
        compute_capability=lambda: capability,
        gpu_name=lambda: "NVIDIA A100-SXM4-40GB",
        gpu_count=lambda: gpus,
        which=lambda tool: f"/usr/local/bin/{tool}",
    )


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """A TensorRT-LLM examples/ folder with the two scripts the build runs."""
    for script in ("models/core/llama/convert_checkpoint.py", "quantization/quantize.py"):
        (tmp_path / "examples" / script).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "examples" / script).write_text("")
    return tmp_path / "examples"


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub()


def make_build(tmp_path: Path, examples: Path, hub: FakeHub, tools: FakeTools, machine: Machine) -> EngineBuild:
    spec = load_spec(TP4_SPEC)
    paths = BuildPaths(tmp_path / "work", examples)
    return EngineBuild(spec, "engines/llama-2-7b-int8-wo-tp4-a100.yaml", paths, hub, machine, tools)


def run(build: EngineBuild, **options: bool) -> None:
    build_engine.run_stages(build.stages(**options))


# -- dry run ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(ENGINES.glob("*.yaml")), ids=lambda path: path.stem)
def test_dry_run_prints_the_generated_commands_and_runs_nothing(
    path: Path, hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    machine = Machine(*(lambda *_: pytest.fail("dry run probed the machine") for _ in range(6)))
    assert main([str(path), "--dry-run"], api=hub, machine=machine) == 0
    lines = capsys.readouterr().out.splitlines()
    spec = load_spec(path)
    paths = BuildPaths(Path("build/engines") / spec.name, build_engine.DEFAULT_EXAMPLES_DIR)
    commands = [line for line in lines if not line.startswith("#")]
    assert commands == [shlex.join(checkpoint_command(spec, paths)), shlex.join(build_command(spec, paths))]
    stages = [line.split(" ", 2)[2] for line in lines if line.startswith("# ") and "/6 " in line]
    assert stages == ["preflight", "download", "checkpoint", "build", "stamp", "publish"]
    assert hub.calls == []


def test_dry_run_ends_with_the_settings_that_serve_the_engine(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(TP4_SPEC), "--dry-run"], api=hub) == 0
    out = capsys.readouterr().out
    assert "# serve with:\n#   LLM_BACKEND=tensorrt_llm\n#   LLM_MODEL_REPO=llm-trtllm-server/Llama-2-7b-trtllm" in out


def test_a_checkpoint_spec_builds_nothing_and_prints_its_settings(hub: FakeHub, capsys: pytest.CaptureFixture[str]):
    spec = ENGINES / "checkpoint" / "mistral-7b-instruct-v0.2-checkpoint-h100.yaml"
    machine = Machine(*(lambda *_: pytest.fail("a checkpoint spec probed the machine") for _ in range(6)))
    assert main([str(spec)], api=hub, machine=machine, runner=lambda *_: pytest.fail("ran a tool")) == 0
    out = capsys.readouterr().out
    assert "no build, backend tensorrt_llm_llmapi serves mistralai/Mistral-7B-Instruct-v0.2" in out
    assert "#   LLM_BACKEND=tensorrt_llm_llmapi" in out and hub.calls == []


def test_dry_run_without_publish_has_no_publish_stage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(TP4_SPEC), "--dry-run", "--no-publish"], api=FakeHub()) == 0
    out = capsys.readouterr().out
    assert "# 5/5 stamp" in out and "publish" not in out
    assert "rank0.engine, rank1.engine, rank2.engine, rank3.engine" in out


def test_bad_spec_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nmax_batch: 8\n")
    assert main([str(path), "--dry-run"], api=FakeHub()) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and "unknown key 'max_batch'" in err
    assert len(err.strip().splitlines()) == 1


# -- a full run with stand-ins --------------------------------------------------------------------


def test_full_run_builds_stamps_and_publishes_one_commit(tmp_path: Path, examples: Path, hub: FakeHub) -> None:
    spec_name = "llama-2-7b-int8-wo-tp4-a100"
    # An older TP=8 build of this engine left rank4..7 on the Hub; a sibling engine must be kept.
    hub.files["main"] = {f"{spec_name}/rank{i}.engine" for i in range(8)} | {"other-engine/rank0.engine"}
    tools = FakeTools()
    build = make_build(tmp_path, examples, hub, tools, a100_machine())
    run(build)

    paths = build.paths
    assert tools.commands == [checkpoint_command(build.spec, paths), build_command(build.spec, paths)]
    download = hub.called("snapshot_download")[0]
    assert download["args"] == ("meta-llama/Llama-2-7b-hf",) and download["revision"] == SOURCE_SHA

    meta = json.loads((paths.engine_dir / "build_meta.json").read_text())
    assert meta["engine_name"] == spec_name and meta["spec_file"] == f"engines/{spec_name}.yaml"
    assert (meta["tensorrt_llm_version"], meta["tensorrt_version"]) == ("1.2.0", "10.13.2.6")
    assert (meta["compute_capability"], meta["gpu_name"]) == ([8, 0], "NVIDIA A100-SXM4-40GB")
    assert (meta["tp_size"], meta["pp_size"], meta["source_revision"]) == (4, 1, SOURCE_SHA)
    assert meta["spec_sha256"] == engine_meta.spec_sha256(build.spec.model_dump(mode="json"))
    assert meta["spec"]["parallelism"] == {"tensor": 4, "pipeline": 1}

    assert hub.called("create_repo") == [{"args": ("llm-trtllm-server/Llama-2-7b-trtllm",), "private": True,
                                          "exist_ok": True}]  # fmt: skip
    commits = hub.called("create_commit")
    assert len(commits) == 1
    commit = commits[0]
    assert (commit["revision"], commit["parent_commit"]) == ("main", HEAD_SHA)
    added = {op.path_in_repo for op in commit["operations"] if isinstance(op, CommitOperationAdd)}
    deleted = {op.path_in_repo for op in commit["operations"] if isinstance(op, CommitOperationDelete)}
    engine_files = {"config.json", "build_meta.json", *engine_meta.engine_file_names(4)}
    assert added == {f"{spec_name}/{name}" for name in engine_files} | {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert deleted == {f"{spec_name}/rank{i}.engine" for i in range(4, 8)}
    assert "other-engine/rank0.engine" in hub.files["main"]
    assert "Llama-2-7b-hf@" + SOURCE_SHA in commit["commit_description"]


def test_the_engine_folder_layout_is_what_the_truss_downloads(tmp_path: Path, examples: Path, hub: FakeHub) -> None:
    """model/artifacts.py fetches `<subfolder>/*` plus root tokenizer files; the engine then verifies."""
    build = make_build(tmp_path, examples, hub, FakeTools(), a100_machine())
    run(build)
    repo = tmp_path / "hub-checkout"
    for name in hub.files["main"]:
        source = build_engine.publish_files(build.spec, build.paths)[name]
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(source.read_bytes())
    engine_meta.verify_engine_compatible(
        repo / build.spec.engine_subfolder,
        trtllm_version=lambda: "1.2.0",
        compute_capability=lambda: (8, 0),
        visible_gpus=lambda: 4,
    )
    assert (repo / "tokenizer.json").is_file()


def test_branch_publish_creates_the_branch_first(tmp_path: Path, examples: Path, hub: FakeHub) -> None:
    build = make_build(tmp_path, examples, hub, FakeTools(), a100_machine())
    build.spec = build.spec.model_copy(update={"publish": build.spec.publish.model_copy(update={"revision": "rc"})})
    run(build)
    names = [name for name, _, _ in hub.calls]
    assert names.index("create_branch") < names.index("create_commit")
    assert hub.called("create_commit")[0]["revision"] == "rc" and hub.files["main"] == set()


def test_failed_build_stage_is_named_and_publishes_nothing(
    tmp_path: Path, examples: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tools = FakeTools(fail_on="trtllm-build")
    monkeypatch.chdir(tmp_path)
    args = [str(TP4_SPEC), "--trtllm-examples", str(examples)]
    assert main(args, api=hub, machine=a100_machine(), runner=tools) == 1
    err = capsys.readouterr().err
    assert "error: stage 'build' failed: trtllm-build exited with 1" in err and "CUDA out of memory" in err
    assert hub.called("create_commit") == [] and hub.called("create_repo") == []


def test_failed_upload_leaves_the_repo_as_it_was(tmp_path: Path, examples: Path) -> None:
    hub = FakeHub(fail_commit=True)
    hub.files["main"] = {"llama-2-7b-int8-wo-tp4-a100/rank0.engine"}
    build = make_build(tmp_path, examples, hub, FakeTools(), a100_machine())
    with pytest.raises(StageError, match="stage 'publish' failed: connection reset"):
        run(build)
    assert len(hub.called("create_commit")) == 1
    assert hub.files["main"] == {"llama-2-7b-int8-wo-tp4-a100/rank0.engine"}


def test_publish_only_retries_the_upload_without_rebuilding(tmp_path: Path, examples: Path) -> None:
    failing = FakeHub(fail_commit=True)
    with pytest.raises(StageError):
        run(make_build(tmp_path, examples, failing, FakeTools(), a100_machine()))
    hub, tools = FakeHub(), FakeTools()
    retry = make_build(tmp_path, examples, hub, tools, a100_machine(gpus=0))
    run(retry, publish_only=True)
    assert tools.commands == [] and hub.called("snapshot_download") == []
    assert len(hub.called("create_commit")) == 1


def test_publish_only_refuses_an_engine_of_another_spec_version(tmp_path: Path, examples: Path) -> None:
    run(make_build(tmp_path, examples, FakeHub(), FakeTools(), a100_machine()), publish=False)
    retry = make_build(tmp_path, examples, FakeHub(), FakeTools(), a100_machine())
    retry.spec = retry.spec.model_copy(update={"description": "edited after the build"})
    with pytest.raises(StageError, match=r"stage 'verify' failed: .* was built from a different version"):
        run(retry, publish_only=True)


PREFLIGHT_FAILURES = {
    "wrong GPU": (a100_machine(capability=(9, 0)), "this machine has sm_90 but llama-2-7b-int8-wo-tp4-a100 targets"),
    "no GPU": (a100_machine(capability=None), "this machine has no GPU"),
    "too few GPUs": (a100_machine(gpus=1), "1 GPU(s) visible but the build uses 4"),
    "wrong TensorRT-LLM": (a100_machine(version="1.1.0"), "TensorRT-LLM 1.1.0 is installed but the spec wants 1.2.0"),
    "no TensorRT-LLM": (a100_machine(version=None), "TensorRT-LLM is not installed"),
}


@pytest.mark.parametrize(("machine", "message"), PREFLIGHT_FAILURES.values(), ids=PREFLIGHT_FAILURES.keys())
def test_preflight_refuses_a_machine_that_cannot_build_this_engine(
    tmp_path: Path, examples: Path, hub: FakeHub, machine: Machine, message: str
) -> None:
    tools = FakeTools()
    with pytest.raises(StageError, match="stage 'preflight' failed") as error:
        run(make_build(tmp_path, examples, hub, tools, machine))
    assert message in str(error.value)
    assert tools.commands == [] and hub.called("snapshot_download") == []


def test_preflight_refuses_a_missing_token_before_building(tmp_path: Path, examples: Path) -> None:
    tools = FakeTools()
    with pytest.raises(StageError, match="set HF_TOKEN to a token that can write llm-trtllm-server/Llama-2-7b"):
        run(make_build(tmp_path, examples, FakeHub(token=False), tools, a100_machine()))
    assert tools.commands == []


def test_preflight_needs_trtllm_build_on_path(tmp_path: Path, examples: Path, hub: FakeHub) -> None:
    machine = Machine(**{**a100_machine().__dict__, "which": lambda tool: None})
    with pytest.raises(StageError, match="trtllm-build is not on PATH; run in the TensorRT-LLM release container"):
        run(make_build(tmp_path, examples, hub, FakeTools(), machine))


def test_preflight_needs_the_tensorrt_llm_examples(tmp_path: Path, hub: FakeHub) -> None:
    with pytest.raises(StageError, match=r"convert_checkpoint\.py not found; pass --trtllm-examples"):
        run(make_build(tmp_path, tmp_path / "nowhere", hub, FakeTools(), a100_machine()))


def test_rebuild_clears_stale_ranks_of_an_older_build(tmp_path: Path, examples: Path, hub: FakeHub) -> None:
    build = make_build(tmp_path, examples, hub, FakeTools(), a100_machine())
    build.paths.engine_dir.mkdir(parents=True)
    (build.paths.engine_dir / "rank7.engine").write_bytes(b"old")
    run(build, publish=False)
    assert not (build.paths.engine_dir / "rank7.engine").exists()


# -- the real subprocess runner --------------------------------------------------------------------


def test_run_command_streams_output_and_keeps_a_log(tmp_path: Path) -> None:
    lines: list[str] = []
    run_command([sys.executable, "-c", "print('converting'); print('done')"], tmp_path / "logs" / "x.log", lines.append)
    assert lines == ["converting", "done"]
    assert (tmp_path / "logs" / "x.log").read_text() == "converting\ndone\n"


def test_run_command_failure_carries_exit_code_tail_and_log(tmp_path: Path) -> None:
    code = "import sys; print('step 1'); print('boom', file=sys.stderr); sys.exit(3)"
    with pytest.raises(RuntimeError) as error:
        run_command([sys.executable, "-c", code], tmp_path / "fail.log", lambda line: None)
    message = str(error.value)
    assert "exited with 3" in message and f"full log: {tmp_path / 'fail.log'}" in message
    assert "| step 1" in message and "| boom" in message
