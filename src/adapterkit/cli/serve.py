"""``adapterkit serve``: an HTTP server (FastAPI on uvicorn) holding one base model and many adapters.

FastAPI + uvicorn because they are the standard ASGI pair: request bodies are validated by pydantic
(bad input is a 422 before any handler runs), handlers await the engine without blocking the event
loop, uvicorn shuts down gracefully on SIGINT/SIGTERM (stops accepting, lets open requests finish,
then the app's lifespan drains the engine's queue), and Starlette's TestClient tests it in-process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from ..apps.serve import CAUSAL_LM, CLASSIFICATION, AdapterStore, Engine, EngineSettings
from ..apps.serve.store import LABELS_FILE
from ..errors import ConfigError, MissingFileError
from ..zoo.llm import MODELS, load_lm
from ..zoo.models import load_sentence_classifier

DEFAULT_PORT = 8000


def register(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``adapterkit serve``."""
    p = command("serve", serve, help="serve one base model and many adapters over HTTP (mixed-adapter batches, "
                                     "hot load/unload)")
    p.add_argument("--model", default="minilm",
                   help=f"minilm (sentence classifier), {', '.join(sorted(MODELS))} (causal LM), or a local model "
                        "directory (a causal LM if its config names a ...ForCausalLM architecture, else an encoder)")
    p.add_argument("--adapters", nargs="*", default=[], metavar="DIR", help="adapter directories loaded at start")
    p.add_argument("--root", default=None,
                   help="adapters load only from directories under this one (None: the current directory); "
                        "relative paths in load requests are taken from it")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (0: any free port)")
    p.add_argument("--max-batch", type=int, default=EngineSettings.max_batch, help="rows per forward")
    p.add_argument("--max-queue", type=int, default=EngineSettings.max_queue,
                   help="requests waiting; one more is answered 429")
    p.add_argument("--max-wait-ms", type=float, default=EngineSettings.max_wait_ms,
                   help="how long the worker waits for more requests to fill a batch")
    p.add_argument("--max-length", type=int, default=EngineSettings.max_length, help="tokens per text (classifiers)")
    p.add_argument("--max-new-tokens", type=int, default=EngineSettings.max_new_tokens,
                   help="the most tokens one generate request may ask for (causal LMs)")
    p.add_argument("--num-labels", type=int, default=None,
                   help="classifier head size (None: from the first adapter's labels.json, else 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _is_causal_lm(directory: Path) -> bool:
    config = directory / "config.json"
    if not config.is_file():
        raise MissingFileError(f"no model directory (config.json) at {directory}")
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{config}: not a readable model config ({exc})") from None
    return any(str(a).endswith("ForCausalLM") for a in architectures)


def _num_labels(args: argparse.Namespace) -> int:
    if args.num_labels is not None:
        return args.num_labels
    for directory in args.adapters:
        path = Path(directory, LABELS_FILE)
        if path.is_file():
            try:
                return len(json.loads(path.read_text(encoding="utf-8"))["label_names"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}: no label_names list ({exc})") from None
    return 2


def load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """``(model, tokenizer, task)`` for ``--model``."""
    if args.model == "minilm":
        return (*load_sentence_classifier(None, num_labels=_num_labels(args)), CLASSIFICATION)
    if args.model in MODELS or _is_causal_lm(Path(args.model)):
        return (*load_lm(args.model), CAUSAL_LM)
    return (*load_sentence_classifier(args.model, num_labels=_num_labels(args)), CLASSIFICATION)


def build_engine(args: argparse.Namespace) -> Engine:
    """The model, its store with ``--adapters`` loaded, and an engine (not started yet)."""
    settings = EngineSettings(max_batch=args.max_batch, max_queue=args.max_queue, max_wait_ms=args.max_wait_ms,
                              max_length=args.max_length, max_new_tokens=args.max_new_tokens)
    root = Path(args.root if args.root is not None else ".")
    model, tokenizer, task = load_model(args)
    store = AdapterStore(model, root)
    for directory in args.adapters:
        store.load(Path(directory).resolve())
    return Engine(model, tokenizer, store, settings, task=task)


def serve(args: argparse.Namespace) -> int:
    """Load everything, then serve until interrupted (SIGINT/SIGTERM: graceful shutdown)."""
    import uvicorn

    from ..apps.serve.app import create_app

    engine = build_engine(args)
    names = ", ".join(engine.store.names()) or "none"
    print(f"adapterkit serve: {args.model} ({engine.task}), adapters: {names}; root {engine.store.root}; "
          f"http://{args.host}:{args.port}")
    config = uvicorn.Config(create_app(engine), host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=30)
    uvicorn.Server(config).run()
    return 0
