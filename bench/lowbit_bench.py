#!/usr/bin/env python
"""Low-bit adapters: held-out accuracy and file size at 32, 8, 4, 2 and 1 bits.

    .venv/bin/python bench/lowbit_bench.py            # full run (~15 min on 2 cores)
    .venv/bin/python bench/lowbit_bench.py --quick    # smoke run (tiny sizes; results in bench/results/tmp)

Text: MiniLM + VADER movie-snippet sentiment (2,000 training examples, 1 epoch, 1,000 test), with
LoRA r=8 on query/value, a Pfeiffer bottleneck adapter (width 32, no biases, as the paper's
AdaptFormer: biases would stay fp32) after every feed-forward output,
and SHiRA-rand at LoRA r=8's budget; the classifier head is trained in full precision in every run.
Vision: EfficientNet-Lite0 + scikit-learn digits, 20 images per class, a 1×1-conv bottleneck
adapter (reduction 4, no biases) after every MBConv block, 3 seeds. Every precision uses the same learning rate
and steps (the paper's recipe: quantisation-aware training from the start, one codebook per tensor).

Sizes: bytes of the adapter's own tensors in ``adapter.safetensors`` (packed codes + μ, σ when
low-bit; the fp32 head excluded) and of the whole saved directory (head, JSON and header included).
Goals (issue): 1-bit adapter storage ≥ 31× smaller than fp32; 1-bit accuracy within 2 points of fp32.
Writes bench/results/lowbit_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import _tasks as T
from _provenance import describe
import torch
from safetensors import safe_open

import adapterkit as ak
from adapterkit.zoo.vision import digits, load_efficientnet_lite0

BITS = (32, 8, 4, 2, 1)
TEXT_LR = {"lora": 1e-2, "bottleneck": 3e-3, "shira-rand": 1e-2}  # LoRA/SHiRA: shira_quality's best on validation
VISION = dict(per_class=20, size=32, epochs=8, lr=5e-3, batch=20, seeds=(0, 1, 2))
HEADS = {"text": "classifier", "vision": "backbone._fc"}


def text_config(method: str, bits: int) -> ak.AdapterConfig:
    common = dict(modules_to_save=[HEADS["text"]], bits=bits)
    if method == "lora":
        return ak.LoRAConfig(r=T.R, alpha=T.LORA_ALPHA, target_modules=["query", "value"], **common)
    if method == "bottleneck":
        return ak.BottleneckConfig(bottleneck=32, bias=False, target_modules=r".*layer\.\d+\.output\.dense", **common)
    return ak.ShiraConfig(r=T.R, mask="rand", target_modules=["query", "value"], **common)


def sizes(model: torch.nn.Module, name: str, head: str) -> dict[str, int]:
    """Adapter-tensor bytes (the head copy excluded) and the whole directory's bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        ak.save(model, tmp, name)
        with safe_open(str(Path(tmp) / "adapter.safetensors"), framework="pt") as handle:
            own = sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size()
                      for k in handle.keys() if not k.startswith(head + "."))
        total = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    return {"adapter_bytes": own, "directory_bytes": total}


def run_text(quick: bool) -> list[dict]:
    n_fit, n_test = (96, 64) if quick else (2000, 1000)
    splits = T.sentiment_splits("movies", n_fit, 0, n_test)
    _, tokenizer = T.load_minilm()
    test = T.eval_batches(tokenizer, splits.test)
    rows = []
    for method in TEXT_LR:
        for bits in BITS:
            model, _ = T.load_minilm()
            batches = T.train_batches(tokenizer, splits.fit, seed=0)
            T.attach(model, text_config(method, bits), "a", batches, seed=0)
            fitted = T.fit(model, batches, TEXT_LR[method], seed=0)
            acc = ak.accuracy(model, test)
            rows.append({"task": "text", "method": method, "bits": bits, "seed": 0, "accuracy": acc,
                         "train_s": fitted["train_s"], **sizes(model, "a", HEADS["text"])})
            T.log(f"text {method} {bits}-bit: accuracy {acc:.3f}, {rows[-1]['adapter_bytes']:,} adapter bytes")
    return rows


def run_vision(quick: bool) -> list[dict]:
    per_class, seeds, epochs = (2, (0,), 1) if quick else (VISION["per_class"], VISION["seeds"], VISION["epochs"])
    train = digits("train", per_class=per_class, size=VISION["size"])
    test = digits("test", size=VISION["size"], test_size=100 if quick else 500).batches(100)
    rows = []
    for bits in BITS:
        for seed in seeds:
            model = load_efficientnet_lite0(10, seed=seed)
            torch.manual_seed(seed)
            ak.attach(model, ak.BottleneckConfig(reduction_factor=4, bias=False, target_modules=r"backbone\._blocks\.\d+",
                                                 modules_to_save=[HEADS["vision"]], bits=bits), "a")
            start = time.perf_counter()
            ak.train(model, train.batches(VISION["batch"], shuffle=True, seed=seed) * epochs, lr=VISION["lr"],
                     progress=False)
            rows.append({"task": "vision", "method": "conv bottleneck", "bits": bits, "seed": seed,
                         "accuracy": ak.accuracy(model, test), "train_s": time.perf_counter() - start,
                         **sizes(model, "a", HEADS["vision"])})
            T.log(f"vision {bits}-bit seed {seed}: accuracy {rows[-1]['accuracy']:.3f}")
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["task"], r["method"]) for r in rows):
        group = [r for r in rows if (r["task"], r["method"]) == key]
        fp32 = T.mean_spread([r["accuracy"] for r in group if r["bits"] == 32])
        fp32_bytes = next(r["adapter_bytes"] for r in group if r["bits"] == 32)
        for bits in BITS:
            cell = [r for r in group if r["bits"] == bits]
            acc = T.mean_spread([r["accuracy"] for r in cell])
            out.append({"task": key[0], "method": key[1], "bits": bits, "accuracy": acc,
                        "drop_vs_fp32_points": 100 * (fp32["mean"] - acc["mean"]),
                        "adapter_bytes": cell[0]["adapter_bytes"], "directory_bytes": cell[0]["directory_bytes"],
                        "smaller_than_fp32": fp32_bytes / cell[0]["adapter_bytes"],
                        "train_s": T.mean_spread([r["train_s"] for r in cell])["mean"]})
    return out


def markdown(report: dict) -> str:
    lines = ["# Low-bit adapters: accuracy and storage by precision", "",
             f"- {describe(report['meta'])}, {report['meta']['date']}, "
             f"run time {report['run_s']:.0f} s, torch threads {report['meta']['machine']['torch_threads']}",
             "- text: MiniLM + VADER movies (2,000 train, 1 epoch, 1,000 test, seed 0); vision: EfficientNet-Lite0 + "
             "digits (20 per class, 32 px, 8 epochs, 500 test, 3 seeds: mean ± sd)",
             "- adapter bytes: the adapter's own tensors (packed codes + 8 bytes of μ, σ per tensor when low-bit; "
             "biases fp32); the trained fp32 head is excluded there and included in the directory size", ""]
    rows = [[s["task"], s["method"], s["bits"], T.pm(s["accuracy"]), f"{s['drop_vs_fp32_points']:+.1f}",
             f"{s['adapter_bytes']:,}", f"{s['smaller_than_fp32']:.1f}×", f"{s['directory_bytes']:,}",
             f"{s['train_s']:.1f}"] for s in report["summary"]]
    lines += T.md_table(["task", "adapter", "bits", "accuracy %", "drop vs fp32 (points)", "adapter bytes",
                         "smaller than fp32", "directory bytes", "train s"], rows)
    lines += ["", "## Goals", ""]
    goal_rows = []
    for s in report["summary"]:
        if s["bits"] == 1:
            goal_rows.append([f"{s['task']} {s['method']}", f"{s['smaller_than_fp32']:.1f}×",
                              "met" if s["smaller_than_fp32"] >= 31 else "NOT met", f"{s['drop_vs_fp32_points']:+.1f}",
                              "met" if s["drop_vs_fp32_points"] <= 2 else "NOT met"])
    lines += T.md_table(["adapter", "1-bit storage vs fp32", "≥ 31×", "1-bit accuracy drop (points)", "≤ 2 points"],
                        goal_rows)
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("text", "vision"))
    args = parser.parse_args(argv)
    T.setup()
    start = time.perf_counter()
    rows = []
    if args.only in (None, "text"):
        rows += run_text(args.quick)
    if args.only in (None, "vision"):
        rows += run_vision(args.quick)
    report = {"meta": T.metadata(["lowbit_bench.py", *argv]), "rows": rows, "summary": summarise(rows),
              "text_lr": TEXT_LR, "vision": VISION, "run_s": time.perf_counter() - start}
    out = T.write_report(report, markdown(report), "lowbit_bench", args.quick)
    print(markdown(report))
    T.log(f"wrote {out}/lowbit_bench.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
