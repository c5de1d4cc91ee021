"""The non-demo subcommands. Each takes parsed arguments and returns an exit status."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..core import api
from ..io import artefact
from ..zoo import data
from ..errors import ConfigError, DataNotFoundError, MissingFileError
from ..methods import DyLoRAConfig, LoRAConfig
from ..methods.dylora import rank_sweep as sweep_ranks
from ..zoo.models import SentenceClassifier, load_sentence_classifier
from ..io.safefiles import read_json, read_tensors, write_tensors
from ..train.loop import TextBatches, accuracy, train as train_loop

HEAD_FILE = "classifier.safetensors"


def dataset(spec: str, split: str, test_size: int) -> data.LabelledTexts:
    """``vader:<subset>`` -> the requested split."""
    source, _, subset = spec.partition(":")
    if source != "vader" or not subset:
        raise ConfigError(f"unknown dataset {spec!r}; use vader:movies, vader:tweets, vader:amazon or vader:nyt")
    return data.vader(subset, split, test_size=test_size)


def parse_targets(text: str) -> str | list[str]:
    if text == "all-linear" or any(c in text for c in "*()[]|^$\\"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def _model(path: str | None) -> tuple[SentenceClassifier, Any]:
    if path is not None and not Path(path, "config.json").is_file():
        raise MissingFileError(f"no model directory (config.json) at {path}")
    return load_sentence_classifier(path)


def train(args: argparse.Namespace) -> int:
    import torch

    torch.manual_seed(args.seed)
    train_set = dataset(args.data, "train", args.test_size)
    if args.train_size:
        train_set = train_set.head(args.train_size)
    test_set = dataset(args.data, "test", args.test_size)
    common = dict(alpha=args.alpha, dropout=args.dropout, target_modules=parse_targets(args.targets),
                  modules_to_save=["classifier"])
    config = DyLoRAConfig(r_max=args.r, seed=args.seed, **common) if args.method == "dylora" else LoRAConfig(r=args.r, **common)
    model, tokenizer = _model(args.model)
    api.attach(model, config, args.name)
    trainable, total = api.trainable_parameters(model)
    print(f"training {args.name!r}: {trainable:,} trainable of {total:,} parameters on {len(train_set)} examples")
    batches = TextBatches(tokenizer, train_set, args.batch_size, args.max_length, shuffle=True, seed=args.seed)
    train_loop(model, batches, epochs=args.epochs, lr=args.lr)
    acc = accuracy(model, TextBatches(tokenizer, test_set, 128, args.max_length, by_length=True))
    artefact.save(model, args.out, args.name, format=args.format)
    print(f"held-out accuracy {acc:.3f} on {len(test_set)} examples; adapter saved to {args.out}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    test_set = dataset(args.data, "test", args.test_size)
    model, tokenizer = _model(args.model)
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
    test_set = dataset(args.data, "test", args.test_size)
    model, tokenizer = _model(args.model)
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


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def info(args: argparse.Namespace) -> int:
    directory = Path(args.adapter)
    if not directory.is_dir():
        raise MissingFileError(f"adapter directory not found: {directory}")
    config = read_json(directory / artefact.CONFIG_FILE)
    if "peft_type" in config:
        tensors = read_tensors(directory / "adapter_model.safetensors")
        summary = {"format": "peft", "method": config["peft_type"].lower(), "r": config.get("r"),
                   "target_modules": config.get("target_modules")}
    else:
        tensors = read_tensors(directory / artefact.WEIGHTS_FILE)
        base = config.get("base_model", {})
        summary = {"format": "adapterkit", "method": config.get("method"), "name": config.get("name"),
                   "adapterkit_version": config.get("adapterkit_version"),
                   "base_model": base.get("name_or_path"), "base_weights_sha256": base.get("weights_sha256"),
                   "adapted_modules": len(base.get("modules", {})), "copied_modules": base.get("copied_modules", []),
                   "bits": config.get("config", {}).get("bits", 32), "config": config.get("config")}
    summary["parameters"] = sum(t.numel() for t in tensors.values())
    summary["tensors"] = len(tensors)
    summary["bytes_on_disk"] = _directory_size(directory)
    for key, value in summary.items():
        print(f"{key:>20}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def fuse(args: argparse.Namespace) -> int:
    model, tokenizer = _model(args.model)
    name = artefact.load(model, args.adapter, ignore_fingerprint=args.ignore_fingerprint)
    api.merge_and_unload(model, [name])
    out = Path(args.out)
    model.encoder.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_tensors(out / HEAD_FILE, model.classifier.state_dict())
    print(f"fused adapter {name!r} into the base weights: {out} (evaluate with: adapterkit eval --model {out})")
    return 0


def export(args: argparse.Namespace) -> int:
    model, _ = _model(args.model)
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
