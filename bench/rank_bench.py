#!/usr/bin/env python
"""Ranking-aware adapter (issue 13) against heuristics, ridge probes, fine-tuning and LoRA, with ablations.

Tasks: ``quality`` (Task A, default split, 5 degradation instructions), ``counting`` (Task B, default
split, one instruction per category) and ``counting_heldout`` (Task B, scheme "heldout": the test
instructions are category words never seen in training; rows that need one model per instruction
cannot exist there and are skipped). Every learned row trains on the train split, ``--epochs`` passes,
and is scored on the test split: SRCC, PLCC, Kendall τ, strict pairwise accuracy and MAE per
instruction, averaged per task; seeds give mean ± std in bench/rank_report.py.

``pair_cost``: forward+backward time of the ranking-aware attention (the library's factorised softmax)
against a naive version written here that materialises the joint softmax over N²·2P tokens (a
yardstick only), plus a whole adapter training step with and without the pair branch, for N in
``--pair-sizes``; the largest intermediates are counted analytically.

Every cell is cached in ``<work>/cells.json`` (default bench/work/rank) the moment it finishes, so an
interrupted run resumes; image/text tokens are cached on disk under ``<work>/tokens`` (TokenCache) and
the fine-tuning baselines' frozen front activations under ``<work>/fronts``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import adapterkit as ak  # noqa: E402
from adapterkit.analysis.ranking_metrics import OrderingMetrics, mean_metrics  # noqa: E402
from adapterkit.apps.ranking import (InstructionTokens, RankingTrainSettings, RidgeSettings, TailSettings,  # noqa: E402
                                     TokenCache, compute_statistics, efficientnet_minilm, efficientnet_split,
                                     evaluate_ranking, evaluate_scores, fit_finetune, fit_lora, fit_ridge_probes,
                                     front_activations, heuristic_for, train_ranking)
from adapterkit.apps.ranking.data import MIN_POSITIVE, RankingData, ranking_data  # noqa: E402
from adapterkit.methods.ranking import (RankingAdapter, RankingAdapterConfig, RankingAwareAttention,  # noqa: E402
                                        ranking_layer, ranking_loss)
from adapterkit.zoo.rank_tasks import RankTask, rank_task  # noqa: E402
from _provenance import provenance  # noqa: E402
from _timing import hardware, timed  # noqa: E402

TASKS = {"quality": ("quality", "default"), "counting": ("counting", "default"),
         "counting_heldout": ("counting", "heldout")}
ADAPTERS = {"adapter": {}, "no_pair": {"pair_branch": False}, "concat": {"pair_combine": "concat"},
            "no_prompts": {"prompt_style": "none"}, "scalar_prompts": {"prompt_style": "scalar"}, "constant_text": {}}
# priority order: the adapter, then the baselines, then the ablations, then the pair-branch cost
ROWS = ("adapter", "heuristic", "ridge_agnostic", "ridge_oracle", "finetune", "lora", "no_pair", "concat",
        "no_prompts", "scalar_prompts", "constant_text", "pair_cost")
PER_INSTRUCTION = ("ridge_oracle", "finetune", "lora")  # one model per instruction: none for unseen words
CONSTANT_TEXT = "Sort the images."
NAME = "rank"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclasses.dataclass
class TaskData:
    """One benchmark task: its three splits as cached tokens, image paths and instruction names."""

    key: str
    train: RankingData
    val: RankingData
    test: RankingData
    paths: dict[str, list[Path]]
    attributes: dict[str, str]  # instruction text -> attribute / category word
    min_positive: float | None

    @property
    def train_pools(self) -> list:
        return self.train.train_pools(self.min_positive)

    @property
    def val_pools(self) -> list:
        return self.val.eval_pools()

    @property
    def test_pools(self) -> list:
        return self.test.eval_pools()


@dataclasses.dataclass
class Fronts:
    """The frozen EfficientNet front's output for the train and test images (the tails' input)."""

    split: Any
    train: torch.Tensor
    test: torch.Tensor


def limited(splits: dict[str, RankTask], limit: int | None, min_positive: float | None) -> dict[str, RankTask]:
    """The first ``limit`` images of each split, keeping only the instructions every split that shares
    them can still rank (two positives, two distinct targets): a smoke-test subset, not the benchmark."""
    if limit is None:
        return splits
    cut = {s: dataclasses.replace(t, images=t.images[:limit]) for s, t in splits.items()}

    def usable(task: RankTask) -> set[str]:
        floor = -math.inf if min_positive is None else min_positive
        return {i.text for i in task.instructions
                if sum(v >= floor for v in task.targets(i)) >= 2 and len(set(task.targets(i))) > 1}

    shared = {s: {i.text for i in cut[s].instructions} for s in cut}
    keep = {s: set.intersection(*(usable(cut[o]) for o in cut if shared[o] == shared[s])) for s in cut}
    return {s: dataclasses.replace(t, instructions=tuple(i for i in t.instructions if i.text in keep[s]))
            for s, t in cut.items()}


def metrics_record(data: TaskData, metrics: dict[str, OrderingMetrics]) -> dict[str, Any]:
    """Per-instruction metrics keyed by attribute word, and their mean (NaN means: constant scores)."""
    if not metrics:
        return {"per_instruction": {}, "mean": {}}
    return {"per_instruction": {data.attributes[k]: m.as_dict() for k, m in metrics.items()},
            "mean": mean_metrics(metrics)}


def naive_pair_logits(att: RankingAwareAttention, tokens: torch.Tensor) -> torch.Tensor:
    """The pair branch with the joint softmax over both images' 2P tokens materialised for every
    ordered pair (N, N, H, 2P, dh): the textbook form, to measure what the factorisation saves."""
    split = lambda x: x.unflatten(-1, (att.heads, -1)).transpose(-3, -2)  # noqa: E731 (..., L, w) -> (..., H, L, dh)
    queries = split(att.q_norm(att.q_proj(att.queries)))  # (H, M, dh)
    values = split(att.kv_norm(att.kv_proj(tokens)))  # (N, H, P, dh)
    n, h, p, dh = values.shape
    joint = torch.cat([values.unsqueeze(1).expand(n, n, h, p, dh), values.unsqueeze(0).expand(n, n, h, p, dh)], dim=3)
    weights = torch.softmax(torch.einsum("hmd,ijhpd->ijhmp", queries, joint) / math.sqrt(dh), dim=-1)
    merge = lambda x: x.transpose(-3, -2).flatten(-2)  # noqa: E731 (N, N, M, width)
    first, second = merge(weights[..., :p] @ joint[..., :p, :]), merge(weights[..., p:] @ joint[..., p:, :])
    pair = first - second if att.combine == "subtract" else torch.cat([first, second], dim=-1)
    return att.head(att.out_proj(pair).sum(dim=2)).squeeze(-1)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work)
        self.cells_path = self.work / "cells.json"
        self.cells: dict[str, Any] = json.loads(self.cells_path.read_text()) if self.cells_path.is_file() else {}
        record = provenance()
        self.code = {k: record[k] for k in ("commit", "src_tree", "src_dirty")}
        self._encoders: Any = None
        self._cache: TokenCache | None = None
        self._data: dict[str, TaskData] = {}
        self._fronts: dict[str, Fronts] = {}
        self._ridge: dict[tuple[str, int], Any] = {}

    # -- bookkeeping ---------------------------------------------------------------------------
    def save(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        tmp = self.cells_path.with_suffix(".partial")
        tmp.write_text(json.dumps(self.cells, indent=1))
        tmp.replace(self.cells_path)

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self.args, k) for k in ("epochs", "batch_size", "threads", "limit")}

    def cell(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if key not in self.cells:
            log(f"{key} ...")
            start = time.perf_counter()
            result = compute()
            result["seconds"] = round(time.perf_counter() - start, 2)
            result["settings"] = self.settings()
            result["provenance"] = self.code  # the code this process loaded
            self.cells[key] = result
            self.save()
            mean = result.get("mean", {})
            log(f"{key} done in {result['seconds']:.1f} s" + (f": SRCC {mean['srcc']:.3f}" if "srcc" in mean else ""))
        return self.cells[key]

    def caching(self, key: str, seconds: float, **extra: Any) -> None:
        """The one-off cost of filling a cache: kept from the first run that computed anything."""
        table = self.cells.setdefault("caching", {})
        if key not in table or (table[key].get("computed_items", 0) == 0 and extra.get("computed_items", 0) > 0):
            table[key] = {"seconds": round(seconds, 2), "threads": self.args.threads, **extra}
            self.save()

    # -- encoders, tokens, fronts ----------------------------------------------------------------
    @property
    def encoders(self) -> Any:
        if self._encoders is None:
            self._encoders = efficientnet_minilm()
        return self._encoders

    @property
    def cache(self) -> TokenCache:
        if self._cache is None:
            self._cache = TokenCache(Path(self.args.tokens or self.work / "tokens"), self.encoders, progress=False)
        return self._cache

    def data(self, key: str) -> TaskData:
        if key not in self._data:
            name, scheme = TASKS[key]
            task = rank_task(name)
            splits = limited({s: task.split(s, scheme) for s in ("train", "val", "test")}, self.args.limit,
                             MIN_POSITIVE.get(name))
            misses, start = self.cache.misses, time.perf_counter()
            loaded = {s: ranking_data(t, self.cache) for s, t in splits.items()}
            self.caching(f"tokens/{key}", time.perf_counter() - start, computed_items=self.cache.misses - misses,
                         images=sum(len(t) for t in splits.values()))
            self._data[key] = TaskData(key, loaded["train"], loaded["val"], loaded["test"],
                                       {s: t.paths for s, t in splits.items()},
                                       {i.text: i.attribute for i in task.instructions}, MIN_POSITIVE.get(name))
        return self._data[key]

    def fronts(self, data: TaskData) -> Fronts:
        if data.key not in self._fronts:
            from safetensors.torch import load_file, save_file

            split = efficientnet_split(self.encoders.image_encoder, self.args.tail_blocks)
            digest = hashlib.sha256(json.dumps([self.encoders.image_encoder.fingerprint, self.args.tail_blocks,
                                                [str(p) for s in ("train", "test") for p in data.paths[s]]])
                                    .encode()).hexdigest()[:16]
            path = self.work / "fronts" / f"{data.key}-{digest}.safetensors"
            if path.is_file():
                stored = load_file(str(path))
            else:
                start = time.perf_counter()
                stored = {s: front_activations(split, data.paths[s], progress=False).contiguous() for s in ("train", "test")}
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file(stored, str(path))
                self.caching(f"fronts/{data.key}", time.perf_counter() - start,
                             computed_items=sum(len(v) for v in stored.values()), shape=list(stored["train"].shape[1:]))
            self._fronts[data.key] = Fronts(split, stored["train"], stored["test"])
        return self._fronts[data.key]

    # -- rows ------------------------------------------------------------------------------------
    def adapter(self, data: TaskData, row: str, seed: int) -> dict[str, Any]:
        encoders = self.encoders
        config = RankingAdapterConfig(image_dim=self.cache.token_dim, text_dim=encoders.text_token_dim, **ADAPTERS[row])
        train_texts, test_texts = data.train.texts, data.test.texts
        if row == "constant_text":  # one fixed sentence for every instruction, in training and test
            constant = InstructionTokens(*self.cache.text_tokens(CONSTANT_TEXT))
            train_texts, test_texts = {k: constant for k in train_texts}, {k: constant for k in test_texts}
        with torch.random.fork_rng(devices=[]):  # the adapter's initial values come from the seed
            torch.manual_seed(seed)
            ak.attach(encoders, config, NAME)
        try:
            layer = ranking_layer(encoders, NAME)
            params = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            pairs = layer.adapter.pairs
            settings = RankingTrainSettings(epochs=self.args.epochs, batch_size=self.args.batch_size, seed=seed)
            start = time.perf_counter()
            losses = train_ranking(encoders, NAME, data.train.images, train_texts, data.train_pools, settings,
                                   progress=False)
            seconds = time.perf_counter() - start
            metrics = evaluate_ranking(encoders, NAME, data.test.images, test_texts, data.test_pools)
        finally:
            ak.detach(encoders, NAME)
        return {**metrics_record(data, metrics), "trainable_params": params, "train_seconds": seconds,
                "inference_params": params - (0 if pairs is None else sum(p.numel() for p in pairs.parameters())),
                "steps": len(losses), "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}

    def heuristic(self, data: TaskData) -> dict[str, Any]:
        chosen = {data.attributes[p.instruction]: heuristic_for(p.instruction) for p in data.test_pools}
        if all(h.statistic is None for h in chosen.values()):
            return {"skipped": sorted({h.reason for h in chosen.values()})[0], "per_instruction": {}, "mean": {}}
        stats = compute_statistics(data.paths["test"], progress=False)
        metrics = evaluate_scores(stats.scores, data.test_pools)
        return {**metrics_record(data, metrics), "trainable_params": 0, "train_seconds": 0.0,
                "statistics_seconds": stats.seconds,
                "statistic": {k: f"{'−' if h.sign < 0 else '+'}{h.statistic}" for k, h in chosen.items() if h.statistic}}

    def ridge(self, data: TaskData, row: str, seed: int) -> dict[str, Any]:
        if (data.key, seed) not in self._ridge:
            self._ridge[data.key, seed] = fit_ridge_probes(data.train.images, data.train_pools, RidgeSettings(seed=seed),
                                                           data.val.images, data.val_pools)
        probes = self._ridge[data.key, seed]
        agnostic = row == "ridge_agnostic"
        metrics = evaluate_scores(lambda i: probes.scores(data.test.images, None if agnostic else i), data.test_pools)
        heads = [probes.agnostic] if agnostic else list(probes.per_instruction.values())
        return {**metrics_record(data, metrics), "train_seconds": probes.train_seconds,
                "trainable_params": probes.trainable_params["agnostic" if agnostic else "per_instruction"],
                "alpha": sorted({h.alpha for h in heads}), "note": "train_seconds: both probe kinds fitted together"}

    def tail(self, data: TaskData, row: str, seed: int) -> dict[str, Any]:
        fronts = self.fronts(data)
        settings = TailSettings(epochs=self.args.epochs, batch_size=self.args.batch_size, seed=seed)
        if row == "finetune":
            fitted = fit_finetune(fronts.split, fronts.train, data.train_pools, settings=settings, progress=False)
        else:
            fitted = fit_lora(fronts.split, fronts.train, data.train_pools, settings=settings, progress=False)
        metrics = evaluate_scores(lambda i: fitted.scores(fronts.test, i), data.test_pools)
        per = list(fitted.trainable_params.values())
        return {**metrics_record(data, metrics), "trainable_params": sum(per), "params_per_instruction": max(per),
                "train_seconds": fitted.train_seconds, "tail_blocks": self.args.tail_blocks}

    def pair_cost(self) -> dict[str, Any]:
        """Time (median of ``--pair-repeats``) of forward+backward of the pair branch, factorised and
        naive, and of a whole adapter training step with and without it, per batch size N."""
        config = RankingAdapterConfig(image_dim=self.cache.token_dim, text_dim=self.encoders.text_token_dim)
        tokens_per_image, width, m, h = self.cache.num_tokens, config.width, config.relation_tokens, config.heads
        gen = torch.Generator().manual_seed(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            attention, adapter = RankingAwareAttention(config), RankingAdapter(config, config.image_dim, config.text_dim)
        adapter.train()
        text = torch.randn(12, config.text_dim, generator=gen)
        mask = torch.ones(12, dtype=torch.bool)
        rows = []
        for n in self.args.pair_sizes:
            z = torch.randn(n, tokens_per_image, width, generator=gen).requires_grad_(True)
            images = torch.randn(n, tokens_per_image, config.image_dim, generator=gen)
            targets = torch.randint(0, 5, (n,), generator=gen).float()
            with torch.no_grad():
                diff = (attention(z) - naive_pair_logits(attention, z)).abs().max().item()

            def branch(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
                return lambda: fn(z).sum().backward()

            def step(pairs: bool) -> Callable[[], None]:
                def run() -> None:
                    adapter.zero_grad(set_to_none=True)
                    ranking_loss(adapter(images, text, mask, pairs=pairs), targets).total.backward()
                return run

            cases = {"factorised": branch(attention), "naive": branch(lambda x: naive_pair_logits(attention, x)),
                     "step_with_pairs": step(True), "step_without_pairs": step(False)}
            times = {}
            for label, fn in cases.items():
                fn()  # warm-up
                times[label] = statistics.median(timed(fn) for _ in range(self.args.pair_repeats))
            rows.append({"n": n, "max_abs_diff": diff, **{f"{k}_s": v for k, v in times.items()},
                         # the largest intermediates, float32: the factorised halves O_i, O_j (N², M, width)
                         # against the naive joint keys/values (N², 2P, width) and its attention (N², H, M, 2P)
                         "factorised_bytes": 4 * n * n * m * width,
                         "naive_bytes": 4 * n * n * max(2 * tokens_per_image * width, h * m * 2 * tokens_per_image)})
            log(f"pair cost N={n}: factorised {1e3 * times['factorised']:.1f} ms, naive {1e3 * times['naive']:.1f} ms, "
                f"step {1e3 * times['step_with_pairs']:.1f} / {1e3 * times['step_without_pairs']:.1f} ms")
        return {"rows": rows, "tokens_per_image": tokens_per_image, "width": width, "relation_tokens": m, "heads": h,
                "repeats": self.args.pair_repeats, "default_batch_size": RankingTrainSettings().batch_size}

    # -- driver ----------------------------------------------------------------------------------
    def run(self, rows: list[str], tasks: list[str], seeds: list[int]) -> None:
        suffix = "" if self.args.limit is None else f"/limit{self.args.limit}"
        for row in rows:
            if row == "pair_cost":
                self.cell("pair_cost" + suffix, self.pair_cost)
                continue
            for seed in ([0] if row == "heuristic" else seeds):
                for key in tasks:
                    if row in PER_INSTRUCTION and TASKS[key][1] == "heldout":
                        continue  # a per-instruction model cannot exist for an unseen category word
                    cell = f"{key}/{row}" + ("" if row == "heuristic" else f"/seed{seed}") + suffix
                    if cell in self.cells:
                        continue
                    data = self.data(key)
                    if row in ADAPTERS:
                        self.cell(cell, lambda: self.adapter(data, row, seed))
                    elif row == "heuristic":
                        self.cell(cell, lambda: self.heuristic(data))
                    elif row.startswith("ridge_"):
                        self.cell(cell, lambda: self.ridge(data, row, seed))
                    else:
                        self.cell(cell, lambda: self.tail(data, row, seed))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--rows", default=",".join(ROWS), help="rows in the order to run them (default: priority order)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training split (every learned row)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (adapter, fine-tuning, LoRA)")
    parser.add_argument("--tail-blocks", type=int, default=2, help="EfficientNet blocks trained by fine-tuning / LoRA")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="first N images of each split (smoke tests)")
    parser.add_argument("--work", default=str(ROOT / "bench" / "work" / "rank"), help="cells.json and caches")
    parser.add_argument("--tokens", default=None, help="token cache root (default: <work>/tokens)")
    parser.add_argument("--pair-sizes", default="4,8,16,32,64")
    parser.add_argument("--pair-repeats", type=int, default=5)
    args = parser.parse_args(argv)
    tasks, rows = args.tasks.split(","), args.rows.split(",")
    unknown = sorted(set(tasks) - set(TASKS)) + sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown tasks or rows: {unknown}; tasks: {', '.join(TASKS)}; rows: {', '.join(ROWS)}")
    args.pair_sizes = [int(n) for n in args.pair_sizes.split(",")]
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    bench.cells.setdefault("_meta", {"provenance": provenance(), "hardware": hardware(), "runs": []})
    bench.cells["_meta"]["runs"].append({"argv": argv, "provenance": provenance(), "started": time.time(),
                                         "settings": bench.settings()})
    bench.run(rows, tasks, [int(s) for s in args.seeds.split(",")])
    bench.save()
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
