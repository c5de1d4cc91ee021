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

Errors are JSON ``{"error": class name, "detail": message}`` with the status of
:data:`~.errors.STATUS` (422 bad input, 404 unknown adapter, 400 unusable adapter directory, 403 path
outside the root, 409 duplicate name, 429 queue full, 503 shutting down). Handlers never block the
event loop: they await the engine's futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated, Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..._version import __version__
from ...errors import AdapterError
from .engine import Engine
from .errors import status_of
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
    return {"error": type(error).__name__, "detail": str(error)}


def create_app(engine: Engine, *, close_engine: bool = True) -> FastAPI:
    """The application; its lifespan starts the engine and (``close_engine``) closes it gracefully
    on shutdown, after the server has stopped taking connections."""

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

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        # the same body shape as every other error; "detail" keeps pydantic's list of what is wrong
        return JSONResponse({"error": "RequestValidationError", "detail": jsonable_encoder(error.errors())}, status_code=422)

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
        result = await asyncio.wrap_future(engine.submit_predict(body.adapter, body.texts))
        return {"adapter": result.adapter, "labels": result.labels, "logits": result.logits,
                "label_names": result.label_names}

    @app.post("/generate")
    async def generate(body: GenerateRequest) -> dict[str, Any]:
        result = await asyncio.wrap_future(engine.submit_generate(body.adapter, body.prompt, body.max_new_tokens))
        return {"adapter": result.adapter, "text": result.text, "tokens": result.tokens}

    return app
