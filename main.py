"""Command line for the project: each subcommand lives in its own module under scripts/.

python main.py                                  # write the Docker build context (build-context)
python main.py build-context --out build/ctx --image user/llm --tag v1
python main.py serve                            # truss's model server on 127.0.0.1:8080, no Docker
python main.py deploy --overlay gke-h100        # apply k8s/ with the kubernetes client, wait for rollout
python main.py bench ...                        # load generator / benchmarks
"""

from __future__ import annotations

import argparse
import sys

from scripts import bench, build_context, deploy, serve
from scripts.cli import CliError

COMMANDS = (build_context, serve, deploy, bench)
DEFAULT_COMMAND = "build-context"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in {"-h", "--help"}):
        argv = [DEFAULT_COMMAND, *argv]
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
