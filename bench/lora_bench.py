#!/usr/bin/env python
"""LoRA benchmark: adapterkit side by side with the real ``peft`` package, in the same run.

    .venv/bin/python bench/lora_bench.py            # full run (~5-10 min on 2 CPU cores)
    .venv/bin/python bench/lora_bench.py --quick    # smoke run (small stack, few repeats)

Two model settings:

* ``minilm``: all-MiniLM-L6-v2 (BertModel), LoRA r=8, alpha=16 on ``query``/``value``;
  batch of 32 random-token sentences of 32 tokens.
* ``stack``: ``nn.Sequential`` of 4096x4096 ``nn.Linear`` (fp32, no bias), LoRA r=32, alpha=64
  on every layer, input 8x4096; plus a bf16 copy for fuse/unfuse/switch.

Metrics (medians after warm-up, ``time.perf_counter``, libraries alternated round by round):
attach, train step (forward+backward+AdamW), peak RSS while training (each library in its own
fresh subprocess), fuse, unfuse, switch (fused a -> fused b), adapter load (cold and warm),
inference forward unfused vs fused. Fuse, unfuse and switch are timed for adapterkit twice: with
``exact=False`` (like for like with peft: both subtract on unfuse and keep no copy) and on its
default exact path, whose host memory (one copy of each fused weight) is recorded beside it.

Sanity checks (asserts): adapterkit and peft hold the very same A/B weights (adapterkit loads
the directories peft saved) and their unfused, fused and switched outputs agree; after
``ak.unfuse`` the base weights are bit-identical to the originals.

Writes ``bench/results/lora_bench.json`` and ``bench/results/lora_bench.md`` (``--quick``:
``lora_bench.quick.*``, not meant to be committed).

Modules: ``lora_common`` (parameters, models, inputs), ``lora_libs`` (one adapter object per
library), ``lora_cases`` (attach, train, load), ``lora_fusion`` (fuse, unfuse, switch,
inference, output checks), ``lora_rss`` (peak-RSS subprocesses), ``lora_report`` (JSON and
Markdown), ``_timing`` (timing, memory and contention helpers).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from _timing import CpuWatch, hardware, now_iso, wait_until_quiet  # noqa: E402
from lora_cases import bench_attach, bench_load, bench_train  # noqa: E402
from lora_common import SETTINGS, Params, build_base, make_input, quiet_warnings, random_b_for_train  # noqa: E402
from lora_fusion import bench_fusion  # noqa: E402
from _provenance import provenance  # noqa: E402
from lora_report import QUIET, versions, write_report  # noqa: E402
from lora_rss import bench_rss, held_while_fused  # noqa: E402


class Sections:
    """Runs the benchmark section by section, logging each and recording in ``contention`` how
    many cores other processes kept busy meanwhile. A disturbed timing section is re-run after
    waiting for a quiet machine, ``retries`` times at most."""

    def __init__(self, retries: int) -> None:
        self.retries = retries
        self.started = time.perf_counter()
        self.contention: dict[str, Any] = {}

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s] {msg}", flush=True)

    def wait_until_quiet(self) -> dict[str, Any]:
        return wait_until_quiet(QUIET, log=self.log)

    def run(self, name: str, fn: Callable[[], Any], retry: bool = True) -> Any:
        """Run one section; ``retry=False`` for sections that measure memory, not time."""
        for attempt in range(1 + (self.retries if retry else 0)):
            self.log(name + (f" (retry {attempt})" if attempt else ""))
            watch = CpuWatch()
            out = fn()
            stats = watch.stop()
            stats["attempt"] = attempt + 1
            stats["timing_section"] = retry
            self.contention[name] = stats
            busy = stats["other_processes_cores"]
            if busy <= QUIET or not retry:
                break
            self.log(f"  other processes kept {busy:.2f} cores busy during {name}")
            if attempt < self.retries:
                self.wait_until_quiet()
        return out


def run_setting(setting: str, p: Params, sections: Sections, tmp: Path) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """All measurements of one model setting: ``{result key: (results, sanity)}``; the stack
    setting also yields "stack_bf16" when bf16 is on."""
    key = "minilm" if setting == "minilm" else "stack_fp32"
    base = build_base(setting, p)
    inp = make_input(setting, p, base)
    res: dict[str, Any] = {}
    sanity: dict[str, Any] = {}
    res["attach"] = sections.run(f"{key}: attach", lambda: bench_attach(setting, base, p, random_b_for_train(setting)))
    res["train_step"] = sections.run(f"{key}: train step", lambda: bench_train(setting, base, inp, p, sanity))
    gc.collect()
    fusion_reps = (p.fuse_mini, p.switch_mini) if setting == "minilm" else (p.fuse_stack, p.switch_stack)
    fres, fsan, pair = sections.run(f"{key}: fuse / unfuse / switch / inference", lambda: bench_fusion(
        setting, base, inp, p, torch.float32, *fusion_reps, tol=1e-4, infer=True, tmp=tmp / f"{key}_peft"))
    res.update(fres)
    sanity.update(fsan)
    res.update(sections.run(f"{key}: adapter load", lambda: bench_load(setting, base, pair, p, tmp / f"{key}_load")))
    del pair
    gc.collect()
    if p.rss:  # memory, not time: no retries
        res["rss_train"] = sections.run(f"{key}: peak RSS subprocesses (train)",
                                        lambda: bench_rss(setting, "train", p, p.rss_runs), retry=False)
        if setting == "stack":
            res["rss_fuse"] = sections.run(f"{key}: peak RSS subprocesses (fuse/switch)",
                                           lambda: bench_rss(setting, "fuse", p, p.rss_runs), retry=False)
            res["rss_fuse_held"] = held_while_fused(res["rss_fuse"])
    out = {key: (res, sanity)}
    if setting == "stack" and p.bf16:
        bres, bsan, pair = sections.run("stack_bf16: fuse / unfuse / switch", lambda: bench_fusion(
            setting, base, inp, p, torch.bfloat16, p.fuse_bf16, p.switch_bf16, tol=3e-2, infer=False,
            tmp=tmp / "stack_bf16_peft"))
        del pair
        out["stack_bf16"] = (bres, bsan)
    return out


def setting_titles(p: Params) -> dict[str, str]:
    """Result key -> the heading of its Markdown table."""
    stack_name = f"{p.stack_layers}× Linear {p.stack_width}×{p.stack_width}"
    return {
        "minilm": f"MiniLM-L6 (BertModel), LoRA r={p.mini_r} alpha={p.mini_alpha:g} on query/value, batch {p.mini_batch}×{p.mini_seq} tokens, fp32",
        "stack_fp32": f"{stack_name} (fp32, no bias), LoRA r={p.stack_r} alpha={p.stack_alpha:g} on every layer, input {p.stack_batch}×{p.stack_width}",
        "stack_bf16": f"{stack_name} in bf16 (LoRA factors fp32 in both libraries), fuse/unfuse/switch only",
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fast smoke run: small stack, few repeats")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 variant of the stack")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--only", choices=list(SETTINGS), help="run one model setting only")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--no-wait", action="store_true",
                        help="start at once even if other processes keep the CPUs busy (default: wait up to 10 min)")
    parser.add_argument("--retries", type=int, default=2,
                        help="re-run a timing section (after waiting for quiet) when other processes were busy during it")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    quiet_warnings()
    import adapterkit  # noqa: F401
    import peft  # noqa: F401

    p = Params.quick_params() if args.quick else Params()
    p.bf16 = p.bf16 and not args.no_bf16
    p.rss = p.rss and not args.no_rss
    sections = Sections(args.retries)
    report: dict[str, Any] = {
        "meta": {
            "date": now_iso(), "hardware": hardware(), "versions": versions(), "provenance": provenance(),
            "torch_threads": torch.get_num_threads(),
            "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS")},
            "params": dataclasses.asdict(p), "settings": setting_titles(p),
            "method": "time.perf_counter around each call with the GC disabled; libraries alternated round by round; "
                      "warm-up rounds dropped; medians reported; peak RSS measured in a fresh subprocess per library "
                      "(psutil sampling every 2 ms + ru_maxrss) minus the RSS right after the base model is built",
            "contention": sections.contention,
        },
        "results": {},
        "sanity": {},
    }
    if not args.no_wait:
        sections.contention["start"] = sections.wait_until_quiet()

    with tempfile.TemporaryDirectory(prefix="lora_bench_") as tmpdir:
        for setting in SETTINGS:
            if args.only and args.only != setting:
                continue
            for key, (res, sanity) in run_setting(setting, p, sections, Path(tmpdir)).items():
                report["results"][key] = res
                report["sanity"][key] = sanity
            gc.collect()

    report["meta"]["wall_s"] = time.perf_counter() - sections.started
    stem = "lora_bench.quick" if p.quick else "lora_bench"
    print(write_report(report, args.out_dir, stem))
    sections.log(f"wrote {args.out_dir / (stem + '.json')} and {stem}.md")


if __name__ == "__main__":
    main()
