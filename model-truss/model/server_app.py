"""The server process: truss's own FastAPI app under uvicorn, started as truss's `server/main.py` starts it,
except that the address to listen on is a flag (the container listens on 0.0.0.0, `main.py serve` on
127.0.0.1 unless told otherwise; truss hard-codes 0.0.0.0).

`main.py build-context` replaces the context's `server/main.py` with a call to `main()`
(scripts/build_context.py), so the container and `main.py serve` run this same code; on Baseten
(`truss push`) truss's own server runs instead. The uvicorn settings are those of truss 0.18.35's
`TrussServer.start` (server/truss_server.py). This module runs only inside truss's server folder,
where `truss_server` and `_truss_shared` are importable.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from model.metrics import metrics_route
from model.openai_api.models import ModelRoutes, served_model_name
from model.settings import load_settings, server_port

if TYPE_CHECKING:
    from truss_server import TrussServer

CONFIG_FILE = "config.yaml"  # truss's server reads its config from the working directory
CONTAINER_HOST = "0.0.0.0"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="truss's model server for this Truss")
    parser.add_argument("--host", default=CONTAINER_HOST, help="address to listen on (default %(default)s)")
    args = parser.parse_args(argv)
    asyncio.run(build_server(args.host, server_port()).serve())


def build_server(host: str, port: int) -> uvicorn.Server:
    """truss's application and uvicorn configuration, listening on `host`."""
    from _truss_shared import log_config
    from truss_server import TIMEOUT_GRACEFUL_SHUTDOWN, WS_MAX_MSG_SZ_BYTES, TrussServer

    truss_server = TrussServer(port, CONFIG_FILE)
    debug = truss_server._config["runtime"].get("enable_debug_logs", False)
    app = truss_server.create_application()
    add_routes(app, truss_server)
    config = uvicorn.Config(
        app,
        http="h11",  # as truss: its requests handling does not work with httptools
        host=host,
        port=port,
        workers=1,
        timeout_graceful_shutdown=TIMEOUT_GRACEFUL_SHUTDOWN,
        log_config=log_config.make_log_config("DEBUG" if debug else "INFO"),
        ws_max_size=WS_MAX_MSG_SZ_BYTES,
        loop="uvloop",
    )
    server = uvicorn.Server(config)
    truss_server._server = server  # truss's watcher stops this server through it when load() fails
    return server


def add_routes(app: FastAPI, truss_server: TrussServer) -> None:
    """What truss's application lacks: `GET /metrics` without its redirect, and OpenAI's `/v1/models` routes."""
    settings = load_settings(truss_server._config.get("model_metadata"))
    before, after = ModelRoutes(served_model_name(settings), truss_server._endpoints.model_ready).routes()
    app.router.routes[:0] = [metrics_route(), *before]
    app.router.routes.extend(after)
