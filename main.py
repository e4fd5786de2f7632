"""Command line for the project; each subcommand lives in its own module under scripts/.

python main.py                                  # write the Docker build context (build-context)
python main.py build-context --out build/ctx --image user/llm --tag v1
python main.py serve --port 8080                # truss's model server on the embedded default, no Docker
python main.py deploy --overlay gke-h100        # apply k8s/ with the kubernetes client, wait for rollout
python main.py bench ...                        # load generator / benchmarks

Run it with the project's virtualenv (`make` creates .venv): `.venv/bin/python main.py ...`, or
`source .venv/bin/activate` first. `--help` works with any Python 3.11: a subcommand's module, and
with it its dependencies (truss, kubernetes, torch), is imported only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from scripts.cli import CliError

REPO_ROOT = Path(__file__).resolve().parent
VENV = REPO_ROOT / ".venv"
FIRST_PARTY = frozenset({"main", "model", "scripts", "tests"})


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # defines `configure(parser)`; imported only when this command is the one that runs
    help: str


COMMANDS = (
    Command(
        "build-context",
        "scripts.build_context",
        "write the Docker build context and print docker build/tag/push (default command)",
    ),
    Command("serve", "scripts.serve", "run truss's model server locally (no Docker)"),
    Command("deploy", "scripts.deploy", "apply a k8s/ overlay with server-side apply and wait for it"),
    Command("bench", "scripts.bench", "benchmarks: load generator, direct mode, CPU/GPU suites, accuracy"),
)
DEFAULT_COMMAND = "build-context"
HELP_FLAGS = ("-h", "--help")


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    """Every command is listed; only `selected` gets its real arguments, so only its module is imported."""
    parser = argparse.ArgumentParser(prog="main.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        if command.name == selected:
            importlib.import_module(command.module).configure(sub)
    return parser


def with_default_command(argv: list[str]) -> list[str]:
    """`python main.py --image x` means `python main.py build-context --image x`."""
    if not argv or (argv[0].startswith("-") and argv[0] not in HELP_FLAGS):
        return [DEFAULT_COMMAND, *argv]
    return argv


def running_in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def missing_package_hint(exc: ModuleNotFoundError, argv: list[str]) -> str:
    """One line: which package is missing and how to run the same command where it is installed."""
    package = (exc.name or "").split(".")[0]
    command = shlex.join(["main.py", *argv])
    if running_in_venv():
        return f"{package!r} is missing from .venv; reinstall it: rm .venv/.installed && make .venv/.installed"
    setup = "" if VENV.is_dir() else " (create it first: make .venv/.installed)"
    return (
        f"'{command}' needs the package {package!r}, which {sys.executable} does not have; "
        f"run it with the project's virtualenv: .venv/bin/python {command}{setup}"
    )


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    argv = with_default_command(given)
    names = {command.name for command in COMMANDS}
    try:
        args = build_parser(argv[0] if argv[0] in names else None).parse_args(argv)
        return args.func(args) or 0
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in FIRST_PARTY:
            raise
        print(f"error: {missing_package_hint(exc, given)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
