"""The server process: truss's own FastAPI app under uvicorn, started as truss's `server/main.py` starts it,
with what truss lacks for a server that is safe to expose:
- the address to listen on is a flag (the container listens on 0.0.0.0, `main.py serve` on 127.0.0.1
  unless told otherwise; truss hard-codes 0.0.0.0);
- what truss lacks: `GET /metrics` without its redirect, and OpenAI's `GET /v1/models` and `/v1/models/{id}`
  (openai_api/models.py);
- only the routes this server serves: truss's others (`/hot-reload`, which re-imports the model code,
  `/v1/websocket`, the SageMaker aliases `/ping` and `/invocations`, `:predict_binary`, `/schema`,
  `/loaded`, `/v1/embeddings`, `/v1/messages`, `/v1/responses`, FastAPI's `/openapi.json`) are gone (404);
- `asgi_guard.GuardMiddleware`: optional API key, the body-size limit, an early 429 when the engine is full,
  the exception barrier;
- error bodies that never carry an exception's class or text (truss's fallback handler sends
  `Unhandled exception: TypeError: ...`), and JSON 404/405s;
- access-log lines without query strings (truss logs the path with its query);
- a SIGTERM drain bounded by `drain_timeout_s` (truss waits up to 3,600 s).

`main.py build-context` replaces the context's `server/main.py` with a call to `main()`
(scripts/build_context.py), so the container and `main.py serve` run this same code; on Baseten
(`truss push`) truss's own server runs instead, without any of the above. The uvicorn settings are
those of truss 0.18.35's `TrussServer.start` (server/truss_server.py). This module runs only inside
truss's server folder, where `truss_server` and `_truss_shared` are importable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from model.asgi_guard import GuardMiddleware, is_openai_path
from model.errors import InternalError, MethodNotAllowed, NotFound, ServingError
from model.http_io import error_response
from model.metrics import metrics_route
from model.openai_api.models import ModelRoutes, served_model_name
from model.settings import ServerSettings, load_settings, server_port

if TYPE_CHECKING:
    from truss_server import TrussServer

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"  # truss's server reads its config from the working directory
CONTAINER_HOST = "0.0.0.0"
# truss's routes that this server serves (every other route truss adds is removed).
SERVED_TRUSS_PATHS = frozenset(
    {"/", "/v1/models/{model_name}", "/v1/models/{model_name}:predict", "/v1/chat/completions", "/v1/completions"}
)
METRICS_PATH = "/metrics"
SERVED_ROUTES = (
    "POST /v1/models/model:predict, POST /v1/chat/completions, POST /v1/completions, GET /v1/models, "
    "GET /v1/models/model (readiness), GET / (liveness), GET /metrics"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="truss's model server for this Truss")
    parser.add_argument("--host", default=CONTAINER_HOST, help="address to listen on (default %(default)s)")
    args = parser.parse_args(argv)
    asyncio.run(build_server(args.host, server_port()).serve())


def build_server(host: str, port: int) -> uvicorn.Server:
    """truss's application, trimmed and guarded, and uvicorn configured as truss does, listening on `host`."""
    from _truss_shared import log_config
    from _truss_shared.secrets_resolver import SecretsResolver
    from truss_server import WS_MAX_MSG_SZ_BYTES, TrussServer

    truss_server = TrussServer(port, CONFIG_FILE)
    settings = load_settings(truss_server._config.get("model_metadata"))
    app = truss_server.create_application()
    close_unserved_routes(app)
    add_routes(app, truss_server, settings)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled_error)
    api_key = read_api_key(SecretsResolver.get_secrets(truss_server._config), settings)
    guarded = GuardMiddleware(
        app, max_request_bytes=settings.max_request_bytes, api_key=api_key, check_capacity=capacity_check(truss_server)
    )
    debug = truss_server._config["runtime"].get("enable_debug_logs", False)
    config = uvicorn.Config(
        guarded,
        http="h11",  # as truss: its requests handling does not work with httptools
        host=host,
        port=port,
        workers=1,
        timeout_graceful_shutdown=settings.drain_timeout_s,  # type: ignore[arg-type]  # uvicorn takes a float
        log_config=log_config_without_queries(log_config.make_log_config("DEBUG" if debug else "INFO")),
        ws_max_size=WS_MAX_MSG_SZ_BYTES,
        loop="uvloop",
    )
    server = uvicorn.Server(config)
    truss_server._server = server  # truss's watcher stops this server through it when load() fails
    return server


def add_routes(app: Any, truss_server: TrussServer, settings: ServerSettings) -> None:
    """What truss's application lacks: `GET /metrics` without its redirect, and OpenAI's `/v1/models` routes."""
    before, after = ModelRoutes(served_model_name(settings), truss_server._endpoints.model_ready).routes()
    app.router.routes[:0] = [metrics_route(), *before]
    app.router.routes.extend(after)


def capacity_check(truss_server: TrussServer) -> Callable[[], None]:
    """The loaded model's admission check for one request (nothing to check before load() has finished)."""

    def check() -> None:
        generator = getattr(truss_server._endpoints._model._maybe_model, "generator", None)
        if generator is not None:
            generator.check_capacity()

    return check


def close_unserved_routes(app: Any) -> None:
    """Drop truss's routes that this server does not serve (and FastAPI's /openapi.json)."""
    app.router.routes = [
        route
        for route in app.router.routes
        if getattr(route, "path", None) in SERVED_TRUSS_PATHS or getattr(route, "path", None) == METRICS_PATH
    ]


def read_api_key(secrets: Mapping[str, str], settings: ServerSettings) -> str | None:
    """The API key from the Truss secret `settings.api_key_secret`; None (auth off) when it is missing or empty."""
    try:
        key = (secrets[settings.api_key_secret] or "").strip()
    except Exception:  # truss raises its own SecretNotFound (not a KeyError) for an unset secret
        key = ""
    logger.info("API-key authentication is %s", "on" if key else f"off (no secret '{settings.api_key_secret}')")
    return key or None


def log_config_without_queries(config: Mapping[str, Any]) -> dict[str, Any]:
    """truss's logging config, with a filter that drops query strings from access-log lines."""
    config = dict(config)
    config["filters"] = {**config["filters"], "strip_query": {"()": StripQueryString}}
    loggers = dict(config["loggers"])
    access = dict(loggers["uvicorn.access"])
    access["filters"] = ["strip_query", *access.get("filters", [])]
    loggers["uvicorn.access"] = access
    config["loggers"] = loggers
    return config


class StripQueryString(logging.Filter):
    """uvicorn's access record args are (client, method, path with query, HTTP version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, version, status = record.args
            record.args = (client, method, str(path).split("?", 1)[0], version, status)
        return True


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """FastAPI's own 404/405 (truss's HTTPExceptions keep truss's handler) as our JSON error."""
    kind = {404: NotFound, 405: MethodNotAllowed}.get(exc.status_code)
    if kind is None:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}; this server serves {SERVED_ROUTES}"
    return error_response(kind(message), openai=is_openai_path(request.url.path))


async def _unhandled_error(request: Request, exc: Exception) -> Response:
    """Replaces truss's fallback handler, whose body names the exception's class and message."""
    if isinstance(exc, ServingError):  # a stream that failed mid-way: the response has started, this is unsent
        return Response(status_code=exc.status)
    logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(InternalError(), openai=is_openai_path(request.url.path))
