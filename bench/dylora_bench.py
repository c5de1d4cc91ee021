"""DyLoRA: every rank from one training run, against LoRA trained once per rank (MiniLM + VADER).

DyLoRA (Valipour et al., EACL 2023, arXiv 2210.07558; spec: docs/methods/dylora.md) trains a
rank-``r_max`` LoRA whose every prefix rank ``b`` works: each optimizer step draws ``b`` and trains
the truncated adapter ``B[:, :b] A[:b]``. The claim checked here: one DyLoRA run replaces the
rank search (LoRA trained at each candidate rank), 4-7x faster, without a large accuracy cost; and a
rank-8 LoRA simply cut to rank ``b`` is much worse than DyLoRA at small ranks.

Two tasks: sentiment of VADER movie snippets and of VADER tweets; one seed by default (``--seeds 0 1``
for two in one go, or ``--extend --seeds 1`` to add a seed to finished results). Every adapter: MiniLM
(all-MiniLM-L6-v2, mean pooling) with ``query``/``value`` of the 6 layers adapted, r(_max)=8, alpha
16, classifier head trained in full (``modules_to_save``), one epoch, batch 32, AdamW without
weight decay, the shared helpers of ``_tasks.py``. Rows, held-out test accuracy at ranks 1, 2, 4, 8:

- DyLoRA ``alpha_over_b`` (the paper's scale) and ``alpha_over_rmax`` (constant), each frozen (only
  component ``b`` receives gradient; the official training) and non-frozen (components ``1..b``);
- LoRA r=8 truncated to its first ``b`` components, keeping alpha/8 (plain) or rescaled to alpha/b;
- LoRA trained separately at each rank b = 1..8 (all eight: the rank search DyLoRA replaces);
- a linear probe (logistic regression on frozen features; ``shira_quality.probe``).

Learning rates: on the first task and first seed every configuration is trained at each LR of a
small per-family grid (LoRA 3e-3/1e-2, DyLoRA 1e-3/3e-3) and the LR is chosen on a validation split
carved from the training data (DyLoRA: mean validation accuracy over ranks 1, 2, 4, 8; separate LoRA:
per rank; truncated LoRA is the rank-8 LoRA at its LR). The other task (and seeds) reuse those LRs.
Test accuracy at every LR is in the JSON, never used to choose.

Time to obtain every rank: within each block (task, seed, LR) the 8 LoRA runs and the 4 DyLoRA runs
alternate (DyLoRA after LoRA runs 1, 3, 5, 7; the rank order reverses from block to block) in one
process; ratio = sum of the 8 LoRA wall times / one DyLoRA wall time; also per-step time ratio
DyLoRA / LoRA r=8.

    .venv/bin/python bench/dylora_bench.py            # ~25 min on 2 cores (1 seed)
    .venv/bin/python bench/dylora_bench.py --extend --seeds 1   # add a seed to those results (~15 min)
    .venv/bin/python bench/dylora_bench.py --quick    # smoke run, results in bench/results/tmp/
    .venv/bin/python bench/dylora_bench.py --report-only   # re-render .md/.png from the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

import _tasks as T
import adapterkit as ak
from adapterkit.methods.dylora import DyLoRALayer
from adapterkit.methods.lora import LoRALayer

import _timing
import dylora_report as R

TARGETS = ["query", "value"]
HEAD = ["classifier"]
RANKS = tuple(range(1, T.R + 1))  # LoRA trained at each; DyLoRA r_max = 8 serves each
SHOW = (1, 2, 4, 8)  # ranks evaluated on DyLoRA and truncated LoRA
VARIANTS = {  # name: (scaling, frozen)
    "dylora-b-frozen": ("alpha_over_b", True),
    "dylora-b-free": ("alpha_over_b", False),
    "dylora-rmax-frozen": ("alpha_over_rmax", True),
    "dylora-rmax-free": ("alpha_over_rmax", False),
}
TASKS = ("movies", "tweets")
SIZES = {"full": (2000, 400, 1000), "quick": (96, 64, 96)}  # fit, val, test
# LR grids per family, tried pairwise (i-th LoRA LR in the same block as the i-th DyLoRA LR). A pilot
# (movies, 2000 examples, seed 0) put DyLoRA at 1e-2 on the edge of collapse (validation accuracy
# non-monotonic in the rank, 47% = one class at some ranks) and at 2e-2 collapsed outright, while LoRA r=8 is
# best at 1e-2 (shira_quality.json); hence the lower DyLoRA grid.
GRID = {"full": {"lora": (3e-3, 1e-2), "dylora": (1e-3, 3e-3)}, "quick": {"lora": (1e-2,), "dylora": (3e-3,)}}
QUIET = 0.25 # wait (bounded) before each training until other processes use fewer cores than this


def make_config(method: str, rank: int, seed: int) -> ak.AdapterConfig:
    if method == "lora":
        return ak.LoRAConfig(r=rank, alpha=T.LORA_ALPHA, target_modules=TARGETS, modules_to_save=HEAD)
    scaling, frozen = VARIANTS[method]
    return ak.DyLoRAConfig(r_max=T.R, r_min=1, alpha=T.LORA_ALPHA, scaling=scaling, frozen=frozen,
                           distribution="uniform", seed=seed, target_modules=TARGETS, modules_to_save=HEAD)


def plain_lora_layers(model: torch.nn.Module) -> list[LoRALayer]:
    return [m for m in model.modules() if isinstance(m, LoRALayer) and not isinstance(m, DyLoRALayer)]


def truncated_accuracy(model: torch.nn.Module, rank: int, rescale: bool, batches: list) -> float:
    """Accuracy with every LoRA layer cut to its first ``rank`` components (alpha/r kept, or alpha/rank)."""
    layers = plain_lora_layers(model)
    saved = [(layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.scaling) for layer in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                layer.lora_A[rank:] = 0.0
                layer.lora_B[:, rank:] = 0.0
                if rescale:
                    layer.scaling = T.LORA_ALPHA / rank
        return ak.accuracy(model, batches)
    finally:
        with torch.no_grad():
            for layer, (a, b, scaling) in zip(layers, saved):
                layer.lora_A.copy_(a)
                layer.lora_B.copy_(b)
                layer.scaling = scaling


def run_one(method: str, rank: int, lr: float, seed: int, fit_batches: ak.TextBatches,
            evals: dict[str, list]) -> dict[str, Any]:
    """Train one adapter from the base model; accuracy per split at the ranks it serves."""
    model, _ = T.load_minilm()
    fit_batches.epoch = 0  # the same shuffled order for every run of a seed
    config = make_config(method, rank, seed)
    result: dict[str, Any] = {"method": method, "rank": rank, "lr": lr, "seed": seed,
                              "attach_s": T.attach(model, config, "task", fit_batches, seed)}
    watch, cpu0 = _timing.CpuWatch(), time.process_time()
    result.update(T.fit(model, fit_batches, lr, seed))
    result["cpu_s"], result["contention"] = time.process_time() - cpu0, watch.stop()
    result["step_s"], result["threads"] = result["train_s"] / result["steps"], torch.get_num_threads()
    result["trainable_params"] = T.adapter_parameter_count(model, "task")
    acc: dict[str, dict[str, dict[str, float]]] = {}
    eval_s: dict[str, float] = {}
    for split, batches in evals.items():
        tick = time.perf_counter()
        if method == "lora":
            acc[split] = {"lora": {str(rank): ak.accuracy(model, batches)}}
            if rank == T.R and split == "test":  # no LR is chosen on truncated LoRA: test only  # the rank-8 LoRA, cut to smaller ranks
                for label, rescale in (("lora-trunc", False), ("lora-trunc-rescale", True)):
                    acc[split][label] = {str(b): (acc[split]["lora"][str(b)] if b == T.R else
                                                  truncated_accuracy(model, b, rescale, batches)) for b in SHOW}
        else:
            scores = {}
            for b in SHOW:
                ak.set_rank(model, b, "task")
                scores[str(b)] = ak.accuracy(model, batches)
            acc[split] = {method: scores}
        if method != "lora":  # seconds per evaluation pass over the split (rank-sweep cost)
            eval_s[split] = (time.perf_counter() - tick) / len(SHOW)
    result["acc"], result["eval_s_per_pass"] = acc, eval_s
    return result


def block_order(index: int) -> list[tuple[str, int]]:
    """8 LoRA runs with the 4 DyLoRA runs spread among them (after LoRA runs 1, 3, 5, 7); the LoRA
    rank order and the DyLoRA variant order change from block to block."""
    ranks = list(RANKS) if index % 2 == 0 else list(reversed(RANKS))
    variants = list(VARIANTS)
    variants = variants[index % len(variants):] + variants[:index % len(variants)]
    order: list[tuple[str, int]] = []
    for i, rank in enumerate(ranks):
        order.append(("lora", rank))
        if i % 2 == 0 and variants:
            order.append((variants.pop(0), T.R))
    return order


def choose_lrs(runs: list[dict[str, Any]], task: str, seed: int, grid: dict[str, tuple[float, ...]]) -> dict[str, float]:
    """Per configuration key (a DyLoRA variant, 'lora@b'): the LR with the best validation accuracy
    (DyLoRA: mean over SHOW); ties: the smaller LR. Truncated LoRA is the rank-8 LoRA, at lora@8's LR."""
    scores: dict[str, dict[float, float]] = {}
    for run in runs:
        if run["task"] != task or run["seed"] != seed or "val" not in run["acc"]:
            continue
        for row, by_rank in run["acc"]["val"].items():
            if row == "lora":
                scores.setdefault(f"lora@{run['rank']}", {})[run["lr"]] = by_rank[str(run["rank"])]
            elif not row.startswith("lora-trunc"):  # truncated LoRA = the rank-8 LoRA, at lora@8's LR
                scores.setdefault(row, {})[run["lr"]] = sum(by_rank.values()) / len(by_rank)
    return {key: max(sorted(by_lr), key=lambda lr: (by_lr[lr], -lr)) for key, by_lr in scores.items()
            if set(by_lr) == set(grid["lora" if key.startswith("lora") else "dylora"])}


def lr_for(chosen: dict[str, float], method: str, rank: int) -> float:
    return chosen[f"lora@{rank}"] if method == "lora" else chosen[method]


def equivalence_check(tokenizer: Any, splits: T.Splits) -> dict[str, Any]:
    """DyLoRA with r_min = r_max = 8, non-frozen, alpha/r_max must train exactly as LoRA r=8 (same
    seed, data order): the two rows differ only by the rank sampling under test."""
    fit_batches = T.train_batches(tokenizer, T.take(splits.fit, 0, 4 * T.BATCH), 0)
    test = T.eval_batches(tokenizer, T.take(splits.test, 0, 128))
    configs = [ak.LoRAConfig(r=T.R, alpha=T.LORA_ALPHA, target_modules=TARGETS, modules_to_save=HEAD),
               ak.DyLoRAConfig(r_max=T.R, r_min=T.R, alpha=T.LORA_ALPHA, scaling="alpha_over_rmax", frozen=False,
                               target_modules=TARGETS, modules_to_save=HEAD)]
    logits = []
    for config in configs:
        model, _ = T.load_minilm()
        fit_batches.epoch = 0
        T.attach(model, config, "task", fit_batches, 0)
        T.fit(model, fit_batches, 3e-3, 0)
        logits.append(ak.predict(model, test))
    diff = float((logits[0] - logits[1]).abs().max())
    return {"max_abs_logit_diff": diff, "passed": diff == 0.0, "steps": 4, "test_examples": 128}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny data, one LR per family (smoke run)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=("movies", "tweets", "amazon", "nyt"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--lora-grid", nargs="+", type=float, help="LoRA LRs tried on the first task and seed")
    parser.add_argument("--dylora-grid", nargs="+", type=float, help="DyLoRA LRs (as many as --lora-grid)")
    parser.add_argument("--sizes", nargs=3, type=int, metavar=("FIT", "VAL", "TEST"))
    parser.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine before trainings")
    parser.add_argument("--threads", type=int, default=T.THREADS, help="torch threads (1 on a machine shared with "
                        "another busy process: a descheduled second thread stalls every op)")
    parser.add_argument("--report-only", action="store_true", help="re-render the Markdown and plot from the JSON")
    parser.add_argument("--extend", action="store_true", help="add --seeds to the existing results (same tasks, "
                        "sizes and chosen LRs; no LR search)")
    args = parser.parse_args(argv)
    if args.report_only:
        out = T.QUICK_RESULTS if args.quick else T.RESULTS
        report = json.loads((out / "dylora_bench.json").read_text())
        R.write(report, args.quick, stem="dylora_bench")
        return 0
    T.setup()
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    n_fit, n_val, n_test = args.sizes or SIZES[mode]
    grid = {"lora": tuple(args.lora_grid or GRID[mode]["lora"]), "dylora": tuple(args.dylora_grid or GRID[mode]["dylora"])}
    if len(grid["lora"]) != len(grid["dylora"]):
        parser.error("--lora-grid and --dylora-grid need the same number of LRs")
    report: dict[str, Any] = json.loads(((T.QUICK_RESULTS if args.quick else T.RESULTS) / "dylora_bench.json").read_text()) \
        if args.extend else {
        "meta": T.metadata([__file__.split("/")[-1], *argv]),
        "config": {"targets": TARGETS, "modules_to_save": HEAD, "r_max": T.R, "alpha": T.LORA_ALPHA,
                   "lora_ranks": list(RANKS), "eval_ranks": list(SHOW), "variants": {k: {"scaling": s, "frozen": f}
                   for k, (s, f) in VARIANTS.items()}, "distribution": "uniform", "tasks": args.tasks,
                   "seeds": args.seeds, "sizes": {"fit": n_fit, "val": n_val, "test": n_test}, "batch": T.BATCH,
                   "max_length": T.MAX_LENGTH, "epochs": 1, "weight_decay": 0.0, "warmup": 0.06,
                   "grid": {k: list(v) for k, v in grid.items()},
                   "lr_selection": {"task": args.tasks[0], "seed": args.seeds[0]}, "quick": args.quick},
        "probe": {}, "runs": [], "chosen_lr": {}, "wall_s": {}, "waits": [],
    }
    block, prior = 0, 0.0
    if args.extend:
        if set(args.seeds) & set(report["config"]["seeds"]):
            parser.error(f"the results already hold seeds {report['config']['seeds']}")
        report["meta"].setdefault("extensions", []).append(T.metadata([__file__.split("/")[-1], *argv]))
        report["config"]["seeds"] += args.seeds
        args.tasks, sizes = report["config"]["tasks"], report["config"]["sizes"]
        n_fit, n_val, n_test = sizes["fit"], sizes["val"], sizes["test"]
        prior = report["wall_s"].get("total", report["wall_s"].get("so_far", 0.0))
        report["wall_s"] = {"first_run": prior}
        block = max(run["block"] for run in report["runs"]) + 1
    first_block = block
    start = time.perf_counter()
    from shira_quality import probe  # the SHiRA quality bench's linear probe, C chosen on validation

    scratch, tokenizer = T.load_minilm()
    for t_index, task in enumerate(args.tasks):
        splits = T.sentiment_splits(task, n_fit, n_val, n_test)
        report["config"].setdefault("task_sizes", {})[task] = splits.sizes()
        report["config"].setdefault("positive_rate_test", {})[task] = sum(splits.test.labels) / len(splits.test)
        if t_index == 0 and not args.extend:
            report["sanity"] = equivalence_check(tokenizer, splits)
            T.log(f"sanity: DyLoRA(r_min=r_max=8, non-frozen, alpha/r_max) vs LoRA r=8: {report['sanity']}")
        val, test = T.eval_batches(tokenizer, splits.val), T.eval_batches(tokenizer, splits.test)
        if not args.extend:
            T.log(f"{task}: linear probe ({splits.sizes()})")
            report["probe"][task] = probe(tokenizer, splits)
        T.log(f"{task}: probe val {report['probe'][task]['val_acc']:.3f} test {report['probe'][task]['test_acc']:.3f}")
        for s_index, seed in enumerate(args.seeds):
            fit_batches = T.train_batches(tokenizer, splits.fit, seed)
            if block == first_block:
                T.warm_up(scratch, fit_batches)
            selecting = t_index == 0 and s_index == 0 and not args.extend
            for pair in zip(grid["lora"], grid["dylora"]) if selecting else [None]:
                evals = {"val": val, "test": test} if selecting else {"test": test}
                for method, rank in block_order(block):
                    if selecting:
                        run_lr = pair[0] if method == "lora" else pair[1]
                    else:
                        run_lr = lr_for(report["chosen_lr"], method, rank)
                    if not args.no_wait:
                        report["waits"].append(_timing.wait_until_quiet(QUIET, max_wait=90, log=T.log))
                    result = run_one(method, rank, run_lr, seed, fit_batches, evals)
                    result.update(task=task, block=block)
                    report["runs"].append(result)
                    shown = " ".join(f"{row}:" + "/".join(f"{100 * a:.1f}" for a in by_rank.values())
                                     for row, by_rank in result["acc"]["test"].items())
                    T.log(f"{task} seed {seed} {method:18s} r={rank} lr={run_lr:<6g} {result['train_s']:5.1f} s "
                          f"({result['steps']} steps, cpu {result['cpu_s']:.0f} s, others "
                          f"{result['contention']['other_processes_cores']:.2f} cores) "
                          f"loss {result['final_loss']:.3f} test {shown}")
                block += 1
            if selecting:
                report["chosen_lr"] = choose_lrs(report["runs"], task, seed, grid)
                T.log(f"chosen LRs (validation, {task} seed {seed}): {report['chosen_lr']}")
            report["wall_s"]["so_far"] = prior + time.perf_counter() - start
            R.write(report, args.quick, stem="dylora_bench")  # partial results after every block
    report["wall_s"].pop("so_far", None)
    report["wall_s"]["total"] = prior + time.perf_counter() - start
    if args.extend:
        report["wall_s"]["extension"] = time.perf_counter() - start
    out = R.write(report, args.quick, stem="dylora_bench")
    T.log(f"done in {report['wall_s']['total'] / 60:.1f} min; wrote {out}/dylora_bench.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
