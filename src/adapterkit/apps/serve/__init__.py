"""``adapterkit serve``: one base model, many adapters, mixed-adapter batches, hot load/unload.

* :class:`AdapterStore` — loads adapters from directories under one root (:mod:`.paths`), reports
  their bytes.
* :class:`Engine` — one worker thread owns the model; bounded queue, dynamic batching through
  :func:`adapterkit.per_row`, loads/unloads between batches, graceful shutdown.
* :func:`create_app` — the FastAPI application (imported on first use: FastAPI is the ``serve`` extra).
"""

from typing import Any

from .engine import Engine
from .errors import (STATUS, CapacityError, InferenceError, OverloadedError, PathOutsideRootError, ServeError,
                     ShuttingDownError, UnreadablePathError, status_of)
from .settings import CAUSAL_LM, CLASSIFICATION, EngineSettings, Generation, Prediction, task_of
from .metrics import Metrics
from .store import AdapterMemory, AdapterStore, LoadedAdapter, adapter_memory


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterMemory", "AdapterStore", "CAUSAL_LM", "CLASSIFICATION", "CapacityError", "Engine", "EngineSettings",
    "Generation", "InferenceError", "LoadedAdapter", "Metrics", "OverloadedError", "PathOutsideRootError", "Prediction",
    "STATUS", "ServeError", "ShuttingDownError", "UnreadablePathError", "adapter_memory", "create_app", "status_of",
    "task_of",
]
