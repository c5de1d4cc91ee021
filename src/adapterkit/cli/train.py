"""``adapterkit train``: any registered method on the bundled VADER sets or a user's CSV/JSONL file.

Everything that can be checked is checked before the first training step: the options (the
method's config is built and validated first), the data file (every line), and the output
format, by writing the freshly attached adapter to a temporary directory in that format.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from ..core import api
from ..core.registry import AdapterMethod, get_method
from ..errors import UnsupportedError
from ..io import artefact
from ..io.safefiles import write_json
from ..methods.mosa import two_pass_loss
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


def train(args: argparse.Namespace) -> int:
    """Train, evaluate on the held-out split and save one adapter (see the module docstring)."""
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
    trainable, total = api.trainable_parameters(model)
    print(f"training {method.name} adapter {args.name!r}: {trainable:,} trainable of {total:,} parameters on "
          f"{len(train_set)} examples; learning rate {lr:g}" + ("" if args.lr is not None else " (method default)"))
    # two_pass_loss is the plain loss unless an active adapter asks for a consistency pass (MoSA)
    train_loop(model, batches, epochs=args.epochs, lr=lr, loss_fn=two_pass_loss)
    acc = accuracy(model, TextBatches(tokenizer, test_set, 128, args.max_length, by_length=True))
    _write(model, args.out, args.name, args.format)
    if train_set.label_names:
        write_json(Path(args.out) / LABELS_FILE, {"label_names": list(train_set.label_names)})
        print(f"class ids: {json.dumps(dict(enumerate(train_set.label_names)))} (in {LABELS_FILE})")
    print(f"held-out accuracy {acc:.3f} on {len(test_set)} examples; adapter saved to {args.out}")
    return 0
