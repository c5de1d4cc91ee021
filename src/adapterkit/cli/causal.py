"""``adapterkit train|eval --task causal-lm``: adapters of any method on a causal LM, trained on
prompt/completion pairs (loss on completion tokens only) and scored by exact match.

``--data`` is a JSONL file of ``{"prompt", "completion"}`` or ``{"input", "target"}`` lines (an
``--instruction`` goes before each input, as :meth:`adapterkit.zoo.lm_tasks.LMTask.prompt` does), a
task directory written by :func:`adapterkit.zoo.lm_tasks.write_jsonl`, or a zoo task name. A file
is read and checked completely before the model is loaded; its held-out split is its last lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from ..core import api
from ..core.registry import get_method
from ..errors import ConfigError, DataNotFoundError, MissingFileError
from ..io import artefact
from ..train.causal import (Completion, ExactMatch, attach_for_completions, exact_match, normalise_answer,
                            train_completions)
from ..train.loop import default_learning_rate
from ..zoo.llm import MODELS, load_lm
from ..zoo.data import json_lines
from ..zoo.lm_tasks import LM_TASKS, LMTask, lm_task, read_task_dir
from .options import DEST, build_config
from .train import CALIBRATION_BATCHES, _check_format, _write

CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"
TASKS = (CLASSIFICATION, CAUSAL_LM)
#: modules adapted by default on an LM (attention query and value projections of Llama and Gemma)
LM_TARGETS = ("q_proj", "v_proj")
LM_TRAIN_DEFAULTS = {"batch_size": 8, "epochs": 2}


def add_task_option(parser: argparse.ArgumentParser) -> None:
    """``--task`` (train and eval): the options shown are the chosen task's."""
    parser.add_argument("--task", choices=TASKS, default=CLASSIFICATION,
                        help="sentence classification, or prompt/completion training and exact-match "
                             "scoring of a causal LM (see 'adapterkit train --task causal-lm --help')")


def add_lm_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The model and data options of ``train``/``eval`` with ``--task causal-lm``."""
    parser.add_argument("--model", required=True, help=f"causal LM: {', '.join(sorted(MODELS))} or a local Hugging Face directory")
    parser.add_argument("--data", required=True,
                        help="a .jsonl file of {\"prompt\", \"completion\"} or {\"input\", \"target\"} lines, a task "
                             f"directory (train/seeds/test.jsonl + task.json), or a zoo task: {', '.join(LM_TASKS)}")
    parser.add_argument("--instruction", default=None,
                        help="text put before each input of {\"input\", \"target\"} lines (instruction, blank line, input)")
    parser.add_argument("--test-size", type=int, default=None,
                        help="held-out examples: a file's last lines (None: a fifth), a task's first test examples "
                             "(None: all; a zoo task makes 500)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens generated per answer in scoring (None: the longest target's + 4)")
    parser.add_argument("--eval-batch-size", type=int, default=32, help="prompts per generation batch")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    if command == "train":
        parser.add_argument("--max-length", type=int, default=256,
                            help="tokens per training prompt + completion (a longer prompt loses its start)")
    if command == "eval":
        parser.add_argument("--predictions", default=None, help="write each prompt, target and prediction to this .jsonl file")


def set_lm_train_defaults(parser: argparse.ArgumentParser) -> None:
    """Training defaults for an LM: fewer, longer sequences per step; attention q/v projections, no head."""
    parser.set_defaults(**LM_TRAIN_DEFAULTS, **{DEST + "target_modules": LM_TARGETS, DEST + "modules_to_save": None})


@dataclasses.dataclass(frozen=True)
class LMData:
    """Training and held-out pairs read from ``--data``."""

    train: tuple[Completion, ...]
    test: tuple[Completion, ...]


def _read_pairs(path: Path, instruction: str | None) -> list[Completion]:
    """Every line of a JSONL file as a pair; any bad line raises naming ``file:line``."""
    pairs, form = [], None
    for number, row in json_lines(path):
        where = f"{path}:{number}"
        keys = ("prompt", "completion") if "prompt" in row else ("input", "target")
        if not all(k in row for k in keys):
            raise ConfigError(f"{where}: expected \"prompt\" and \"completion\" or \"input\" and \"target\", "
                              f"got the keys {sorted(row)[:8]}")
        if form is not None and keys != form:
            raise ConfigError(f"{where}: {keys} line in a file of {form} lines; use one form per file")
        form = keys
        for key in keys:
            if not isinstance(row[key], str) or not row[key].strip():
                raise ConfigError(f"{where}: {key!r} must be a non-empty string, got {json.dumps(row[key])[:80]}")
        if keys[0] == "prompt":
            if instruction is not None:
                raise ConfigError(f"{where}: --instruction applies to \"input\"/\"target\" lines; these have whole prompts")
            pairs.append(Completion(row["prompt"], row["completion"]))
        else:
            pairs.append(Completion(row["input"] if instruction is None else f"{instruction}\n\n{row['input']}", row["target"]))
    if not pairs:
        raise ConfigError(f"{path}: no examples")
    return pairs


def _task_pairs(task: LMTask, split: str) -> tuple[Completion, ...]:
    return tuple(Completion(task.prompt(example), example.target) for example in getattr(task, split))


def lm_data(spec: str, instruction: str | None = None, test_size: int | None = None,
            train_size: int | None = None, training: bool = True) -> LMData:
    """The pairs of ``--data`` (see the module docstring), checked completely; no model is needed.
    ``training=False`` (eval) lets a file's held-out split be the whole file."""
    for label, value, least in (("--test-size", test_size, 0), ("--train-size", train_size, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{label} must be at least {least}, got {value}")
    path = Path(spec)
    if path.is_dir() or spec in LM_TASKS:
        if instruction is not None:
            raise ConfigError(f"{spec} is a task with its own instruction; --instruction is for .jsonl files")
        if path.is_dir():
            task = read_task_dir(path)
        else:
            sizes = {k: v for k, v in (("train_size", train_size), ("test_size", test_size)) if v}
            task = lm_task(spec, **sizes)
        train, test = _task_pairs(task, "train"), _task_pairs(task, "test")
        test = test if test_size is None else test[:test_size]
    elif path.suffix.lower() == ".jsonl":
        if not path.is_file():
            raise MissingFileError(f"no such file: {path}")
        pairs = _read_pairs(path, instruction)
        size = test_size if test_size is not None else len(pairs) // 5
        if training and size >= len(pairs):
            raise ConfigError(f"{path}: {len(pairs)} examples leave none for training with --test-size {size}")
        size = min(size, len(pairs))
        train, test = tuple(pairs[:len(pairs) - size]), tuple(pairs[len(pairs) - size:])
    else:
        raise DataNotFoundError(f"{spec!r} is neither a .jsonl file, a task directory nor a zoo task "
                                f"({', '.join(LM_TASKS)})")
    return LMData(train[:train_size] if train_size else train, test)


def _score(model: torch.nn.Module, tokenizer, pairs: tuple[Completion, ...], args: argparse.Namespace) -> ExactMatch:
    return exact_match(model, tokenizer, [p.prompt for p in pairs], [p.completion for p in pairs],
                       max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)


def _report(result: ExactMatch) -> str:
    return f"exact match {result.accuracy:.3f} ± {result.standard_error:.3f} (binomial SE, n={result.total})"


def train(args: argparse.Namespace) -> int:
    """Train, save, then score on the held-out split (if any) one adapter on a causal LM."""
    method = get_method(args.method)
    config = build_config(method.config_class, args)
    _check_format(method, args.format)
    data = lm_data(args.data, args.instruction, args.test_size, args.train_size)
    model, tokenizer = load_lm(args.model)
    # checks every pair against the tokenizer and --max-length before anything is attached
    # SHiRA grad/snip masks, LT-SFT: calibrate on the first batches; initial values from --seed
    attach_for_completions(model, tokenizer, config, args.name, data.train, seed=args.seed, batch_size=args.batch_size,
                           calibration_batches=CALIBRATION_BATCHES)
    with tempfile.TemporaryDirectory() as scratch:  # the save must work before the training
        _write(model, Path(scratch) / "adapter", args.name, args.format)
    lr = args.lr if args.lr is not None else default_learning_rate(model)
    trainable, total = api.trainable_parameters(model)
    print(f"training {method.name} adapter {args.name!r}: {trainable:,} trainable of {total:,} parameters on "
          f"{len(data.train)} examples; learning rate {lr:g}" + ("" if args.lr is not None else " (method default)"))
    torch.manual_seed(args.seed)  # this process's own RNG: stochastic methods (MoSA) train reproducibly
    losses = train_completions(model, tokenizer, data.train, epochs=args.epochs, lr=lr, batch_size=args.batch_size,
                               max_length=args.max_length, seed=args.seed)
    _write(model, args.out, args.name, args.format)
    print(f"final training loss {losses[-1]:.4f}; adapter saved to {args.out}")
    if data.test:
        print(f"held-out {_report(_score(model, tokenizer, data.test, args))}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Exact match of the base LM, or of the LM with the adapter directory, on the held-out split."""
    data = lm_data(args.data, args.instruction, args.test_size, training=False)
    if not data.test:
        raise ConfigError(f"{args.data}: no held-out examples to score (--test-size 0)")
    if args.predictions is not None and not Path(args.predictions).resolve().parent.is_dir():
        raise MissingFileError(f"--predictions: no directory {Path(args.predictions).parent}")
    model, tokenizer = load_lm(args.model)
    what = f"base model {args.model}"
    if args.adapter is not None:
        name = artefact.load(model, args.adapter, ignore_fingerprint=args.ignore_fingerprint)
        what = f"adapter {name!r} from {args.adapter} on {args.model}"
    result = _score(model, tokenizer, data.test, args)
    if args.predictions is not None:
        rows = ({"prompt": p.prompt, "target": p.completion, "prediction": pred,
                 "correct": normalise_answer(pred) == normalise_answer(p.completion)}
                for p, pred in zip(data.test, result.predictions))
        Path(args.predictions).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{what}: held-out {_report(result)} on {args.data}")
    return 0
