"""`main.py build-context` (the default command): write the Docker build context for model-truss/.

    python main.py                                              # build/docker-context, local image name only
    python main.py --image us-docker.pkg.dev/PROJECT/llm/llm-trtllm-server --tag v1
    python main.py build-context --out /tmp/ctx --platform linux/arm64

truss writes the context itself (`TrussHandle.docker_build_setup`): its Dockerfile starts FROM
config.yaml's `base_image` (the TensorRT-LLM release image), installs truss's server and the
requirements, and copies server/, model/ and config.yaml. Its `server/main.py` is then replaced by
one that starts truss's server through model/server_app.py (what that changes is said there). The
command prints the `docker build`, `docker tag` and `docker push` lines for the image, then the
`deploy` line. Secrets stay out: the config may only name them, and their values come at run time
(Kubernetes Secret or Baseten).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from scripts import REPO_ROOT, TRUSS_DIR
from scripts.cli import CliError
from scripts.k8s_manifests import overlay_names

DEFAULT_OUT = REPO_ROOT / "build" / "docker-context"
DEFAULT_PLATFORM = "linux/amd64"  # GKE's A100/H100 nodes are x86-64, whatever machine builds the image
CONTEXT_MARKERS = ("Dockerfile", "config.yaml", "server")  # what a context truss wrote contains
# A Docker repository (registry host, optional port, path) and a tag, as `docker tag` accepts them.
REPOSITORY = re.compile(
    r"^(?:[a-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$"
)
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY", re.IGNORECASE)
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# The image's entry point (/app/main.py): truss's server, started by this project's launcher.
SERVER_MAIN = '''"""truss's model server, started through model/server_app.py (written by `main.py build-context`)."""

from model.server_app import main

if __name__ == "__main__":
    main()
'''


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="context directory (default build/docker-context)"
    )
    parser.add_argument(
        "--image",
        help="repository to push to, e.g. us-docker.pkg.dev/PROJECT/llm/llm-trtllm-server (default: local name)",
    )
    parser.add_argument("--tag", help="image tag (default: the first 12 hex digits of truss's hash of model-truss/)")
    parser.add_argument("--platform", default=DEFAULT_PLATFORM, help="docker build --platform (default %(default)s)")
    parser.add_argument("--truss", type=Path, default=TRUSS_DIR, help="Truss directory (default model-truss/)")
    parser.set_defaults(func=run)


@dataclass(frozen=True)
class ImageRef:
    """The image `docker build` creates locally and the name it is pushed under."""

    local: str  # <model_name>:<tag>
    remote: str  # <repository>:<tag>


def run(args: argparse.Namespace) -> int:
    config = read_config(args.truss)
    check_no_secret_values(config, args.truss)
    ref = image_ref(config.get("model_name") or "model", args.image, args.tag or truss_hash(args.truss)[:12])
    out = write_context(args.truss, args.out)
    base = (config.get("base_image") or {}).get("image", "truss's default base image")
    print(f"# Docker build context for {args.truss.name}/ written to {out} (FROM {base})")
    build, *push = docker_commands(out, ref, args.platform)
    print(shlex.join(build))
    if args.image is None:
        print("# to push, run again with --image REGISTRY/PATH/NAME (a repository your cluster can pull from)")
        return 0
    for command in push:
        print(shlex.join(command))
    print(f"# then deploy with the overlay for your GPU ({', '.join(overlay_names())}), e.g.:")
    print(f"# python main.py deploy --overlay gke-a100 --image {ref.remote}")
    return 0


def read_config(truss_dir: Path) -> dict:
    path = truss_dir / "config.yaml"
    if not path.is_file():
        raise CliError(f"{path} does not exist; pass --truss with the folder holding the Truss config.yaml")
    return yaml.safe_load(path.read_text()) or {}


def check_no_secret_values(config: dict, truss_dir: Path) -> None:
    """config.yaml may only name secrets: truss copies it into the context, and so into the image."""
    filled = [f"secrets.{k}" for k, v in (config.get("secrets") or {}).items() if v not in (None, "")]
    env = config.get("environment_variables") or {}
    filled += [f"environment_variables.{k}" for k, v in env.items() if SECRET_NAME.search(k) and v]
    if filled:
        raise CliError(
            f"{truss_dir}/config.yaml sets {', '.join(sorted(filled))}; that would bake a secret into the image. "
            "Leave secrets null and provide the value at run time (the Kubernetes Secret, or Baseten's secrets)"
        )


def truss_hash(truss_dir: Path) -> str:
    """truss's content hash of the Truss: a tag that changes exactly when the image's inputs do."""
    from truss.patch.hash import directory_content_hash

    return directory_content_hash(truss_dir)


def image_ref(model_name: str, repository: str | None, tag: str) -> ImageRef:
    if repository is not None and not REPOSITORY.match(repository):
        hint = " (give the tag with --tag)" if ":" in repository.rsplit("/", 1)[-1] else " (lowercase, no tag)"
        raise CliError(f"--image {repository!r} is not a Docker repository name{hint}")
    if not TAG.match(tag):
        raise CliError(f"--tag {tag!r} is not a Docker tag (letters, digits, '_', '.', '-'; at most 128)")
    return ImageRef(local=f"{model_name}:{tag}", remote=f"{repository or model_name}:{tag}")


def write_context(truss_dir: Path, out: Path) -> Path:
    """Have truss write the build context into `out`, replacing a context it wrote there before.

    Returns `out` relative to the working directory when it lies below it, for shorter commands.
    """
    import truss

    if out.exists() and any(out.iterdir()):
        if not all((out / marker).exists() for marker in CONTEXT_MARKERS):
            raise CliError(f"{out} exists and is not a Docker build context written before; pass an empty --out")
        shutil.rmtree(out)
    try:
        truss.load(str(truss_dir)).docker_build_setup(build_dir=out)
    except ValueError as exc:  # truss's config validation (pydantic errors are ValueErrors)
        raise CliError(f"truss cannot build {truss_dir}: {exc}") from exc
    (out / "server" / "main.py").write_text(SERVER_MAIN)
    return out.resolve().relative_to(Path.cwd()) if out.resolve().is_relative_to(Path.cwd()) else out


def docker_commands(context: Path, ref: ImageRef, platform: str) -> list[list[str]]:
    """The three commands: build the local image, tag it for the registry, push it."""
    return [
        ["docker", "build", "--platform", platform, "-t", ref.local, str(context)],
        ["docker", "tag", ref.local, ref.remote],
        ["docker", "push", ref.remote],
    ]
