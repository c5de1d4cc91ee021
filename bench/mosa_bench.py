"""Bottleneck adapter vs MoSA (Mixture of Sparse Adapters) vs LoRA in the low-data regime.

MoSA (Zhang et al., arXiv 2312.02923; spec: docs/methods/mosa.md) splits an adapter's Up projection
into N = 4 disjoint random element sets, trains one (randomly chosen per step and layer) at a time,
adds a symmetric-KL consistency term between two stochastic passes (R-Drop style, weight 1.0) and at
the end averages the modules into a plain adapter of the same shapes. The paper claims it beats the
plain adapter "by a large margin" at no inference cost, with the largest gains when data is scarce.
Checked here, at equal inference parameters, with the head trained in full for every method:

- ``adapter``: plain bottleneck adapter;
- ``mosa``: MoSA on that same adapter (N=4, split="up", consistency_weight=1.0: the paper's setting),
  merged with ``ak.merge`` before evaluation (the merged shapes and counts are checked against the plain
  adapter's, and the merged model's logits against the unmerged eval-mode ones);
- ``mosa-nc``: the same without the consistency pass (consistency_weight=0; 1 pass per step);
- ``lora``: LoRA at about the adapter's trainable-parameter count.

Tasks. Text: MiniLM (all-MiniLM-L6-v2, mean pooling) on VADER movie-snippet sentiment with 64 and 256
training examples, 200 validation, 1000 test. Adapters: sequential Pfeiffer (ReLU, s=1) after each
FFN's output projection ``layer.<i>.output.dense`` (384 → 384, before BERT's residual + LayerNorm),
bottleneck 48; LoRA r=24, alpha=48 on query/value. Vision: EfficientNet-Lite0 (ImageNet) on
scikit-learn's digits at SIZE px, 5 and 20 images per class, 10 per class validation, 500 test.
Adapters: sequential Pfeiffer 1×1-conv adapters after each of the 16 MBConv blocks, reduction 4;
LoRA on the 31 pointwise expand/project convs, r chosen to match the adapter's count.

Training: ``ak.train`` (AdamW, no weight decay, 6 % linear warm-up then linear decay, grad-norm clip 1)
for a fixed number of optimizer steps per run (72 text, ~150 vision; whole epochs), batch 32, the same
for every method (MoSA's consistency pass makes its steps ~2x as expensive; reported). Seeds: 3 per cell; the seed draws the
training subset (nested: the small regime is a prefix of the large one), the data order, the adapter
init and MoSA's partitions and module choices; every method of a seed sees the same data.
Learning rates: per task, every method is trained at each LR of a small grid on the larger regime with
seed 0 and the LR with the best validation accuracy is used for every regime and seed of that task.

    .venv/bin/python bench/mosa_bench.py            # ~30 min on 2 cores
    .venv/bin/python bench/mosa_bench.py --quick    # smoke run, results in bench/results/tmp/
    .venv/bin/python bench/mosa_bench.py --edge-check    # then: LRs beyond chosen grid edges (~4 min)
    .venv/bin/python bench/mosa_bench.py --steps-check 4 --tasks vision   # then: 4x the steps (~3 min)
    .venv/bin/python bench/mosa_bench.py --report-only   # re-render .md/.png from the JSON
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
import time
from typing import Any

import torch

import _tasks as T
import adapterkit as ak
from adapterkit.zoo.data import LabelledTexts, vader
from adapterkit.errors import TargetError
from adapterkit.zoo.vision import Images, digits, load_efficientnet_lite0

import mosa_report as R

STEM = "mosa_bench"
METHODS = ("adapter", "mosa", "mosa-nc", "lora")
N_MODULES = 4
TEXT = {"targets": r".*layer\.\d+\.output\.dense", "bottleneck": 48, "head": ["classifier"],
        "lora_targets": ["query", "value"], "lora_r": 24}
VISION = {"targets": r"backbone\._blocks\.\d+", "reduction_factor": 4, "head": ["backbone._fc"],
          "lora_targets": r"backbone\._blocks\.\d+\._(expand|project)_conv"}
BATCH = 32
MODES = {  # sizes and budgets; grids: (bottleneck family, LoRA)
    "full": {"text_regimes": (64, 256), "vision_regimes": (5, 20), "text_val": 200, "text_test": 1000,
             "vision_val_per_class": 10, "vision_test": 500, "size": 32, "steps": {"text": 72, "vision": 150},
             "seeds": (0, 1, 2),
             "grid": {"text": ((1e-3, 3e-3), (3e-3, 1e-2)), "vision": ((1e-3, 3e-3), (3e-3, 1e-2))}},
    "quick": {"text_regimes": (64,), "vision_regimes": (5,), "text_val": 64, "text_test": 128,
              "vision_val_per_class": 4, "vision_test": 100, "size": 32, "steps": {"text": 6, "vision": 6},
              "seeds": (0,),
              "grid": {"text": ((3e-3,), (1e-2,)), "vision": ((3e-3,), (1e-2,))}},
}


# -- data --------------------------------------------------------------------------------------
class ImageBatches:
    """Re-iterable shuffled mini-batches of :class:`Images` (a new seeded order every epoch)."""

    def __init__(self, images: Images, batch: int, seed: int) -> None:
        self.images, self.batch, self.seed, self.epoch = images, batch, seed, 0

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch)

    def __iter__(self):
        order = self.images.batches(self.batch, shuffle=True, seed=1000 * self.seed + self.epoch)
        self.epoch += 1
        yield from order


def text_data(mode: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Fixed validation (the first examples of the train split) and test; per seed, a shuffled pool
    from which each regime takes a prefix."""
    pool_size = max(mode["text_regimes"])
    splits = T.sentiment_splits("movies", 0, mode["text_val"], mode["text_test"])
    train = vader("movies", "train", test_size=1000)
    rest = T.take(train, mode["text_val"], len(train))
    fits = {}
    for seed in mode["seeds"]:
        order = list(range(len(rest)))
        random.Random(seed).shuffle(order)
        pool = LabelledTexts(*(tuple(getattr(rest, f)[i] for i in order[:pool_size])
                                       for f in ("texts", "labels", "scores")))
        fits[seed] = {n: T.take(pool, 0, n) for n in mode["text_regimes"]}
    return {"fits": fits, "val": T.eval_batches(tokenizer, splits.val), "test": T.eval_batches(tokenizer, splits.test),
            "sizes": {"val": len(splits.val), "test": len(splits.test), "pool": len(rest)},
            "positive_rate": {"val": sum(splits.val.labels) / len(splits.val),
                              "test": sum(splits.test.labels) / len(splits.test)}}


def vision_data(mode: dict[str, Any]) -> dict[str, Any]:
    """Validation: the first ``vision_val_per_class`` training images of each class; per seed, a seeded
    per-class permutation of the rest, from which each regime takes the first k per class."""
    size, k_val, k_max = mode["size"], mode["vision_val_per_class"], max(mode["vision_regimes"])
    train = digits("train", size=size)
    test = digits("test", size=size, test_size=500)
    test = Images(test.pixels[:mode["vision_test"]], test.labels[:mode["vision_test"]])
    by_class = [torch.nonzero(train.labels == c).view(-1) for c in range(10)]
    val_idx = torch.cat([idx[:k_val] for idx in by_class])
    fits = {}
    for seed in mode["seeds"]:
        g = torch.Generator().manual_seed(seed)
        pools = [idx[k_val:][torch.randperm(len(idx) - k_val, generator=g)[:k_max]] for idx in by_class]
        fits[seed] = {k: Images(train.pixels[torch.cat([p[:k] for p in pools])], train.labels[torch.cat([p[:k] for p in pools])])
                      for k in mode["vision_regimes"]}
    val = Images(train.pixels[val_idx], train.labels[val_idx])
    return {"fits": fits, "val": val.batches(128), "test": test.batches(128),
            "sizes": {"val": len(val), "test": len(test), "pool": len(train) - len(val_idx)}}


# -- configurations ------------------------------------------------------------------------------
def base_config(task: str) -> ak.BottleneckConfig:
    if task == "text":
        return ak.BottleneckConfig(bottleneck=TEXT["bottleneck"], style="pfeiffer", target_modules=TEXT["targets"],
                                   modules_to_save=TEXT["head"])
    return ak.BottleneckConfig(reduction_factor=VISION["reduction_factor"], style="pfeiffer",
                               target_modules=VISION["targets"], modules_to_save=VISION["head"])


def lora_width(model: torch.nn.Module) -> int:
    """Sum of in + out channels of the vision LoRA targets: LoRA's parameter count per unit of rank."""
    import re

    return sum(m.in_channels + m.out_channels for n, m in model.named_modules()
               if re.fullmatch(VISION["lora_targets"], n))


def make_config(task: str, method: str, seed: int, lora_r: int) -> ak.AdapterConfig:
    if method == "adapter":
        return base_config(task)
    if method.startswith("mosa"):
        return ak.MoSAConfig(base=base_config(task), n_modules=N_MODULES, split="up",
                             consistency_weight=0.0 if method == "mosa-nc" else 1.0, seed=seed)
    spec = TEXT if task == "text" else VISION
    return ak.LoRAConfig(r=lora_r, alpha=2.0 * lora_r, target_modules=spec["lora_targets"], modules_to_save=spec["head"])


def load_model(task: str) -> torch.nn.Module:
    return T.load_minilm()[0] if task == "text" else load_efficientnet_lite0(10)


def head_params(task: str, model: torch.nn.Module) -> int:
    head = model.classifier if task == "text" else model.backbone._fc
    return sum(p.numel() for p in head.parameters())


def shape_signature(model: torch.nn.Module) -> str:
    shapes = sorted(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters() if p.requires_grad)
    return hashlib.sha1("\n".join(shapes).encode()).hexdigest()[:12]


# -- one run -----------------------------------------------------------------------------------
def run_one(task: str, method: str, regime: int, seed: int, lr: float, batches: Any, evals: dict[str, list],
            steps: int, lora_r: int) -> dict[str, Any]:
    model = load_model(task)
    n_head = head_params(task, model)  # before attach: modules_to_save keeps the original and a copy
    config = make_config(task, method, seed, lora_r)
    torch.manual_seed(seed)  # the adapter's random init (Down / LoRA A)
    ak.attach(model, config, "task")
    batches.epoch = 0
    epochs = max(1, round(steps / len(batches)))
    trainable = ak.trainable_parameters(model)[0]
    result: dict[str, Any] = {"task": task, "method": method, "regime": regime, "seed": seed, "lr": lr,
                              "epochs": epochs, "trainable_params": trainable, "head_params": n_head}
    torch.manual_seed(seed)
    loss_fn = ak.mosa.two_pass_loss if method == "mosa" else None
    start = time.perf_counter()
    losses = ak.train(model, batches, epochs=epochs, lr=lr, progress=False, loss_fn=loss_fn)
    result.update(train_s=time.perf_counter() - start, steps=len(losses), first_loss=losses[0],
                  final_loss=statistics.fmean(losses[-5:]))
    result["step_s"] = result["train_s"] / result["steps"]
    if method.startswith("mosa"):
        probe = evals["test"][:1]
        before = ak.predict(model, probe)
        ak.to_plain(model, "task")
        result["merge_max_abs_logit_diff"] = float((ak.predict(model, probe) - before).abs().max())
    result["inference_params"] = sum(p.numel() for p in ak.adapter_parameters(model, "task"))
    result["inference_signature"] = shape_signature(model)
    for split, data in evals.items():
        result[f"{split}_acc"] = ak.accuracy(model, data)
    return result


def warm_up(task: str, batches: Any, evals: dict[str, list], lora_r: int, methods: list[str]) -> None:
    """Two untimed steps of each method, so the first timed run does not pay one-off set-up costs."""
    for method in methods:
        model = load_model(task)
        ak.attach(model, make_config(task, method, 0, lora_r), "warm-up")
        loss_fn = ak.mosa.two_pass_loss if method == "mosa" else None
        ak.train(model, [b for b, _ in zip(batches, range(2))], lr=1e-3, progress=False, loss_fn=loss_fn)
        ak.predict(model, evals["test"][:1])
    batches.epoch = 0


def prepare(task: str, mode: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The task's data and ``batches_for(seed, regime)``, the training batches of one cell."""
    T.log(f"{task}: preparing data")
    tokenizer = T.load_minilm()[1] if task == "text" else None
    data = text_data(mode, tokenizer) if task == "text" else vision_data(mode)

    def batches_for(seed: int, regime: int) -> Any:
        fit = data["fits"][seed][regime]
        return T.train_batches(tokenizer, fit, seed) if task == "text" else ImageBatches(fit, BATCH, seed)

    return data, batches_for


def edge_check(report: dict[str, Any], quick: bool) -> None:
    """Where a chosen LR lies at the edge of its grid: one more run (selection cell) at the next LR
    outward, to show whether the grid cut the choice short. Reported, never used to change the choice."""
    mode = report["config"]["mode"]
    mode["seeds"] = tuple(mode["seeds"])
    report["edge_check"] = {}
    for task, chosen in report["chosen_lr"].items():
        data, batches_for = prepare(task, mode)
        regime, seed = max(mode[f"{task}_regimes"]), mode["seeds"][0]
        val = R.summarise(report)["selection_val_acc"][task]
        ladder = sorted(m * 10.0 ** e for e in range(-6, 1) for m in (1, 3))  # 1e-6, 3e-6, ..., 3
        for method, lr in chosen.items():
            lrs = sorted(val[method], key=float)
            best = max(val[method].values())
            for end, outward in ((lrs[0], -1), (lrs[-1], 1)):  # every grid end that ties the best
                if len(lrs) < 2 or val[method][end] < best:
                    continue
                index = min(range(len(ladder)), key=lambda i: abs(math.log(ladder[i] / float(end))))
                result = run_one(task, method, regime, seed, float(f"{ladder[index + outward]:.0e}"),
                                 batches_for(seed, regime), {"val": data["val"], "test": data["test"]},
                                 mode["steps"][task], report["config"][task]["lora_r_used"])
                report["edge_check"].setdefault(task, {}).setdefault(method, []).append(result)
                T.log(f"{task} {method}: edge LR {result['lr']:g} val {100 * result['val_acc']:.1f} test "
                      f"{100 * result['test_acc']:.1f} (chosen {lr:g}, val {100 * val[method]['%g' % lr]:.1f})")
    R.write(report, quick, STEM)


def steps_check(report: dict[str, Any], quick: bool, factor: int, tasks: list[str]) -> None:
    """Adapter and MoSA (selection cell, chosen LR) with ``factor``× the steps: is MoSA, whose Up
    entries each train on 1/N of the steps, just short of training? Reported, never used for the tables."""
    mode = report["config"]["mode"]
    mode["seeds"] = tuple(mode["seeds"])
    report["steps_check"] = {"factor": factor}
    for task in tasks:
        data, batches_for = prepare(task, mode)
        regime, seed = max(mode[f"{task}_regimes"]), mode["seeds"][0]
        for method in ("adapter", "mosa"):
            lr = report["chosen_lr"][task][method]
            result = run_one(task, method, regime, seed, lr, batches_for(seed, regime),
                             {"val": data["val"], "test": data["test"]}, factor * mode["steps"][task],
                             report["config"][task]["lora_r_used"])
            report["steps_check"].setdefault(task, {})[method] = result
            T.log(f"{task} {method}: {result['steps']} steps lr {lr:g} loss {result['final_loss']:.3f} "
                  f"val {100 * result['val_acc']:.1f} test {100 * result['test_acc']:.1f}")
    R.write(report, quick, STEM)


# -- driver ------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny data, a few steps, one seed (smoke run)")
    parser.add_argument("--tasks", nargs="+", default=["text", "vision"], choices=("text", "vision"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (rounded to whole epochs)")
    parser.add_argument("--size", type=int, help="vision image size in px")
    parser.add_argument("--edge-check", action="store_true",
                        help="after a run: try the next LR beyond each chosen LR at its grid's edge (validation)")
    parser.add_argument("--steps-check", type=int, metavar="FACTOR",
                        help="after a run: adapter and MoSA with FACTOR× the steps (selection cell, --tasks)")
    parser.add_argument("--report-only", action="store_true", help="re-render the Markdown and plot from the JSON")
    args = parser.parse_args(argv)
    out = T.QUICK_RESULTS if args.quick else T.RESULTS
    if args.report_only:
        R.write(json.loads((out / f"{STEM}.json").read_text()), args.quick, STEM)
        return 0
    T.setup()
    if args.steps_check or args.edge_check:  # add to the results; record what this run measured on
        report = json.loads((out / f"{STEM}.json").read_text())
        meta = T.metadata([__file__.split("/")[-1], *argv])
        extensions = [e for e in report["meta"].get("extensions", []) if e["command"] != meta["command"]]
        report["meta"]["extensions"] = extensions + [meta]  # a re-run of the same check replaces its record
        if args.steps_check:
            steps_check(report, args.quick, args.steps_check, args.tasks)
        else:
            edge_check(report, args.quick)
        return 0
    mode = dict(MODES["quick" if args.quick else "full"])
    mode.update({k: v for k, v in (("seeds", tuple(args.seeds or ())), ("size", args.size)) if v})
    if args.steps:
        mode["steps"] = {t: args.steps for t in mode["steps"]}
    report: dict[str, Any] = {
        "meta": T.metadata([__file__.split("/")[-1], *argv]),
        "config": {"methods": args.methods, "tasks": args.tasks, "n_modules": N_MODULES, "split": "up",
                   "consistency_weight": {"mosa": 1.0, "mosa-nc": 0.0}, "update_unselected": "never",
                   "text": {**TEXT, "style": "pfeiffer", "activation": "relu", "scaling": 1.0,
                            "lora_alpha": 2.0 * TEXT["lora_r"], "max_length": T.MAX_LENGTH},
                   "vision": {**VISION, "style": "pfeiffer", "activation": "relu", "scaling": 1.0},
                   "batch": BATCH, "weight_decay": 0.0, "warmup": 0.06, "max_grad_norm": 1.0,
                   "mode": {k: ({t: [list(g) for g in v] for t, v in mode["grid"].items()} if k == "grid" else v)
                            for k, v in mode.items()}, "quick": args.quick},
        "data": {}, "runs": [], "chosen_lr": {}, "lora_unavailable": {}, "wall_s": {},
    }
    start = time.perf_counter()
    for task in args.tasks:
        data, batches_for = prepare(task, mode)
        report["data"][task] = {"sizes": data["sizes"], "positive_rate": data.get("positive_rate"),
                                "regimes": list(mode[f"{task}_regimes"])}
        # LoRA's rank: text fixed; vision matched to the plain adapter's count (head excluded)
        probe_model = load_model(task)
        widths = 0 if task == "text" else lora_width(probe_model)  # before wrapping
        n_head = head_params(task, probe_model)
        ak.attach(probe_model, base_config(task), "probe")
        adapter_only = ak.trainable_parameters(probe_model)[0] - n_head
        lora_r = TEXT["lora_r"] if task == "text" else max(1, round(adapter_only / widths))
        report["config"][task]["adapter_params_excl_head"] = adapter_only
        report["config"][task]["lora_r_used"] = lora_r
        methods = list(args.methods)
        if "lora" in methods:
            try:
                ak.attach(load_model(task), make_config(task, "lora", 0, lora_r), "check")
            except TargetError as error:  # LoRA on Conv2d not (yet) in adapterkit
                report["lora_unavailable"][task] = str(error)
                methods.remove("lora")
                T.log(f"{task}: LoRA not available: {error}")
        regimes, seeds = mode[f"{task}_regimes"], mode["seeds"]
        select_regime, bottleneck_grid, lora_grid = max(regimes), *mode["grid"][task]
        grid = {m: lora_grid if m == "lora" else bottleneck_grid for m in methods}

        def record(result: dict[str, Any]) -> None:
            report["runs"].append(result)
            T.log(f"{task} n={result['regime']} seed {result['seed']} {result['method']:8s} lr={result['lr']:<6g} "
                  f"{result['train_s']:6.1f} s ({result['steps']} steps) loss {result['final_loss']:.3f} "
                  f"val {100 * result.get('val_acc', float('nan')):.1f} test {100 * result['test_acc']:.1f}")

        evals = {"val": data["val"], "test": data["test"]}
        warm_up(task, batches_for(seeds[0], min(regimes)), evals, lora_r, methods)
        # 1. LR selection: larger regime, first seed, every LR of the grid, chosen on validation
        chosen = report["chosen_lr"].setdefault(task, {})
        batches = batches_for(seeds[0], select_regime)
        for method in methods:
            scores = {}
            for lr in grid[method]:
                result = run_one(task, method, select_regime, seeds[0], lr, batches, evals, mode["steps"][task], lora_r)
                result["selection"] = True
                record(result)
                scores[lr] = result["val_acc"]
            chosen[method] = max(sorted(scores), key=lambda lr: (scores[lr], -lr))
        T.log(f"{task}: chosen LRs {chosen}")
        # 2. every regime and seed at the chosen LR (the selection runs at the chosen LR are reused)
        for regime in regimes:
            for seed in seeds:
                if regime == select_regime and seed == seeds[0]:
                    continue
                batches = batches_for(seed, regime)
                for method in methods:
                    record(run_one(task, method, regime, seed, chosen[method], batches, {"test": data["test"]},
                                           mode["steps"][task], lora_r))
                report["wall_s"]["so_far"] = time.perf_counter() - start
                R.write(report, args.quick, STEM)  # partial results as it goes
    report["wall_s"]["total"] = time.perf_counter() - start
    out = R.write(report, args.quick, STEM)
    T.log(f"done in {report['wall_s']['total'] / 60:.1f} min; wrote {out}/{STEM}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
