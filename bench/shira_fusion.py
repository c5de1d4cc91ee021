"""Concept loss when two adapters are fused (SHiRA paper §4.2, Table 4), on MiniLM with real tasks.

Task A: sentiment of VADER movie-review snippets. Task B (default): source classification, whether
a VADER snippet is an Amazon product review or a New York Times editorial. The tasks share the
encoder but have their own heads: the experiment model wraps the MiniLM encoder with ``head_a``
and ``head_b``, adapter A trains only ``head_a`` (its ``modules_to_save``) and adapter B only
``head_b``, so both can be active, or fused, together.

Why this pair: B needs no sentiment, but the features that tell a product review from an
editorial (opinionated first-person review language) are the ones movie snippets are made of, so
B's update moves movie snippets along directions head A reads. In a one-seed pilot before this
script (LoRA at lr 3e-3, 500 test examples), fusing cost task A 17 points with this B, 5 with
tweet sentiment as B, and about 1 with tweets-vs-NYT source or tweet sentiment intensity as B
(the first three are ``--task-b`` choices). The drops vary a lot with the seed (head init, data
order): SHiRA-WM lost 13.6 points on A in that pilot and 0.3-5.9 over the seeds of the full run.

Variants, all at r=8 on query/value (LoRA r=8 = SHiRA r=8 in trainable entries):
``lora``; ``shira-wm`` with B overlapping A (both take the top-K |W|) and ``shira-wm-nonoverlap``
(B takes the next top-K: ``avoid=("A",)``); ``shira-rand`` (independent random masks).
For each: accuracy of each task with only its adapter active, with both fused
(``ak.fuse(model, ["A", "B"])``), the drops, and AWOR/AWOM between the two deltas.

Learning rates: each family's best validation LR from ``results/shira_quality.json`` (task A's
LR sweep), or ``--lr METHOD=LR``.

    .venv/bin/python bench/shira_fusion.py            # 3 seeds, ~12 min on 2 cores
    .venv/bin/python bench/shira_fusion.py --quick    # smoke run, results in bench/results/tmp/
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from torch import nn

import _tasks as T
from _provenance import describe
import adapterkit as ak
from adapterkit.zoo.data import vader
from adapterkit.zoo.models import mean_pool
from adapterkit.core.state import get_state

TARGETS = ["query", "value"]
VARIANTS = {  # name: (method of both adapters, B avoids A's support)
    "lora": ("lora", False),
    "shira-wm": ("shira-wm", False),
    "shira-wm-nonoverlap": ("shira-wm", True),
    "shira-rand": ("shira-rand", False),
}
DEFAULT_LR = {"lora": 1e-2, "shira-wm": 1e-2, "shira-rand": 1e-2}  # used only without shira_quality.json
TASKS_B = ("source:amazon/nyt", "source:tweets/nyt", "sentiment:tweets")
SIZES = {"full": (1500, 1000), "quick": (192, 128)}  # fit and test examples per task


class TwoTaskModel(nn.Module):
    """MiniLM encoder, mean pooling, and one linear head per task; ``task`` picks the head."""

    def __init__(self, encoder: nn.Module, seed: int) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.head_a, self.head_b = nn.Linear(hidden, 2), nn.Linear(hidden, 2)
        torch.random.set_rng_state(generator_state)
        self.task = "a"

    @property
    def config(self) -> Any:
        return self.encoder.config

    def forward(self, input_ids, attention_mask, labels=None, **kwargs) -> dict[str, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        logits = (self.head_a if self.task == "a" else self.head_b)(mean_pool(hidden, attention_mask))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def task_b_splits(spec: str, n_fit: int, n_test: int) -> T.Splits:
    """``source:X/Y`` (label 0 = subset X, 1 = Y, balanced) or ``sentiment:SUBSET``."""
    kind, _, what = spec.partition(":")
    if kind == "sentiment":
        return T.sentiment_splits(what, n_fit, 0, n_test)
    first, second = what.split("/")
    train = [T.relabel(vader(s, "train", test_size=1000), i) for i, s in enumerate((first, second))]
    test = [T.relabel(vader(s, "test", test_size=1000), i) for i, s in enumerate((first, second))]
    return T.Splits(T.interleave(*train).head(n_fit), T.take(train[0], 0, 0), T.interleave(*test).head(n_test))


def support_overlap(model: nn.Module, first: str, second: str) -> float | None:
    """Fraction of B's SHiRA entries that A also trains (None for LoRA)."""
    state = get_state(model)
    shared = total = 0
    for path, layer in state.layers(second):
        if not isinstance(layer, ak.DeltaLayer):
            continue  # the head copy
        other = state.wrappers[path].layer(first)
        if not hasattr(layer, "indices") or not hasattr(other, "indices"):
            return None
        shared += int(torch.isin(layer.indices, other.indices).sum())
        total += layer.indices.numel()
    return shared / total


def delta_norm(model: nn.Module, name: str) -> float:
    """Frobenius norm of the adapter's ΔW, summed in quadrature over its layers."""
    state = get_state(model)
    total = 0.0
    for path, layer in state.layers(name):
        if isinstance(layer, ak.DeltaLayer):
            total += float(layer.delta_weight(state.wrappers[path].weight.shape).norm()) ** 2
    return total ** 0.5


def train_task(model: TwoTaskModel, name: str, task: str, config: ak.AdapterConfig, batches: ak.TextBatches,
               lr: float, seed: int) -> dict[str, Any]:
    model.task = task
    batches.epoch = 0
    attach_s = T.attach(model, config, name, batches, seed)
    ak.activate(model, [name])
    result = T.fit(model, batches, lr, seed)
    result["attach_s"] = attach_s
    return result


def run_family(method: str, variants: list[str], lr: float, seed: int, data: dict[str, Any]) -> dict[str, Any]:
    """Train A once, then each B variant of this family; score alone and fused."""
    base, _ = T.load_minilm()
    model = TwoTaskModel(base.encoder, seed)
    acc = lambda task: (setattr(model, "task", task), ak.accuracy(model, data["test_" + task]))[1]  # noqa: E731
    out: dict[str, Any] = {}
    train_a = train_task(model, "A", "a", T.make_config(method, TARGETS, ["head_a"], seed=seed), data["fit_a"], lr, 1000 * seed)
    alone_a = acc("a")
    for variant in variants:
        avoid = ("A",) if VARIANTS[variant][1] else ()
        config = T.make_config(method, TARGETS, ["head_b"], avoid=avoid, seed=seed)
        train_b = train_task(model, "B", "b", config, data["fit_b"], lr, 1000 * seed + 1)
        alone_b = acc("b")
        ak.fuse(model, ["A", "B"])
        fused_a, fused_b = acc("a"), acc("b")
        ak.unfuse(model)
        orth = ak.metrics.orthogonality(model, "A", "B")
        out[variant] = {
            "seed": seed, "lr": lr, "alone_a": alone_a, "alone_b": alone_b, "fused_a": fused_a, "fused_b": fused_b,
            "drop_a": alone_a - fused_a, "drop_b": alone_b - fused_b,
            "avg_drop": (alone_a + alone_b - fused_a - fused_b) / 2,
            "awor": orth.awor, "awom_spectral": orth.awom_spectral, "awom_fro": orth.awom_fro,
            "support_overlap": support_overlap(model, "A", "B"), "delta_norm_a": delta_norm(model, "A"),
            "delta_norm_b": delta_norm(model, "B"), "trainable_params_a": T.adapter_parameter_count(model, "A"),
            "trainable_params_b": T.adapter_parameter_count(model, "B"), "train_a": train_a, "train_b": train_b,
        }
        ak.detach(model, "B")
        ak.activate(model, ["A"])
        if acc("a") != alone_a:
            raise AssertionError("adapter A changed while B was trained, fused and detached")
        r = out[variant]
        T.log(f"seed {seed} {variant:20s} alone A {alone_a:.3f} B {alone_b:.3f} | fused A {fused_a:.3f} B {fused_b:.3f} | "
              f"avg drop {100 * r['avg_drop']:+.1f} pts | AWOR {orth.awor:.3f} AWOM {orth.awom_spectral:.3g}")
    return out


def learning_rates(overrides: list[str]) -> tuple[dict[str, float], str]:
    path = T.RESULTS / "shira_quality.json"
    lrs, source = dict(DEFAULT_LR), "defaults in shira_fusion.py"
    if path.is_file():
        best = json.loads(path.read_text()).get("best_lr", {})
        found = {m: float(best[m]) for m in DEFAULT_LR if m in best}
        lrs.update(found)
        if found:
            source = "best validation LR per method in results/shira_quality.json (task A sweep)"
    for item in overrides:
        method, _, value = item.partition("=")
        lrs[method] = float(value)
        source += f"; overridden: {item}"
    return lrs, source


KEYS = ("alone_a", "alone_b", "fused_a", "fused_b", "drop_a", "drop_b", "avg_drop", "awor", "awom_spectral", "awom_fro",
        "support_overlap", "delta_norm_a", "delta_norm_b")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: T.mean_spread([r[k] for r in runs]) for k in KEYS if runs[0][k] is not None}


def markdown(report: dict[str, Any]) -> str:
    meta, cfg = report["meta"], report["config"]
    n = len(cfg["seeds"])
    lines = [
        "# Concept loss when fusing two adapters: LoRA vs SHiRA (MiniLM, VADER)",
        "",
        f"- {meta['date']}, adapterkit {meta['versions']['adapterkit']} ({describe(meta)}), "
        f"torch {meta['versions']['torch']}, {meta['machine']['cpus']} CPUs; command `{meta['command']}`",
        f"- task A: sentiment of VADER movie snippets; task B: {cfg['task_b_description']}; "
        f"{cfg['fit']} training and {cfg['test']} test examples per task, {cfg['max_length']} tokens max",
        "- model: MiniLM encoder + mean pooling + `head_a` / `head_b`; adapter A trains `head_a`, adapter B trains `head_b` "
        f"(`modules_to_save`); r={cfg['r']} on {', '.join(cfg['targets'])} of all 6 layers (LoRA alpha {cfg['lora_alpha']:g}); "
        "1 epoch, batch 32, AdamW without weight decay",
        f"- learning rates: {', '.join(f'{m} {lr:g}' for m, lr in cfg['lr'].items())} ({cfg['lr_source']})",
        f"- alone = only that task's adapter active; fused = `ak.fuse(model, ['A', 'B'])`; drop = alone − fused; "
        f"avg drop = the paper's %Drop (mean single − mean fused); values are mean ± sd over {n} seed(s) "
        f"({', '.join(map(str, cfg['seeds']))}) in accuracy points",
        "",
    ]
    rows = []
    for variant, summary in report["summary"].items():
        s = summary
        overlap = f"{100 * s['support_overlap']['mean']:.0f}%" if "support_overlap" in s else "dense"
        rows.append([variant, T.pm(s["alone_a"]), T.pm(s["alone_b"]), T.pm(s["fused_a"]), T.pm(s["fused_b"]),
                     T.pm(s["drop_a"]), T.pm(s["drop_b"]), f"**{T.pm(s['avg_drop'])}**",
                     T.pm(s["awor"], 1.0, 3), T.pm(s["awom_spectral"], 1.0, 3), T.pm(s["awom_fro"], 1.0, 3), overlap])
    lines += T.md_table(["variant", "A alone", "B alone", "A fused", "B fused", "drop A", "drop B", "avg drop",
                         "AWOR", "AWOM (spectral)", "AWOM (Frobenius)", "B∩A support"], rows)
    lines += ["", "AWOR/AWOM are per-layer means over the 12 adapted weights (`ak.metrics.orthogonality`); higher AWOR "
              "and lower AWOM mean closer to orthogonal. SHiRA here trains r·(in+out) = 6,144 of 147,456 entries per "
              "384×384 weight (4.2%, against the paper's 1-2%), so independent masks are expected to give an AWOR near "
              "(1 − p²)^384 ≈ 0.51.", "", "Per seed (avg drop, points):", ""]
    per_seed = [[v] + [f"{100 * r['avg_drop']:+.1f}" for r in report["runs"][v]] for v in report["runs"]]
    lines += T.md_table(["variant"] + [f"seed {s}" for s in cfg["seeds"]], per_seed)
    lines += ["", "Adapter sizes (Frobenius norm of ΔW over all layers, mean): "
              + "; ".join(f"{v} A {s['delta_norm_a']['mean']:.2f}, B {s['delta_norm_b']['mean']:.2f}"
                          for v, s in report["summary"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny data, one seed (smoke run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--task-b", default=TASKS_B[0], choices=TASKS_B)
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="e.g. --lr shira-wm=0.03")
    args = parser.parse_args(argv)
    T.setup()
    seeds = args.seeds[:1] if args.quick else args.seeds
    n_fit, n_test = SIZES["quick" if args.quick else "full"]
    task_a = T.sentiment_splits("movies", n_fit, 0, n_test)
    task_b = task_b_splits(args.task_b, n_fit, n_test)
    lrs, lr_source = learning_rates(args.lr)
    scratch, tokenizer = T.load_minilm()
    data = {"test_a": T.eval_batches(tokenizer, task_a.test), "test_b": T.eval_batches(tokenizer, task_b.test)}
    description = {"source:amazon/nyt": "source, Amazon product review (0) vs NYT editorial (1), balanced",
                   "source:tweets/nyt": "source, tweet (0) vs NYT editorial (1), balanced",
                   "sentiment:tweets": "sentiment of VADER tweets"}[args.task_b]
    families = {VARIANTS[v][0]: [] for v in args.variants}
    for variant in args.variants:
        families[VARIANTS[variant][0]].append(variant)
    report: dict[str, Any] = {
        "meta": T.metadata([__file__.split("/")[-1], *argv]),
        "config": {"task_a": "sentiment:movies", "task_b": args.task_b, "task_b_description": description,
                   "fit": n_fit, "test": n_test, "targets": TARGETS, "r": T.R, "lora_alpha": T.LORA_ALPHA,
                   "max_length": T.MAX_LENGTH, "seeds": seeds, "lr": {m: lrs[m] for m in families}, "lr_source": lr_source,
                   "quick": args.quick},
        "runs": {v: [] for v in args.variants},
    }
    for seed in seeds:
        data["fit_a"] = T.train_batches(tokenizer, task_a.fit, seed)
        data["fit_b"] = T.train_batches(tokenizer, task_b.fit, seed)
        if seed == seeds[0]:
            T.warm_up(scratch, data["fit_a"])
        for method, variants in families.items():
            for variant, result in run_family(method, variants, lrs[method], seed, data).items():
                report["runs"][variant].append(result)
    report["summary"] = {v: summarise(runs) for v, runs in report["runs"].items()}
    out = T.write_report(report, markdown(report), "shira_fusion", args.quick)
    print(markdown(report))
    T.log(f"wrote {out}/shira_fusion.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
