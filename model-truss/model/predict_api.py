"""`POST /v1/models/model:predict`: this server's own API (a prompt or chat messages, sampling controls).

Body: `schema.GenerateRequest`. Response: `{"output", "finish_reason", "usage"}`, or with `"stream": true`
the text pieces as they are generated (`text/plain`; joined, they are exactly the non-streaming output).
Errors: `{"error": "<what to fix>"}` with the status of the `ServingError` (errors.py); a 429 carries
`Retry-After`. A stream that fails after its first piece ends without HTTP's final chunk (the connection
is closed mid-body), which every HTTP client reports as an incomplete read: the text received so far is
not the whole output.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from model.errors import ServingError
from model.generation import TextGenerator
from model.http_io import PREDICT_STREAM_MEDIA_TYPE, error_response, read_json
from model.schema import parse_request


async def predict(generator: TextGenerator, request: Request) -> Response:
    try:
        body = parse_request(await read_json(request, generator.settings.max_request_bytes))
        generation = await generator.start(body, request)
        if body.stream:
            return StreamingResponse(generation.stream(request), media_type=PREDICT_STREAM_MEDIA_TYPE)
        return JSONResponse((await generation.complete(request)).as_response())
    except ServingError as exc:
        return error_response(exc)
