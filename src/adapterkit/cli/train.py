"""``adapterkit train``: any registered method on the bundled VADER sets or a user's CSV/JSONL file.

Everything that can be checked is checked before the first training step: the options (the
method's config is built and validated first), the data file (every line), and the output
format, by writing the freshly attached adapter to a temporary directory in that format.
``--nproc N`` does all of that in this process, then starts N local processes (torch.distributed's
elastic launcher, gloo) that train data-parallel on the same global batches; each collective waits
at most ``--collective-timeout`` seconds for the other processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ..core import api
from ..core.registry import AdapterMethod, get_method
from ..errors import AdapterError, ConfigError, UnsupportedError
from ..io import artefact
from ..io.safefiles import write_json
from ..methods.mosa import two_pass_loss
from ..train import distributed
from ..train.loop import TextBatches, accuracy, default_learning_rate, train as train_loop
from .commands import LABELS_FILE, dataset, load_model
from .options import build_config

CALIBRATION_BATCHES = 8  # batches of gradients for masks chosen by gradient (as bench/shira_quality)


def _write(model: torch.nn.Module, directory: str | Path, name: str, format: str) -> None:
    """``adapterkit`` format: the adapter as trained. ``peft``: its portable form (:func:`artefact.export`),
    e.g. a DyLoRA adapter as a plain LoRA at its inference rank, which after training is ``r_max``."""
    if format == "peft":
        artefact.export(model, name, directory, format="peft")
    else:
        artefact.save(model, directory, name)


def _check_format(method: AdapterMethod, format: str) -> None:
    """Refuse at once a PEFT save of a method that has neither a PEFT codec nor a portable form."""
    if format == "peft" and method.peft is None and type(method).portable is AdapterMethod.portable:
        raise UnsupportedError(f"method {method.name!r} has no PEFT file format; use --format adapterkit")


@dataclasses.dataclass
class Prepared:
    """Everything a training run needs, built and checked (the adapter attached, a trial save done)."""

    model: torch.nn.Module
    tokenizer: Any
    batches: TextBatches
    train_set: Any
    test_set: Any
    lr: float


def _prepare(args: argparse.Namespace, announce: bool = True) -> Prepared:
    method = get_method(args.method)
    config = build_config(method.config_class, args)
    _check_format(method, args.format)
    torch.manual_seed(args.seed)
    train_set = dataset(args.data, "train", args.test_size, args.text_column, args.label_column)
    if args.train_size:
        train_set = train_set.head(args.train_size)
    test_set = dataset(args.data, "test", args.test_size, args.text_column, args.label_column)
    model, tokenizer = load_model(args.model, train_set.num_classes)
    batches = TextBatches(tokenizer, train_set, args.batch_size, args.max_length, shuffle=True, seed=args.seed)
    # a config that chooses its weights by gradient (SHiRA grad/snip masks) gets calibration batches
    calibration = TextBatches(tokenizer, train_set.head(CALIBRATION_BATCHES * args.batch_size), args.batch_size,
                              args.max_length)
    options = {"calibration": calibration} if getattr(config, "needs_gradients", False) else {}
    api.attach(model, config, args.name, **options)
    with tempfile.TemporaryDirectory() as scratch:  # the save must work before hours of training
        _write(model, Path(scratch) / "adapter", args.name, args.format)
    lr = args.lr if args.lr is not None else default_learning_rate(model)
    if announce:
        trainable, total = api.trainable_parameters(model)
        processes = f" on {args.nproc} processes" if getattr(args, "nproc", 1) > 1 else ""
        print(f"training {method.name} adapter {args.name!r}: {trainable:,} trainable of {total:,} parameters on "
              f"{len(train_set)} examples{processes}; learning rate {lr:g}"
              + ("" if args.lr is not None else " (method default)"), flush=True)
    return Prepared(model, tokenizer, batches, train_set, test_set, lr)


def _finish(run: Prepared, args: argparse.Namespace) -> int:
    """Held-out accuracy, the adapter (and class names) written, the summary printed."""
    acc = accuracy(run.model, TextBatches(run.tokenizer, run.test_set, 128, args.max_length, by_length=True))
    _write(run.model, args.out, args.name, args.format)
    if run.train_set.label_names:
        write_json(Path(args.out) / LABELS_FILE, {"label_names": list(run.train_set.label_names)})
        print(f"class ids: {json.dumps(dict(enumerate(run.train_set.label_names)))} (in {LABELS_FILE})")
    print(f"held-out accuracy {acc:.3f} on {len(run.test_set)} examples; adapter saved to {args.out}", flush=True)
    return 0


def train(args: argparse.Namespace) -> int:
    """Train, evaluate on the held-out split and save one adapter (see the module docstring).
    With ``--nproc N > 1`` everything is checked here first, then N local processes train
    data-parallel (:func:`rank_main`)."""
    nproc = getattr(args, "nproc", 1)
    if not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc must be an integer >= 1, got {nproc!r}")
    timeout = getattr(args, "collective_timeout", None)
    if nproc > 1 and not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
        raise ConfigError(f"--collective-timeout must be a number of seconds > 0, got {timeout!r}")
    run = _prepare(args)
    if nproc == 1:
        # two_pass_loss is the plain loss unless an active adapter asks for a consistency pass (MoSA)
        train_loop(run.model, run.batches, epochs=args.epochs, lr=run.lr, loss_fn=two_pass_loss)
        return _finish(run, args)
    del run  # each process builds its own
    results = distributed.launch(rank_main, nproc, (args,))
    outcomes = sorted(results.values(), key=lambda r: r.rank)
    if all(r.status == 0 for r in outcomes):
        steps = sorted({r.steps for r in outcomes})
        print(f"{len(outcomes)} processes (ranks {', '.join(str(r.rank) for r in outcomes)}) trained "
              f"{' / '.join(map(str, steps))} optimizer steps each", flush=True)
    return max(r.status for r in outcomes)


@dataclasses.dataclass(frozen=True)
class RankOutcome:
    """What one process of ``--nproc N`` reports back: its rank (from its process group), its exit
    status (0, or 2 after an error it printed), and the optimizer steps it took part in."""

    rank: int
    status: int
    steps: int


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def rank_main(args: argparse.Namespace) -> RankOutcome:
    """One process of ``--nproc N``: the same model, adapter and global batches as ``--nproc 1``,
    this rank's rows of each batch under DDP (:func:`adapterkit.train.distributed.train`). Rank 0
    then evaluates and writes the adapter on its own: the other ranks end after training rather
    than wait for it (no collective would bound that wait by the work)."""
    import torch.distributed as dist

    from .main import _quiet_transformers

    _quiet_transformers()  # as the launching process did
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.collective_timeout))
    rank, world = distributed.rank_and_world()
    steps = 0
    try:
        torch.set_num_threads(args.threads or max(1, usable_cores() // world))  # the cores, shared
        run = _prepare(args, announce=False)
        if rank:  # dropout masks differ across ranks as they do across the rows of one batch
            torch.manual_seed(args.seed + rank)
        steps = len(distributed.train(run.model, run.batches, epochs=args.epochs, lr=run.lr, loss_fn=two_pass_loss))
    except (AdapterError, OSError, ValueError) as error:  # what main() reports in one line
        print(f"adapterkit: error (rank {rank}): {error}", file=sys.stderr, flush=True)
        return RankOutcome(rank, 2, steps)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        try:
            _finish(run, args)
        except (AdapterError, OSError, ValueError) as error:
            print(f"adapterkit: error (rank {rank}): {error}", file=sys.stderr, flush=True)
            return RankOutcome(rank, 2, steps)
    return RankOutcome(rank, 0, steps)
