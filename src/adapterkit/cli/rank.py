"""``adapterkit rank train|eval|sort``: the ranking-aware adapter on frozen EfficientNet-Lite0 image
tokens and MiniLM text tokens (cached on disk; the encoders run once per image and instruction).

``train`` fits one adapter for every instruction of a task and saves it with ``rank.json`` (the
token-cache settings the adapter was trained on); ``eval`` prints per-instruction ordering metrics;
``sort`` orders image files by an instruction and writes a contact sheet. Everything that can be
checked without a model (files, options) is checked first.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable

from ..analysis.ranking_metrics import METRICS, OrderingMetrics, mean_metrics
from ..errors import ConfigError, MissingFileError
from ..io.safefiles import read_json, write_json
from ..methods.ranking import RankingAdapterConfig
from ..zoo.data import cache_dir
from ..zoo.rank_tasks import SCHEMES, SPLITS, TASKS, RankTask, rank_task, read_rank_task
from .options import add_config_options, build_config, nested_commands

SIDECAR = "rank.json"
NAME = "rank"


def register(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``rank train``, ``rank eval`` and ``rank sort``."""
    nested = nested_commands(command, "rank", "order images by a text instruction (ranking-aware adapter)",
                             "train, eval or sort")

    def sub_command(name: str, run: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = nested(name, run, help)
        p.add_argument("--cache", default=None, help="token cache directory (default: the adapterkit cache)")
        return p

    tasks = f"{', '.join(TASKS)} (built by 'adapterkit fetch-data rank') or a built task directory"
    p = sub_command("train", run_train, "train a ranking adapter on a task's training split")
    p.add_argument("--task", required=True, help=tasks)
    p.add_argument("--scheme", choices=SCHEMES, default="default", help="split scheme (heldout: unseen category words)")
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (weight decay 0.01)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (one instruction per batch)")
    p.add_argument("--negative-ratio", type=float, default=0.2, help="share of relabelled negatives per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=1, help="cache: average k×k image tokens (7×7 → 16 at k=2)")
    p.add_argument("--project-dim", type=int, default=None, help="cache: fixed seeded projection of image tokens")
    add_config_options(p, RankingAdapterConfig, {}, {"--seed", "--image-dim", "--text-dim"}, inherited=False)  # widths: from the cache

    p = sub_command("eval", run_eval, "per-instruction SRCC, PLCC, Kendall τ, pairwise accuracy, MAE of an adapter")
    p.add_argument("adapter", help="ranking adapter directory (from 'rank train')")
    p.add_argument("--task", required=True, help=tasks)
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--scheme", choices=SCHEMES, default="default")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")

    p = sub_command("sort", run_sort, "order image files by an instruction; print scores, write a contact sheet")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--adapter", required=True, help="ranking adapter directory")
    p.add_argument("--instruction", required=True, help='e.g. "Sort the images by how blurry they are."')
    p.add_argument("--sheet", default="sorted.png", help="contact sheet PNG to write")
    p.add_argument("--descending", action="store_true", help="highest score first")


def _task(name: str) -> RankTask:
    if name in TASKS:
        return rank_task(name)
    if not Path(name).is_dir():
        raise MissingFileError(f"--task {name!r} is neither {' nor '.join(TASKS)} nor a task directory")
    return read_rank_task(name)


def _cache(args: argparse.Namespace, encoders: Any, settings: dict[str, Any]) -> Any:
    from ..apps.ranking import TokenCache

    root = Path(args.cache) if args.cache else cache_dir() / "rank-tokens"
    return TokenCache(root, encoders, progress=True, **settings)


def _sidecar(adapter: Path) -> dict[str, Any]:
    if not (adapter / SIDECAR).is_file():
        raise MissingFileError(f"{adapter} has no {SIDECAR}: not a directory written by 'adapterkit rank train'")
    return read_json(adapter / SIDECAR)


def _load(adapter: Path, args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """Encoders with the adapter loaded, the token cache it was trained with, its sidecar."""
    import adapterkit as ak
    from ..apps.ranking import efficientnet_minilm

    sidecar = _sidecar(adapter)
    encoders = efficientnet_minilm()
    ak.load(encoders, adapter, NAME)
    return encoders, _cache(args, encoders, sidecar["cache"]), sidecar


def _table(metrics: dict[str, OrderingMetrics]) -> str:
    lines = [f"{'instruction':<52}" + "".join(f"{m:>10}" for m in METRICS)]
    lines += [f"{name[:52]:<52}" + "".join(f"{getattr(m, k):>10.3f}" for k in METRICS) for name, m in metrics.items()]
    mean = mean_metrics(metrics)
    lines.append(f"{'mean':<52}" + "".join(f"{mean[k]:>10.3f}" for k in METRICS))
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> int:
    import adapterkit as ak
    from ..apps.ranking import RankingTrainSettings, efficientnet_minilm, evaluate_ranking, train_ranking
    from ..apps.ranking.data import MIN_POSITIVE, ranking_data
    from ..apps.ranking.train import attach_ranking

    config = build_config(RankingAdapterConfig, args)
    settings = RankingTrainSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                    negative_ratio=args.negative_ratio, seed=args.seed)
    cache_settings = {"pool": args.pool, "project_dim": args.project_dim}
    task = _task(args.task)
    train, val = task.split("train", args.scheme), task.split("val", args.scheme)
    encoders = efficientnet_minilm()
    cache = _cache(args, encoders, cache_settings)
    train_data, val_data = ranking_data(train, cache), ranking_data(val, cache)
    config = dataclasses.replace(config, image_dim=cache.token_dim, text_dim=encoders.text_token_dim)
    attach_ranking(encoders, config, NAME, seed=args.seed)
    losses = train_ranking(encoders, NAME, train_data.images, train_data.texts,
                           train_data.train_pools(MIN_POSITIVE.get(task.name)), settings)
    metrics = evaluate_ranking(encoders, NAME, val_data.images, val_data.texts, val_data.eval_pools())
    print(f"validation ({len(val)} images):\n{_table(metrics)}")
    out = Path(args.out)
    ak.save(encoders, out, NAME)
    write_json(out / SIDECAR, {"task": task.name, "scheme": args.scheme, "cache": cache_settings,
                               "train": dataclasses.asdict(settings), "steps": len(losses), "last_loss": losses[-1],
                               "instructions": [i.text for i in train.instructions],
                               "validation": {k: m.as_dict() for k, m in metrics.items()}})
    print(f"saved the ranking adapter to {out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..apps.ranking import evaluate_ranking
    from ..apps.ranking.data import MIN_POSITIVE, ranking_data

    adapter = Path(args.adapter)
    _sidecar(adapter)
    split = _task(args.task).split(args.split, args.scheme)
    encoders, cache, _ = _load(adapter, args)
    data = ranking_data(split, cache)
    metrics = evaluate_ranking(encoders, NAME, data.images, data.texts, data.eval_pools())
    print(f"{args.split} ({len(split)} images):\n{_table(metrics)}")
    result = {"all": {k: m.as_dict() for k, m in metrics.items()}}
    least = MIN_POSITIVE.get(split.name)
    if least is not None:
        present = evaluate_ranking(encoders, NAME, data.images, data.texts, data.eval_pools(least))
        print(f"\n{args.split}, only the images that show the object:\n{_table(present)}")
        result["present"] = {k: m.as_dict() for k, m in present.items()}
    if args.json:
        write_json(Path(args.json), result)
    return 0


def run_sort(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    from ..apps.ranking import InstructionTokens, score_images
    from ..apps.ranking.sheet import contact_sheet

    images = []
    for name in args.images:
        try:
            with Image.open(name) as image:
                images.append(image.convert("RGB"))
        except FileNotFoundError:
            raise MissingFileError(f"no image file {name}") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise ConfigError(f"{name} is not a readable image ({exc})") from None
    if not args.instruction.strip():
        raise ConfigError("--instruction is empty")
    adapter = Path(args.adapter)
    _sidecar(adapter)
    encoders, cache, _ = _load(adapter, args)
    scores = score_images(encoders, NAME, cache.image_tokens(images), InstructionTokens(*cache.text_tokens(args.instruction)))
    order = sorted(range(len(images)), key=lambda k: scores[k].item(), reverse=args.descending)
    for rank, k in enumerate(order, 1):
        print(f"{rank:>3}  {scores[k].item():>8.3f}  {args.images[k]}")
    sheet = contact_sheet([images[k] for k in order], [f"#{r} {scores[k].item():.2f} {Path(args.images[k]).name[:14]}"
                                                       for r, k in enumerate(order, 1)], args.sheet, title=args.instruction)
    print(f"contact sheet: {sheet}")
    return 0
