#!/usr/bin/env python
"""Tables and plot of bench/rank_bench.py: bench/results/rank_bench.{json,md,png}.

Every number is computed from ``<work>/cells.json``; a cell that is not there reads "not run", a row
that cannot exist (no heuristic counts objects; no per-instruction model for an unseen word) reads "—".
Counting is headlined over the test images that show the object (count ≥ 1); over all images (most
show none) the number is labelled "presence + count".
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _provenance import describe  # noqa: E402

TASKS = (("quality", "A: quality"), ("counting", "B: counting"), ("counting_heldout", "B: held-out words"))
COUNTED = ("counting", "counting_heldout")  # headlined over the images that show the object
METHODS = (("heuristic", "heuristic (image statistic per criterion)"), ("ridge_agnostic", "ridge probe, text-agnostic"),
           ("ridge_oracle", "ridge probe per instruction (oracle)"),
           ("finetune", "fine-tune last EfficientNet blocks + head, per instruction"),
           ("lora", "LoRA on the last blocks + head, per instruction"), ("adapter", "**ranking-aware adapter**"),
           ("no_pair", "ablation: pair branch off"), ("concat", "ablation: concat instead of subtract"),
           ("no_prompts", "ablation: prompts off"), ("scalar_prompts", "ablation: scalar prompts"),
           ("constant_text", "ablation: constant instruction (text-agnostic)"))
LABEL = dict(METHODS)
PER_INSTRUCTION = ("ridge_oracle", "finetune", "lora")
METRICS = (("srcc", "SRCC"), ("plcc", "PLCC"), ("kendall", "Kendall τ"), ("pairwise", "pairwise acc."), ("mae", "MAE"))
NOT_RUN, NONE = "not run", "—"
FORMAT = 2  # the cells.json layout this report reads (bench/rank_bench.py FORMAT)
HEADLINE, ALL = "headline", "all"  # views: the task's headline (counting: count ≥ 1) or every test image


class Cells:
    """The cells of one benchmark run (``limit``: the smoke-test subset's cells)."""

    def __init__(self, raw: dict[str, Any], limit: int | None) -> None:
        self.raw, self.suffix = raw, "" if limit is None else f"/limit{limit}"

    def runs(self, task: str, row: str) -> list[dict[str, Any]]:
        """Every seed's cell of a (task, row), seed order; the heuristic has one, seed-independent."""
        if row == "heuristic":
            found = self.raw.get(f"{task}/heuristic{self.suffix}")
            return [found] if found else []
        seeds = sorted({int(k.split("/")[2][4:]) for k in self.raw if k.startswith(f"{task}/{row}/seed")
                        and k.endswith(self.suffix) and (self.suffix or "/limit" not in k)})
        return [self.raw[f"{task}/{row}/seed{s}{self.suffix}"] for s in seeds]

    def absent(self, task: str, row: str) -> str | None:
        """Why a (task, row) has no number: "—" where it cannot exist, "not run" where it did not run."""
        if row in PER_INSTRUCTION and task == "counting_heldout":
            return NONE
        runs = self.runs(task, row)
        if runs and "skipped" in runs[0]:
            return NONE
        return None if runs else NOT_RUN

    def values(self, task: str, row: str, metric: str = "srcc", instruction: str | None = None,
               view: str = HEADLINE) -> list[float]:
        out = []
        for run in self.runs(task, row):
            scored = view_of(run, view)
            source = scored.get("mean", {}) if instruction is None else scored.get("per_instruction", {}).get(instruction, {})
            if metric in source and not math.isnan(source[metric]):
                out.append(source[metric])
        return out

    def instructions(self, task: str) -> list[str]:
        names: dict[str, None] = {}
        for row, _ in METHODS:
            for run in self.runs(task, row):
                names.update(dict.fromkeys(view_of(run, HEADLINE).get("per_instruction", {})))
        return list(names)

    @staticmethod
    def counted(task: str) -> bool:
        """Whether the task is scored twice (counting: count ≥ 1, the headline, and all images)."""
        return task in COUNTED


def view_of(run: dict[str, Any], view: str) -> dict[str, Any]:
    """One view's metrics of a cell: ``per_instruction``, ``mean`` and ``images`` (per instruction)."""
    return run.get("views", {}).get(run.get("headline") if view == HEADLINE else view, {})


def spread(values: list[int]) -> str:
    """Median and range of a few counts, e.g. "31 (12–48)"."""
    return f"{statistics.median(values):.0f} ({min(values)}–{max(values)})" if values else "?"


def mean_std(values: list[float]) -> tuple[float, float]:
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan"))


def fmt(values: list[float], digits: int = 3, std: bool = True) -> str:
    if not values:
        return NONE
    mean, spread = mean_std(values)
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if std and len(values) > 1 else "")


def number(cells: Cells, task: str, row: str, metric: str = "srcc", instruction: str | None = None,
           std: bool = True, view: str = HEADLINE) -> str:
    why = cells.absent(task, row)
    if why:
        return why
    if metric == "mae" and row == "heuristic":
        return NONE  # a statistic, not on the targets' scale
    return fmt(cells.values(task, row, metric, instruction, view), std=std)


def params(cells: Cells, task: str, row: str) -> str:
    why = cells.absent(task, row)
    if why:
        return why
    count = cells.runs(task, row)[0]["trainable_params"]
    return f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count:,}"


def seconds(cells: Cells, task: str, row: str) -> str:
    why = cells.absent(task, row)
    if why:
        return why
    value = statistics.mean(r["train_seconds"] for r in cells.runs(task, row))
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def difference(cells: Cells, task: str, a: str, b: str) -> tuple[float, float] | None:
    """Mean SRCC of ``a`` minus ``b`` and the seeds' noise (√(s_a² + s_b²); NaN with one seed)."""
    va, vb = cells.values(task, a), cells.values(task, b)
    if not va or not vb:
        return None
    (ma, sa), (mb, sb) = mean_std(va), mean_std(vb)
    noise = math.sqrt(sa ** 2 + sb ** 2) if len(va) > 1 and len(vb) > 1 else float("nan")
    return ma - mb, noise


def verdict(diff: tuple[float, float] | None, better: str, worse: str) -> str:
    if diff is None:
        return NOT_RUN
    d, noise = diff
    text = f"{d:+.3f} SRCC"
    if math.isnan(noise):
        return f"{text} ({better if d > 0 else worse}; one seed: noise unknown)"
    if abs(d) <= noise:
        return f"{text} (within seed noise ±{noise:.3f}: neither)"
    return f"{text} ({better if d > 0 else worse}; noise ±{noise:.3f})"


def claims(cells: Cells) -> list[str]:
    out = ["## The paper's claims, from these numbers", "", "SRCC; counting over the images that show the object "
           "(count ≥ 1). Noise: the seeds' spread (training noise; one fixed task build).", ""]
    lines = []
    for task, label in TASKS[:2]:
        for base in ("finetune", "lora"):
            d = difference(cells, task, "adapter", base)
            if d is None:
                lines.append(f"- {label}: adapter vs {LABEL[base]}: {NOT_RUN}")
                continue
            pa, pb = cells.runs(task, "adapter")[0]["trainable_params"], cells.runs(task, base)[0]["trainable_params"]
            ratio = f"{pa / pb:.0%} of them" if pa < pb else f"{pa / pb:.1f}× as many"
            lines.append(f"- {label}: adapter vs {base}: {verdict(d, 'adapter orders better', 'adapter orders worse')}; "
                         f"trainable parameters {pa / 1e6:.2f}M vs {pb / 1e6:.2f}M ({ratio})")
    out += ["**1. The adapter beats fine-tuning on ordering while training a fraction of the parameters.**", *lines, ""]
    out += ["**2. The ranking branch helps** (adapter minus pair branch off):"]
    out += [f"- {label}: {verdict(difference(cells, t, 'adapter', 'no_pair'), 'helps', 'hurts')}" for t, label in TASKS]
    out += ["", "**3. One adapter serves all instructions.**"]
    out += [f"- {label}: adapter minus constant instruction (the text is what tells instructions apart): "
            f"{verdict(difference(cells, t, 'adapter', 'constant_text'), 'the instruction is used', 'no gain from the text')}"
            for t, label in TASKS]
    for task, label in TASKS[:2]:
        best = max((r for r in PER_INSTRUCTION if cells.values(task, r)), key=lambda r: mean_std(cells.values(task, r))[0],
                   default=None)
        text = NOT_RUN if best is None else verdict(difference(cells, task, "adapter", best),
                                                    "one adapter beats it", "one adapter trails it")
        out.append(f"- {label}: adapter minus the best per-instruction model ({best or '—'}): {text}")
    out.append(f"- B held-out words: adapter minus text-agnostic ridge probe: "
               f"{verdict(difference(cells, 'counting_heldout', 'adapter', 'ridge_agnostic'), 'generalises beyond it', 'no better than it')}; "
               "no per-instruction model can exist for a word never seen in training.")
    return out + [""]


def megabytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def pair_table(cost: dict[str, Any], cells: Cells) -> list[str]:
    rows = cost["rows"]
    out = ["## Pair-branch cost against batch size", "",
           f"Forward + backward, median of {cost['repeats']} runs, {cost['tokens_per_image']} tokens per image, width "
           f"{cost['width']}, {cost['relation_tokens']} relational tokens, {cost['heads']} heads. *Naive* materialises the "
           "joint softmax over both images' 2P tokens for each of the N² ordered pairs (written in the benchmark as a "
           "yardstick); the library's factorised version combines per-image partial sums. Memory, measured: *peak* is "
           "the highest running sum of the torch profiler's CPU allocation events during one forward + backward "
           "(gradients included, inputs and weights excluded); *saved* sums the distinct storages autograd keeps for "
           "backward (saved_tensors_hooks). *Analytic*: the largest single intermediate, float32. Step: a whole "
           "adapter training step (fusion, heads, loss) with / without the pair branch.", "",
           "| N | pairs | factorised ms | naive ms | naive / factorised | peak MB measured (factorised / naive) "
           "| saved for backward MB (factorised / naive) | largest intermediate MB, analytic (factorised / naive) "
           "| step ms with / without | step peak MB with / without | pair-branch share of a step | max abs diff |",
           "|---" * 12 + "|"]
    for r in rows:
        share = 1 - r["step_without_pairs_s"] / r["step_with_pairs_s"]
        out.append(f"| {r['n']} | {r['n'] ** 2} | {1e3 * r['factorised_s']:.1f} | {1e3 * r['naive_s']:.1f} | "
                   f"{r['naive_s'] / r['factorised_s']:.1f}× | {megabytes(r['factorised_peak_bytes'])} / "
                   f"{megabytes(r['naive_peak_bytes'])} | {megabytes(r['factorised_saved_bytes'])} / "
                   f"{megabytes(r['naive_saved_bytes'])} | {megabytes(r['factorised_bytes'])} / {megabytes(r['naive_bytes'])} "
                   f"| {1e3 * r['step_with_pairs_s']:.0f} / {1e3 * r['step_without_pairs_s']:.0f} | "
                   f"{megabytes(r['step_with_pairs_peak_bytes'])} / {megabytes(r['step_without_pairs_peak_bytes'])} | "
                   f"{share:.0%} | {r['max_abs_diff']:.1e} |")
    shares = {r["n"]: 1 - r["step_without_pairs_s"] / r["step_with_pairs_s"] for r in rows}
    cheap = [n for n, s in shares.items() if s <= 1 / 3]
    size = cost["batch_size"]
    per_image = {r["n"]: r["step_with_pairs_s"] / r["n"] for r in rows}
    at_size = (f"the pair branch takes {shares[size]:.0%} of a step ({per_image[size] * 1e3:.0f} ms per image)"
               if size in shares else "not among the measured sizes")
    out += ["", f"Benchmark batch size N = {size}: {at_size}. The largest N whose pair branch stays within a third of "
            f"the step: {max(cheap) if cheap else 'none'}; N = {rows[-1]['n']}: {shares[rows[-1]['n']]:.0%} of the step."]
    bounded = []
    for task, label in TASKS:
        runs = [r for r in cells.runs(task, "adapter") if "train_positives" in r]
        if runs:
            positives, batches = list(runs[0]["train_positives"].values()), list(runs[0]["batches_per_epoch"].values())
            bounded.append(f"{label}: {spread(positives)} training positives per instruction, {spread(batches)} "
                           f"batches of N = {runs[0]['settings']['batch_size']} per instruction and epoch")
    if bounded:
        out.append("A batch holds one instruction's images, so N is also bounded by its positives (median (range)): "
                   + "; ".join(bounded) + ".")
    return out + [""]


def views(cells: Cells, task: str) -> list[tuple[str, str]]:
    """The (view, label suffix) pairs a task is reported in: counting twice, the headline first."""
    return [(HEADLINE, " (count ≥ 1)"), (ALL, " (presence + count)")] if cells.counted(task) else [(HEADLINE, "")]


def image_counts(cells: Cells, task: str) -> str:
    """How many test images each instruction is scored on, per view (from the cells)."""
    runs = [r for row, _ in METHODS for r in cells.runs(task, row) if r.get("views")]
    if not runs:
        return "?"
    return "; ".join(f"{name}: {spread(list(view_of(runs[0], view).get('images', {}).values()))}"
                     for view, name in ((HEADLINE, "count ≥ 1"), (ALL, "all images")))


def render(raw: dict[str, Any], cells: Cells) -> str:
    meta = raw.get("_meta", {})
    used = {json.dumps(v["settings"], sort_keys=True) for k, v in raw.items()
            if isinstance(v, dict) and "views" in v and k.endswith(cells.suffix) and (cells.suffix or "/limit" not in k)}
    seeds = sorted({k.split("/")[2] for k in raw if k.count("/") >= 2 and k.split("/")[2].startswith("seed")
                    and k.endswith(cells.suffix) and (cells.suffix or "/limit" not in k)})
    hw = meta.get("hardware", {})
    quality = cells.instructions("quality") or ["blur", "noise", "jpeg", "dark", "contrast"]
    shape = next((r["image_tokens"] for t, _ in TASKS for r in cells.runs(t, "adapter") if "image_tokens" in r), None)
    counted = [(t, label) for t, label in TASKS if cells.counted(t)]
    lines = ["# Ranking-aware adapter (issue 13): ordering images by a text instruction", "",
             f"Measured on: {describe(meta) if meta else 'unknown'}; {hw.get('cpu_model', '?')}, "
             f"{hw.get('usable_cores', '?')} cores. Seeds: {', '.join(seeds) or 'none'}; cell settings: "
             f"{'; '.join(sorted(used)) or 'none'}; task builds (manifest.json sha256): "
             f"{', '.join(f'{k} {v[:12]}' for k, v in meta.get('record', {}).get('manifests', {}).items()) or '?'}.", "",
             "**± std over training seeds; one fixed task build and split.** A seed changes the models' initial "
             "weights, batch order and dropout only; every seed trains and tests on the same images, split and "
             "held-out category words (the tasks are built once, with seed 0), so the spread is training noise, "
             "not data noise.", "",
             f"Frozen EfficientNet-Lite0 image tokens ({' × '.join(map(str, shape)) if shape else '?'}) and MiniLM text "
             "tokens; every learned row trains on the train split for the same number of epochs and is scored on the "
             "test split (per instruction, then averaged; the heuristic is seed-independent). Trainable parameters: "
             "the whole trained set (per-instruction rows: summed over the instructions; the adapter: including the "
             "pair branch, which is dropped at inference). Train time: seconds on the listed cores.", ""]
    if counted:
        lines += ["**Counting is headlined over the test images that show the object (count ≥ 1).** Over all test "
                  "images most show none, so an ordering there mostly says whether the object is present; that number "
                  "is kept as *presence + count*. Test images per category: "
                  + "; ".join(f"{label}: {image_counts(cells, t)}" for t, label in counted)
                  + ". A category with fewer than 2 images that show it is left out of the count ≥ 1 view.", ""]
    head = [f"A: {q}" for q in quality] + ["A mean"] + [label + suffix for t, label in counted for _, suffix in views(cells, t)]
    lines += ["## SRCC", "", "| method | " + " | ".join(head) + " | seeds | trainable params A / B | train s A / B / B held-out |",
              "|---" * (len(head) + 4) + "|"]
    for row, label in METHODS:
        cols = [number(cells, "quality", row, instruction=q, std=False) for q in quality] + [number(cells, "quality", row)]
        cols += [number(cells, t, row, view=view) for t, _ in counted for view, _ in views(cells, t)]
        cols += [str(max((len(cells.runs(t, row)) for t, _ in TASKS), default=0)),
                 f"{params(cells, 'quality', row)} / {params(cells, 'counting', row)}",
                 " / ".join(seconds(cells, t, row) for t, _ in TASKS)]
        lines.append(f"| {label} | " + " | ".join(cols) + " |")
    lines += ["", "Per-attribute columns: the mean over seeds. \"—\": cannot exist (no non-learned counter for "
              "arbitrary objects; a per-instruction model — the oracle probe, fine-tuning, LoRA — needs training "
              "examples of its instruction, which a held-out category word never has). \"not run\": not measured.", ""]
    for task, label in TASKS:
        for view, suffix in views(cells, task):
            lines += [f"## All metrics, {label}{suffix}", "", "| method | " + " | ".join(m for _, m in METRICS) + " |",
                      "|---" * (len(METRICS) + 1) + "|"]
            lines += [f"| {name} | " + " | ".join(number(cells, task, row, k, view=view) for k, _ in METRICS) + " |"
                      for row, name in METHODS]
            lines += ["", "MAE in target units (levels 0–4 / objects); the heuristic's scores are not on that scale.", ""]
    for task, label in TASKS[1:]:
        shown = [(r, n) for r, n in METHODS if cells.runs(task, r) and not cells.absent(task, r)]
        names = cells.instructions(task)
        if not shown or not names:
            continue
        suffix = views(cells, task)[0][1]
        lines += [f"## SRCC per category, {label}{suffix}", "", "| category | " + " | ".join(r for r, _ in shown) + " |",
                  "|---" * (len(shown) + 1) + "|"]
        lines += [f"| {c} | " + " | ".join(number(cells, task, r, instruction=c) for r, _ in shown) + " |" for c in names]
        lines += ["", "\"—\" here: no SRCC (every scored image of the category has the same count, or the scores are "
                  "constant).", ""]
    caching = raw.get("caching", {})
    if caching:
        lines += ["## One-off caching (not in the train times)", "", "| cache | seconds | items computed | threads |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v['seconds']:.0f} | {v.get('computed_items', v.get('computed', '?'))} | {v['threads']} |"
                  for k, v in caching.items()]
        lines.append("")
    cost = raw.get("pair_cost" + cells.suffix)
    lines += pair_table(cost, cells) if cost else ["## Pair-branch cost against batch size", "", NOT_RUN, ""]
    lines += claims(cells)
    return "\n".join(lines)


def plot(cells: Cells, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: matplotlib does not import ({exc})"
    fig, axes = plt.subplots(3, 1, figsize=(15, 11))
    others = [row for row, _ in METHODS if row != "adapter"]  # one colour per method in every panel; the adapter black
    colours = {"adapter": "black", **{row: plt.get_cmap("tab10")(k % 10) for k, row in enumerate(others)}}
    legend: dict[str, Any] = {}
    for ax, (task, label) in zip(axes, TASKS):
        names = cells.instructions(task)
        shown = [(r, n) for r, n in METHODS if cells.runs(task, r) and not cells.absent(task, r)]
        width = 0.85 / max(1, len(shown))
        for k, (row, name) in enumerate(shown):
            stats = [mean_std(cells.values(task, row, "srcc", c)) if cells.values(task, row, "srcc", c) else (math.nan, 0.0)
                     for c in names]
            errors = [0 if math.isnan(s) else s for _, s in stats]
            bars = ax.bar([j + k * width for j in range(len(names))], [m for m, _ in stats], width, color=colours[row],
                          yerr=errors if any(errors) else None, capsize=1.5)
            legend.setdefault(name.strip("*"), bars)
        ax.set_xticks([j + 0.425 - width / 2 for j in range(len(names))], names, rotation=30 if len(names) > 8 else 0)
        ax.set_ylabel("SRCC (test)")
        ax.set_title(label)
        ax.axhline(0, color="black", linewidth=0.5)
    fig.suptitle("SRCC per instruction and method (mean over seeds, ± std; counting: images with count ≥ 1)")
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.legend(list(legend.values()), list(legend), fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![SRCC per instruction]({path.name})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "bench" / "work" / "rank"), help="the benchmark's work directory")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "rank_bench"), help="output path stem")
    parser.add_argument("--limit", type=int, default=None, help="report the cells of a --limit smoke run")
    args = parser.parse_args(argv)
    raw = json.loads((Path(args.work) / "cells.json").read_text())
    found = raw.get("_meta", {}).get("record", {}).get("format")
    if found != FORMAT:
        raise SystemExit(f"{args.work}/cells.json: layout {found!r}, this report reads {FORMAT} (per-view metrics); "
                         "rerun bench/rank_bench.py into a new --work")
    cells, out = Cells(raw, args.limit), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = plot(cells, out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps({"meta": raw.get("_meta", {}), "caching": raw.get("caching", {}),
                                                    "cells": {k: v for k, v in raw.items() if k not in ("_meta", "caching")}},
                                                   indent=1))
    out.with_suffix(".md").write_text(render(raw, cells) + "\n" + figure + "\n")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
