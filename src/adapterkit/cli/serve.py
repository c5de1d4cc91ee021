"""``adapterkit serve``: an HTTP server (FastAPI on uvicorn) holding one base model and many adapters.

FastAPI + uvicorn because they are the standard ASGI pair: request bodies are validated by pydantic
(bad input is a 422 before any handler runs), handlers await the engine without blocking the event
loop, uvicorn shuts down gracefully on SIGINT/SIGTERM (stops accepting, lets open requests finish,
then the app's lifespan drains the engine's queue), and Starlette's TestClient tests it in-process.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

from ..apps.serve import CAUSAL_LM, CLASSIFICATION, AdapterStore, Engine, EngineSettings
from ..apps.serve.settings import DEFAULT_MAX_BODY_BYTES
from ..core.build import check_adapter_name
from ..errors import ConfigError, MissingFileError
from ..io.layout import LABELS_FILE
from ..io.safefiles import read_json
from ..zoo.llm import MODELS, load_lm
from .commands import adapter_classes, load_model as load_classifier

DEFAULT_PORT = 8000
GRACEFUL_SHUTDOWN_S = 300  # open requests (a long generate behind a full queue) get this long after Ctrl-C


def register(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``adapterkit serve``."""
    p = command("serve", serve, help="serve one base model and many adapters over HTTP (mixed-adapter batches, "
                                     "hot load/unload)")
    p.add_argument("--model", default="minilm",
                   help=f"minilm (sentence classifier), {', '.join(sorted(MODELS))} (causal LM), or a local model "
                        "directory (a causal LM if its config names a ...ForCausalLM architecture, else an encoder)")
    p.add_argument("--adapters", nargs="*", default=[], metavar="[NAME=]DIR",
                   help="adapter directories loaded at start, each served under NAME (default: the directory's name)")
    p.add_argument("--root", default=None,
                   help="adapters load only from directories under this one (default: the deepest directory holding "
                        "every --adapters directory); relative paths in load requests are taken from it")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (the admin endpoints have no authentication: keep the loopback default "
                        "or put an authenticating proxy in front)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (0: any free port)")
    p.add_argument("--max-batch", type=int, default=EngineSettings.max_batch, help="rows per forward")
    p.add_argument("--max-queue", type=int, default=EngineSettings.max_queue,
                   help="requests waiting; one more is answered 429")
    p.add_argument("--max-wait-ms", type=float, default=EngineSettings.max_wait_ms,
                   help="how long the worker waits for more requests to fill a batch")
    p.add_argument("--max-length", type=int, default=EngineSettings.max_length,
                   help="tokens per text (classifiers; at most the model's positions)")
    p.add_argument("--max-prompt-tokens", type=int, default=EngineSettings.max_prompt_tokens,
                   help="tokens per prompt (causal LMs; with --max-new-tokens at most the model's positions)")
    p.add_argument("--max-new-tokens", type=int, default=EngineSettings.max_new_tokens,
                   help="the most tokens one generate request may ask for (causal LMs)")
    p.add_argument("--max-adapters", type=int, default=EngineSettings.max_adapters,
                   help="adapters loaded at once; one more is answered 507")
    p.add_argument("--max-adapter-bytes", type=int, default=EngineSettings.max_adapter_bytes,
                   help="bytes all loaded adapters may hold in memory; a load beyond is answered 507")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="request body limit; a larger body is answered 413 before it is parsed")
    p.add_argument("--graceful-timeout", type=float, default=GRACEFUL_SHUTDOWN_S,
                   help="seconds open requests get to finish after Ctrl-C/SIGTERM before their connections close "
                        "(queued work is still answered by the engine)")
    p.add_argument("--num-labels", type=int, default=None,
                   help="classifier head size (None: from the first adapter's labels.json, else 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _is_causal_lm(directory: Path) -> bool:
    if not (directory / "config.json").is_file():
        raise MissingFileError(f"no model directory (config.json) at {directory}")
    architectures = read_json(directory / "config.json").get("architectures") or []
    return isinstance(architectures, list) and any(str(a).endswith("ForCausalLM") for a in architectures)


def _num_labels(args: argparse.Namespace) -> int:
    if args.num_labels is not None:
        return args.num_labels
    # the first adapter with a labels.json decides; the engine checks every adapter against the head
    return next((adapter_classes(d) for _, d in startup_adapters(args) if Path(d, LABELS_FILE).is_file()), 2)


def startup_adapters(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """``(name, directory)`` for each ``--adapters [NAME=]DIR`` (checked before any model loads):
    two CLI-trained adapters both saved as 'default' are told apart by their directories."""
    named = []
    for item in args.adapters:
        name, sep, directory = item.partition("=")
        if not sep:
            name, directory = Path(item).resolve().name, item
        check_adapter_name(name)
        named.append((name, Path(directory)))
    names = [name for name, _ in named]
    if len(set(names)) < len(names):
        raise ConfigError(f"--adapters: names {sorted({n for n in names if names.count(n) > 1})} are used twice; "
                          "give NAME=DIR to tell them apart")
    return named


def load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """``(model, tokenizer, task)`` for ``--model``."""
    if args.model == "minilm":
        return (*load_classifier(None, _num_labels(args)), CLASSIFICATION)
    if args.model in MODELS or _is_causal_lm(Path(args.model)):
        return (*load_lm(args.model), CAUSAL_LM)
    return (*load_classifier(args.model, _num_labels(args)), CLASSIFICATION)


def adapter_root(args: argparse.Namespace) -> Path:
    """``--root``, else the deepest directory holding every ``--adapters`` directory (never the
    current directory by default: it may hold anything)."""
    if args.root is not None:
        return Path(args.root)
    if not args.adapters:
        raise ConfigError("give --root (the directory adapters may be loaded from) or --adapters")
    return Path(os.path.commonpath([d.resolve().parent for _, d in startup_adapters(args)]))


def build_engine(args: argparse.Namespace) -> Engine:
    """The model, its store with ``--adapters`` loaded, and an engine (not started yet)."""
    settings = EngineSettings(max_batch=args.max_batch, max_queue=args.max_queue, max_wait_ms=args.max_wait_ms,
                              max_length=args.max_length, max_prompt_tokens=args.max_prompt_tokens,
                              max_new_tokens=args.max_new_tokens, max_adapters=args.max_adapters,
                              max_adapter_bytes=args.max_adapter_bytes)
    root, named = adapter_root(args), startup_adapters(args)
    model, tokenizer, task = load_model(args)
    store = AdapterStore(model, root)
    for name, directory in named:
        store.load(directory.resolve(), name)
    return Engine(model, tokenizer, store, settings, task=task)


def serve(args: argparse.Namespace) -> int:
    """Load everything, then serve until interrupted (SIGINT/SIGTERM: graceful shutdown)."""
    import uvicorn

    from ..apps.serve.app import create_app

    engine = build_engine(args)
    names = ", ".join(engine.store.names()) or "none"
    print(f"adapterkit serve: {args.model} ({engine.task}), adapters: {names}; root {engine.store.root}; "
          f"http://{args.host}:{args.port}")
    config = uvicorn.Config(create_app(engine, max_body_bytes=args.max_body_bytes), host=args.host, port=args.port,
                            log_level="info", timeout_graceful_shutdown=args.graceful_timeout)
    uvicorn.Server(config).run()
    return 0
