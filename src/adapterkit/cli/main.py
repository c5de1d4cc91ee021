"""``adapterkit`` command line: demo, train, eval, rank-sweep, info, fuse, export, fetch-data.

Errors are printed as one line (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from ..errors import AdapterError


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local encoder directory (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--data", default="vader:movies", help="dataset, e.g. vader:movies, vader:tweets, vader:amazon, vader:nyt")
    parser.add_argument("--test-size", type=int, default=1000, help="held-out examples (the last ones of the seeded shuffle)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def build_parser() -> argparse.ArgumentParser:
    from . import commands, demo

    parser = argparse.ArgumentParser(prog="adapterkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a LoRA sentiment adapter on MiniLM + VADER movie snippets, end to end")
    _add_model_args(p)
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default="demo-output", help="where the adapter is saved")
    p.set_defaults(run=demo.run)

    p = sub.add_parser("train", help="train an adapter for sentence classification and save it")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--name", default="default")
    p.add_argument("--method", choices=("lora", "dylora"), default="lora",
                   help="dylora: one run serves every rank 1..r (pick one later with rank-sweep / export --rank)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (DyLoRA: the largest rank)")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--targets", default="query,value", help="comma-separated module names, a regex, or all-linear")
    p.add_argument("--train-size", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("adapterkit", "peft"), default="adapterkit")
    p.set_defaults(run=commands.train)

    p = sub.add_parser("eval", help="held-out accuracy of an adapter (or of a fused model directory)")
    _add_model_args(p)
    p.add_argument("adapter", nargs="?", default=None, help="adapter directory (adapterkit or PEFT)")
    p.add_argument("--ignore-fingerprint", action="store_true")
    p.set_defaults(run=commands.evaluate)

    p = sub.add_parser("rank-sweep", help="held-out accuracy of a DyLoRA adapter at every rank: table, plot, chosen rank")
    _add_model_args(p)
    p.add_argument("adapter", help="DyLoRA adapter directory")
    p.add_argument("--out", required=True, help="where rank_sweep.{json,md,png} are written")
    p.add_argument("--ranks", default=None, help="comma-separated ranks (default: every rank the adapter serves)")
    p.add_argument("--tolerance", type=float, default=0.01, help="accuracy a smaller rank may lose against the best")
    p.add_argument("--ignore-fingerprint", action="store_true")
    p.set_defaults(run=commands.rank_sweep)

    p = sub.add_parser("info", help="method, size, parameter count and base fingerprint of an adapter directory")
    p.add_argument("adapter")
    p.set_defaults(run=commands.info)

    p = sub.add_parser("fuse", help="write a standalone model with the adapter folded into its weights")
    p.add_argument("adapter")
    p.add_argument("--model", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--ignore-fingerprint", action="store_true")
    p.set_defaults(run=commands.fuse)

    p = sub.add_parser("export", help="convert an adapter directory to another format (e.g. PEFT)")
    p.add_argument("adapter")
    p.add_argument("--model", default=None)
    p.add_argument("--format", choices=("adapterkit", "peft"), default="peft")
    p.add_argument("--rank", type=int, default=None, help="DyLoRA: write a plain LoRA of this rank")
    p.add_argument("--out", required=True)
    p.add_argument("--ignore-fingerprint", action="store_true")
    p.set_defaults(run=commands.export)

    p = sub.add_parser("fetch-data", help="download the VADER sentences from PyPI into the local cache (once)")
    p.set_defaults(run=commands.fetch_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_transformers()
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return run(args) or 0
    except AdapterError as exc:
        print(f"adapterkit: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"adapterkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adapterkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
