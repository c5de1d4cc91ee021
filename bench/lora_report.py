"""The LoRA benchmark's report: run metadata, and writing ``<stem>.json`` and ``<stem>.md``.

The Markdown leads with the like-for-like comparison (adapterkit ``exact=False`` vs peft: the same
arithmetic, the same memory), then adapterkit's default exact path beside peft with what it costs
in memory, then the operations where the two libraries do the same work anyway (attach, train, load,
inference).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from _provenance import describe
from lora_common import AK, AK_INEXACT, PEFT

QUIET = 0.15  # other processes may keep at most this many cores busy during a timing section

Row = tuple[str, str, str]  # (result key, Markdown label, unit)
FUSION_ROWS: list[Row] = [
    ("fuse", "fuse a (ak.fuse vs merge_adapter)", "ms"),
    ("unfuse", "unfuse (ak.unfuse vs unmerge_adapter)", "ms"),
    ("switch", "**switch fused a → fused b**", "ms"),
]
MEMORY_ROWS: list[Row] = [
    ("held_bytes_fused", "host memory held to undo fusing (library's own count)", "MiB"),
    ("rss_fuse_held", "RSS still held while fused, measured (after the switches)", "MiB"),
    ("rss_fuse", "peak RSS during fuse a, switch b, switch a (above model+adapters)", "MiB"),
]
EXACT_ROWS: list[Row] = FUSION_ROWS + [("adapterkit_unfuse_then_fuse", "adapterkit unfuse + fuse (reference for switch)", "ms")]
OTHER_ROWS: list[Row] = [
    ("attach", "attach (ak.attach vs get_peft_model)", "ms"),
    ("train_step", "train step (fwd+bwd+AdamW)", "ms"),
    ("rss_train", "peak RSS during attach+training, above base model", "MiB"),
    ("load_cold", "adapter load, cold (fresh model)", "ms"),
    ("load_warm", "adapter load, warm", "ms"),
    ("load_after_fuse_cycle", "adapter load after a fuse/unfuse cycle of another adapter", "ms"),
    ("load_while_fused", "adapter load while another adapter is fused", "ms"),
    ("load_warm_adapterkit_ignore_fingerprint", "ak.load(..., ignore_fingerprint=True), warm", "ms"),
    ("load_warm_adapterkit_from_peft_dir", "ak.load of the peft-saved dir (holds no fingerprint), warm", "ms"),
    ("infer_unfused", "inference forward, unfused", "ms"),
    ("infer_fused", "inference forward, fused", "ms"),
    ("infer_unfused_over_fused", "inference unfused / fused", "x"),
]


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    import adapterkit

    return {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
            "adapterkit": adapterkit.__version__, "python": sys.version.split()[0]}


def fmt(value: float | None, unit: str) -> str:
    """A table cell: seconds shown as ms, bytes as MiB, ratios as they are."""
    if value is None:
        return "—"
    if unit == "ms":
        v = value * 1e3
        return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}"
    if unit == "MiB":
        return f"{value / 2**20:.1f}"
    return f"{value:.3f}"


def median(res: dict[str, Any], key: str, lib: str) -> float | None:
    return res.get(key, {}).get(lib, {}).get("median")


def key_number(report: dict[str, Any]) -> list[str]:
    """The switch on the fp32 stack: like for like first, then the exact path and its memory."""
    res, params = report["results"].get("stack_fp32", {}), report["meta"]["params"]
    peft, fast, exact = (median(res, "switch", lib) for lib in (PEFT, AK_INEXACT, AK))
    if not (peft and exact):
        return []
    at_goal = (params["stack_width"], params["stack_r"]) == (4096, 32)

    def verdict(ratio: float) -> str:
        return f"≥ 4× goal {'met' if ratio >= 4 else 'NOT met'}" if at_goal else "the ≥ 4× goal is stated for 4096×4096, r=32"

    lines = []
    if fast:
        lines.append(f"- **key number, like for like** — switch fused a → fused b on the fp32 Linear stack, both "
                     f"subtracting and keeping no copy: adapterkit `exact=False` {fast * 1e3:.1f} ms, peft (unmerge + "
                     f"set_adapter + merge) {peft * 1e3:.1f} ms: **{peft / fast:.1f}× faster** ({verdict(peft / fast)})")
    held = median(res, "held_bytes_fused", AK)
    lines.append(f"- exact path (default `exact=True`, bit-exact unfuse): {exact * 1e3:.1f} ms, **{peft / exact:.1f}×** "
                 f"peft ({verdict(peft / exact)}), holding "
                 + (f"{held / 2**20:.1f} MiB of host memory (one copy of each fused weight)" if held is not None
                    else "one host copy of each fused weight"))
    return lines


def header_lines(report: dict[str, Any]) -> list[str]:
    """Title, machine, versions, source commit, contention check and the key number."""
    meta = report["meta"]
    hw, ver, src = meta["hardware"], meta["versions"], meta["provenance"]
    lines = [
        f"# LoRA benchmark: adapterkit vs peft{' (QUICK smoke run)' if meta['params']['quick'] else ''}",
        "",
        f"- machine: {hw['cpu_model']}, {hw['usable_cores']} usable cores ({hw['logical_cores']} logical), "
        f"{hw['ram_total_gib']} GiB RAM, no GPU; torch threads: {meta['torch_threads']}",
        f"- versions: adapterkit {ver['adapterkit']}, peft {ver['peft']}, torch {ver['torch']}, "
        f"transformers {ver['transformers']}, Python {ver['python']}",
        f"- adapterkit source: {describe(meta)}; src/ last changed in {(src.get('src_last_commit') or '?')[:10]} "
        f"({src.get('src_last_subject') or '?'})",
        f"- date: {meta['date']}; total run time {meta['wall_s']:.0f} s; "
        "medians over timed repeats after warm-up (repeat counts and raw samples in lora_bench.json)",
        "- ratio = peft median / adapterkit median (> 1: adapterkit faster or smaller)",
    ]
    busy = {k: v["other_processes_cores"] for k, v in meta.get("contention", {}).items() if v.get("timing_section")}
    if busy:
        worst = max(busy, key=busy.get)
        retried = sum(v.get("attempt", 1) - 1 for v in meta["contention"].values() if isinstance(v, dict))
        lines.append(f"- contention check: other processes kept at most {busy[worst]:.2f} cores busy during a timing "
                     f"section ({worst}); {retried} section re-run(s) because of contention; per-section values in "
                     "lora_bench.json" + (
                         " — **the numbers of that section are distorted**" if busy[worst] > QUIET else ""))
    return lines + key_number(report) + [""]


def rows_table(res: dict[str, Any], rows: list[Row], ours: str, ours_label: str) -> list[str]:
    """A table of ``rows``: ``ours`` (adapterkit variant) vs peft, ratio, repeats; missing results skipped."""
    lines = [f"| metric | {ours_label} median | peft median | ratio peft/adapterkit | repeats |",
             "|---|---:|---:|---:|---:|"]
    for key, label, unit in rows:
        m = res.get(key)
        if m is None or (ours not in m and PEFT not in m):
            continue
        a, b = median(res, key, ours), median(res, key, PEFT)
        ratio = f"{b / a:.2f}×" if a and b else "—"
        lines.append(f"| {label} [{unit}] | {fmt(a, unit)} | {fmt(b, unit)} | {ratio} | {m.get('repeats', m.get('runs', ''))} |")
    return lines + [""]


def drift_line(sanity: dict[str, Any], key: str, who: str) -> str:
    d = sanity.get(key)
    return "" if d is None else (f"{who}: base weights after all fuse/unfuse cycles differ by up to {d['max_abs']:.2g} "
                                 f"({100 * d['changed_fraction']:.1f}% of entries changed).")


def setting_lines(title: str, res: dict[str, Any], sanity: dict[str, Any]) -> list[str]:
    """One setting: like for like, the exact path and its memory, then the other operations."""
    lines = [f"## {title}", ""]
    if "fuse" in res:
        lines += ["### Like for like: adapterkit `exact=False` vs peft", "",
                  "Both add ΔW in place to fuse and subtract it again to unfuse or switch; neither keeps a copy.", ""]
        lines += rows_table(res, FUSION_ROWS + MEMORY_ROWS, AK_INEXACT, "adapterkit exact=False")
        lines += [" ".join(filter(None, (drift_line(sanity, "adapterkit_exact_false_base_weight_drift_after_all_cycles",
                                                    "adapterkit exact=False"),
                                         drift_line(sanity, "peft_base_weight_drift_after_all_cycles", "peft")))), ""]
        lines += ["### Trade-off: adapterkit's exact path (default `exact=True`)", "",
                  "`ak.unfuse` restores the base weights bit for bit (asserted); the price is one host copy of each "
                  "fused dense weight, kept after unfuse for the next fuse (`ak.unfuse(model, free_memory=True)` drops "
                  "it). `ak.switch` is then one pass per layer writing original + ΔW_b.", ""]
        lines += rows_table(res, EXACT_ROWS + MEMORY_ROWS, AK, "adapterkit exact")
        if "peft_breakdown" in res.get("switch", {}):
            bd = res["switch"]["peft_breakdown"]
            lines += ["peft switch breakdown (medians): " + ", ".join(
                f"{k.split('.', 1)[1]} {fmt(v['median'], 'ms')} ms" for k, v in bd.items()) + ".", ""]
    others = rows_table(res, OTHER_ROWS, AK, "adapterkit")
    if len(others) > 3:
        lines += ["### Other operations (same work in both libraries)", ""] + others
    if "infer_base_reference" in res:
        lines += [f"Plain base model forward (no adapters): {fmt(res['infer_base_reference']['base']['median'], 'ms')} ms.", ""]
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The whole Markdown report."""
    lines = header_lines(report)
    for key, title in report["meta"]["settings"].items():
        if report["results"].get(key):
            lines += setting_lines(title, report["results"][key], report["sanity"].get(key, {}))
    lines += ["## Sanity checks (asserted)", ""]
    for key, s in report["sanity"].items():
        lines.append(f"- {key}: " + json.dumps(s, sort_keys=True))
    lines.append("")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path, stem: str) -> str:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir``; returns the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    md = markdown(report)
    (out_dir / f"{stem}.md").write_text(md, encoding="utf-8")
    return md
