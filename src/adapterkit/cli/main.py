"""``adapterkit`` command line: demo, train, eval, rank-sweep, info, fuse, export, fetch-data, clir, transfer, rank.

Errors are printed as one line (no traceback) with exit status 2; ``--debug`` re-raises them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Mapping, NoReturn, Sequence

from ..core.registry import get_method, registered_methods
from ..errors import AdapterError
from .options import DEST, UsageError, add_config_options, nested_selectors, parse_targets, unknown_option_message

DEFAULT_METHOD = "lora"


class Parser(argparse.ArgumentParser):
    """Usage errors become one-line :class:`UsageError`s (main prints them, or re-raises with --debug)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see: {self.prog} --help)")


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default."""


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


def _add_model_args(parser: argparse.ArgumentParser, task: str = "classification", command: str = "") -> None:
    from . import causal

    if task == causal.CAUSAL_LM:
        causal.add_lm_options(parser, command)
        return
    parser.add_argument("--model", default=None, help="local encoder directory (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--data", default="vader:movies",
                        help="vader:movies, vader:tweets, vader:amazon, vader:nyt, or a .csv (with a header) / .jsonl file")
    parser.add_argument("--text-column", default="text", help="text column of a .csv/.jsonl file")
    parser.add_argument("--label-column", default="label", help="label column of a .csv/.jsonl file (integers or class names)")
    parser.add_argument("--test-size", type=int, default=None,
                        help="held-out examples, the last ones of a seeded shuffle (None: 1000 for VADER, a fifth of a file)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _add_train_args(parser: argparse.ArgumentParser, method: str, selected: Mapping[str, str]) -> None:
    """The command's own options, then the chosen method's config fields (see :mod:`.options`)."""
    from . import causal

    methods = [m.name for m in registered_methods()]
    task = selected.get("task", causal.CLASSIFICATION)
    _add_model_args(parser, task, "train")
    causal.add_task_option(parser)
    parser.add_argument("--out", required=True, help="adapter directory to write")
    parser.add_argument("--name", default="default", help="adapter name")
    parser.add_argument("--method", choices=methods, default=DEFAULT_METHOD,
                        help="adapter method; its config fields are the options below (shown for the method given)")
    parser.add_argument("--train-size", type=int, default=None, help="use only the first N training examples")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training examples")
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW learning rate (None: the method's default, x4 for 1-2-bit adapters; see the README)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
    parser.add_argument("--seed", type=int, default=0,
                        help="data order and head init; also the config's seed field where the method has one")
    parser.add_argument("--format", choices=("adapterkit", "peft"), default="adapterkit",
                        help="file format; peft writes the portable form (DyLoRA: a plain LoRA at rank r_max)")
    if task != causal.CAUSAL_LM:  # data-parallel training: cli/train.py
        parser.add_argument("--nproc", type=int, default=1, help="local processes training data-parallel (DDP on "
                            "gloo): the same global batches as 1 process, each its share of the rows; rank 0 saves")
        parser.add_argument("--collective-timeout", type=float, default=1800.0,
                            help="with --nproc: seconds a process waits for the others at a collective before it "
                                 "fails (torch's default)")
    taken = {"--debug", "-h", "--help", *(s for a in parser._actions for s in a.option_strings)}
    parser.add_argument("--targets", dest=DEST + "target_modules", type=parse_targets, default=argparse.SUPPRESS,
                        help="alias of --target-modules")
    add_config_options(parser, get_method(method).config_class, selected, taken)
    if task == causal.CAUSAL_LM:
        causal.set_lm_train_defaults(parser)


def build_parser(selected: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The full parser; ``selected`` chooses the method (``{"method": "shira"}``) and nested config
    classes (``{"base": "lora"}``) whose options ``train`` offers."""
    from . import causal, clir, commands, demo, info, rank, serve, train, transfer

    selected = dict(selected or {})
    method = selected.get("method", DEFAULT_METHOD)
    lm = selected.get("task") == causal.CAUSAL_LM
    task = causal.CAUSAL_LM if lm else causal.CLASSIFICATION
    method = method if method in {m.name for m in registered_methods()} else DEFAULT_METHOD
    parser = Parser(prog="adapterkit", description=__doc__.splitlines()[0], formatter_class=Formatter)
    parser.add_argument("--debug", action="store_true", help="re-raise errors with their traceback")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], int], **kwargs: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, formatter_class=Formatter, allow_abbrev=False, **kwargs)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="re-raise errors with their traceback")
        p.set_defaults(run=run)
        return p

    p = command("demo", demo.run, help="train a LoRA sentiment adapter on MiniLM + VADER movie snippets, end to end")
    _add_model_args(p)
    p.add_argument("--train-size", type=int, default=3000, help="training examples")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training examples")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--out", default="demo-output", help="where the adapter is saved")

    p = command("train", causal.train if lm else train.train, help="train an adapter of any registered method and save it",
                description=f"Train an adapter. The options shown are those of --task {task} and --method {method}; "
                            "see 'adapterkit train --task TASK --method NAME --help' for others.")
    _add_train_args(p, method, {**selected, "task": task})

    p = command("eval", causal.evaluate if lm else commands.evaluate,
                help="held-out accuracy of an adapter (or of a fused model directory); exact match with --task causal-lm")
    _add_model_args(p, task, "eval")
    causal.add_task_option(p)
    p.add_argument("adapter", nargs="?", default=None,
                   help="adapter directory (adapterkit or PEFT)" + ("; none: the base model" if lm else ""))
    p.add_argument("--ignore-fingerprint", action="store_true", help="load even if the base weights differ")

    p = command("rank-sweep", commands.rank_sweep,
                help="held-out accuracy of a DyLoRA adapter at every rank: table, plot, chosen rank")
    _add_model_args(p)
    p.add_argument("adapter", help="DyLoRA adapter directory")
    p.add_argument("--out", required=True, help="where rank_sweep.{json,md,png} are written")
    p.add_argument("--ranks", default=None, help="comma-separated ranks (default: every rank the adapter serves)")
    p.add_argument("--tolerance", type=float, default=0.01, help="accuracy a smaller rank may lose against the best")
    p.add_argument("--ignore-fingerprint", action="store_true", help="load even if the base weights differ")

    p = command("info", info.info, help="method, logical parameter count, size and base fingerprint of an adapter directory")
    p.add_argument("adapter", help="adapter directory (adapterkit or PEFT)")

    p = command("fuse", commands.fuse, help="write a standalone model with the adapter folded into its weights")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--model", default=None, help="local encoder directory (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--ignore-fingerprint", action="store_true", help="load even if the base weights differ")

    p = command("export", commands.export, help="convert an adapter directory to another format (e.g. PEFT)")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--model", default=None, help="local encoder directory (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--format", choices=("adapterkit", "peft"), default="peft", help="file format to write")
    p.add_argument("--rank", type=int, default=None, help="DyLoRA: write a plain LoRA of this rank")
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--ignore-fingerprint", action="store_true", help="load even if the base weights differ")

    p = command("fetch-data", clir.fetch_data, help="download data into the local cache (once): the VADER sentences "
                "from PyPI, (clir) the Debian man pages and fortunes of the CLIR collections, or (rank) Debian "
                "photos and cut-outs built into the image-ordering tasks")
    p.add_argument("dataset", nargs="?", choices=("vader", "clir", "rank"), default="vader", help="which data")
    clir.register(sub, command)
    transfer.register(sub, command, method, selected)
    rank.register(sub, command)
    serve.register(sub, command)
    return parser


def _selection(argv: Sequence[str]) -> dict[str, str]:
    """The method and nested config classes named on the command line (defaults where not)."""
    pre = Parser(add_help=False, allow_abbrev=False)
    pre.add_argument("--method", default=DEFAULT_METHOD)
    pre.add_argument("--task", default=None)
    for flag, key, default in dict.fromkeys(nested_selectors()):
        pre.add_argument(flag, dest=key, default=default)
    try:
        return vars(pre.parse_known_args(list(argv))[0])
    except UsageError:
        return {}  # e.g. --method without a value: the full parser says so


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # looked up first, so that usage errors re-raise too
    _quiet_transformers()
    try:
        parser = build_parser(_selection(argv))
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise UsageError(unknown_option_message(extra, getattr(args, "method", None)))
        run: Callable[[argparse.Namespace], int] = args.run
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return run(args) or 0
    except (AdapterError, OSError, ValueError) as exc:
        if debug:
            raise
        print(f"adapterkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adapterkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
