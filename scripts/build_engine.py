"""Build a TensorRT-LLM engine from a spec, stamp it with build_meta.json and publish it to the Hub.

    python scripts/build_engine.py engines/mistral-7b-instruct-v0.2-fp16-a100.yaml --dry-run
    python scripts/build_engine.py engines/llama-2-7b-int8-wo-a100.yaml                 # all stages
    python scripts/build_engine.py engines/llama-2-7b-int8-wo-a100.yaml --no-publish    # keep it local
    python scripts/build_engine.py engines/llama-2-7b-int8-wo-a100.yaml --publish-only  # retry an upload
    python scripts/build_engine.py engines/checkpoint/mistral-7b-instruct-v0.2-checkpoint-h100.yaml  # no build

Stages: preflight (installed TensorRT-LLM and this GPU match the spec; the Hub token works) ->
download (the checkpoint at its resolved commit) -> checkpoint (convert_checkpoint.py or
quantize.py) -> build (trtllm-build) -> stamp (build_meta.json, then every rank file checked) ->
publish (engine and tokenizer in ONE Hub commit, so a failure leaves the repo as it was).
Run it in the TensorRT-LLM release container that the serving image uses, on the GPU type the
engine will serve on (k8s/engine-build does both). `--dry-run` prints every command and call.
Every run ends with the LLM_* settings that serve the result; a checkpoint spec (`serve: checkpoint`)
builds nothing and prints only those.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (REPO_ROOT, REPO_ROOT / "model-truss"):  # run as `python scripts/build_engine.py`
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError  # noqa: E402

from model import engine_meta  # noqa: E402
from model.engine_meta import BuildMeta, ComputeCapability  # noqa: E402
from scripts.engine_spec import (  # noqa: E402
    BuildPaths,
    CheckpointSpec,
    EngineSpec,
    SpecError,
    build_command,
    checkpoint_command,
    load_draft,
    load_spec,
    serve_settings,
)

DEFAULT_EXAMPLES_DIR = Path("/app/tensorrt_llm/examples")  # in nvcr.io/nvidia/tensorrt-llm/release images
CHECKPOINT_PATTERNS = ["model*.safetensors", "*.json", "tokenizer*", "*.tiktoken", "*.jinja"]
TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "*.tiktoken", "*.jinja", "generation_config.json"]
HF_CONFIG = "config.json"  # the checkpoint's, published at the repo root beside the tokenizer
LOG_TAIL_LINES = 20


class StageError(RuntimeError):
    """A stage failed; the message names the stage and why."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"stage '{stage}' failed: {reason}")
        self.stage = stage


@dataclass(frozen=True)
class Machine:
    """Probes of the build machine, replaceable in tests."""

    trtllm_version: Callable[[], str | None] = engine_meta.installed_trtllm_version
    tensorrt_version: Callable[[], str | None] = engine_meta.installed_tensorrt_version
    compute_capability: Callable[[], ComputeCapability | None] = engine_meta.gpu_compute_capability
    gpu_name: Callable[[], str] = engine_meta.gpu_name
    gpu_count: Callable[[], int] = engine_meta.gpu_count
    which: Callable[[str], str | None] = shutil.which


CommandRunner = Callable[[Sequence[str], Path, Callable[[str], None]], None]


def run_command(argv: Sequence[str], log_path: Path, echo: Callable[[str], None]) -> None:
    """Run one tool, echo its output live and keep it in `log_path`; a failure carries the output's tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    with (
        log_path.open("w") as log,
        subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as process,
    ):
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            tail.append(line.rstrip())
            echo(line.rstrip())
    if process.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} exited with {process.returncode}; full log: {log_path}\n" + "\n".join(f"  | {t}" for t in tail)
        )


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str  # what --dry-run prints: the shell command, or the library call
    run: Callable[[Callable[[str], None]], None]
    is_command: bool = False


@dataclass
class EngineBuild:
    """One spec's build: plans the stages and carries what one stage hands the next."""

    spec: EngineSpec
    spec_file: str
    paths: BuildPaths
    api: Any  # huggingface_hub.HfApi, or a stand-in with the same methods
    machine: Machine = field(default_factory=Machine)
    runner: CommandRunner = run_command
    source_revision: str | None = None
    meta: BuildMeta | None = None

    # -- plan ------------------------------------------------------------------------------

    def stages(self, *, publish: bool = True, publish_only: bool = False) -> list[Stage]:
        if publish_only:
            return [self._stage_load_existing(), self._stage_publish()]
        stages = [
            self._stage_preflight(publish),
            self._stage_download(),
            self._command_stage("checkpoint", checkpoint_command(self.spec, self.paths), self.paths.checkpoint_dir),
            self._command_stage("build", build_command(self.spec, self.paths), self.paths.engine_dir),
            self._stage_stamp(),
        ]
        return [*stages, self._stage_publish()] if publish else stages

    def _stage_preflight(self, publish: bool) -> Stage:
        gpu = self.spec.gpu
        summary = (
            f"check tensorrt_llm=={self.spec.tensorrt_llm_version} is installed, this GPU is {gpu.gpu.sm} "
            f"({gpu.type}), >= {self.spec.workers} GPU(s) visible, {self.paths.examples_dir} exists"
            + (f", the Hub accepts this machine's token (to publish {self.spec.publish.repo})" if publish else "")
        )
        return Stage("preflight", summary, lambda echo: self.preflight(publish))

    def _stage_download(self) -> Stage:
        checkpoint = self.spec.checkpoint
        summary = (
            f"huggingface_hub.snapshot_download({checkpoint.repo!r}, revision={checkpoint.revision!r} -> its commit, "
            f"local_dir={str(self.paths.hf_dir)!r}, allow_patterns={CHECKPOINT_PATTERNS!r})"
        )
        return Stage("download", summary, lambda echo: self.download(echo))

    def _command_stage(self, name: str, argv: list[str], output_dir: Path) -> Stage:
        def run(echo: Callable[[str], None]) -> None:
            shutil.rmtree(output_dir, ignore_errors=True)  # never mix ranks with an older build's
            self.runner(argv, self.paths.work_dir / "logs" / f"{name}.log", echo)

        return Stage(name, shlex.join(argv), run, is_command=True)

    def _stage_stamp(self) -> Stage:
        ranks = ", ".join(engine_meta.engine_file_names(self.spec.parallelism.world_size))
        summary = f"write {self.paths.engine_dir / engine_meta.BUILD_META_FILE}, then check config.json and {ranks}"
        return Stage("stamp", summary, lambda echo: self.stamp())

    def _stage_load_existing(self) -> Stage:
        summary = f"read {self.paths.engine_dir / engine_meta.BUILD_META_FILE}; it must be this spec's build"
        return Stage("verify", summary, lambda echo: self.load_existing())

    def _stage_publish(self) -> Stage:
        publish = self.spec.publish
        summary = (
            f"HfApi.create_commit({publish.repo!r}, revision={publish.revision!r}, parent_commit=<head>): "
            f"engine -> {self.spec.engine_subfolder}/ (stale files there deleted), tokenizer + config.json -> /, "
            "one commit"
        )
        return Stage("publish", summary, lambda echo: self.publish(echo))

    # -- stages ----------------------------------------------------------------------------

    def preflight(self, publish: bool) -> None:
        """Fail in seconds, not after an hour of quantization, when the engine could not be served."""
        spec = self.spec
        installed = self.machine.trtllm_version()
        if installed != spec.tensorrt_llm_version:
            have = f"TensorRT-LLM {installed} is installed" if installed else "TensorRT-LLM is not installed"
            raise RuntimeError(
                f"{have} but the spec wants {spec.tensorrt_llm_version}; run in nvcr.io/nvidia/tensorrt-llm/release:"
                f"{spec.tensorrt_llm_version} (the serving image's version) or change tensorrt_llm_version"
            )
        capability = self.machine.compute_capability()
        wanted = spec.gpu.gpu.compute_capability
        if capability is None or tuple(capability) != wanted:
            found = "no GPU" if capability is None else engine_meta.sm_name(capability)
            raise RuntimeError(
                f"this machine has {found} but {spec.name} targets {spec.gpu.type} ({spec.gpu.gpu.sm}); an engine runs "
                f"only on the architecture it was built on, so build on a {spec.gpu.type} node (k8s/engine-build)"
            )
        if self.machine.gpu_count() < spec.workers:
            raise RuntimeError(
                f"{self.machine.gpu_count()} GPU(s) visible but the build uses {spec.workers}; "
                f"request nvidia.com/gpu: {spec.gpu.count} or lower build.workers"
            )
        script = Path(checkpoint_command(spec, self.paths)[1])
        if not script.is_file():
            raise RuntimeError(f"{script} not found; pass --trtllm-examples (TensorRT-LLM's examples/ folder)")
        if self.machine.which("trtllm-build") is None:
            raise RuntimeError("trtllm-build is not on PATH; run in the TensorRT-LLM release container")
        if publish:
            try:
                self.api.whoami()
            except (LocalTokenNotFoundError, HfHubHTTPError) as exc:
                raise RuntimeError(
                    f"the Hub rejects this machine's token ({exc}); set HF_TOKEN to a token that can write "
                    f"{spec.publish.repo}"
                ) from exc

    def download(self, echo: Callable[[str], None]) -> None:
        checkpoint = self.spec.checkpoint
        self.source_revision = self.api.model_info(checkpoint.repo, revision=checkpoint.revision).sha
        echo(f"{checkpoint.repo}@{checkpoint.revision} is commit {self.source_revision}")
        self.api.snapshot_download(
            checkpoint.repo,
            revision=self.source_revision,
            local_dir=self.paths.hf_dir,
            allow_patterns=CHECKPOINT_PATTERNS,
        )

    def stamp(self) -> None:
        spec = self.spec
        capability = self.machine.compute_capability()
        assert capability is not None and self.source_revision is not None, "preflight and download run first"
        spec_data = spec.model_dump(mode="json")
        self.meta = BuildMeta(
            engine_name=spec.name,
            spec_file=self.spec_file,
            spec=spec_data,
            spec_sha256=engine_meta.spec_sha256(spec_data),
            tensorrt_llm_version=self.machine.trtllm_version() or "unknown",
            tensorrt_version=self.machine.tensorrt_version(),
            gpu_name=self.machine.gpu_name(),
            compute_capability=capability,
            tp_size=spec.parallelism.tensor,
            pp_size=spec.parallelism.pipeline,
            source_repo=spec.checkpoint.repo,
            source_revision=self.source_revision,
            built_at=datetime.now(UTC),
        )
        engine_meta.write_build_meta(self.paths.engine_dir, self.meta)
        engine_meta.check_engine_files(self.paths.engine_dir, self.meta)

    def load_existing(self) -> None:
        meta = engine_meta.read_build_meta(self.paths.engine_dir)
        if meta.spec_sha256 != engine_meta.spec_sha256(self.spec.model_dump(mode="json")):
            raise RuntimeError(
                f"{self.paths.engine_dir} was built from a different version of {self.spec_file}; "
                "rebuild it (drop --publish-only)"
            )
        engine_meta.check_engine_files(self.paths.engine_dir, meta)
        self.meta = meta

    def publish(self, echo: Callable[[str], None]) -> None:
        """Engine + tokenizer as one commit on top of the head we listed: all of it lands, or none.

        Not `upload_folder`: with hf_xet installed it commits large folders in several batches.
        """
        assert self.meta is not None, "stamp or verify runs first"
        target = self.spec.publish
        self.api.create_repo(target.repo, private=target.private, exist_ok=True)
        if target.revision != "main":
            self.api.create_branch(target.repo, branch=target.revision, exist_ok=True)
        head = self.api.model_info(target.repo, revision=target.revision)
        uploads = publish_files(self.spec, self.paths)
        stale = [
            sibling.rfilename
            for sibling in head.siblings or []
            if sibling.rfilename.startswith(f"{self.spec.engine_subfolder}/") and sibling.rfilename not in uploads
        ]
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=path) for name, path in uploads.items()]
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
        echo(f"committing {len(uploads)} file(s), deleting {len(stale)} stale file(s) in {target.repo}")
        commit = self.api.create_commit(
            target.repo,
            operations=operations,
            commit_message=f"Engine {self.spec.name} (TensorRT-LLM {self.meta.tensorrt_llm_version}, {self.meta.sm})",
            commit_description=f"Built from {self.spec_file} (sha256 {self.meta.spec_sha256[:12]}) "
            f"and {self.meta.source_repo}@{self.meta.source_revision}.",
            revision=target.revision,
            parent_commit=head.sha,
        )
        echo(
            f"published: model_repo={target.repo} revision={commit.oid} subfolder={self.spec.engine_subfolder} "
            f"({commit.commit_url})"
        )


def publish_files(spec: EngineSpec, paths: BuildPaths) -> dict[str, Path]:
    """Repo path -> local file: the engine folder under its subfolder, tokenizer and HF config at the root.

    The root layout is what `model/artifacts.py` downloads for `LLM_SUBFOLDER=<subfolder>`.
    """
    files = {
        f"{spec.engine_subfolder}/{path.name}": path for path in sorted(paths.engine_dir.iterdir()) if path.is_file()
    }
    for pattern in [*TOKENIZER_PATTERNS, HF_CONFIG]:
        for path in sorted(paths.hf_dir.glob(pattern)):
            files[path.name] = path
    return files


# -- running ---------------------------------------------------------------------------------


def print_plan(build: EngineBuild, stages: list[Stage]) -> None:
    spec = build.spec
    print(
        f"# {spec.name}: {spec.parallelism.world_size} rank(s) on {spec.gpu.count}x {spec.gpu.type} "
        f"({spec.gpu.gpu.sm}), TensorRT-LLM {spec.tensorrt_llm_version}"
    )
    if spec.speculative.draft:
        print(f"#   draft-target target: build engines/{spec.speculative.draft}.yaml too; both are served together")
    for number, stage in enumerate(stages, 1):
        print(f"# {number}/{len(stages)} {stage.name}")
        print(stage.summary if stage.is_command else f"#   {stage.summary}")


def run_stages(stages: list[Stage]) -> None:
    """Run in order with a live display; the first failure stops the run and names its stage."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as progress:
        tasks = [progress.add_task(f"[dim]{stage.name}", total=1, start=False) for stage in stages]
        for number, (stage, task) in enumerate(zip(stages, tasks, strict=True)):
            progress.start_task(task)
            progress.update(task, description=f"[bold]{stage.name}")
            try:
                stage.run(lambda line: progress.console.print(line, markup=False, highlight=False))
            except Exception as exc:  # the stage boundary: re-raised with the stage named
                progress.update(task, description=f"[red]{stage.name} failed")
                for later, later_task in zip(stages[number + 1 :], tasks[number + 1 :], strict=True):
                    progress.update(later_task, description=f"[dim]{later.name} not run")
                raise StageError(stage.name, str(exc)) from exc
            progress.update(task, completed=1, description=f"[green]{stage.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="engines/<name>.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print every command and call, run nothing")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-publish", action="store_true", help="stop after the engine is built and stamped")
    mode.add_argument("--publish-only", action="store_true", help="upload an already built engine of this spec")
    parser.add_argument("--work-dir", type=Path, help="default: build/engines/<name>")
    parser.add_argument("--trtllm-examples", type=Path, default=DEFAULT_EXAMPLES_DIR, help="TensorRT-LLM's examples/")
    return parser


def main(
    argv: list[str] | None = None,
    *,
    api: Any = None,
    machine: Machine | None = None,
    runner: CommandRunner = run_command,
) -> int:
    """The CLI. `api`, `machine` and `runner` (Hub client, GPU probes, tool runner) are for tests to swap."""
    args = build_parser().parse_args(argv)
    try:
        spec = load_spec(args.spec)
        draft = load_draft(spec, args.spec.parent)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if isinstance(spec, CheckpointSpec):
        print(f"# {spec.name}: no build, backend tensorrt_llm_llmapi serves {spec.checkpoint.repo} as it is")
        print_serve_settings(serve_settings(spec))
        return 0
    paths = BuildPaths(args.work_dir or Path("build/engines") / spec.name, args.trtllm_examples)
    build = EngineBuild(spec, _display_path(args.spec), paths, api or HfApi(), machine or Machine(), runner)
    stages = build.stages(publish=not args.no_publish, publish_only=args.publish_only)
    if args.dry_run:
        print_plan(build, stages)
        print_serve_settings(serve_settings(spec, draft))
        return 0
    try:
        run_stages(stages)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_serve_settings(serve_settings(spec, draft))
    return 0


def print_serve_settings(settings: dict[str, str]) -> None:
    """The environment of a deployment that serves this spec (a ConfigMap, `docker run -e`, `main.py serve`)."""
    print("# serve with:")
    for name, value in settings.items():
        print(f"#   {name}={value}")


def _display_path(path: Path) -> str:
    """The spec path as recorded in build_meta.json: relative to the repo when it is inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


if __name__ == "__main__":
    sys.exit(main())
