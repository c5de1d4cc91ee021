#!/usr/bin/env python
"""Ranking-aware adapter (issue 13) against heuristics, ridge probes, fine-tuning and LoRA, with ablations.

Tasks: ``quality`` (Task A, default split, 5 degradation instructions), ``counting`` (Task B, default
split, one instruction per category) and ``counting_heldout`` (Task B, scheme "heldout": the test
instructions are category words never seen in training; rows that need one model per instruction
cannot exist there and are skipped). Every learned row trains on the train split, ``--epochs`` passes,
and is scored on the test split: SRCC, PLCC, Kendall τ, strict pairwise accuracy and MAE per
instruction, averaged per task. Counting is scored twice: over every test image ("all": mostly whether
the object is there at all) and over the images that show it (count ≥ 1, "present": the headline).
Seeds vary the model initialisation and batch order only; each task is one fixed build and split
(rank_task's seed 0). bench/rank_report.py gives mean ± std over seeds.

``pair_cost``: forward+backward time of the ranking-aware attention (the library's factorised softmax)
against a naive version (bench/rank_pair_cost.py) that materialises the joint softmax over N²·2P tokens (a
yardstick only), plus a whole adapter training step with and without the pair branch, for N in
``--pair-sizes``; memory is measured (peak of the profiler's allocation events, and the bytes autograd
saves for backward) and the largest intermediates are also counted analytically.

Every cell is cached in ``<work>/cells.json`` (default bench/work/rank) the moment it finishes, so an
interrupted run resumes; the work dir's run record (settings, task manifest hashes) refuses a resume
with other settings or a rebuilt task. Image/text tokens are cached under ``<work>/tokens`` (TokenCache)
and the fine-tuning baselines' frozen front activations under ``<work>/fronts`` (with a digest).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import adapterkit as ak  # noqa: E402
from adapterkit.analysis.ranking_metrics import OrderingMetrics, mean_metrics  # noqa: E402
from adapterkit.apps.ranking import (InstructionBatches, InstructionTokens, RankingTrainSettings,  # noqa: E402
                                     RidgeSettings, TailSettings, TokenCache, attach_ranking, compute_statistics,
                                     efficientnet_minilm, efficientnet_split, evaluate_ranking, evaluate_scores,
                                     fit_finetune, fit_lora, fit_ridge_probes, front_activations, heuristic_for,
                                     train_ranking)
from adapterkit.apps.ranking.data import MIN_POSITIVE, RankingData, ranking_data  # noqa: E402
from adapterkit.errors import AdapterError  # noqa: E402
from adapterkit.io.safefiles import read_metadata, read_tensors, write_tensors  # noqa: E402
from adapterkit.methods.ranking import RankingAdapterConfig  # noqa: E402
from adapterkit.zoo.rank_tasks import RankTask, rank_task  # noqa: E402
from _provenance import provenance  # noqa: E402
from _timing import hardware  # noqa: E402
from rank_pair_cost import pair_cost  # noqa: E402

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
FORMAT = 2  # cells.json layout: 2 = per-view metrics ("all" / "present") and a run record
RECORDED = ("epochs", "batch_size", "tail_blocks", "threads", "pair_sizes", "pair_repeats")  # settings a cell depends on


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
    min_positive: float | None  # counting: 1 (an image shows the object); None: every image is a positive
    manifest: str  # sha256 of the task build's manifest.json

    @property
    def train_pools(self) -> list:
        return self.train.train_pools(self.min_positive)

    @property
    def val_pools(self) -> list:
        return self.val.eval_pools()

    @property
    def test_views(self) -> dict[str, list]:
        """Test pools per view: "all" images, and for counting also "present" (count ≥ 1), the headline."""
        views = {"all": self.test.eval_pools()}
        if self.min_positive is not None:
            views["present"] = self.test.eval_pools(self.min_positive)
        return views

    @property
    def headline(self) -> str:
        return "present" if self.min_positive is not None else "all"


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


def metrics_record(data: TaskData, evaluate: Callable[[list], dict[str, OrderingMetrics]]) -> dict[str, Any]:
    """``evaluate(pools)`` on every test view: per-instruction metrics keyed by attribute word, their
    mean (NaN means: constant scores or targets) and each instruction's image count."""
    views = {}
    for view, pools in data.test_views.items():
        metrics = evaluate(pools)
        views[view] = {"per_instruction": {data.attributes[k]: m.as_dict() for k, m in metrics.items()},
                       "mean": mean_metrics(metrics) if metrics else {},
                       "images": {data.attributes[p.instruction]: len(p.positives) for p in pools}}
    return {"views": views, "headline": data.headline}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
        self.check_record()

    # -- bookkeeping ---------------------------------------------------------------------------
    def save(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        tmp = self.cells_path.with_suffix(".partial")
        tmp.write_text(json.dumps(self.cells, indent=1))
        tmp.replace(self.cells_path)

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self.args, k) for k in (*RECORDED, "limit")}

    def check_record(self) -> None:
        """Cells of one work dir share one set of settings: refuse to resume into a dir made otherwise
        (``--limit`` is part of every cell key, so smoke cells sit apart from the full run's)."""
        wanted = {"format": FORMAT, **{k: getattr(self.args, k) for k in RECORDED}}
        meta = self.cells.setdefault("_meta", {"provenance": provenance(), "hardware": hardware(), "runs": []})
        record = meta.setdefault("record", None if set(self.cells) - {"_meta", "caching"} else {**wanted, "manifests": {}})
        if record is None:
            raise SystemExit(f"{self.cells_path}: made by an earlier version of this benchmark (no run record); "
                             "its cells cannot be checked against these settings: use a new --work")
        differ = {k: (record.get(k), v) for k, v in wanted.items() if record.get(k) != v}
        if differ:
            raise SystemExit(f"{self.cells_path}: made with other settings than this run's ("
                             + ", ".join(f"{k}: recorded {a!r}, asked {b!r}" for k, (a, b) in differ.items())
                             + "); rerun with the recorded settings or use a new --work (cells never mix settings)")

    def check_manifest(self, name: str, digest: str) -> None:
        manifests = self.cells["_meta"]["record"]["manifests"]
        if manifests.setdefault(name, digest) != digest:
            raise SystemExit(f"{self.cells_path}: task {name!r} was rebuilt since its cells were computed "
                             f"(manifest.json sha256 {digest[:12]}…, recorded {manifests[name][:12]}…): use a new --work")
        self.save()

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
            view = result.get("views", {}).get(result.get("headline"), {}).get("mean", {})
            log(f"{key} done in {result['seconds']:.1f} s" + (f": SRCC {view['srcc']:.3f}" if "srcc" in view else ""))
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
            manifest = file_sha256(task.root / "manifest.json")
            self.check_manifest(name, manifest)
            splits = limited({s: task.split(s, scheme) for s in ("train", "val", "test")}, self.args.limit,
                             MIN_POSITIVE.get(name))
            misses, start = self.cache.misses, time.perf_counter()
            loaded = {s: ranking_data(t, self.cache) for s, t in splits.items()}
            self.caching(f"tokens/{key}", time.perf_counter() - start, computed_items=self.cache.misses - misses,
                         images=sum(len(t) for t in splits.values()))
            self._data[key] = TaskData(key, loaded["train"], loaded["val"], loaded["test"],
                                       {s: t.paths for s, t in splits.items()},
                                       {i.text: i.attribute for i in task.instructions}, MIN_POSITIVE.get(name), manifest)
        return self._data[key]

    def fronts(self, data: TaskData) -> Fronts:
        if data.key not in self._fronts:
            split = efficientnet_split(self.encoders.image_encoder, self.args.tail_blocks)
            # the task build's content (manifest hash), not just its paths: a rebuilt task gets new fronts
            digest = hashlib.sha256(json.dumps([self.encoders.image_encoder.fingerprint, self.args.tail_blocks,
                                                data.manifest, [str(p) for s in ("train", "test") for p in data.paths[s]]])
                                    .encode()).hexdigest()[:16]
            path, stored = self.work / "fronts" / f"{data.key}-{digest}.safetensors", None
            if path.is_file():
                try:
                    stored = read_tensors(path, read_metadata(path).get("digest", ""), recorded_in="its header")
                except AdapterError as exc:
                    log(f"recomputing the fronts: {exc}")
            if stored is None:
                start = time.perf_counter()
                stored = {s: front_activations(split, data.paths[s], progress=False).contiguous() for s in ("train", "test")}
                write_tensors(path, stored, digest_key="digest")  # atomic: a killed run leaves no half file
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
        layer = attach_ranking(encoders, config, NAME, seed)  # initial weights from the seed
        try:
            params = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            pairs = layer.adapter.pairs
            settings = RankingTrainSettings(epochs=self.args.epochs, batch_size=self.args.batch_size, seed=seed)
            batches = [b.instruction for b in InstructionBatches(data.train_pools, settings.batch_size,
                                                                 settings.negative_ratio, seed).epoch(0)]
            start = time.perf_counter()
            losses = train_ranking(encoders, NAME, data.train.images, train_texts, data.train_pools, settings,
                                   progress=False)
            seconds = time.perf_counter() - start
            record = metrics_record(data, lambda pools: evaluate_ranking(encoders, NAME, data.test.images, test_texts, pools))
        finally:
            ak.detach(encoders, NAME)
        return {**record, "trainable_params": params, "train_seconds": seconds,
                "inference_params": params - (0 if pairs is None else sum(p.numel() for p in pairs.parameters())),
                "image_tokens": list(data.train.images.shape[1:]),
                "train_positives": {data.attributes[p.instruction]: len(p.positives) for p in data.train_pools},
                "batches_per_epoch": {data.attributes[p.instruction]: batches.count(p.instruction) for p in data.train_pools},
                "steps": len(losses), "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}

    def heuristic(self, data: TaskData) -> dict[str, Any]:
        chosen = {data.attributes[p.instruction]: heuristic_for(p.instruction) for p in data.test_views["all"]}
        if all(h.statistic is None for h in chosen.values()):
            return {"skipped": sorted({h.reason for h in chosen.values()})[0], "views": {}, "headline": data.headline}
        stats = compute_statistics(data.paths["test"], progress=False)
        return {**metrics_record(data, lambda pools: evaluate_scores(stats.scores, pools)), "trainable_params": 0,
                "train_seconds": 0.0, "statistics_seconds": stats.seconds,
                "statistic": {k: f"{'−' if h.sign < 0 else '+'}{h.statistic}" for k, h in chosen.items() if h.statistic}}

    def ridge(self, data: TaskData, row: str, seed: int) -> dict[str, Any]:
        if (data.key, seed) not in self._ridge:
            self._ridge[data.key, seed] = fit_ridge_probes(data.train.images, data.train_pools, RidgeSettings(seed=seed),
                                                           data.val.images, data.val_pools)
        probes = self._ridge[data.key, seed]
        agnostic = row == "ridge_agnostic"
        score = lambda i: probes.scores(data.test.images, None if agnostic else i)  # noqa: E731
        heads = [probes.agnostic] if agnostic else list(probes.per_instruction.values())
        return {**metrics_record(data, lambda pools: evaluate_scores(score, pools)), "train_seconds": probes.train_seconds,
                "trainable_params": probes.trainable_params["agnostic" if agnostic else "per_instruction"],
                "alpha": sorted({h.alpha for h in heads}),
                "note": "train_seconds: both probe kinds fitted together; alpha chosen on every validation image"}

    def tail(self, data: TaskData, row: str, seed: int) -> dict[str, Any]:
        fronts = self.fronts(data)
        settings = TailSettings(epochs=self.args.epochs, batch_size=self.args.batch_size, seed=seed)
        fit = fit_finetune if row == "finetune" else fit_lora
        fitted = fit(fronts.split, fronts.train, data.train_pools, settings=settings, progress=False)
        record = metrics_record(data, lambda pools: evaluate_scores(lambda i: fitted.scores(fronts.test, i), pools))
        per = list(fitted.trainable_params.values())
        return {**record, "trainable_params": sum(per), "params_per_instruction": max(per),
                "train_seconds": fitted.train_seconds, "tail_blocks": self.args.tail_blocks}

    # -- driver ----------------------------------------------------------------------------------
    def run(self, rows: list[str], tasks: list[str], seeds: list[int]) -> None:
        suffix = "" if self.args.limit is None else f"/limit{self.args.limit}"
        for row in rows:
            if row == "pair_cost":
                self.cell("pair_cost" + suffix, lambda: pair_cost(
                    self.cache.token_dim, self.encoders.text_token_dim, self.cache.num_tokens, self.args.pair_sizes,
                    self.args.pair_repeats, self.args.batch_size, log))
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
    bench.cells["_meta"]["runs"].append({"argv": argv, "provenance": provenance(), "started": time.time(),
                                         "settings": bench.settings()})
    bench.run(rows, tasks, [int(s) for s in args.seeds.split(",")])
    bench.save()
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
