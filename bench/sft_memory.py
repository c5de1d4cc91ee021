"""Peak memory of LT-SFT training on Gemma-3-270M's decoder stack, one fresh process per variant.

Variants (same batches, same number of optimizer steps, same scalar loss on the last hidden state):

* ``phase1``    — adapterkit phase 1: ``ak.attach(..., calibration=batches)``: dense AdamW on every
                  targeted parameter, the global top-K selection and the rewind;
* ``phase2``    — adapterkit phase 2: AdamW on the K values only (sparse parametrisation);
* ``reference`` — composable-sft's phase 2, reimplemented from its description: dense AdamW over every
                  maskable parameter, a dense bool mask per parameter, gradients multiplied by the mask
                  after backward, a θ₀ copy of every maskable parameter (on the CPU, as it keeps it);
* ``full``      — full fine-tuning: dense AdamW over every parameter.

The decoder stack (``model.model``) is the body; the 262k-token LM head is left out (it shares the
embedding table). Every parameter of the body is maskable (embeddings and RMSNorm scales included),
K = ``density`` × all of them. phase2 and reference use a seeded *random* support of K entries
(memory does not depend on which entries, and a random support touches every tensor: the worst case
for the sparse forward, which runs each touched module on ``base + Δ``).

Peak RSS is measured around the variant's work in a fresh ``python`` process per variant: the Linux
high-water mark (``VmHWM``) reset through ``/proc/self/clear_refs`` when allowed, and psutil sampling
every 2 ms (plus ``ru_maxrss`` whenever it moves) otherwise; reported as the absolute peak and as the
peak above the RSS with the model loaded. Goal: phase2 ≤ 0.6 × reference and ≤ full.

    python bench/sft_memory.py            # Gemma-3-270M, 4 × 64 tokens of VADER movie reviews, 4 steps
    python bench/sft_memory.py --quick    # a tiny random Gemma3 (seconds; writes to bench/results/tmp/)

Writes ``bench/results/sft_memory.{json,md,png}`` (``--quick``: ``bench/results/tmp/sft_memory.quick.*``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _provenance import describe, provenance  # noqa: E402
from _timing import PeakRSS, hardware, maxrss_bytes, now_iso, rss_bytes  # noqa: E402

RESULT_TAG = "__SFT_MEMORY_RESULT__"
VARIANTS = {
    "phase1": "adapterkit phase 1 (dense AdamW on every targeted tensor, selection, rewind)",
    "phase2": "adapterkit phase 2 (AdamW on the K values)",
    "reference": "composable-sft phase 2 (dense AdamW, bool masks, masked grads, θ₀ copy)",
    "full": "full fine-tuning (dense AdamW)",
}
GOAL_RATIO = 0.6


@dataclasses.dataclass
class Params:
    quick: bool = False
    batch: int = 4
    seq: int = 64
    steps: int = 4
    density: float = 0.01
    lr: float = 1e-5
    seed: int = 0
    threads: int = 2

    @classmethod
    def quick_params(cls) -> "Params":
        return cls(quick=True, batch=2, seq=16, steps=2)


# -- the worker (one variant, in its own process) ---------------------------------------------
def build_body(p: Params) -> Any:
    import torch

    if p.quick:
        from transformers import Gemma3TextConfig, Gemma3TextModel

        torch.manual_seed(p.seed)
        config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                  max_position_embeddings=128, sliding_window=64)
        return Gemma3TextModel(config).eval()
    from adapterkit.zoo.llm import load_lm

    model, _ = load_lm("gemma3")
    body = model.model
    del model  # the LM head only shares the embedding table; the body keeps it alive
    gc.collect()
    return body.eval()


def loss_of(body: Any, batch: dict) -> Any:
    """A scalar on the last hidden state: what every variant minimises."""
    return body(input_ids=batch["input_ids"]).last_hidden_state.float().pow(2).mean()


def warm_up() -> None:
    """Pay torch's lazy imports (first AdamW step, autograd) before the baseline, in every variant."""
    import torch

    w = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.AdamW([w])
    (torch.nn.Linear(4, 4)(w) * w).sum().backward()
    optimizer.step()


def random_masks(body: Any, k: int, seed: int) -> dict[str, Any]:
    from adapterkit.methods.sft.select import random_k

    return random_k([(n, p.numel()) for n, p in body.named_parameters()], k, seed)


def run_phase1(body: Any, batches: list, k: int, p: Params) -> dict[str, Any]:
    import adapterkit as ak

    config = ak.SFTConfig(k=k, target_modules=".*", full_steps=p.steps, full_lr=p.lr)
    ak.attach(body, config, "sft", calibration=batches, loss_fn=loss_of)
    return {"selected": ak.sft.outcome(body, "sft")["k"]}


def run_phase2(body: Any, batches: list, k: int, p: Params) -> dict[str, Any]:
    import torch
    import adapterkit as ak
    from adapterkit.methods.sft.train import cycle, run_steps

    ak.attach(body, ak.SFTConfig(k=k, target_modules=".*", selection="random", seed=p.seed), "sft")
    params = list(ak.adapter_parameters(body, "sft"))
    optimizer = torch.optim.AdamW(params, lr=p.lr, weight_decay=0.0)
    body.train()
    losses = run_steps(body, optimizer, cycle(batches), p.steps, 1, loss_of, progress=False)
    state = sum(s[key].numel() for s in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq"))
    return {"losses": losses, "trainable": sum(x.numel() for x in params), "optimizer_state_entries": state}


def run_reference(body: Any, batches: list, k: int, p: Params) -> dict[str, Any]:
    import torch

    params = dict(body.named_parameters())
    original = {n: torch.zeros_like(t, device="cpu").copy_(t) for n, t in params.items()}  # θ₀ (CPU)
    masks = {n: torch.zeros(t.shape, dtype=torch.bool, device=t.device) for n, t in params.items()}
    for n, idx in random_masks(body, k, p.seed).items():
        masks[n].view(-1)[idx] = True
    body.requires_grad_(True)
    optimizer = torch.optim.AdamW(params.values(), lr=p.lr, weight_decay=0.0)  # HF Trainer default
    body.train()
    losses = []
    for step in range(p.steps):
        optimizer.zero_grad()
        loss = loss_of(body, batches[step % len(batches)])
        loss.backward()
        for n, t in params.items():  # masking zeroes gradients after the dense backward
            if t.grad is not None:
                t.grad *= masks[n]
        optimizer.step()
        losses.append(loss.item())

    def check() -> dict[str, Any]:  # run after the measured window
        return {"moved_outside_mask": sum(int((t.detach().cpu() != original[n])[~masks[n].cpu()].sum())
                                          for n, t in params.items())}

    return {"losses": losses, "after": check}


def run_full(body: Any, batches: list, k: int, p: Params) -> dict[str, Any]:
    import torch

    body.requires_grad_(True)
    optimizer = torch.optim.AdamW(body.parameters(), lr=p.lr, weight_decay=0.0)
    body.train()
    losses = []
    for step in range(p.steps):
        optimizer.zero_grad()
        loss = loss_of(body, batches[step % len(batches)])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses}


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "phase1": run_phase1, "phase2": run_phase2, "reference": run_reference, "full": run_full}


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _high_water() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    p = Params(**spec["params"])
    torch.set_num_threads(p.threads)
    import adapterkit  # noqa: F401  (every variant pays the same imports)
    import transformers  # noqa: F401

    warm_up()
    body = build_body(p)
    ids = load_file(spec["batches"])["input_ids"]
    batches = [{"input_ids": ids[i:i + p.batch]} for i in range(0, ids.shape[0], p.batch)]
    total = sum(t.numel() for t in body.parameters())
    k = max(1, round(p.density * total))
    gc.collect()
    baseline, load_peak = rss_bytes(), maxrss_bytes()
    exact = _reset_high_water()
    with PeakRSS() as peak:
        extra = RUNNERS[spec["variant"]](body, batches, k, p)
    hwm = _high_water() if exact else None
    after = extra.pop("after", None)
    if after is not None:
        extra.update(after())
    top = max(peak.peak, hwm or 0)
    return {"variant": spec["variant"], "parameters": total, "k": k, "baseline_rss": baseline,
            "peak_rss": top, "peak_above_baseline": top - baseline, "sampled_peak": peak.sampled_peak,
            "vmhwm_peak": hwm, "process_peak_before": load_peak, **extra}


# -- the parent ---------------------------------------------------------------------------------
def make_batches(p: Params, path: Path) -> dict[str, Any]:
    """``steps`` batches of ``batch × seq`` token ids: real text (VADER movie reviews, Gemma's
    tokenizer, concatenated and cut into windows), or seeded random ids for ``--quick``."""
    import torch
    from safetensors.torch import save_file

    count = p.steps * p.batch
    if p.quick:
        ids = torch.randint(1, 512, (count, p.seq), generator=torch.Generator().manual_seed(p.seed))
        source = "random ids (quick)"
    else:
        from adapterkit.zoo.data import vader
        from adapterkit.zoo.llm import load_lm, lm_path
        from transformers import AutoTokenizer

        load_lm  # noqa: B018  (lm_path converts the GGUF on first use, like load_lm)
        tokenizer = AutoTokenizer.from_pretrained(str(lm_path("gemma3")))
        stream: list[int] = []
        for text in vader("movies", split="train").texts:
            stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if len(stream) >= count * p.seq:
                break
        ids = torch.tensor(stream[: count * p.seq]).view(count, p.seq)
        source = "VADER movie reviews (train split), Gemma-3 tokenizer, concatenated"
    save_file({"input_ids": ids.contiguous()}, str(path))
    return {"source": source, "shape": list(ids.shape)}


def run_variant(variant: str, p: Params, batches: Path) -> dict[str, Any]:
    spec = {"variant": variant, "params": dataclasses.asdict(p), "batches": str(batches)}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"variant {variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def goals(results: dict[str, Any]) -> dict[str, Any]:
    out = {}
    if {"phase2", "reference"} <= set(results):
        ratio = results["phase2"]["peak_rss"] / results["reference"]["peak_rss"]
        out[f"phase2 peak RSS ≤ {GOAL_RATIO} × reference"] = {"value": ratio, "met": ratio <= GOAL_RATIO}
    if {"phase2", "full"} <= set(results):
        ratio = results["phase2"]["peak_rss"] / results["full"]["peak_rss"]
        out["phase2 peak RSS ≤ full fine-tuning"] = {"value": ratio, "met": ratio <= 1.0}
    return out


def markdown(report: dict[str, Any]) -> str:
    p, meta = report["meta"]["params"], report["meta"]
    gib = lambda b: f"{b / 2**30:.3f}"  # noqa: E731
    model = "tiny random Gemma3 (--quick)" if p["quick"] else "Gemma-3-270M decoder stack (no LM head)"
    lines = [f"# LT-SFT peak memory: {model}", "",
             f"{meta['date']}; {describe(meta)}; {meta['hardware']['cpu_model']}, {p['threads']} threads.", "",
             f"Batches: {p['steps']} × ({p['batch']} × {p['seq']} tokens) of {meta['batches']['source']}; "
             f"{p['steps']} AdamW steps at lr {p['lr']}; K = {p['density']:.0%} of every body parameter "
             f"(K = {next(iter(report['results'].values()))['k']:,}). One fresh process per variant.", "",
             "## Goals", "", "| goal | ratio | verdict |", "|---|---:|---|"]
    for name, goal in report["goals"].items():
        lines.append(f"| {name} | {goal['value']:.2f}× | {'met' if goal['met'] else '**missed**'} |")
    lines += ["", "## Peak RSS per variant", "",
              "| variant | what | peak RSS [GiB] | above model loaded [GiB] | × full FT |", "|---|---|---:|---:|---:|"]
    full = report["results"].get("full", {}).get("peak_rss")
    for name, res in report["results"].items():
        times = f"{res['peak_rss'] / full:.2f}×" if full else "–"
        lines.append(f"| {name} | {VARIANTS[name]} | {gib(res['peak_rss'])} | {gib(res['peak_above_baseline'])} | {times} |")
    lines += ["", "Checks: phase2 optimizer state holds "
              f"{report['results'].get('phase2', {}).get('optimizer_state_entries', '–')} entries (2K); the reference "
              f"moved {report['results'].get('reference', {}).get('moved_outside_mask', '–')} entries outside its mask.",
              "", f"Method: {meta['method']}"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(report["results"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    base = [report["results"][n]["baseline_rss"] / 2**30 for n in names]
    above = [report["results"][n]["peak_above_baseline"] / 2**30 for n in names]
    ax.bar(names, base, color="#bbbbbb", label="model loaded")
    ax.bar(names, above, bottom=base, color="#3b75af", label="training peak above it")
    ax.set_ylabel("peak RSS [GiB]")
    ax.set_title("LT-SFT peak memory per variant")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random Gemma3; results go to bench/results/tmp/")
    parser.add_argument("--steps", type=int, help="optimizer steps per variant (default 4; quick 2)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    p = Params.quick_params() if args.quick else Params()
    if args.steps:
        p.steps = args.steps
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}")
    out_dir = HERE / "results" / ("tmp" if p.quick else "")
    stem = "sft_memory.quick" if p.quick else "sft_memory"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        batches = Path(tmp) / "batches.safetensors"
        meta = {"date": now_iso(), "provenance": provenance(), "hardware": hardware(), "params": dataclasses.asdict(p),
                "batches": make_batches(p, batches),
                "method": "peak RSS of the variant's work in a fresh process: VmHWM after resetting it through "
                          "/proc/self/clear_refs (when allowed) and psutil sampling every 2 ms + ru_maxrss; "
                          "'above model loaded' subtracts the RSS once the body is built and torch is warmed up"}
        results = {}
        for variant in variants:
            print(f"{variant} ...", flush=True)
            results[variant] = run_variant(variant, p, batches)
    report = {"meta": meta, "results": results, "goals": goals(results)}
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(report))
    plotted = plot(report, out_dir / f"{stem}.png")
    print(markdown(report))
    print(f"wrote {out_dir / stem}.json, .md" + (", .png" if plotted else " (no matplotlib: no plot)"))


if __name__ == "__main__":
    main()
