"""HTTP routes: a thin map from requests to the chat service, and from results to responses."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gateway import events as console
from gateway.errors import (
    APIError,
    BodyTooLarge,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
)
from gateway.ledger import Ledger
from gateway.mesh import Mesh
from gateway.metrics import Metrics
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from gateway.service import ChatService, Completion

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
MAX_BODY_BYTES = 8 << 20
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
Parsed = TypeVar("Parsed", bound=SamplingRequest)


@dataclass(frozen=True)
class ServedModel:
    """One model the gateway serves: its chat service (engine inside) and its mesh."""

    name: str
    service: ChatService
    mesh: Mesh


@dataclass
class GatewayState:
    """What the routes reach: every served model, by the name clients ask for."""

    models: dict[str, ServedModel]
    metrics: Metrics
    join_token: str
    started: float
    ledger: Ledger | None = None

    @property
    def first(self) -> ServedModel:
        return next(iter(self.models.values()))

    @property
    def service(self) -> ChatService:
        """The first model's service (the only one in a single-model gateway)."""
        return self.first.service

    @property
    def mesh(self) -> Mesh:
        return self.first.mesh

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise ModelNotFound(f"The model '{name}' does not exist", "model")
        return self.models[name]


def _state(request: Request) -> GatewayState:
    return request.app.state.gateway


def _validation_error(error: ValidationError) -> InvalidRequest:
    first = error.errors()[0]
    # a whole-request check names its field in its context (see protocol's UNHONOURED)
    param = ".".join(str(part) for part in first["loc"]) or first.get("ctx", {}).get("name")
    return InvalidRequest(f"{param}: {first['msg']}" if param else first["msg"], param)


async def _bounded_body(request: Request) -> bytes:
    """The request's body, read no further than MAX_BODY_BYTES: a declared length over it is
    refused before reading, and a body without one is cut off once it passes the limit."""
    too_large = BodyTooLarge(f"request body larger than {MAX_BODY_BYTES} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _json_body(body: bytes) -> Any:
    """The body as JSON that the rest of the gateway can take: parsed, not nested past
    Python's recursion limit, and without an unpaired UTF-16 surrogate (JSON may escape one,
    `"\\ud800"`, but no UTF-8 text holds it, so the tokenizer could not read it)."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequest(f"request body is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    if SURROGATE_ESCAPE.search(body):  # only then can a string hold one
        try:
            json.dumps(payload, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidRequest("request body holds an unpaired UTF-16 surrogate") from None
    return payload


async def _parse(request: Request, kind: type[Parsed]) -> Parsed:
    payload = _json_body(await _bounded_body(request))
    if not isinstance(payload, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return kind.model_validate(payload)
    except ValidationError as error:
        raise _validation_error(error) from None


async def chat_completions(request: Request) -> Response:
    chat_request = await _parse(request, ChatCompletionRequest)
    service = _state(request).model(chat_request.model).service
    return await _respond(service, service.start(chat_request), chat_request.stream)


async def completions(request: Request) -> Response:
    """The legacy text completion, which many tools and benchmarks still speak."""
    text_request = await _parse(request, CompletionRequest)
    service = _state(request).model(text_request.model).service
    return await _respond(service, service.start_text(text_request), text_request.stream)


async def _respond(service: ChatService, completion: Completion, stream: bool) -> Response:
    if not stream:
        return JSONResponse(await service.complete(completion))

    async def events():
        async for chunk in service.stream(completion):
            yield {"data": json.dumps(chunk, separators=(",", ":"))}
            if "error" in chunk:
                return
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15)


def _model_object(state: GatewayState, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(state.started), "owned_by": "meshpipe"}


async def models(request: Request) -> Response:
    state = _state(request)
    data = [_model_object(state, name) for name in state.models]
    return JSONResponse({"object": "list", "data": data})


async def model(request: Request) -> Response:
    state = _state(request)
    name = state.model(request.path_params["name"]).name
    return JSONResponse(_model_object(state, name))


async def health(request: Request) -> Response:
    state = _state(request)
    ready = all(model.mesh.live for model in state.models.values())
    return JSONResponse({"status": "ok" if ready else "starting", "ready": ready})


def _is_local(request: Request) -> bool:
    return request.client is not None and request.client.host in ("127.0.0.1", "::1", "localhost")


async def status(request: Request) -> Response:
    state = _state(request)
    body: dict[str, Any] = {
        "model": state.service.model_name,
        "uptime": time.time() - state.started,
        "pipeline": state.mesh.status(),
        "engine": state.service.engine.status(),
    }
    body["stages"] = body["pipeline"]["stages"]
    body["models"] = [
        {"name": name, "pipeline": m.mesh.status(), "engine": m.service.engine.status()}
        for name, m in state.models.items()
    ]
    if _is_local(request):
        body["join_token"] = state.join_token
    return JSONResponse(body)


async def ledger(request: Request) -> Response:
    """Totals per worker and the most recent requests of the contribution ledger."""
    state = _state(request)
    if state.ledger is None:
        raise NotFound("this gateway keeps no ledger")
    limit = request.query_params.get("limit", "20")
    if not limit.isdigit():
        raise InvalidRequest("limit: expected a non-negative integer", "limit")
    return JSONResponse(await state.ledger.summary(int(limit)))


async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type="text/plain; version=0.0.4")


async def api_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, APIError)
    return JSONResponse(error.body(), status_code=error.status)


async def unexpected_error(request: Request, error: Exception) -> Response:
    """A bug's answer is an error object too, not a bare "Internal Server Error" (Starlette
    raises the error on after this answer, so the server logs its traceback)."""
    api = APIError(f"internal error: {type(error).__name__}")
    return JSONResponse(api.body(), status_code=api.status)


async def http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    # The console's static mount at "/" answers any other path: 404, or 405 for a method other
    # than GET (so POST /v1/embeddings would have read "method not allowed"). Only a known API
    # path asked with the wrong method deserves 405.
    known_path = any(
        isinstance(route, Route) and route.path_regex.match(request.url.path)
        for route in request.app.routes
    )
    if error.status_code in (404, 405) and known_path:
        api: APIError = MethodNotAllowed(
            f"method {request.method} not allowed on {request.url.path}"
        )
    elif error.status_code in (404, 405):
        api = NotFound(f"no route {request.method} {request.url.path}")
    else:
        api = InvalidRequest(str(error.detail))
        api.status = error.status_code
    return JSONResponse(api.body(), status_code=api.status)


EXCEPTION_HANDLERS = {
    APIError: api_error,
    HTTPException: http_error,
    Exception: unexpected_error,
}


def build_app(state: GatewayState) -> Starlette:
    """The gateway's Starlette application."""
    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/api/status", status, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/api/events", console.events, methods=["GET"]),
        Route("/api/models", console.models, methods=["GET"]),
        Route("/api/ledger", ledger, methods=["GET"]),
    ]
    if WEB_DIR.is_dir():
        routes.append(Mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web"))
    app = Starlette(
        routes=routes,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.gateway = state
    return app
