"""The LoRA benchmark's report: run metadata, and writing ``<stem>.json`` and ``<stem>.md``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from lora_common import AK, PEFT

QUIET = 0.15  # other processes may keep at most this many cores busy during a timing section

ROWS = [  # (result key, Markdown label, unit) in table order; missing results are skipped
    ("attach", "attach (ak.attach vs get_peft_model)", "ms"),
    ("train_step", "train step (fwd+bwd+AdamW)", "ms"),
    ("rss_train", "peak RSS during attach+training, above base model", "MiB"),
    ("rss_fuse", "peak RSS during fuse a, switch b, switch a (above model+adapters)", "MiB"),
    ("rss_fuse_held", "RSS still held while fused (after the switches)", "MiB"),
    ("fuse", "fuse a (ak.fuse vs merge_adapter)", "ms"),
    ("unfuse", "unfuse (ak.unfuse vs unmerge_adapter)", "ms"),
    ("switch", "**switch fused a → fused b**", "ms"),
    ("adapterkit_unfuse_then_fuse", "adapterkit unfuse + fuse (reference for switch)", "ms"),
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


def git_info(root: Path) -> dict[str, Any]:
    """The adapterkit commit measured, and whether src/ had uncommitted changes."""

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [l for l in git("status", "--porcelain", "--", "src").splitlines() if l.strip()]
    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "src_last_commit": git("log", "-1", "--format=%H", "--", "src"),
            "src_last_subject": git("log", "-1", "--format=%s", "--", "src"),
            "src_uncommitted_changes": dirty}


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


def header_lines(report: dict[str, Any]) -> list[str]:
    """Title, machine, versions, source commit, contention check and the key number."""
    meta = report["meta"]
    hw, ver, src = meta["hardware"], meta["versions"], meta["adapterkit_git"]
    lines = [
        f"# LoRA benchmark: adapterkit vs peft{' (QUICK smoke run)' if meta['params']['quick'] else ''}",
        "",
        f"- machine: {hw['cpu_model']}, {hw['usable_cores']} usable cores ({hw['logical_cores']} logical), "
        f"{hw['ram_total_gib']} GiB RAM, no GPU; torch threads: {meta['torch_threads']}",
        f"- versions: adapterkit {ver['adapterkit']}, peft {ver['peft']}, torch {ver['torch']}, "
        f"transformers {ver['transformers']}, Python {ver['python']}",
        f"- adapterkit source: HEAD {src['commit'][:10]}; src/ last changed in "
        f"{src.get('src_last_commit', '')[:10]} ({src.get('src_last_subject', '')})"
        + (f", with uncommitted changes in {', '.join(l.split()[-1] for l in src['src_uncommitted_changes'])}"
           if src["src_uncommitted_changes"] else ""),
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
    sw = report["results"].get("stack_fp32", {}).get("switch")
    if sw:
        a_ms, p_ms = sw[AK]["median"] * 1e3, sw[PEFT]["median"] * 1e3
        ratio = p_ms / a_ms
        lines.append(f"- **key number** — switch fused a → fused b on the fp32 Linear stack: adapterkit {a_ms:.1f} ms, "
                     f"peft (unmerge + set_adapter + merge) {p_ms:.1f} ms: **{ratio:.1f}× faster** "
                     + (f"(project goal ≥ 4×: {'met' if ratio >= 4 else 'NOT met'})"
                        if (meta["params"]["stack_width"], meta["params"]["stack_r"]) == (4096, 32)
                        else "(the ≥ 4× goal is stated for 4096×4096 at r=32; this stack is smaller)"))
    lines.append("")
    return lines


def table_lines(title: str, res: dict[str, Any]) -> list[str]:
    """One setting's table (medians, ratio, repeats) and its footnotes."""
    lines = [f"## {title}", "", "| metric | adapterkit median | peft median | ratio peft/adapterkit | repeats |",
             "|---|---:|---:|---:|---:|"]
    for key, label, unit in ROWS:
        m = res.get(key)
        if m is None:
            continue
        a = m.get(AK, {}).get("median") if AK in m else None
        b = m.get(PEFT, {}).get("median") if PEFT in m else None
        ratio = f"{b / a:.2f}×" if a and b else "—"
        reps = m.get("repeats", m.get("runs", ""))
        lines.append(f"| {label} [{unit}] | {fmt(a, unit)} | {fmt(b, unit)} | {ratio} | {reps} |")
    if "infer_base_reference" in res:
        lines.append("")
        lines.append(f"Plain base model forward (no adapters): {fmt(res['infer_base_reference']['base']['median'], 'ms')} ms.")
    if "switch" in res and "peft_breakdown" in res["switch"]:
        bd = res["switch"]["peft_breakdown"]
        lines.append("peft switch breakdown (medians): " + ", ".join(
            f"{k.split('.', 1)[1]} {fmt(v['median'], 'ms')} ms" for k, v in bd.items()) + ".")
    lines.append("")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The whole Markdown report."""
    lines = header_lines(report)
    for key, title in report["meta"]["settings"].items():
        if report["results"].get(key):
            lines += table_lines(title, report["results"][key])
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
