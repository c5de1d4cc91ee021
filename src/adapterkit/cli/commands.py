"""The subcommands eval, rank-sweep, fuse, export and fetch-data, and the data and model helpers of
every command (train: :mod:`.train`, info: :mod:`.info`). Each takes parsed arguments and returns an
exit status."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core import api
from ..io import artefact
from ..zoo import data
from ..errors import ConfigError, DataNotFoundError, MissingFileError
from ..methods.dylora import rank_sweep as sweep_ranks
from ..zoo.models import SentenceClassifier, load_sentence_classifier
from ..io.layout import LABELS_FILE as LABELS_FILE, read_label_names  # LABELS_FILE: re-exported for cli.train
from ..io.safefiles import read_tensors, write_tensors
from ..train.loop import TextBatches, accuracy

HEAD_FILE = "classifier.safetensors"


def dataset(spec: str, split: str, test_size: int | None, text_column: str = "text", label_column: str = "label",
            seed: int = 0) -> data.LabelledTexts:
    """``vader:<subset>`` or a ``.csv``/``.jsonl`` file -> the requested split.

    A file is read and checked completely (:func:`adapterkit.zoo.data.labelled_file`); its held-out
    split is the last ``test_size`` examples of a seeded shuffle (default: a fifth of the file).
    """
    if Path(spec).suffix.lower() in data.USER_FORMATS:
        rows = data.labelled_file(spec, text_column, label_column)
        size = test_size if test_size is not None else max(1, len(rows) // 5)
        try:
            return data.split_labelled(rows, split, size, seed)
        except ConfigError as exc:
            raise ConfigError(f"{spec}: {exc}") from None
    source, _, subset = spec.partition(":")
    if source != "vader" or not subset:
        raise ConfigError(f"unknown dataset {spec!r}; use vader:movies, vader:tweets, vader:amazon, vader:nyt "
                          "or a .csv/.jsonl file")
    return data.vader(subset, split, test_size=1000 if test_size is None else test_size)


def load_model(path: str | None, num_labels: int = 2) -> tuple[SentenceClassifier, Any]:
    """The sentence classifier on the encoder at ``path`` (default: the bundled MiniLM)."""
    if path is not None and not Path(path, "config.json").is_file():
        raise MissingFileError(f"no model directory (config.json) at {path}")
    return load_sentence_classifier(path, num_labels=num_labels)


def adapter_classes(directory: str | Path) -> int:
    """Classes of the head an adapter was trained with (``labels.json`` written by ``train`` on a user file)."""
    names = read_label_names(Path(directory))
    return 2 if names is None else len(names)


def _data(args: argparse.Namespace) -> data.LabelledTexts:
    return dataset(args.data, "test", args.test_size, args.text_column, args.label_column)


def evaluate(args: argparse.Namespace) -> int:
    test_set = _data(args)
    model, tokenizer = load_model(args.model, test_set.num_classes)
    if args.adapter is not None:
        name = artefact.load(model, args.adapter, ignore_fingerprint=args.ignore_fingerprint)
        what = f"adapter {name!r} from {args.adapter}"
    elif args.model is not None and Path(args.model, HEAD_FILE).is_file():
        model.classifier.load_state_dict(read_tensors(Path(args.model, HEAD_FILE)))
        what = f"fused model {args.model}"
    else:
        raise ConfigError("give an adapter directory, or --model with a directory written by 'adapterkit fuse'")
    acc = accuracy(model, TextBatches(tokenizer, test_set, 128, args.max_length, by_length=True))
    print(f"{what}: held-out accuracy {acc:.3f} on {len(test_set)} examples of {args.data}")
    return 0


def rank_sweep(args: argparse.Namespace) -> int:
    test_set = _data(args)
    model, tokenizer = load_model(args.model, test_set.num_classes)
    name = artefact.load(model, args.adapter, ignore_fingerprint=args.ignore_fingerprint)
    ranks = None if args.ranks is None else [int(r) for r in args.ranks.split(",") if r.strip()]
    batches = TextBatches(tokenizer, test_set, 128, args.max_length, by_length=True)
    result = sweep_ranks(model, name, lambda m: accuracy(m, batches), ranks, args.tolerance, metric="accuracy")
    result.write(args.out)
    print(result.table())
    print(f"best rank {result.best_rank}; smallest rank within {args.tolerance:g} of the best: {result.chosen_rank} "
          f"(export it with: adapterkit export {args.adapter} --rank {result.chosen_rank} --out DIR); "
          f"table and plot in {args.out}")
    return 0


def fuse(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args.model, adapter_classes(args.adapter))
    name = artefact.load(model, args.adapter, ignore_fingerprint=args.ignore_fingerprint)
    api.merge_and_unload(model, [name])
    out = Path(args.out)
    model.encoder.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_tensors(out / HEAD_FILE, model.classifier.state_dict())
    print(f"fused adapter {name!r} into the base weights: {out} (evaluate with: adapterkit eval --model {out})")
    return 0


def export(args: argparse.Namespace) -> int:
    model, _ = load_model(args.model, adapter_classes(args.adapter))
    name = artefact.load(model, args.adapter, ignore_fingerprint=args.ignore_fingerprint)
    options = {} if args.rank is None else {"rank": args.rank}
    artefact.export(model, name, args.out, format=args.format, **options)
    print(f"wrote {args.format} adapter {name!r} to {args.out}")
    return 0


def fetch_data(args: argparse.Namespace) -> int:
    try:
        path = data.fetch_vader()
    except Exception as exc:  # pip's own failure output has been printed above
        raise DataNotFoundError(f"could not download vaderSentiment=={data.VADER_VERSION} from PyPI ({exc})") from None
    print(f"VADER data ready: {path}")
    return 0
