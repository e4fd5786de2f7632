"""`main.py serve`: run truss's own model server on model-truss/, without Docker.

The server code is the one the Docker build context holds (truss's server/ with its main.py
starting model/server_app.py, model/, the normalized config.yaml), laid out as the image lays it
out under /app, so what runs here is what runs in the container. It listens on 127.0.0.1 unless
`--host` says otherwise (the container listens on 0.0.0.0).

    python main.py serve                      # embedded SmolLM2 on CPU, 127.0.0.1:8080
    LLM_MODEL_REPO=/path/to/hf-model python main.py serve --port 9000
    python main.py serve --host 0.0.0.0       # reachable from other machines (the server has no auth by default)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

from model.settings import DEFAULT_PORT, PORT_VARIABLE
from scripts import REPO_ROOT, TRUSS_DIR
from scripts.build_context import write_context

DEFAULT_HOST = "127.0.0.1"
RUN_DIR = REPO_ROOT / ".cache" / "serve"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default %(default)s)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s)")
    parser.add_argument("--truss", type=Path, default=TRUSS_DIR, help="Truss directory (default model-truss/)")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="where the server app is laid out")
    parser.set_defaults(func=lambda args: serve(args.truss, args.host, args.port, args.run_dir))


def prepare_app_dir(truss_dir: Path, run_dir: Path) -> Path:
    """Write truss's build context and lay it out as the image's /app folder; returns that folder."""
    shutil.rmtree(run_dir, ignore_errors=True)
    context, app = write_context(truss_dir, run_dir / "context"), run_dir / "app"
    shutil.copytree(context / "server", app)
    shutil.copytree(context / "model", app / "model")
    shutil.copy(context / "config.yaml", app / "config.yaml")
    return app


def server_env(port: int) -> dict[str, str]:
    """The container's environment, plus a persistent cache for the converted embedded model."""
    env = dict(os.environ)
    env[PORT_VARIABLE] = str(port)
    env.setdefault("LLM_CACHE_DIR", str(REPO_ROOT / ".cache" / "models"))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def serve(truss_dir: Path, host: str, port: int, run_dir: Path) -> NoReturn:
    """Replace this process with the server, so SIGTERM/Ctrl-C reach uvicorn's graceful shutdown."""
    app = prepare_app_dir(truss_dir, run_dir)
    print(f"serving {truss_dir} on http://{host}:{port}/v1/models/model:predict (Ctrl-C stops)", flush=True)
    os.chdir(app)
    os.execve(sys.executable, [sys.executable, "main.py", "--host", host], server_env(port))
