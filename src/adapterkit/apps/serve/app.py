"""The HTTP layer of ``adapterkit serve``: a FastAPI application over an :class:`~.engine.Engine`.

=========================  ==========================================================================
``GET /health``            200 while the engine accepts work, 503 while it shuts down
``GET /metrics``           requests, errors by status, latency p50/p90/p99, batch sizes, adapters, RSS
``GET /adapters``          the loaded adapters with the bytes each holds, and how many fit in 1 GiB
``POST /adapters``         ``{"path", "name"?}``: load an adapter from a directory under the root (201)
``DELETE /adapters/NAME``  unload it
``POST /predict``          ``{"adapter": NAME|null, "texts": [...]}`` → labels and logits (classifiers)
``POST /generate``         ``{"adapter": NAME|null, "prompt", "max_new_tokens"}`` → greedy text (causal LMs)
=========================  ==========================================================================

Answers name the adapter's ``version``: which load of it produced them (1, 2, ... over the server's
life; ``GET /adapters`` shows each adapter's version and its path relative to the root).

Errors are JSON ``{"error": class name, "detail": message}`` with the status of
:data:`~.errors.STATUS` (422 bad input, 404 unknown adapter, 400 unusable adapter directory, 403 path
outside the root or unreadable, 409 duplicate name, 413 body over ``max_body_bytes`` (refused before
it is parsed), 429 queue full, 500 a failure of the server's, 503 shutting down, 507 no room for one
more adapter); no error is plain text. Handlers never block the event loop: they await the
engine's futures.

The admin endpoints (load, unload) have no authentication: anyone who can reach the server can
load any adapter under the root or unload one. ``adapterkit serve`` listens on 127.0.0.1 unless
told otherwise; put it behind an authenticating proxy before exposing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Annotated, Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..._version import __version__
from ...errors import AdapterError, ConfigError
from .engine import Engine
from .errors import status_of
from .settings import DEFAULT_MAX_BODY_BYTES
from .store import GIB

# schema bounds: the widest any server accepts; each engine's EngineSettings may set tighter ones (422 too)
SCHEMA_MAX_TEXTS = 1024
SCHEMA_MAX_CHARS = 100_000
SCHEMA_MAX_NEW_TOKENS = 4096
AdapterName = Annotated[str, StringConstraints(min_length=1, max_length=100)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=SCHEMA_MAX_CHARS)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PredictRequest(_Body):
    """Classify ``texts`` with ``adapter`` (null: the base model)."""

    adapter: AdapterName | None = None
    texts: Annotated[list[Text], Field(min_length=1, max_length=SCHEMA_MAX_TEXTS)]


class GenerateRequest(_Body):
    """Greedy continuation of ``prompt`` with ``adapter`` (null: the base model)."""

    adapter: AdapterName | None = None
    prompt: Text
    max_new_tokens: Annotated[int, Field(ge=1, le=SCHEMA_MAX_NEW_TOKENS)] | None = None  # None: 32 or the server's limit


class LoadRequest(_Body):
    """Load the adapter directory ``path`` (relative to the server's root, or absolute inside it)."""

    path: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    name: AdapterName | None = None


def error_body(error: BaseException) -> dict[str, str]:
    """The JSON body of an error answer: the error's class name and its message."""
    return {"error": type(error).__name__, "detail": str(error)}


class BodyTooLargeError(HTTPException):
    """A request body over the server's ``max_body_bytes`` (HTTP 413), refused before it is parsed."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this server takes ({limit:,} bytes)")


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` is answered 413 before the application reads it
    whole (a ``Content-Length`` over the limit at once; a chunked body as soon as it passes it)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            error = BodyTooLargeError(self.max_bytes)
            await JSONResponse({"error": type(error).__name__, "detail": error.detail}, 413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLargeError(self.max_bytes)  # FastAPI lets HTTPExceptions through its body parsing
            return message

        await self.app(scope, limited, send)


def create_app(engine: Engine, *, close_engine: bool = True, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The application; its lifespan starts the engine and (``close_engine``) closes it gracefully
    on shutdown, after the server has stopped taking connections. Bodies over ``max_body_bytes``
    are refused with 413 before they are parsed."""
    if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool) or max_body_bytes < 1:
        raise ConfigError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        if close_engine:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="adapterkit serve", version=__version__, lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(AdapterError)
    async def adapter_error(request: Request, error: AdapterError) -> JSONResponse:
        return JSONResponse(error_body(error), status_code=status_of(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        # Starlette's own errors (unknown route 404, wrong method 405, 413) in the same body shape
        return JSONResponse({"error": type(error).__name__, "detail": error.detail}, status_code=error.status_code,
                            headers=error.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        # anything unforeseen is still a JSON answer (Starlette logs the traceback and re-raises to the server)
        return JSONResponse({"error": "InternalServerError", "detail": f"{type(error).__name__}: {error}"},
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        # the same body shape as every other error; "detail" keeps pydantic's list of what is wrong
        return JSONResponse({"error": "RequestValidationError", "detail": jsonable_encoder(error.errors())}, status_code=422)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            engine.metrics.record_request(status, time.perf_counter() - start)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = engine.status()
        return JSONResponse(status, status_code=200 if status["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        loaded = engine.adapters()
        return {**engine.metrics.snapshot(), "queued": engine.queued, "adapters_loaded": len(loaded),
                "adapter_bytes_held": sum(a.memory.held for a in loaded),
                "adapters": {a.name: a.memory.to_dict() for a in loaded}}

    @app.get("/adapters")
    async def list_adapters() -> dict[str, Any]:
        return {"adapters": [a.to_dict() for a in engine.adapters()], "fits_in_1gib": engine.store.fits_in(GIB)}

    @app.post("/adapters", status_code=201)
    async def load_adapter(body: LoadRequest) -> dict[str, Any]:
        entry = await asyncio.wrap_future(engine.load(body.path, body.name))
        return entry.to_dict()

    @app.delete("/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        entry = await asyncio.wrap_future(engine.unload(name))
        return {"unloaded": entry.name}

    @app.post("/predict")
    async def predict(body: PredictRequest) -> dict[str, Any]:
        return dataclasses.asdict(await asyncio.wrap_future(engine.submit_predict(body.adapter, body.texts)))

    @app.post("/generate")
    async def generate(body: GenerateRequest) -> dict[str, Any]:
        return dataclasses.asdict(await asyncio.wrap_future(engine.submit_generate(body.adapter, body.prompt,
                                                                                   body.max_new_tokens)))

    return app
