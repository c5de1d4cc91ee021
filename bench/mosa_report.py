"""Summaries, Markdown and plot of ``mosa_bench.py`` (adapter vs MoSA vs LoRA, low-data)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import _tasks as T
from _provenance import describe

LABELS = {"adapter": "Adapter (plain)", "mosa": "MoSA (N=4, cons. 1.0)", "mosa-nc": "MoSA (N=4, no cons.)",
          "lora": "LoRA (≈ params)"}
COLORS = {"adapter": "tab:gray", "mosa": "tab:blue", "mosa-nc": "tab:cyan", "lora": "tab:orange"}
UNIT = {"text": "examples", "vision": "img/class"}


def selected_runs(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run, except among the LR-selection runs only those at the chosen LR."""
    return [r for r in report["runs"] if not r.get("selection") or report["chosen_lr"][r["task"]].get(r["method"]) == r["lr"]]


def t_crit(n: int) -> float:
    """Two-sided 95 % Student-t critical value for n paired values (n - 1 degrees of freedom)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, n - 1))
    except ImportError:
        return {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}.get(n, 2.0)


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    runs = selected_runs(report)
    acc: dict[str, Any] = {}
    cost: dict[str, Any] = {}
    by_key: dict[tuple, dict[str, Any]] = {(r["task"], r["regime"], r["seed"], r["method"]): r for r in runs}
    for (task, regime, _, method), r in by_key.items():
        acc.setdefault(task, {}).setdefault(str(regime), {}).setdefault(method, []).append(r["test_acc"])
    acc = {t: {g: {m: T.mean_spread(v) for m, v in ms.items()} for g, ms in gs.items()} for t, gs in acc.items()}
    diffs: dict[str, Any] = {}
    for (task, regime, seed, method), r in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        base = by_key.get((task, regime, seed, "adapter"))
        if method != "adapter" and base is not None:
            diffs.setdefault(task, {}).setdefault(str(regime), {}).setdefault(method, []).append(r["test_acc"] - base["test_acc"])
    paired: dict[str, Any] = {}
    for task, gs in diffs.items():
        for regime, ms in gs.items():
            for method, v in ms.items():
                s = T.mean_spread(v)
                half = t_crit(len(v)) * s["sd"] / len(v) ** 0.5 if len(v) > 1 else None
                s.update(wins=sum(d > 0 for d in v), ties=sum(d == 0 for d in v), ci95_half=half,
                         clear=None if half is None else abs(s["mean"]) > half)
                paired.setdefault(task, {}).setdefault(regime, {})[method] = s
    for r in runs:
        c = cost.setdefault(r["task"], {}).setdefault(r["method"], {"train_s": {}, "step_s": {}, "steps": {},
                                                                    "trainable": set(), "inference": set(),
                                                                    "head": set(), "signature": set(), "merge_diff": []})
        c["train_s"].setdefault(str(r["regime"]), []).append(r["train_s"])
        c["step_s"].setdefault(str(r["regime"]), []).append(r["step_s"])
        c["steps"].setdefault(str(r["regime"]), set()).add(r["steps"])
        c["trainable"].add(r["trainable_params"])
        c["inference"].add(r["inference_params"])
        c["head"].add(r["head_params"])
        c["signature"].add(r["inference_signature"])
        if "merge_max_abs_logit_diff" in r:
            c["merge_diff"].append(r["merge_max_abs_logit_diff"])
    costs: dict[str, Any] = {}
    for task, ms in cost.items():
        plain_sig = ms.get("adapter", {}).get("signature", set())
        for method, c in ms.items():
            costs.setdefault(task, {})[method] = {
                "median_train_s": {g: statistics.median(v) for g, v in c["train_s"].items()},
                "median_step_s": {g: statistics.median(v) for g, v in c["step_s"].items()},
                "train_s_range": {g: [min(v), max(v)] for g, v in c["train_s"].items()},
                "steps": {g: sorted(v) for g, v in c["steps"].items()},
                "trainable_params": sorted(c["trainable"]), "inference_params": sorted(c["inference"]),
                "head_params": sorted(c["head"]),
                "same_shapes_as_adapter": (c["signature"] == plain_sig) if plain_sig and method.startswith("mosa") else None,
                "merge_max_abs_logit_diff": max(c["merge_diff"]) if c["merge_diff"] else None}
    val: dict[str, Any] = {}
    for r in report["runs"]:
        if r.get("selection"):
            val.setdefault(r["task"], {}).setdefault(r["method"], {})[f"{r['lr']:g}"] = r["val_acc"]
    return {"accuracy": acc, "paired_vs_adapter": paired, "costs": costs, "selection_val_acc": val}


def fmt_params(values: list[int]) -> str:
    return "/".join(f"{v:,}" for v in values) if values else "–"


def markdown(report: dict[str, Any]) -> str:
    s, cfg = report["summary"], report["config"]
    mode = cfg["mode"]
    methods = [m for m in cfg["methods"]]
    lines = [f"# Bottleneck adapter vs MoSA vs LoRA in the low-data regime{' (quick)' if cfg['quick'] else ''}", "",
             f"`bench/mosa_bench.py`, {report['meta']['date']}, adapterkit "
             f"{describe(report['meta'])}, torch "
             f"{report['meta']['versions']['torch']}, {report['meta']['machine']['torch_threads']} threads. "
             f"Full run: {report['wall_s'].get('total', report['wall_s'].get('so_far', 0)) / 60:.1f} min.", "",
             f"Each cell: test accuracy (%) mean ± sample sd over {len(mode['seeds'])} seed(s) (seed = training subset, "
             f"order, init, MoSA partition/choices); AdamW, ~" + ", ".join(f"{v} steps ({t})" for t, v in mode["steps"].items())
             + f" (whole epochs), the same for every method, batch {cfg['batch']}, "
             "head trained in full, LR per method chosen on validation (below). MoSA is evaluated after `ak.merge`.", ""]
    for task in cfg["tasks"]:
        if task not in s["accuracy"]:
            continue
        d = report["data"][task]
        what = ("MiniLM, VADER movie snippets" if task == "text"
                else f"EfficientNet-Lite0, digits {mode['size']} px")
        lines += [f"## {task.capitalize()}: {what} (val {d['sizes']['val']}, test {d['sizes']['test']})", ""]
        rows = []
        for regime in map(str, d["regimes"]):
            cells = s["accuracy"][task].get(regime, {})
            rows.append([f"{regime} {UNIT[task]}"] + [T.pm(cells[m]) if m in cells else
                                                      ("not available" if m == "lora" and task in report["lora_unavailable"] else "–")
                                                      for m in methods])
        lines += T.md_table(["train set"] + [LABELS[m] for m in methods], rows) + [""]
        prow = []
        for regime in map(str, d["regimes"]):
            for method, p in s["paired_vs_adapter"].get(task, {}).get(regime, {}).items():
                ci = f"± {100 * p['ci95_half']:.1f}" if p["ci95_half"] is not None else "–"
                prow.append([f"{regime} {UNIT[task]}", LABELS[method], f"{100 * p['mean']:+.1f}", f"{100 * p['sd']:.1f}", ci,
                             f"{p['wins']}/{p['n']}", {True: "yes", False: "no", None: "–"}[p["clear"]]])
        if prow:
            lines += ["Paired difference to the plain adapter (same seed = same data), points:", ""]
            lines += T.md_table(["train set", "method", "mean diff", "sd", "95 % CI half-width", "seeds better",
                                 "CI excludes 0"], prow) + [""]
        crow = []
        for method in methods:
            c = s["costs"].get(task, {}).get(method)
            if c is None:
                continue
            head = c["head_params"][0] if c["head_params"] else 0
            times = ", ".join(f"{g}: {c['median_train_s'][g]:.1f} s ({c['median_step_s'][g] * 1000:.0f} ms/step, "
                              f"{'/'.join(map(str, c['steps'][g]))} steps)" for g in sorted(c["median_train_s"], key=int))
            same = {True: "yes", False: "**no**", None: "–"}[c["same_shapes_as_adapter"]]
            diff = "–" if c["merge_max_abs_logit_diff"] is None else f"{c['merge_max_abs_logit_diff']:.1e}"
            crow.append([LABELS[method], fmt_params(c["trainable_params"]), fmt_params(c["inference_params"]),
                         f"{head:,}", same, diff, times])
        lines += ["Parameters (adapter + head copy) and median train time per run:", ""]
        lines += T.md_table(["method", "trainable (training)", "inference (after merge)", "of which head",
                             "merged shapes = adapter", "max |Δlogit| merge", "median train time by train set"], crow) + [""]
        val = s["selection_val_acc"].get(task, {})
        if val:
            lrs = sorted({lr for v in val.values() for lr in v}, key=float)
            lines += [f"LR choice (validation accuracy %, {max(d['regimes'])} {UNIT[task]}, seed {mode['seeds'][0]}):", ""]
            lines += T.md_table(["method"] + lrs + ["chosen"], [[LABELS[m]] + [f"{100 * v[lr]:.1f}" if lr in v else "–" for lr in lrs]
                                                                + [f"{report['chosen_lr'][task][m]:g}"] for m, v in val.items()]) + [""]
        edge = report.get("edge_check", {}).get(task, {})
        if edge:
            erow = []
            for m, results in edge.items():
                lr = report["chosen_lr"][task][m]
                base = val[m]["%g" % lr]
                erow += [[LABELS[m], f"{lr:g}", f"{100 * base:.1f}", f"{r['lr']:g}", f"{100 * r['val_acc']:.1f}",
                          f"{100 * r['test_acc']:.1f}", "yes" if r["val_acc"] > base else "no"] for r in results]
            lines += ["Edge check (`--edge-check`, after the run; not used for the tables above): the next LR beyond a "
                      "chosen LR that lay at its grid's edge, same cell:", ""]
            lines += T.md_table(["method", "chosen LR", "val %", "next LR", "val %", "test %", "better on val"], erow) + [""]
        longer = report.get("steps_check", {}).get(task, {})
        if longer:
            srow = [[LABELS[m], f"{r['lr']:g}", r["steps"], f"{r['final_loss']:.3f}", f"{100 * r['val_acc']:.1f}",
                     f"{100 * r['test_acc']:.1f}"] for m, r in longer.items()]
            lines += [f"Steps check (`--steps-check {report['steps_check']['factor']}`, after the run; not used above): "
                      f"the LR-selection cell ({max(d['regimes'])} {UNIT[task]}, seed {mode['seeds'][0]}) trained "
                      f"{report['steps_check']['factor']}× as long:", ""]
            lines += T.md_table(["method", "LR", "steps", "final train loss", "val %", "test %"], srow) + [""]
        if task in report["lora_unavailable"]:
            lines += [f"LoRA: not available ({report['lora_unavailable'][task]}).", ""]
    lines += ["![accuracy per method and training-set size](mosa_bench.png)", "", "## Findings", ""] + findings(report) + ["", "## Setup", ""] + setup_notes(report) + [""]
    return "\n".join(lines)


def best_on_val(report: dict[str, Any], task: str, method: str) -> dict[str, Any]:
    """The selection-cell run of ``method`` with the best validation accuracy, edge-check runs included."""
    runs = [r for r in report["runs"] if r.get("selection") and r["task"] == task and r["method"] == method]
    runs += report.get("edge_check", {}).get(task, {}).get(method, [])
    return max(runs, key=lambda r: (r["val_acc"], -r["lr"]))


def findings(report: dict[str, Any]) -> list[str]:
    s = report["summary"]
    out, score = [], {"better": 0, "clearly better": 0, "worse": 0, "clearly worse": 0, "cells": 0}
    for task, gs in s["paired_vs_adapter"].items():
        for regime in map(str, report["data"][task]["regimes"]):
            ms, parts = gs.get(regime, {}), []
            for method in ("mosa", "mosa-nc", "lora"):
                p = ms.get(method)
                if p is None:
                    continue
                verdict = ("clearly better" if p["clear"] and p["mean"] > 0 else "clearly worse" if p["clear"]
                           else "within seed noise")
                parts.append(f"{LABELS[method]} {100 * p['mean']:+.1f} (paired sd {100 * p['sd']:.1f}, better on "
                             f"{p['wins']}/{p['n']} seeds; {verdict})")
                if method == "mosa":
                    score["cells"] += 1
                    score["better" if p["mean"] > 0 else "worse"] += 1
                    if p["clear"]:
                        score["clearly better" if p["mean"] > 0 else "clearly worse"] += 1
            if parts:
                plain = s["accuracy"][task][regime]["adapter"]
                out.append(f"- {task}, {regime} {UNIT[task]} (plain adapter {T.pm(plain)}): " + "; ".join(parts) + ".")
    if score["cells"]:
        out.insert(0, f"- **Verdict**: MoSA in the paper's setting (N=4, Up split, consistency 1.0) beat the plain adapter of "
                      f"the same inference size in {score['better']} of {score['cells']} task × data-size cells "
                      f"(95 % paired CI excluding 0 in {score['clearly better']}) and lost in {score['worse']} "
                      f"(clearly in {score['clearly worse']}). Differences are paired MoSA − adapter test points, same seed = "
                      "same data.")
    for task, by_method in report.get("edge_check", {}).items():
        wins = [f"{LABELS[m]} at {r['lr']:g} ({100 * r['val_acc']:.1f} vs {100 * s['selection_val_acc'][task][m]['%g' % report['chosen_lr'][task][m]]:.1f})"
                for m, rs in by_method.items() for r in rs
                if r["val_acc"] > s["selection_val_acc"][task][m]["%g" % report["chosen_lr"][task][m]]]
        a, m = best_on_val(report, task, "adapter"), best_on_val(report, task, "mosa")
        out.append(f"- {task}, LR edge check: " + (("better on validation beyond the grid: " + "; ".join(wins) + ". ")
                                                     if wins else "no LR beyond the grid was better on validation. ")
                   + f"With each method's best validation LR over grid + edge (adapter {a['lr']:g}, MoSA {m['lr']:g}), the "
                     f"selection cell's test accuracy is adapter {100 * a['test_acc']:.1f} vs MoSA {100 * m['test_acc']:.1f} "
                     f"({100 * (m['test_acc'] - a['test_acc']):+.1f}).")
    for task, by_method in report.get("steps_check", {}).items():
        if task == "factor" or not {"adapter", "mosa"} <= set(by_method):
            continue
        a, m = by_method["adapter"], by_method["mosa"]
        base = {r["method"]: r for r in report["runs"] if r.get("selection") and r["task"] == task
                and r["lr"] == report["chosen_lr"][task][r["method"]]}
        out.append(f"- {task}, {report['steps_check']['factor']}× the steps (selection cell): adapter "
                   f"{100 * a['test_acc']:.1f}, MoSA {100 * m['test_acc']:.1f} ({100 * (m['test_acc'] - a['test_acc']):+.1f}; "
                   f"at 1× {100 * (base['mosa']['test_acc'] - base['adapter']['test_acc']):+.1f}); final train loss "
                   f"adapter {a['final_loss']:.3f}, MoSA {m['final_loss']:.3f} (at 1×: {base['adapter']['final_loss']:.3f}, "
                   f"{base['mosa']['final_loss']:.3f}).")
    for task, ms in s["costs"].items():
        if "mosa" in ms and "adapter" in ms:
            ratios = [ms["mosa"]["median_train_s"][g] / ms["adapter"]["median_train_s"][g] for g in ms["mosa"]["median_train_s"]
                      if g in ms["adapter"]["median_train_s"]]
            out.append(f"- {task}: MoSA with the consistency pass trains {min(ratios):.1f}-{max(ratios):.1f}× as long as the "
                       f"plain adapter for the same steps (median wall time); its merged adapter has "
                       f"{fmt_params(ms['mosa']['inference_params'])} parameters, the plain adapter "
                       f"{fmt_params(ms['adapter']['inference_params'])}, same shapes: "
                       f"{ms['mosa']['same_shapes_as_adapter']}; while training it holds "
                       f"{fmt_params(ms['mosa']['trainable_params'])} (N bias vectors for the split Up).")
    noisy = [f"{t}/{LABELS[m]}/{g} ({min(v):.0f}-{max(v):.0f} s)" for t, ms in s["costs"].items() for m, c in ms.items()
             for g, v in c["train_s_range"].items() if max(v) > 1.5 * min(v)]
    if noisy:
        out.append("- Timing noise: other processes shared the 2 cores during some runs; train times of one cell "
                   "spread by more than 1.5× in " + ", ".join(noisy) + ". Medians are shown; compare ms/step with care.")
    out.append("- '95 % CI' is a paired t interval over seeds (n - 1 degrees of freedom); with 3 seeds only large, "
               "consistent differences clear it. The test set's own binomial SE at 80 % accuracy is ≈ "
               + ", ".join(f"{t} {100 * (0.16 / report['data'][t]['sizes']['test']) ** 0.5:.1f}" for t in report["data"])
               + " points.")
    return out


def setup_notes(report: dict[str, Any]) -> list[str]:
    cfg = report["config"]
    text, vision = cfg["text"], cfg["vision"]
    return [
        f"- Text adapter: sequential Pfeiffer (ReLU, s = 1) on `{text['targets']}` (BERT FFN output projection, "
        f"384 → 384, before the residual + LayerNorm), bottleneck {text['bottleneck']}; LoRA r = {text['lora_r']}, "
        f"alpha = {text['lora_alpha']:g} on {text['lora_targets']}. Head `classifier` trained in full.",
        f"- Vision adapter: sequential Pfeiffer (ReLU, s = 1) 1×1-conv adapters after each MBConv block "
        f"`{vision['targets']}`, reduction {vision['reduction_factor']}; LoRA r = {vision.get('lora_r_used', '–')} on "
        f"`{vision['lora_targets']}` (alpha = 2r). Head `backbone._fc` trained in full; frozen BatchNorm statistics.",
        f"- MoSA: N = {cfg['n_modules']}, split = \"{cfg['split']}\" (Up split, Down dense and shared, as the reference "
        f"for most datasets), update_unselected = \"{cfg['update_unselected']}\", consistency weight 1.0 "
        "(`ak.mosa.two_pass_loss`, two passes per step) or 0; merged with `ak.merge` (average of the modules) before "
        "evaluation. Deviations from the paper's recipe: no adapter dropout, s = 1 and ReLU (the plain adapter's "
        "settings; AdaptFormer uses s = 0.1, GELU, dropout 0.1), a sequential rather than a parallel FFN adapter, "
        "a linear rather than cosine schedule, far fewer steps.",
        "- Inference cost: the bottleneck adapters (plain and merged MoSA) stay as extra modules at inference; LoRA "
        "can be fused into the base weights (zero extra inference parameters/FLOPs); its count here is the stored "
        "adapter's.",
        f"- Data: text fit sets are nested prefixes of a seed-shuffled pool; validation = the first "
        f"{report['data'].get('text', {}).get('sizes', {}).get('val', '–')} training examples; test = VADER's held-out "
        "split. Vision: per class, a seed-permuted pool (validation = the first images of each class, excluded).",
    ]


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc, cfg = report["summary"]["accuracy"], report["config"]
    tasks = [t for t in cfg["tasks"] if t in acc]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), dpi=110, squeeze=False)
    per_seed: dict[tuple, list[float]] = {}
    for r in selected_runs(report):
        per_seed.setdefault((r["task"], str(r["regime"]), r["method"]), []).append(100 * r["test_acc"])
    for ax, task in zip(axes[0], tasks):
        regimes = [str(g) for g in report["data"][task]["regimes"]]
        methods = [m for m in cfg["methods"] if any(m in acc[task].get(g, {}) for g in regimes)]
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(regimes))]
            cells = [acc[task].get(g, {}).get(method) for g in regimes]
            ax.bar(xs, [100 * c["mean"] if c else 0 for c in cells], width, yerr=[100 * c["sd"] if c else 0 for c in cells],
                   capsize=3, color=COLORS[method], label=LABELS[method], alpha=0.85)
            for x, g in zip(xs, regimes):
                pts = per_seed.get((task, g, method), [])
                ax.scatter([x] * len(pts), pts, color="black", s=8, zorder=3)
        lows = [v for vals in per_seed.values() for v in vals]
        ax.set_ylim(max(0, min(lows) - 10) if lows else 0, 100)
        ax.set_xticks(range(len(regimes)), [f"{g} {UNIT[task]}" for g in regimes])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("MiniLM, VADER movies" if task == "text" else f"EfficientNet-Lite0, digits {cfg['mode']['size']} px")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Adapter vs MoSA vs LoRA, low data (bars: mean ± sd over seeds; dots: seeds)", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def write(report: dict[str, Any], quick: bool, stem: str) -> Path:
    report["summary"] = summarise(report)
    report = json.loads(json.dumps(report, default=sorted))  # sets -> lists
    out = T.write_report(report, markdown(report), stem, quick)
    plot(report, out / f"{stem}.png")
    return out
