"""SHiRA vs LoRA quality at equal trainable parameters: MiniLM + VADER movie-review snippets.

Rows: a linear probe on frozen features, LoRA r=8 (alpha 16) and SHiRA r=8 with each mask rule
(struct, rand, wm, grad, snip; r=8 trains r·(in + out) entries per layer, LoRA r=8's count), all
on the query and value projections of the six MiniLM layers, with the classifier head trained in
full (``modules_to_save``). One epoch, batch 32, AdamW without weight decay, the same seed, data
and batch order for every row.

Learning rates: every method gets the same protocol. Train on the fit split at each LR of a
common grid (1e-3, 3e-3, 1e-2), score on a validation split carved from the training data, and
while the best LR lies at the edge of what was tried, extend the grid by ×3 in that direction
(at most two extensions). The test split is scored only to report; the LR is chosen on
validation accuracy alone.

    .venv/bin/python bench/shira_quality.py            # ~10-15 min on 2 cores
    .venv/bin/python bench/shira_quality.py --quick    # smoke run, results in bench/results/tmp/
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

import _tasks as T
from _provenance import describe
import adapterkit as ak

GRID = (1e-3, 3e-3, 1e-2)
STEP = 3.0  # grid extension factor
MAX_EXTENSIONS = 2
PROBE_C = (0.1, 1.0, 10.0)
TARGETS = ["query", "value"]
SIZES = {"full": (2500, 500, 1000), "quick": (256, 128, 256)}  # fit, val, test


def probe(tokenizer: Any, splits: T.Splits) -> dict[str, Any]:
    """Logistic regression on frozen mean-pooled MiniLM embeddings; C chosen on validation."""
    from sklearn.linear_model import LogisticRegression

    model, _ = T.load_minilm()

    def features(data):
        batches = T.eval_batches(tokenizer, data)
        with torch.no_grad():
            embedded = torch.cat([model.embed(b["input_ids"], b["attention_mask"]) for b in batches])
        return embedded.numpy(), torch.cat([b["labels"] for b in batches]).numpy()

    (fit_x, fit_y), val, test = features(splits.fit), features(splits.val), features(splits.test)
    scores = {}
    for c in PROBE_C:
        scores[c] = float(LogisticRegression(max_iter=3000, C=c).fit(fit_x, fit_y).score(*val))
    best = max(PROBE_C, key=lambda c: (scores[c], -c))
    clf = LogisticRegression(max_iter=3000, C=best).fit(fit_x, fit_y)
    return {"val_by_C": {str(c): s for c, s in scores.items()}, "best_C": best, "val_acc": scores[best],
            "test_acc": float(clf.score(*test)), "trainable_params": int(clf.coef_.size + clf.intercept_.size)}


def run_one(method: str, lr: float, tokenizer: Any, fit_batches: ak.TextBatches, val: list, test: list,
            seed: int) -> dict[str, Any]:
    """Train one adapter from the base model; validation and test accuracy, cost and size."""
    model, _ = T.load_minilm()
    fit_batches.epoch = 0  # the same shuffled order for every run
    config = T.make_config(method, TARGETS, ["classifier"], seed=seed)
    attach_s = T.attach(model, config, "task", fit_batches, seed)
    result = {"method": method, "lr": lr, "attach_s": attach_s}
    result.update(T.fit(model, fit_batches, lr, seed))
    result["val_acc"] = ak.accuracy(model, val)
    result["test_acc"] = ak.accuracy(model, test)
    result["trainable_params"] = T.adapter_parameter_count(model, "task")
    result["encoder_params"] = result["trainable_params"] - sum(p.numel() for p in model.classifier.parameters())
    result["file_bytes"] = T.adapter_bytes(model, "task")
    return result


def sweep(method: str, grid: tuple[float, ...], extend: bool, run: Any) -> tuple[list[dict[str, Any]], float]:
    """Runs at every LR of ``grid``, extended while the best lies at an edge; returns (runs, best LR)."""
    runs = {lr: run(method, lr) for lr in grid}
    for _ in range(MAX_EXTENSIONS if extend else 0):
        lrs = sorted(runs)
        best = max(lrs, key=lambda lr: (runs[lr]["val_acc"], -lr))
        if best == lrs[0]:
            new = lrs[0] / STEP
        elif best == lrs[-1]:
            new = lrs[-1] * STEP
        else:
            break
        runs[new] = run(method, new)
    lrs = sorted(runs)
    best = max(lrs, key=lambda lr: (runs[lr]["val_acc"], -lr))  # ties: the smaller LR
    return [runs[lr] for lr in lrs], best


def markdown(report: dict[str, Any]) -> str:
    meta, cfg = report["meta"], report["config"]
    lines = [
        "# SHiRA vs LoRA: quality at equal trainable parameters (MiniLM, VADER movie snippets)",
        "",
        f"- {meta['date']}, adapterkit {meta['versions']['adapterkit']} ({describe(meta)}), "
        f"torch {meta['versions']['torch']}, {meta['machine']['cpus']} CPUs, {meta['machine']['torch_threads']} threads; "
        f"command `{meta['command']}`",
        f"- data: VADER movie-review snippets, label = mean human rating > 0; {cfg['sizes']['fit']} training, "
        f"{cfg['sizes']['val']} validation (carved from the training split, used only to choose the LR), "
        f"{cfg['sizes']['test']} held-out test examples; {cfg['max_length']} tokens max",
        f"- every adapter: targets {', '.join(cfg['targets'])} of all 6 layers (12 weights of 384×384), classifier head trained "
        f"in full; 1 epoch, batch {cfg['batch']}, AdamW (no weight decay), 6% warm-up then linear decay, grad-norm clip 1, "
        f"seed {cfg['seed']} (same data order for every row); grad/snip masks from {cfg['calibration_batches']} training batches",
        f"- LR protocol: common grid {', '.join(f'{g:g}' for g in cfg['grid'])}, extended ×3 while the best validation "
        "accuracy is at an edge (at most twice); test accuracy at each method's best validation LR",
        "",
    ]
    rows = []
    p = report["probe"]
    rows.append(["linear probe (logistic regression on frozen features, C from 0.1/1/10)", f"{p['trainable_params']:,}", f"C={p['best_C']:g}",
                 f"{100 * p['val_acc']:.1f}", f"**{100 * p['test_acc']:.1f}**", "–", "–", "–"])
    for method, res in report["methods"].items():
        best = next(r for r in res["runs"] if r["lr"] == res["best_lr"])
        mask_s = f" (+{best['attach_s']:.1f} mask)" if best["attach_s"] > 0.5 else ""
        rows.append([method, f"{best['trainable_params']:,}", f"{res['best_lr']:g}", f"{100 * best['val_acc']:.1f}",
                     f"**{100 * best['test_acc']:.1f}**", f"{best['train_s']:.0f}{mask_s}", f"{best['file_bytes'] / 1024:.0f}",
                     f"{best['final_loss']:.3f}"])
    lines += ["## Results", ""]
    lines += T.md_table(["method", "trainable params (adapter + head)", "best LR", "val acc %", "test acc %",
                         "train time s", "adapter file kB", "final train loss"], rows)
    lines += ["", "Trainable parameters include the 770 of the classifier head. SHiRA-struct selects 15 full rows plus "
              "the diagonal per weight, which falls 15 entries short of the r·(in+out) budget. Train times are wall "
              "time of one epoch on a shared 2-core machine, so treat them as indicative. Adapter files are "
              "`ak.save` directories (safetensors + JSON, head included): rand and struct store no indices "
              "(regenerated from the seed), wm/grad/snip store Rice-coded indices, LoRA stores A and B.", "",
              "## Validation accuracy (%) by learning rate", ""]
    lrs = sorted({r["lr"] for res in report["methods"].values() for r in res["runs"]})
    sweep_rows = []
    for method, res in report["methods"].items():
        by_lr = {r["lr"]: r["val_acc"] for r in res["runs"]}
        sweep_rows.append([method] + [(f"**{100 * by_lr[lr]:.1f}**" if lr == res["best_lr"] else f"{100 * by_lr[lr]:.1f}")
                                      if lr in by_lr else "" for lr in lrs])
    lines += T.md_table(["method"] + [f"{lr:g}" for lr in lrs], sweep_rows)
    for method, res in report["methods"].items():
        best_val = max(r["val_acc"] for r in res["runs"])
        tied = [r["lr"] for r in res["runs"] if r["val_acc"] == best_val]
        if len(tied) > 1:
            others = ", ".join(f"{100 * r['test_acc']:.1f} at {r['lr']:g}" for r in res["runs"] if r["lr"] in tied[1:])
            lines += ["", f"{method}: validation ties between LRs {', '.join(f'{lr:g}' for lr in tied)}; the protocol "
                      f"takes the smaller (test accuracy {others} for reference)."]
    lines += ["", f"Single seed; with {cfg['sizes']['val']} validation and {cfg['sizes']['test']} test examples one "
              f"example is {100 / cfg['sizes']['val']:.1f} / {100 / cfg['sizes']['test']:.1f} points and the binomial "
              f"standard error near 80% accuracy is about {100 * (0.8 * 0.2 / cfg['sizes']['test']) ** 0.5:.1f} points "
              "on test, so differences of 1-2 points between rows are within noise. Test accuracy at every LR is in "
              "the JSON (not used for any choice).", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny data, two LRs, no grid extension (smoke run)")
    parser.add_argument("--methods", nargs="+", default=list(T.METHODS), choices=T.METHODS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    T.setup()
    n_fit, n_val, n_test = SIZES["quick" if args.quick else "full"]
    grid = GRID[1:] if args.quick else GRID
    splits = T.sentiment_splits("movies", n_fit, n_val, n_test)
    scratch, tokenizer = T.load_minilm()
    fit_batches = T.train_batches(tokenizer, splits.fit, args.seed)
    T.warm_up(scratch, fit_batches)
    val, test = T.eval_batches(tokenizer, splits.val), T.eval_batches(tokenizer, splits.test)
    report: dict[str, Any] = {
        "meta": T.metadata([__file__.split("/")[-1], *argv]),
        "config": {"targets": TARGETS, "r": T.R, "lora_alpha": T.LORA_ALPHA, "sizes": splits.sizes(), "batch": T.BATCH,
                   "max_length": T.MAX_LENGTH, "epochs": 1, "seed": args.seed, "grid": list(grid), "grid_step": STEP,
                   "max_extensions": 0 if args.quick else MAX_EXTENSIONS, "calibration_batches": T.CALIBRATION_BATCHES,
                   "quick": args.quick},
    }
    T.log(f"linear probe on {n_fit} examples")
    report["probe"] = probe(tokenizer, splits)
    T.log(f"probe: val {report['probe']['val_acc']:.3f} test {report['probe']['test_acc']:.3f}")

    def run(method: str, lr: float) -> dict[str, Any]:
        result = run_one(method, lr, tokenizer, fit_batches, val, test, args.seed)
        T.log(f"{method:13s} lr={lr:<7g} val {result['val_acc']:.3f} test {result['test_acc']:.3f} "
              f"loss {result['final_loss']:.3f} ({result['train_s']:.0f} s, {result['steps']} steps)")
        return result

    report["methods"] = {}
    for method in args.methods:
        runs, best = sweep(method, grid, not args.quick, run)
        report["methods"][method] = {"best_lr": best, "runs": runs}
    report["best_lr"] = {m: r["best_lr"] for m, r in report["methods"].items()}
    out = T.write_report(report, markdown(report), "shira_quality", args.quick)
    print(markdown(report))
    T.log(f"wrote {out}/shira_quality.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
