"""Peak-RSS measurements of the LoRA benchmark: each library in its own fresh subprocess.

The parent calls ``bench_rss``; that runs this file as a script once per library and run
(``python bench/lora_rss.py '<json spec>'``), so only one library is ever imported per process.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from _timing import PeakRSS, rss_bytes, summary
from lora_common import FUSION_LIBS, LIBS, Params, build_base, make_input, make_train_step, quiet_warnings, random_b_for_train
from lora_libs import FUSION_LIBRARIES

RESULT_TAG = "__LORA_BENCH_RESULT__"
MODES = ("train", "fuse")


def warm_up_autograd() -> None:
    """Touch torch's optimizer/autograd machinery first: its lazy imports (e.g. torch._dynamo on
    the first AdamW) add ~70 MB of RSS, which `import peft` happens to pay up front but
    `import adapterkit` does not; without this the first library would be charged for it."""
    warm = nn.Parameter(torch.zeros(4))
    warm_opt = torch.optim.AdamW([warm])
    (nn.Linear(4, 4)(warm) * warm).sum().backward()
    warm_opt.step()


def peak_above_baseline(work: Callable[[], Any]) -> dict[str, int]:
    """Peak RSS while ``work`` runs, and the RSS it still holds afterwards, above the RSS before."""
    gc.collect()
    baseline = rss_bytes()
    with PeakRSS() as peak:
        work()
    gc.collect()
    return {"baseline": baseline, "peak": peak.peak, "held": rss_bytes() - baseline, "delta": peak.peak - baseline}


def rss_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs inside a fresh interpreter. Mode "train": attach + a few training steps; mode "fuse":
    fuse "a", switch to "b", switch back to "a" (the adapters are attached before the window)."""
    quiet_warnings()
    p = Params.from_dict(spec["params"])
    setting, lib, mode = spec["setting"], FUSION_LIBRARIES[spec["lib"]], spec["mode"]
    __import__(lib.module)
    warm_up_autograd()
    torch.manual_seed(p.seed)
    base = build_base(setting, p)
    inp = make_input(setting, p, base)
    out: dict[str, Any] = {"setting": setting, "lib": lib.name, "mode": mode}
    if mode == "train":

        def attach_and_train() -> None:
            model = lib.attach(base, lib.config(setting, p, random_b_for_train(setting)), "a")
            model.train()
            step = make_train_step(model, setting, inp)
            for _ in range(p.rss_train_steps):
                step()

        out.update(peak_above_baseline(attach_and_train))
    elif mode == "fuse":
        model = lib.attach(base, lib.config(setting, p, True), "a")
        lib.add(model, lib.config(setting, p, True), "b")

        def fuse_and_switch() -> None:
            with torch.no_grad():
                lib.fuse(model, "a")
                lib.switch(model, "b")
                lib.switch(model, "a")

        out.update(peak_above_baseline(fuse_and_switch))
    else:
        raise ValueError(mode)
    return out


def run_rss(setting: str, lib: str, mode: str, p: Params) -> dict[str, Any]:
    """One worker process; its result dict."""
    spec = {"setting": setting, "lib": lib, "mode": mode, "params": dataclasses.asdict(p)}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
        capture_output=True, text=True, env=os.environ.copy(), timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"RSS worker {setting}/{lib}/{mode} failed:\n{proc.stderr[-4000:]}")
    line = next(l for l in reversed(proc.stdout.splitlines()) if l.startswith(RESULT_TAG))
    return json.loads(line[len(RESULT_TAG):])


def bench_rss(setting: str, mode: str, p: Params, runs: int) -> dict[str, Any]:
    """``runs`` workers per library (alternating which goes first); peak RSS above baseline. Mode
    "fuse" also measures adapterkit with ``exact=False``."""
    libs = FUSION_LIBS if mode == "fuse" else LIBS
    raw: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
    for i in range(runs):
        for lib in libs if i % 2 == 0 else libs[::-1]:
            raw[lib].append(run_rss(setting, lib, mode, p))
    result: dict[str, Any] = {"unit": "bytes", "runs": runs}
    for lib in libs:
        result[lib] = summary([r["delta"] for r in raw[lib]])
        result[lib]["held_after"] = summary([r["held"] for r in raw[lib]])["median"]
        result[lib]["baseline_rss"] = [r["baseline"] for r in raw[lib]]
        result[lib]["peak_rss"] = [r["peak"] for r in raw[lib]]
    return result


def held_while_fused(fuse_rss: dict[str, Any]) -> dict[str, Any]:
    """The "rss_fuse_held" metric: RSS each library still holds after the fuse/switch window."""
    held: dict[str, Any] = {"unit": "bytes", "runs": fuse_rss["runs"]}
    for lib in FUSION_LIBS:
        if lib in fuse_rss:
            held[lib] = {"median": fuse_rss[lib]["held_after"]}
    return held


if __name__ == "__main__":
    print(RESULT_TAG + json.dumps(rss_worker(json.loads(sys.argv[1]))), flush=True)
