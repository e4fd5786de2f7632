"""`GET /v1/models` and `GET /v1/models/{id}`: the one model this server serves, as OpenAI lists models.

truss's own readiness route is `GET /v1/models/{model_name}` and Kubernetes probes `GET /v1/models/model`, so
`/v1/models/model` stays readiness (503 until loaded, and whenever the engine is unhealthy); when the served name is
`model` too, a ready server answers it with the model object. Another id is the served model or a 404. A served
name with a slash (a Hub id such as `org/name`) is answered by a second route placed after truss's
`/v1/models/{model_name}/loaded` and `/schema`, so those keep working. These routes exist where the server runs
through server_app.py (the container, `main.py serve`), not under truss's own server on Baseten.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from model.artifacts import EMBEDDED_CACHE_NAME
from model.errors import NotFound
from model.http_io import error_response
from model.settings import ServerSettings

READINESS_NAME = "model"  # truss's model name in its routes, the one every probe uses
OWNER = "llm-trtllm-server"

Readiness = Callable[[str], Awaitable[Any]]  # truss's readiness endpoint: returns when ready, raises otherwise


def served_model_name(settings: ServerSettings) -> str:
    """The setting, else the Hub repo id, the local folder's name, or the embedded model's name."""
    if settings.served_model_name:
        return settings.served_model_name
    if settings.model_repo is None:
        return EMBEDDED_CACHE_NAME
    local = Path(settings.model_repo).expanduser()
    return local.name if local.is_dir() or settings.model_repo.startswith(("/", ".", "~")) else settings.model_repo


class ModelRoutes:
    def __init__(self, name: str, readiness: Readiness) -> None:
        self.name, self.readiness = name, readiness
        self.created = int(time.time())

    def routes(self) -> tuple[list[Route], list[Route]]:
        """Routes to put before truss's, and after them."""
        first = [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model_id}", self.retrieve, methods=["GET"]),
        ]
        return first, [Route("/v1/models/{model_id:path}", self.retrieve, methods=["GET"])]

    def model_object(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": OWNER}

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_object()]})

    async def retrieve(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id == READINESS_NAME:
            ready = await self.readiness(model_id)  # raises truss's ModelNotReady (503) until ready
            return JSONResponse(self.model_object() if model_id == self.name else ready)
        if model_id == self.name:
            return JSONResponse(self.model_object())
        message = f"the model '{model_id}' does not exist; this server serves '{self.name}' (GET /v1/models)"
        return error_response(NotFound(message, param="model", code="model_not_found"), openai=True)
