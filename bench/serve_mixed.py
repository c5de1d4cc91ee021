"""Serving many LoRA adapters from one base model: mixed-adapter batches against switching (engine level).

Base: all-MiniLM-L6-v2 as a sentence classifier (``adapterkit.zoo.models.load_sentence_classifier``:
mean pooling, a linear ``classifier`` head), fp32, eval, no gradients. N = 1, 8, 64, 256 LoRA adapters
(r=8, alpha=16, ``query``/``value`` of the 6 layers, B random N(0, 0.02), and each with its own
classifier head in ``modules_to_save``, perturbed per adapter so heads differ). peft gets the very same
adapters: each is written with ``ak.export`` (PEFT format) and loaded with ``PeftModel.from_pretrained``
/ ``load_adapter``.

Traffic: windows of 32 requests (a request = one VADER tweet of at most 16 words, real text), each
request's adapter drawn uniformly from the N; the same windows for every strategy. Tokenisation
happens before timing (the same for all). Strategies, in the same run, rotated round by round:

- ``per_row``: ``ak.per_row`` mixed batch, the window padded into one forward (base GEMMs once,
  each row its own adapter; many small LoRA groups gathered into one bmm);
- ``per_row_grouped``: the same with the gathered path off (one matmul pair per adapter group), to
  show what gathering adds;
- ``switch_request``: the issue's baseline: per request ``ak.switch`` to its adapter (fused; skipped
  when it is already fused) and a forward of that request alone;
- ``switch_group``: a stronger baseline: per adapter group of the window, one switch and one forward
  of the group's requests;
- ``peft_mixed``: peft's mixed batch, ``model(**batch, adapter_names=[...])`` on a PeftModel.

A request's latency is the time from the window's start until the forward that answers it finishes
(the window arrives at once). Throughput = requests / summed window times. Per N and strategy the
JSON keeps every repeat; tables show medians over repeats of throughput, p50 and p99. The first
window's logits of every strategy are compared with ``per_row``'s (allclose, atol = rtol = 1e-4;
fused weights round differently from unfused adds) and the result is stored.

    .venv/bin/python bench/serve_mixed.py            # the full run (a few minutes on an idle machine)
    .venv/bin/python bench/serve_mixed.py --quick    # smoke: N = 1, 8, small windows, results/tmp/
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import _tasks as T
import _timing
import adapterkit as ak
from _provenance import describe
from adapterkit.core import rows as ak_rows
from adapterkit.core.state import get_state
from adapterkit.zoo.models import load_sentence_classifier

STEM = "serve_mixed"
TARGETS = ["query", "value"]
HEAD = ["classifier"]
STRATEGIES = ("per_row", "per_row_grouped", "switch_request", "switch_group", "peft_mixed")
ATOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Options:
    counts: tuple[int, ...] = (1, 8, 64, 256)
    window: int = 32
    windows: int = 8  # per repeat
    repeats: int = 3
    warmup: int = 1  # untimed windows per strategy before the repeats
    threads: int = 1
    max_words: int = 16
    max_length: int = 64
    seed: int = 0

    @classmethod
    def quick(cls) -> "Options":
        return cls(counts=(1, 8), window=8, windows=2, repeats=1)


@dataclasses.dataclass
class Window:
    """One window of requests, tokenised for every strategy."""

    names: list[str]
    batch: dict[str, torch.Tensor]  # all requests, padded
    singles: list[dict[str, torch.Tensor]]  # each request alone
    groups: list[tuple[str, list[int], dict[str, torch.Tensor]]]  # adapter, its requests, padded


# -- models ----------------------------------------------------------------------------------
def build(n: int, options: Options, work: Path) -> tuple[torch.nn.Module, torch.nn.Module, Any, list[str]]:
    """The adapterkit model with N adapters, and a PeftModel holding the same N (via PEFT files)."""
    import peft

    model, tokenizer = load_sentence_classifier(num_labels=2, seed=options.seed)
    model.eval()
    names = [f"task{i:03d}" for i in range(n)]
    torch.manual_seed(options.seed)
    config = ak.LoRAConfig(r=8, alpha=16.0, target_modules=TARGETS, modules_to_save=HEAD, init="random")
    for name in names:
        ak.attach(model, config, name)
        head = get_state(model).host("classifier").layer(name)
        with torch.no_grad():
            for param in head.parameters():  # every task its own head
                param.add_(torch.randn_like(param) * 0.05)
    for name in names:
        ak.export(model, name, work / name)
    base, _ = load_sentence_classifier(num_labels=2, seed=options.seed)
    served = peft.PeftModel.from_pretrained(base.eval(), str(work / names[0]), adapter_name=names[0])
    for name in names[1:]:
        served.load_adapter(str(work / name), adapter_name=name)
    return model, served.eval(), tokenizer, names


def make_windows(texts: list[str], names: list[str], tokenizer: Any, options: Options, count: int,
                 rng: random.Random) -> list[Window]:
    def tok(chunk: list[str]) -> dict[str, torch.Tensor]:
        out = tokenizer(chunk, padding=True, truncation=True, max_length=options.max_length, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    windows = []
    for _ in range(count):
        chosen = [texts[rng.randrange(len(texts))] for _ in range(options.window)]
        adapters = [rng.choice(names) for _ in range(options.window)]
        grouped: dict[str, list[int]] = {}
        for i, name in enumerate(adapters):
            grouped.setdefault(name, []).append(i)
        groups = [(name, idx, tok([chosen[i] for i in idx])) for name, idx in grouped.items()]
        windows.append(Window(adapters, tok(chosen), [tok([t]) for t in chosen], groups))
    return windows


# -- strategies: each returns (latency of every request in s, logits in request order) ---------
Run = Callable[[Window], tuple[list[float], torch.Tensor]]


def strategies(model: torch.nn.Module, served: torch.nn.Module) -> dict[str, tuple[Callable[[], None], Run]]:
    """name -> (untimed set-up before a series of windows, the timed window)."""

    def unfused() -> None:
        if ak.fused_adapters(model):
            ak.unfuse(model)

    def per_row(w: Window) -> tuple[list[float], torch.Tensor]:
        start = time.perf_counter()
        with ak.per_row(model, w.names):
            logits = model(**w.batch)["logits"]
        return [time.perf_counter() - start] * len(w.names), logits

    def per_row_grouped(w: Window) -> tuple[list[float], torch.Tensor]:
        before, ak_rows.GATHER_MIN_GROUPS = ak_rows.GATHER_MIN_GROUPS, 10**9
        try:
            return per_row(w)
        finally:
            ak_rows.GATHER_MIN_GROUPS = before

    def fused_now() -> str | None:
        fused = ak.fused_adapters(model)
        return fused[0][0] if fused else None

    def switch_request(w: Window) -> tuple[list[float], torch.Tensor]:
        start, latencies, outs = time.perf_counter(), [], []
        for name, single in zip(w.names, w.singles):
            if fused_now() != name:
                ak.switch(model, name)
            outs.append(model(**single)["logits"])
            latencies.append(time.perf_counter() - start)
        return latencies, torch.cat(outs)

    def switch_group(w: Window) -> tuple[list[float], torch.Tensor]:
        start = time.perf_counter()
        latencies, logits = [0.0] * len(w.names), [None] * len(w.names)
        for name, idx, batch in w.groups:
            if fused_now() != name:
                ak.switch(model, name)
            out = model(**batch)["logits"]
            done = time.perf_counter() - start
            for j, i in enumerate(idx):
                latencies[i], logits[i] = done, out[j]
        return latencies, torch.stack(logits)

    def peft_mixed(w: Window) -> tuple[list[float], torch.Tensor]:
        start = time.perf_counter()
        logits = served(**w.batch, adapter_names=list(w.names))["logits"]
        return [time.perf_counter() - start] * len(w.names), logits

    nothing = lambda: None  # noqa: E731
    return {"per_row": (unfused, per_row), "per_row_grouped": (unfused, per_row_grouped),
            "switch_request": (nothing, switch_request), "switch_group": (nothing, switch_group),
            "peft_mixed": (nothing, peft_mixed)}


def timed_series(setup: Callable[[], None], run: Run, windows: list[Window]) -> tuple[list[float], float]:
    """Every request's latency over the windows, and the summed window time (gc off meanwhile)."""
    setup()
    gc.collect()
    gc.disable()
    try:
        latencies, total = [], 0.0
        for w in windows:
            lat, _ = run(w)
            latencies.extend(lat)
            total += max(lat)
        return latencies, total
    finally:
        gc.enable()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def measure(n: int, options: Options, texts: list[str], work: Path) -> dict[str, Any]:
    T.log(f"N={n}: building {n} adapters (adapterkit + peft)")
    started = time.perf_counter()
    model, served, tokenizer, names = build(n, options, work / f"n{n}")
    build_s = time.perf_counter() - started
    rng = random.Random(options.seed * 1000 + n)
    warm = make_windows(texts, names, tokenizer, options, max(1, options.warmup), rng)
    series = [make_windows(texts, names, tokenizer, options, options.windows, rng) for _ in range(options.repeats)]
    runs = strategies(model, served)
    agreement: dict[str, Any] = {}
    with torch.no_grad():
        first: dict[str, torch.Tensor] = {}
        for name, (setup, run) in runs.items():
            setup()
            for w in warm:
                _, logits = run(w)
                first.setdefault(name, logits)
        for name, logits in first.items():
            diff = float((logits - first["per_row"]).abs().max())
            agreement[name] = {"max_abs_diff_vs_per_row": diff,
                               "allclose": bool(torch.allclose(logits, first["per_row"], atol=ATOL, rtol=ATOL))}
        samples: dict[str, dict[str, list[float]]] = {s: {"throughput_rps": [], "p50_ms": [], "p99_ms": []} for s in runs}
        watch = _timing.CpuWatch()
        for r, windows in enumerate(series):
            order = list(runs)[r % len(runs):] + list(runs)[: r % len(runs)]
            for name in order:
                latencies, total = timed_series(*runs[name], windows)
                samples[name]["throughput_rps"].append(len(latencies) / total)
                samples[name]["p50_ms"].append(1e3 * percentile(latencies, 50))
                samples[name]["p99_ms"].append(1e3 * percentile(latencies, 99))
        contention = watch.stop()
    distinct = [len(w.groups) for ws in series for w in ws]
    result = {
        "adapters": n, "build_s": round(build_s, 2), "contention": contention, "agreement": agreement,
        "all_agree": all(a["allclose"] for a in agreement.values()),
        "distinct_adapters_per_window": statistics.fmean(distinct),
        "strategies": {s: {k: {"median": statistics.median(v), "samples": v} for k, v in m.items()}
                       for s, m in samples.items()},
    }
    T.log(f"N={n}: " + ", ".join(f"{s} {result['strategies'][s]['throughput_rps']['median']:.1f} req/s" for s in runs)
          + f"; logits agree: {result['all_agree']}")
    del model, served
    gc.collect()
    return result


# -- report ----------------------------------------------------------------------------------
def goals(results: dict[str, Any]) -> dict[str, Any]:
    def rps(n: str, s: str) -> float:
        return results[n]["strategies"][s]["throughput_rps"]["median"]

    out: dict[str, Any] = {"per_row_over_switch_request": {}, "per_row_over_switch_group": {},
                           "per_row_over_peft_mixed": {}}
    for n in results:
        out["per_row_over_switch_request"][n] = rps(n, "per_row") / rps(n, "switch_request")
        out["per_row_over_switch_group"][n] = rps(n, "per_row") / rps(n, "switch_group")
        out["per_row_over_peft_mixed"][n] = rps(n, "per_row") / rps(n, "peft_mixed")
    at64 = out["per_row_over_switch_request"].get("64")
    out["goal_3x_switch_request_at_64"] = None if at64 is None else at64 >= 3.0
    out["goal_ahead_of_peft_every_n"] = all(v > 1.0 for v in out["per_row_over_peft_mixed"].values())
    return out


def markdown(report: dict[str, Any]) -> str:
    meta, results, g = report["meta"], report["results"], report["goals"]
    o = meta["options"]
    lines = [f"# Serving many LoRA adapters: mixed-adapter batches ({meta['date']})", "",
             f"Measured at {describe(meta)}; torch threads {o['threads']}; windows of {o['window']} requests, "
             f"{o['windows']} windows x {o['repeats']} repeats; medians over repeats.", "",
             "MiniLM sentence classifier, LoRA r=8 on query/value + a classifier head per adapter (modules_to_save); "
             "adapters drawn uniformly per request.", ""]
    rows = []
    for n, r in results.items():
        for s in STRATEGIES:
            m = r["strategies"][s]
            rows.append([n, s, f"{m['throughput_rps']['median']:.1f}", f"{m['p50_ms']['median']:.1f}",
                         f"{m['p99_ms']['median']:.1f}", "yes" if r["agreement"][s]["allclose"] else "**no**"])
    lines += T.md_table(["N", "strategy", "req/s", "p50 ms", "p99 ms", "logits = per_row"], rows)
    lines += ["", "| N | per_row / switch_request | per_row / switch_group | per_row / peft_mixed | distinct adapters / window |",
              "|---|---|---|---|---|"]
    for n, r in results.items():
        lines.append(f"| {n} | {g['per_row_over_switch_request'][n]:.2f}x | {g['per_row_over_switch_group'][n]:.2f}x | "
                     f"{g['per_row_over_peft_mixed'][n]:.2f}x | {r['distinct_adapters_per_window']:.1f} |")
    lines += ["", f"- Goal per_row >= 3x switch_request at N=64: {g['goal_3x_switch_request_at_64']}",
              f"- Goal per_row ahead of peft's mixed batch at every N: {g['goal_ahead_of_peft_every_n']}",
              f"- Other processes kept {max(r['contention']['other_processes_cores'] for r in results.values()):.2f} "
              "cores busy at most during a measurement (contention check).", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    ns = [int(n) for n in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for s in STRATEGIES:
        left.plot(ns, [results[str(n)]["strategies"][s]["throughput_rps"]["median"] for n in ns], marker="o", label=s)
        right.plot(ns, [results[str(n)]["strategies"][s]["p99_ms"]["median"] for n in ns], marker="o", label=s)
    for ax, label in ((left, "throughput (requests/s)"), (right, "p99 latency (ms)")):
        ax.set_xscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("distinct adapters in the traffic (N)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle("MiniLM + LoRA r=8: mixed-adapter batches vs switching vs peft")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny sizes (results/tmp)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--counts", type=int, nargs="+", help="numbers of adapters (default 1 8 64 256)")
    for field in ("window", "windows", "repeats"):
        parser.add_argument(f"--{field}", type=int, help=f"override {field} (default {getattr(Options(), field)})")
    args = parser.parse_args(argv)
    options = Options.quick() if args.quick else Options()
    changes = {f: getattr(args, f) for f in ("window", "windows", "repeats") if getattr(args, f) is not None}
    if args.counts:
        changes["counts"] = tuple(args.counts)
    options = dataclasses.replace(options, threads=args.threads, **changes)
    T.setup()
    torch.set_num_threads(options.threads)
    import peft

    texts = [t for t in T.vader("tweets", split="all").texts if len(t.split()) <= options.max_words]
    meta = T.metadata([Path(__file__).name, *argv])
    meta["versions"]["peft"] = peft.__version__
    meta["options"] = dataclasses.asdict(options)
    meta["hardware"] = _timing.hardware()
    meta["timing"] = ("tokenisation before timing; latency = window start -> end of the forward answering the request; "
                      "throughput = requests / summed window times; gc off while timing")
    with tempfile.TemporaryDirectory(prefix="serve_mixed_") as tmp:
        results = {str(n): measure(n, options, texts, Path(tmp)) for n in options.counts}
    report = {"meta": meta, "results": results, "goals": goals(results)}
    out = T.write_report(report, markdown(report), STEM, args.quick)
    plot(report, out / f"{STEM}.png")
    T.log(f"wrote {out / STEM}.json/.md/.png")


if __name__ == "__main__":
    main(sys.argv[1:])
