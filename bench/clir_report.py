"""Time plan, Markdown table and plot of ``clir_bench.py``."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

from _provenance import describe, provenance

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
QUICK_RESULTS = Path(os.environ.get("BENCH_QUICK_DIR") or RESULTS / "tmp")
METRICS = ("map", "mrr@10", "ndcg@10")

#: Gemma-3-270M body, fp32, 2 mostly idle cores (measured here, 8x64 forward 0.83 s): seconds per 512 tokens
FORWARD_S = 0.85       # scoring (LT-SFT compositions fused): 16x81 tokens 2.22 s
TRAIN_S = 1.75         # forward + backward with a frozen body (adapter ranking step, 8x81 tokens: 2.19 s)
SPARSE_FACTOR = 1.15   # LT-SFT sparse phase: the diff is overlaid on the weights at every forward
DENSE_FACTOR = 1.4     # weight gradients of the ~100M decoder weights (full FT step, 8x81 tokens: 3.48 s)
DENSE_OPTIMIZER_S = 0.4  # AdamW over those weights, per step
SHORTLIST_S = 0.4      # the 16k-row shortlist softmax (language adapter step, 8x64 tokens: 2.19 s)
LOAD_S = 6.0           # copy the model and load modules, per trained module
QUERY_TOKENS = 17      # BOS + a NAME line (~12 tokens) + separator + EOS


def calibrate(backbone: Any) -> float:
    """This machine's time for a body forward of 8x64 tokens over :data:`FORWARD_S` (the plan's scale)."""
    import time

    import torch

    body = backbone.lm.model
    ids = torch.randint(10, 1000, (8, 64))
    times = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            body(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            times.append(time.perf_counter() - start)
    return min(times[1:]) / FORWARD_S


def estimate(s: Any, scale: float = 1.0) -> dict[str, Any]:
    """Seconds per stage from the sizes (the cost constants above, linear in tokens), times ``scale``
    (:func:`calibrate`)."""
    from adapterkit.apps.clir import systems

    if s.model == "tiny":
        return {"stages": {}, "total_s": 0.0, "note": "tiny model: not estimated"}
    lang_tokens = s.lang_batch * s.lang_tokens / 512
    head = SHORTLIST_S * lang_tokens * s.shortlist / 16384
    frozen = TRAIN_S * lang_tokens + head
    sparse = TRAIN_S * lang_tokens * SPARSE_FACTOR + head
    dense = TRAIN_S * lang_tokens * DENSE_FACTOR + DENSE_OPTIMIZER_S + head
    n_lang = len(s.languages)
    pair_tokens = s.max_doc_tokens + QUERY_TOKENS
    rank_tokens = s.rank_queries * (1 + s.negatives) * pair_tokens / 512
    r_frozen, r_sparse = TRAIN_S * rank_tokens, TRAIN_S * rank_tokens * SPARSE_FACTOR
    r_dense = TRAIN_S * rank_tokens * DENSE_FACTOR + DENSE_OPTIMIZER_S
    runs = 0
    for pair in s.pairs:
        q, d = pair.split("-")
        runs += len({x.plan(q, d).key for x in systems.SYSTEMS if x.reranks})
    per_run = FORWARD_S * s.queries * s.top_k * pair_tokens / 512
    stages = {
        "language LT-SFTs": n_lang * (s.lang_steps * (dense + sparse) + LOAD_S),
        "language adapters": n_lang * (2 * s.lang_steps * frozen + LOAD_S),
        "ranking full FT": s.rank_steps * r_dense + LOAD_S,
        "ranking LT-SFT": s.rank_steps * (r_dense + r_sparse) + LOAD_S,
        "ranking adapter + LoRA": 2 * (s.rank_steps * r_frozen + LOAD_S),
        f"rerank {runs} distinct (system, pair) runs": runs * per_run,
        "first stage (USE encodings, cached after)": 60.0 * sum(p.split("-")[0] != p.split("-")[1] for p in s.pairs),
    }
    stages = {k: v * scale for k, v in stages.items()}
    return {"stages": stages, "total_s": sum(stages.values()), "runs": runs, "scale": scale,
            "constants": {"forward_s_per_512": FORWARD_S, "train_s_per_512": TRAIN_S, "sparse_factor": SPARSE_FACTOR,
                          "dense_factor": DENSE_FACTOR, "dense_optimizer_s": DENSE_OPTIMIZER_S,
                          "shortlist_s": SHORTLIST_S}}


def plan_table(plan: dict[str, Any], s: Any) -> str:
    lines = [f"plan: {len(s.pairs)} pairs x {s.queries} queries, top-{s.top_k} of {s.depth}; language modules "
             f"{s.lang_steps} steps/phase at {s.lang_batch}x{s.lang_tokens}; ranking {s.rank_steps} steps/phase "
             f"at {s.rank_queries}x(1+{s.negatives}) pairs; docs cut to {s.max_doc_tokens} tokens"]
    for name, seconds in plan["stages"].items():
        lines.append(f"  {name:<48} {seconds / 60:6.1f} min")
    scale = plan.get("scale", 1.0)
    where = "2 idle cores" if scale == 1.0 else f"calibrated here: x{scale:.2f}"
    lines.append(f"  {f'estimated total (fp32, {where})':<48} {plan['total_s'] / 60:6.1f} min")
    return "\n".join(lines)


def metadata(argv: Sequence[str], model: str) -> dict[str, Any]:
    import torch
    import transformers

    import adapterkit as ak

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "adapterkit": ak.__version__},
        "provenance": provenance(ROOT),
        "model": model,
        "data": "Debian man pages and their human translations (adapterkit fetch-data clir)",
    }


def write(report: dict[str, Any], stem: str, quick: bool) -> Path:
    out = QUICK_RESULTS if quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    report["meta"]["machine"]["loadavg_end"] = os.getloadavg()
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    plot(report, out / f"{stem}.png")
    return out


def render(stem: str, quick: bool) -> None:
    out = QUICK_RESULTS if quick else RESULTS
    report = json.loads((out / f"{stem}.json").read_text())
    (out / f"{stem}.md").write_text(markdown(report))
    plot(report, out / f"{stem}.png")


def _system_order(report: dict[str, Any]) -> list[str]:
    from adapterkit.apps.clir.systems import SYSTEMS

    present = {name for pair in report["pairs"].values() for name in pair["systems"]}
    return [s.name for s in SYSTEMS if s.name in present]


def _module_of(system: str) -> str | None:
    from adapterkit.apps.clir.systems import system as lookup

    ranker = lookup(system).ranker
    return None if ranker == "none" else f"rank/{ranker}"


def _cell(row: dict[str, Any] | None, metric: str) -> str:
    if row is None:
        return "—"
    mark = ""
    if row.get("beats_full") and row["beats_full"][metric]:
        mark = " ▲"
    elif row.get("loses_to_full") and row["loses_to_full"][metric]:
        mark = " ▼"
    return f"{row['means'][metric]:.3f} ± {row['stderrs'][metric]:.3f}{mark}"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def markdown(report: dict[str, Any]) -> str:
    s, meta = report["settings"], report["meta"]
    pairs = list(report["pairs"])
    head = [f"# Zero-shot cross-lingual reranking with language + ranking modules ({meta['model']})", "",
            f"{describe(meta)}; {meta['date']}; `{meta['command']}`", "",
            f"Sizes: {s['queries']} queries per pair (seeded sample), top-{s['top_k']} of a depth-{s['depth']} first "
            f"stage reranked (USE for EN→X, BM25 for X→X), documents cut to {s['max_doc_tokens']} tokens; language "
            f"modules {s['lang_steps']} steps per LT-SFT phase ({2 * s['lang_steps']} for adapters) at "
            f"{s['lang_batch']}×{s['lang_tokens']} tokens with a {s['shortlist']}-id shortlist softmax; ranking modules "
            f"{s['rank_steps']} steps (per phase for LT-SFT), {s['rank_queries']} queries × (1 + {s['negatives']} BM25 "
            "negatives) per step, listwise loss. Full fine-tuning trains every decoder weight and norm and the head; "
            "the token embeddings stay frozen. Cells: mean ± standard error over queries; ▲/▼: significantly "
            "better/worse than full fine-tuning (paired t-test, p < 0.05).", ""]
    lines = head
    for metric in METRICS:
        lines += [f"## {metric}", "", "| system | " + " | ".join(p.upper().replace("-", "→") for p in pairs)
                  + " | trainable params | train time |", "|---" * (len(pairs) + 3) + "|"]
        for name in _system_order(report):
            module = _module_of(name)
            mod = report["modules"].get(module) if module else None
            params = f"{mod['trainable']:,}" if mod else "—"
            seconds = f"{mod['seconds'] / 60:.1f} min" if mod else "—"
            cells = [_cell(report["pairs"][p]["systems"].get(name), metric) for p in pairs]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {params} | {seconds} |")
        lines.append("")
    lines += ["## Modules", "", "Steps: optimizer steps of every phase; losses: mean of the first and of the last five "
              "steps of the last phase (LT-SFT: the sparse one).", "",
              "| module | kind | trainable params | steps | train time | loss first → last | file |",
              "|---|---|---|---|---|---|---|"]
    for name, m in report["modules"].items():
        lines.append(f"| {name} | {m['kind']} | {m['trainable']:,} | {m['steps']} | {m['seconds']:.0f} s | "
                     f"{m['first_loss']:.3f} → {m['last_loss']:.3f} | {_size(m['bytes'])} |")
    lines += ["", "Ranking SFT and adapter rows: trained on top of the English language module (its own time is in "
              "the module table). Language-module LM losses use the shortlist softmax (an approximation of the full "
              "262k softmax).", "", "## Time", "", "| stage | estimated |", "|---|---|"]
    for stage, seconds in report["plan"]["stages"].items():
        lines.append(f"| {stage} | {seconds / 60:.1f} min |")
    lines.append(f"\nThis run's wall time: {report['wall_seconds_this_run'] / 60:.1f} min (cached stages are "
                 "skipped on a re-run).")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(report["pairs"])
    names = _system_order(report)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(6 * len(METRICS), 4.5), sharey=False)
    width = 0.8 / max(1, len(names))
    cmap = plt.get_cmap("tab20")
    for ax, metric in zip(axes, METRICS):
        for i, name in enumerate(names):
            rows = [report["pairs"][p]["systems"].get(name) for p in pairs]
            xs = [j + (i - len(names) / 2) * width + width / 2 for j in range(len(pairs))]
            ax.bar(xs, [r["means"][metric] if r else 0 for r in rows], width,
                   yerr=[r["stderrs"][metric] if r else 0 for r in rows], label=name, color=cmap(i), capsize=1.5)
        ax.set_xticks(range(len(pairs)), [p.upper().replace("-", "→") for p in pairs])
        ax.set_title(metric)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Reranking {report['meta']['model']}: {report['settings']['queries']} queries per pair, "
                 f"top-{report['settings']['top_k']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
