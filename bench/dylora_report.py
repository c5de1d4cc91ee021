"""Summaries, Markdown and plot of ``dylora_bench.py`` (accuracy by rank, time to obtain every rank)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Iterable

import _tasks as T
from _provenance import describe

ROWS = {  # result row: label
    "dylora-b-frozen": "DyLoRA α/b, frozen (paper)",
    "dylora-b-free": "DyLoRA α/b, non-frozen",
    "dylora-rmax-frozen": "DyLoRA α/r_max, frozen",
    "dylora-rmax-free": "DyLoRA α/r_max, non-frozen",
    "lora-trunc": "LoRA r=8 truncated (keep α/8)",
    "lora-trunc-rescale": "LoRA r=8 truncated, α/b rescale",
    "lora": "LoRA trained at rank b",
}
DYLORA = [k for k in ROWS if k.startswith("dylora")]
PAPER = "dylora-b-frozen"
COMPARABLE_POINTS = 2.0  # "comparable quality": no rank more than this many points below separate LoRA
SPEED_GOAL = 7.0
CLEAN_CORES = 0.25  # a training is "clean" when other processes used fewer cores than this meanwhile


def key_of(run: dict[str, Any]) -> str:
    return f"lora@{run['rank']}" if run["method"] == "lora" else run["method"]


def selected_runs(report: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """Every run, except in the LR-selection block only the runs at their chosen LR."""
    sel, chosen = report["config"]["lr_selection"], report["chosen_lr"]
    for run in report["runs"]:
        if run["task"] == sel["task"] and run["seed"] == sel["seed"] and chosen.get(key_of(run)) != run["lr"]:
            continue
        yield run


def accuracy_table(report: dict[str, Any]) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """task -> row -> rank -> mean/sd/min/max/n of test accuracy over seeds."""
    values: dict[str, dict[str, dict[int, list[float]]]] = {}
    for run in selected_runs(report):
        for row, by_rank in run["acc"]["test"].items():
            for rank, acc in by_rank.items():
                values.setdefault(run["task"], {}).setdefault(row, {}).setdefault(int(rank), []).append(acc)
    return {task: {row: {rank: T.mean_spread(v) for rank, v in sorted(ranks.items())} for row, ranks in rows.items()}
            for task, rows in values.items()}


def timing(report: dict[str, Any]) -> dict[str, Any]:
    """Per block: the 8 LoRA wall times, each DyLoRA wall time, ratios; medians over blocks."""
    blocks: dict[int, dict[str, Any]] = {}
    for run in report["runs"]:
        b = blocks.setdefault(run["block"], {"task": run["task"], "seed": run["seed"], "lora": {}, "dylora": {},
                                             "lrs": {"lora": set(), "dylora": set()}})
        b["lrs"]["lora" if run["method"] == "lora" else "dylora"].add(run["lr"])
        (b["lora"] if run["method"] == "lora" else b["dylora"])[str(run["rank"]) if run["method"] == "lora"
                                                                 else run["method"]] = run
    rows = []
    for index, b in sorted(blocks.items()):
        if len(b["lora"]) != len(report["config"]["lora_ranks"]) or not b["dylora"]:
            continue
        lora_sum = sum(r["train_s"] for r in b["lora"].values())
        r8 = b["lora"][str(report["config"]["r_max"])]
        rows.append({"block": index, "task": b["task"], "seed": b["seed"], "lrs": {k: sorted(v) for k, v in b["lrs"].items()},
                     "lora_s": {k: r["train_s"] for k, r in b["lora"].items()}, "lora_sum_s": lora_sum,
                     "lora_r8_step_s": r8["step_s"],
                     "dylora_s": {k: r["train_s"] for k, r in b["dylora"].items()},
                     "ratio": {k: lora_sum / r["train_s"] for k, r in b["dylora"].items()},
                     "cpu_ratio": {k: sum(x["cpu_s"] for x in b["lora"].values()) / r["cpu_s"] for k, r in b["dylora"].items()},
                     "other_cores_max": max(x["contention"]["other_processes_cores"]
                                            for x in [*b["lora"].values(), *b["dylora"].values()]),
                     "step_ratio": {k: r["step_s"] / r8["step_s"] for k, r in b["dylora"].items()},
                     "val_eval_s": statistics.fmean(r["eval_s_per_pass"].get("val", r["eval_s_per_pass"]["test"])
                                                    for r in b["dylora"].values()),
                     "loadavg": [r["loadavg_1min_before"] for r in [*b["lora"].values(), *b["dylora"].values()]]})
    summary: dict[str, Any] = {"blocks": rows}
    if rows:
        for field in ("ratio", "cpu_ratio", "step_ratio"):
            summary[field] = {k: T.mean_spread([r[field][k] for r in rows if k in r[field]]) for k in DYLORA
                              if any(k in r[field] for r in rows)}
            summary[field]["all"] = T.mean_spread([v for r in rows for v in r[field].values()])
            summary[field]["median_all"] = statistics.median(v for r in rows for v in r[field].values())
        # clean runs only: sum over ranks of the median clean LoRA step time / median clean DyLoRA step time
        threads = report["meta"]["machine"]["torch_threads"]  # the first run's; an --extend run may use fewer
        clean = [r for r in report["runs"] if r["contention"]["other_processes_cores"] < CLEAN_CORES
                 and r.get("threads", threads) == threads]
        lora_steps = {b: [r["step_s"] for r in clean if r["method"] == "lora" and r["rank"] == b]
                      for b in report["config"]["lora_ranks"]}
        dy_steps = [r["step_s"] for r in clean if r["method"] != "lora"]
        summary["clean"] = {"threshold_other_cores": CLEAN_CORES, "threads": threads, "runs": len(clean), "of": len(report["runs"]),
                            "lora_runs_per_rank": {b: len(v) for b, v in lora_steps.items()}, "dylora_runs": len(dy_steps)}
        if dy_steps and all(lora_steps.values()):
            summary["clean"]["ratio"] = (sum(statistics.median(v) for v in lora_steps.values())
                                         / statistics.median(dy_steps))
            summary["clean"]["ratio_ranks_1_2_4_8"] = (sum(statistics.median(lora_steps[b]) for b in (1, 2, 4, 8)
                                                           if b in lora_steps) / statistics.median(dy_steps))
            summary["clean"]["step_ratio"] = statistics.median(dy_steps) / statistics.median(
                lora_steps[report["config"]["r_max"]])
        # with a rank sweep on validation added to both sides (8 evaluations each; same cost per pass)
        summary["ratio_with_sweep"] = statistics.median(
            (r["lora_sum_s"] + 8 * r["val_eval_s"]) / (d + 8 * r["val_eval_s"]) for r in rows for d in r["dylora_s"].values())
    return summary


def gaps(acc: dict[str, Any]) -> dict[str, Any]:
    """Per task and DyLoRA variant: separate LoRA minus DyLoRA (points) per rank, and the worst rank;
    DyLoRA minus plain truncation per rank."""
    out: dict[str, Any] = {}
    for task, rows in acc.items():
        for variant in DYLORA:
            if variant not in rows:
                continue
            ranks = sorted(rows[variant])
            vs_lora = {b: 100 * (rows["lora"][b]["mean"] - rows[variant][b]["mean"]) for b in ranks if b in rows.get("lora", {})}
            vs_trunc = {b: 100 * (rows[variant][b]["mean"] - rows["lora-trunc"][b]["mean"])
                        for b in ranks if b in rows.get("lora-trunc", {})}
            out.setdefault(task, {})[variant] = {"lora_minus_dylora": vs_lora, "max_gap": max(vs_lora.values()),
                                                 "dylora_minus_trunc": vs_trunc}
    return out


def verdicts(acc: dict[str, Any], gap: dict[str, Any], time: dict[str, Any]) -> dict[str, Any]:
    variants = [v for v in DYLORA if any(v in g for g in gap.values())]
    worst = {v: max(gap[t][v]["max_gap"] for t in gap if v in gap[t]) for v in variants}
    mean_gap = {v: statistics.fmean(d for t in gap if v in gap[t] for d in gap[t][v]["lora_minus_dylora"].values())
                for v in variants}
    best = min(worst, key=worst.get) if worst else None

    def versus(row: str) -> dict[str, dict[str, dict[int, float]]]:  # variant -> task -> rank -> points
        return {v: {t: {b: 100 * (rows[v][b]["mean"] - rows[row][b]["mean"]) for b in (1, 2, 4) if b in rows.get(row, {})}
                    for t, rows in acc.items() if v in rows} for v in variants}

    ratio = dict(time.get("ratio", {}))
    source = "all runs"
    if "ratio" in time.get("clean", {}):  # uncontended runs only, when there are enough
        ratio["median_all"], source = time["clean"]["ratio"], "uncontended runs"
    fast = (ratio.get("median_all") or 0) >= SPEED_GOAL
    return {"max_gap_by_variant": worst, "mean_gap_by_variant": mean_gap, "best_variant": best,
            "best_variant_note": "chosen on test accuracy (the smallest worst-rank gap), so optimistic",
            "comparable_threshold_points": COMPARABLE_POINTS,
            "paper_variant_comparable": worst.get(PAPER, 1e9) <= COMPARABLE_POINTS,
            "best_variant_comparable": worst.get(best, 1e9) <= COMPARABLE_POINTS,
            "minus_trunc_small_ranks": versus("lora-trunc"), "minus_trunc_rescale_small_ranks": versus("lora-trunc-rescale"),
            "paper_minus_trunc_small_ranks": versus("lora-trunc").get(PAPER, {}),
            "speed_ratio_median": ratio.get("median_all"), "speed_ratio_source": source,
            "speed_ratio_4_ranks": time.get("clean", {}).get("ratio_ranks_1_2_4_8"),
            "speed_goal": SPEED_GOAL, "speed_goal_met": fast,
            "speed_goal_met_at_comparable_quality": fast and worst.get(best, 1e9) <= COMPARABLE_POINTS,
            "speed_goal_met_at_comparable_quality_paper_variant": fast and worst.get(PAPER, 1e9) <= COMPARABLE_POINTS}


def cell(stats: dict[str, Any] | None) -> str:
    return T.pm(stats) if stats else "–"


def markdown(report: dict[str, Any]) -> str:
    meta, cfg, s = report["meta"], report["config"], report["summary"]
    acc, time, gap, verdict = s["accuracy"], s["timing"], s["gaps"], s["verdict"]
    seeds = ", ".join(map(str, cfg["seeds"]))
    lines = [
        "# DyLoRA: every rank from one run (MiniLM, VADER sentiment)",
        "",
        f"- {meta['date']}, adapterkit {meta['versions']['adapterkit']} ({describe(meta, extensions=False)}), torch {meta['versions']['torch']}, "
        f"{meta['machine']['cpus']} CPUs, {meta['machine']['torch_threads']} threads; command `{meta['command']}`; "
        f"wall time {report['wall_s'].get('total', report['wall_s'].get('so_far', 0)) / 60:.1f} min"
        f"{'' if 'total' in report['wall_s'] else ' (PARTIAL RESULTS: run still in progress or interrupted)'}"
        + "".join(f"; extended by `{e['command']}` ({e['date']}, {describe(e)}, "
                  f"{e['machine']['torch_threads']} thread(s), load average {e['machine']['loadavg_start'][0]:.1f} at start)"
                  for e in meta.get("extensions", []))
        + (f" (first run {report['wall_s']['first_run'] / 60:.1f} min, extension {report['wall_s']['extension'] / 60:.1f} min)"
           if "extension" in report["wall_s"] else ""),
        f"- tasks: VADER {', '.join(cfg['tasks'])} sentiment (label = mean human rating > 0); per task "
        f"{cfg['sizes']['fit']} training, {cfg['sizes']['val']} validation (carved from the training split), "
        f"{cfg['sizes']['test']} held-out test examples; {cfg['max_length']} tokens max; positive share of test: "
        + ", ".join(f"{t} {100 * p:.0f}%" for t, p in cfg["positive_rate_test"].items()),
        f"- every adapter: query/value of the 6 MiniLM layers, r / r_max = {cfg['r_max']}, alpha {cfg['alpha']:g}, "
        f"classifier head trained in full; 1 epoch, batch {cfg['batch']}, AdamW (no weight decay), 6% warm-up then "
        f"linear decay, grad-norm clip 1; seeds {seeds} (data order, LoRA init, DyLoRA rank sampler; rank drawn "
        "uniformly on 1..8 every optimizer step)",
        f"- LR: chosen on validation on {cfg['lr_selection']['task']} / seed {cfg['lr_selection']['seed']} from "
        f"LoRA {', '.join(f'{g:g}' for g in cfg['grid']['lora'])} and DyLoRA {', '.join(f'{g:g}' for g in cfg['grid']['dylora'])} "
        "(DyLoRA: mean over ranks 1, 2, 4, 8; LoRA: per rank; truncated LoRA = the rank-8 LoRA at its LR), reused "
        "for the other task" + (" and seeds" if len(cfg["seeds"]) > 1 else "") + "; DyLoRA's grid is lower because a "
        "pilot at 1e-2 was on the edge of collapse (see the script's docstring)",
        "",
        "## Test accuracy (%) by rank" + (" (mean ± sd over seeds)" if len(cfg["seeds"]) > 1 else ""),
        "",
    ]
    for task, rows in acc.items():
        probe = report["probe"].get(task)
        lines += [f"### {task}", ""]
        table = [[label] + [cell(rows.get(row, {}).get(b)) for b in cfg["eval_ranks"]] for row, label in ROWS.items()]
        if probe:
            table.append([f"linear probe (frozen encoder, C={probe['best_C']:g})"] +
                         [f"{100 * probe['test_acc']:.1f}"] * len(cfg["eval_ranks"]))
        lines += T.md_table(["method"] + [f"b={b}" for b in cfg["eval_ranks"]], table)
        lines += ["", "LoRA trained separately at every rank: " + ", ".join(
            f"b={b} {cell(st)}" for b, st in rows.get("lora", {}).items()), ""]
    lines += ["## Gap to separately trained LoRA (points, LoRA − DyLoRA; positive = DyLoRA worse)", ""]
    table = []
    for task, variants in gap.items():
        for v, g in variants.items():
            table.append([task, ROWS[v]] + [f"{g['lora_minus_dylora'].get(str(b), g['lora_minus_dylora'].get(b, 0)):+.1f}"
                                             for b in cfg["eval_ranks"]] + [f"**{g['max_gap']:+.1f}**"] +
                         [f"{g['dylora_minus_trunc'].get(str(b), g['dylora_minus_trunc'].get(b, 0)):+.1f}" for b in (1, 2, 4)])
    lines += T.md_table(["task", "DyLoRA variant"] + [f"b={b}" for b in cfg["eval_ranks"]] + ["worst"] +
                        [f"vs trunc b={b}" for b in (1, 2, 4)], table)
    lines += ["", "\"vs trunc\": DyLoRA minus LoRA r=8 plainly truncated (points; positive = DyLoRA better).", "",
              "## Time to obtain every rank 1..8", ""]
    table = []
    for r in time.get("blocks", []):
        table.append([r["task"], r["seed"], " / ".join(",".join(f"{lr:g}" for lr in r["lrs"][k]) for k in ("lora", "dylora")),
                      f"{r['lora_sum_s']:.0f}", f"{r['lora_s'][str(cfg['r_max'])]:.1f}"] +
                     [f"{r['dylora_s'][v]:.1f} ({r['ratio'][v]:.1f}×)" if v in r["dylora_s"] else "–" for v in DYLORA] +
                     [f"{statistics.median(r['step_ratio'].values()):.2f}",
                      f"{statistics.median(r['cpu_ratio'].values()):.2f}×", f"{r['other_cores_max']:.2f}"])
    lines += T.md_table(["task", "seed", "LRs (LoRA/DyLoRA)", "8 LoRA runs s", "LoRA r=8 s"] +
                        [f"{ROWS[v]} s (ratio)" for v in DYLORA] +
                        ["step time DyLoRA / LoRA r=8 (median)", "CPU-time ratio (median)", "max other-process cores"], table)
    if time.get("ratio"):
        lines += ["", f"Ratio (sum of the 8 LoRA runs / one DyLoRA run), over all blocks and variants: median "
                  f"**{time['ratio']['median_all']:.2f}×** (mean {time['ratio']['all']['mean']:.2f}, range "
                  f"{time['ratio']['all']['min']:.2f}–{time['ratio']['all']['max']:.2f}); per variant: " +
                  ", ".join(f"{ROWS[v]} {time['ratio'][v]['mean']:.2f}×" for v in DYLORA if v in time["ratio"]) +
                  f". Per-step time DyLoRA / LoRA r=8: median {time['step_ratio']['median_all']:.3f} (range "
                  f"{time['step_ratio']['all']['min']:.3f}–{time['step_ratio']['all']['max']:.3f}). Adding the rank "
                  f"sweep itself (8 validation passes on either side) gives {time['ratio_with_sweep']:.2f}×. The same ratio in "
                  f"process CPU time (less sensitive to other processes): median {time['cpu_ratio']['median_all']:.2f}×. "
                  "Wall times on a shared 2-core machine (cores used by other processes during the trainings in the last "
                  "column); runs alternate within a block so load drifts hit both sides."]
        c = time["clean"]
        if "ratio" in c:
            lines += ["", f"Only the {c['threads']}-thread trainings during which other processes used < "
                      f"{c['threshold_other_cores']:g} cores "
                      f"({c['runs']} of {c['of']}): Σ over ranks of the median LoRA step time / median DyLoRA step time "
                      f"= **{c['ratio']:.2f}×** (a LoRA search over ranks 1, 2, 4, 8 only: {c['ratio_ranks_1_2_4_8']:.2f}×); DyLoRA step / "
                      f"LoRA r=8 step = {c['step_ratio']:.3f}."]
        else:
            lines += ["", f"Too few uncontended trainings ({c['runs']} of {c['of']}) for a clean-only estimate."]
    lines += ["", "## Learning-rate choice (validation accuracy %, " + f"{cfg['lr_selection']['task']}, seed "
              f"{cfg['lr_selection']['seed']}; DyLoRA: mean over ranks 1, 2, 4, 8)", ""]
    grid = sorted({lr for lrs in cfg["grid"].values() for lr in lrs})
    lines += T.md_table(["configuration"] + [f"{lr:g}" for lr in grid] + ["chosen"], lr_rows(report))
    lines += ["", "## Findings", ""] + findings(report) + [""]
    lines += [f"![accuracy vs rank](dylora_bench.png)", ""]
    return "\n".join(lines)


def lr_rows(report: dict[str, Any]) -> list[list[str]]:
    sel = report["config"]["lr_selection"]
    grid = sorted({lr for lrs in report["config"]["grid"].values() for lr in lrs})
    val: dict[str, dict[float, float]] = {}
    for run in report["runs"]:
        if run["task"] == sel["task"] and run["seed"] == sel["seed"] and "val" in run["acc"]:
            by_rank = run["acc"]["val"][run["method"]]
            val.setdefault(key_of(run), {})[run["lr"]] = statistics.fmean(by_rank.values())
    order = DYLORA + [f"lora@{b}" for b in report["config"]["lora_ranks"]]
    return [[ROWS.get(k, k.replace("lora@", "LoRA r="))] + [f"{100 * val[k][lr]:.1f}" if lr in val[k] else "–" for lr in grid]
            + [f"{report['chosen_lr'].get(k, float('nan')):g}"] for k in order if k in val]


def findings(report: dict[str, Any]) -> list[str]:
    s, cfg = report["summary"], report["config"]
    v, time = s["verdict"], s["timing"]
    se = 100 * (0.8 * 0.2 / cfg["sizes"]["test"]) ** 0.5
    steps = report["runs"][0]["steps"]

    def ranks(by_task: dict[str, dict[Any, float]]) -> str:
        return "; ".join(f"{t} " + ", ".join(f"b={b} {d:+.1f}" for b, d in by_rank.items()) for t, by_rank in by_task.items())

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    out = ["- **DyLoRA vs LoRA r=8 truncated (points, DyLoRA minus truncated, b = 1, 2, 4).** Plain truncation (keep "
           "α/8): " + " | ".join(f"{ROWS[k]}: {ranks(t)}" for k, t in v["minus_trunc_small_ranks"].items()) +
           ". Truncation rescaled to α/b: " + " | ".join(f"{ROWS[k]}: {ranks(t)}" for k, t in
                                                        v["minus_trunc_rescale_small_ranks"].items()) + "."]
    out.append(f"- **DyLoRA vs LoRA trained at each rank** (LoRA minus DyLoRA over ranks 1, 2, 4, 8 and both tasks): "
               + ", ".join(f"{ROWS[k]} worst {g:+.1f} / mean {v['mean_gap_by_variant'][k]:+.1f}"
                           for k, g in v["max_gap_by_variant"].items())
               + f". \"Comparable\" here means no rank more than {v['comparable_threshold_points']:g} points below "
               f"(one test accuracy has a binomial SE of ≈ {se:.1f} points): paper variant {yes(v['paper_variant_comparable'])}; "
               f"smallest worst gap ({ROWS[v['best_variant']]}, picked on test, so optimistic) "
               f"{yes(v['best_variant_comparable'])}.")
    out.append(f"- **Frozen training is short of updates here.** One epoch is {steps} optimizer steps; with b uniform on 1..8 "
               f"and frozen training, each component receives gradient in ≈ {steps / cfg['r_max']:.0f} of them (the "
               "paper trains 25-80 epochs). Non-frozen training updates components 1..b every step.")
    if v["speed_ratio_median"] is not None:
        extra = (f"; against a 4-rank LoRA search (1, 2, 4, 8) {v['speed_ratio_4_ranks']:.2f}×"
                 if v.get("speed_ratio_4_ranks") else "")
        out.append(f"- **Time for every rank 1..8:** one DyLoRA run vs 8 LoRA runs = {v['speed_ratio_median']:.2f}× "
                   f"({v['speed_ratio_source']}){extra}; with the rank sweep on validation counted on both sides "
                   f"{time['ratio_with_sweep']:.2f}×. Goal ≥ {v['speed_goal']:g}×: training time "
                   f"{'met' if v['speed_goal_met'] else 'not met'}; at comparable per-rank quality: "
                   f"{'met' if v['speed_goal_met_at_comparable_quality'] else 'not met'} (paper variant: "
                   f"{'met' if v['speed_goal_met_at_comparable_quality_paper_variant'] else 'not met'}). A DyLoRA step "
                   f"costs what a LoRA step costs ({time['step_ratio']['median_all']:.2f}×), so the factor is the number "
                   "of LoRA runs replaced: a rank-search saving, not a per-step speed-up.")
    chosen, top = report["chosen_lr"], max(cfg["grid"]["dylora"])
    if all(chosen.get(k) == top for k in DYLORA if k in chosen):
        out.append(f"- **Learning rate:** every DyLoRA variant chose the top of its grid ({top:g}); the higher 1e-2 was "
                   "erratic for the frozen variants in a pilot (see the script), not tried for the non-frozen ones. The "
                   "head trains at the adapter's LR, so a low LR also slows the head.")
    out.append(f"- **Noise:** " + (f"{len(cfg['seeds'])} seeds (± is the seed sd)." if len(cfg["seeds"]) > 1 else
               "a single seed: differences of 1-2 points are within noise."))
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = report["summary"]["accuracy"]
    fig, axes = plt.subplots(1, len(acc), figsize=(6 * len(acc), 4.8), dpi=110, squeeze=False)
    styles = {"dylora-b-frozen": ("tab:blue", "-o"), "dylora-b-free": ("tab:cyan", "-o"),
              "dylora-rmax-frozen": ("tab:green", "-s"), "dylora-rmax-free": ("tab:olive", "-s"),
              "lora-trunc": ("tab:red", "--v"), "lora-trunc-rescale": ("tab:pink", ":v"), "lora": ("black", "-D")}
    for ax, (task, rows) in zip(axes[0], acc.items()):
        for row, label in ROWS.items():
            if row not in rows:
                continue
            ranks = sorted(rows[row])
            color, fmt = styles[row]
            ax.errorbar(ranks, [100 * rows[row][b]["mean"] for b in ranks], yerr=[100 * rows[row][b]["sd"] for b in ranks],
                        fmt=fmt, color=color, label=label, capsize=3, markersize=4, linewidth=1.2)
        probe = report["probe"].get(task)
        if probe:
            ax.axhline(100 * probe["test_acc"], color="gray", linestyle=":", label="linear probe")
        ax.set_title(f"VADER {task}")
        ax.set_xlabel("rank b")
        ax.set_ylabel("test accuracy (%)")
        ax.set_xticks(list(range(1, report["config"]["r_max"] + 1)))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def write(report: dict[str, Any], quick: bool, stem: str) -> Path:
    """Summaries into ``report['summary']``, then JSON + Markdown (``T.write_report``) and the plot."""
    acc = accuracy_table(report)
    time = timing(report)
    gap = gaps(acc)
    report["summary"] = {"accuracy": acc, "timing": time, "gaps": gap, "verdict": verdicts(acc, gap, time) if gap else {}}
    if not gap:
        return T.write_report(report, "# DyLoRA benchmark: no complete results yet\n", stem, quick)
    out = T.write_report(report, markdown(report), stem, quick)
    plot(report, out / f"{stem}.png")
    return out
