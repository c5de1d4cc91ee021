#!/usr/bin/env python
"""Data-parallel scaling on MiniLM: 1 process vs 2 processes (DDP, gloo) for LoRA and MoSA.

    .venv/bin/python bench/ddp_scaling.py            # full run (~10-15 min on 2 idle CPU cores)
    .venv/bin/python bench/ddp_scaling.py --quick    # smoke run (tiny batches, few steps)

Model: the bundled all-MiniLM-L6-v2 with a 2-class head (``adapterkit.zoo.models``); LoRA r=8 on
``query``/``value`` (+ the head as ``modules_to_save``), and MoSA (4 modules splitting that LoRA's B,
consistency weight 1: two forwards a step, and modules left without a gradient every step).
Batches of random tokens, ``--seq-len`` long, random labels.

Settings, each with its own fresh processes (elastic launch, like ``adapterkit train --nproc``):

* 1 process x 1 thread and 1 process x 2 threads, global batch G (no DDP: the plain loop);
* 2 processes x 1 thread, global batch G (each rank G/2 rows: the same optimizer steps as 1
  process) and per-process batch G (global 2G: twice the examples per step).

This machine has 2 cores, so "2 processes" compete with "1 process x 2 threads" for the same
cores: both single-process settings are reported. Step time is the median over the timed steps
after the warm-up (wall clock of a whole optimizer step on rank 0: draw, forward(s), backward with
the all-reduce, clipping, AdamW); throughput = global examples per step / median step time.

Communication: a DDP comm hook counts the bytes of every bucket it all-reduces (then runs
torch's default all-reduce hook): adapter gradients only (frozen parameters have none), vs the
bytes of all the model's parameters (what full fine-tuning would all-reduce every step). MoSA's
unchosen modules sit in the buckets too (as zeros: DDP reduces whole buckets). Not in that
figure, reported beside it: with the unused-parameter search (MoSA) DDP also all-reduces its map of
used parameters (4 bytes per trainable tensor), and every step's draw/batch check all-gathers
16 bytes per process (``distributed.check_draws``).

Writes ``bench/results/ddp_scaling.json`` and ``.md`` (``--quick``: ``ddp_scaling.quick.*``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _provenance import provenance  # noqa: E402
from _timing import CpuWatch, hardware, now_iso  # noqa: E402

METHODS = ("lora", "mosa")


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: a method, the rows of one optimizer step (all processes), torch threads per process."""

    method: str
    global_batch: int
    threads: int
    seq_len: int
    warmup: int
    steps: int
    label: str


def _adapter(method: str) -> Any:
    import adapterkit as ak

    lora = ak.LoRAConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    if method == "lora":
        return lora
    return ak.MoSAConfig(base=lora, n_modules=4, split="up", consistency_weight=1.0)


def _batches(case: Case, count: int) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(0)
    shape = (case.global_batch, case.seq_len)
    return [{"input_ids": torch.randint(1000, 30000, shape, generator=g), "attention_mask": torch.ones(shape, dtype=torch.long),
             "labels": torch.randint(0, 2, (case.global_batch,), generator=g)} for _ in range(count)]


class ByteCounter:
    """DDP comm hook state: bytes handed to all-reduce, and how many buckets."""

    def __init__(self, group: Any) -> None:
        self.group, self.bytes, self.buckets = group, 0, 0


def counting_allreduce(state, bucket):  # unannotated: DDP checks the annotations it finds against its own types
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buffer = bucket.buffer()
    state.bytes += buffer.numel() * buffer.element_size()
    state.buckets += 1
    return default_hooks.allreduce_hook(state.group, bucket)


def measure(case: Case) -> dict[str, Any]:
    """Time ``case`` in this process (rank 0 reports; every rank runs it)."""
    import torch
    import torch.distributed as dist

    import adapterkit as ak
    from adapterkit.methods.mosa import two_pass_loss
    from adapterkit.train import distributed
    from adapterkit.train.loop import train as train_loop
    from adapterkit.zoo.models import load_sentence_classifier

    torch.set_num_threads(case.threads)
    rank, world = distributed.rank_and_world()
    torch.manual_seed(0)
    model, _ = load_sentence_classifier(None, num_labels=2)
    model.requires_grad_(False)
    ak.attach(model, _adapter(case.method), "a")
    stamps: list[float] = []
    batches = _batches(case, case.warmup + case.steps)
    counter = None
    start = time.perf_counter()
    if world == 1:
        train_loop(model, batches, lr=1e-3, progress=False, loss_fn=two_pass_loss,
                   on_step=lambda *_: stamps.append(time.perf_counter()))
    else:
        ddp = distributed.wrap(model, two_pass_loss)
        counter = ByteCounter(dist.group.WORLD)
        ddp.register_comm_hook(counter, counting_allreduce)
        dist.barrier()
        start = time.perf_counter()
        train_loop(ddp, distributed.ShardedBatches(batches), lr=1e-3, progress=False, loss_fn=distributed.shard_loss,
                   on_step=lambda *_: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip([start, *stamps], stamps)][case.warmup:]
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    median = statistics.median(steps)
    return {**dataclasses.asdict(case), "processes": world, "per_process_batch": case.global_batch // world,
            "step_s": {"median": median, "min": min(steps), "max": max(steps), "samples": steps},
            "examples_per_s": case.global_batch / median,
            "allreduce_bytes_per_step": None if counter is None else counter.bytes / (case.warmup + case.steps),
            "buckets_per_step": None if counter is None else counter.buckets / (case.warmup + case.steps),
            "trainable_bytes": trainable,
            "model_param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "find_unused_parameters": None if world == 1 else distributed.may_skip_parameters(model),
            # beside the buckets: DDP's used-parameter map (int32 per trainable tensor, with the search)
            # and the per-step check's all-gather (two int64s from each process)
            "unused_map_bytes_per_step": None if world == 1 else
            4 * sum(p.requires_grad for p in model.parameters()) * distributed.may_skip_parameters(model),
            "check_bytes_per_step": None if world == 1 else 16 * world}


def worker(cases: list[Case]) -> list[dict[str, Any]]:
    """One process of a launch: every case in turn (all ranks), rank 0's results returned."""
    import torch.distributed as dist

    from adapterkit.train import distributed

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    try:
        results = [measure(case) for case in cases]
        return results if distributed.is_main() else []
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(nproc: int, cases: list[Case]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    from adapterkit.train import distributed

    watch = CpuWatch()
    results = distributed.launch(worker, nproc, (cases,))[0]
    return results, watch.stop()


def plan(args: argparse.Namespace) -> dict[int, list[Case]]:
    g, common = args.global_batch, dict(seq_len=args.seq_len, warmup=args.warmup, steps=args.steps)
    single = [Case(m, g, t, label=f"1 process x {t} thread{'s' * (t > 1)}", **common) for m in METHODS for t in (1, 2)]
    double = [Case(m, b, 1, label=label, **common) for m in METHODS
              for b, label in ((g, "2 processes x 1 thread, same global batch"),
                               (2 * g, "2 processes x 1 thread, same per-process batch"))]
    return {1: single, 2: double}


def report(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | setting | global batch | per-process batch | step (s, median) | examples/s | "
             "vs 1x1 | all-reduced / step | full model params | ratio |", "|" + "---|" * 10]
    for row in rows:
        base = next(r for r in rows if r["method"] == row["method"] and r["processes"] == 1 and r["threads"] == 1)
        sent = row["allreduce_bytes_per_step"]
        lines.append(
            f"| {row['method']} | {row['label']} | {row['global_batch']} | {row['per_process_batch']} | "
            f"{row['step_s']['median']:.3f} | {row['examples_per_s']:.1f} | "
            f"{row['examples_per_s'] / base['examples_per_s']:.2f}x | "
            + (f"{sent / 1e6:.3f} MB ({row['buckets_per_step']:.0f} buckets)" if sent is not None else "-")
            + f" | {row['model_param_bytes'] / 1e6:.1f} MB | "
            + (f"{sent / row['model_param_bytes'] * 100:.2f}%" if sent is not None else "-") + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny batches, few steps")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    if args.quick:
        args.global_batch, args.seq_len, args.warmup, args.steps = 4, 8, 1, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    rows, contention = [], {}
    for nproc, cases in plan(args).items():
        print(f"{nproc} process(es): {len(cases)} cases ...", flush=True)
        results, contention[f"{nproc}_processes"] = run(nproc, cases)
        rows += results
    for row in rows:
        print(f"{row['method']:5s} {row['label']:48s} step {row['step_s']['median']:.3f} s  "
              f"{row['examples_per_s']:.1f} ex/s  all-reduced {row['allreduce_bytes_per_step']}", flush=True)
    stem = "ddp_scaling.quick" if args.quick else "ddp_scaling"
    meta = {"date": now_iso(), "hardware": hardware(), "provenance": provenance(), "contention": contention,
            "settings": {k: v for k, v in vars(args).items()}}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    header = (f"# DDP scaling on MiniLM (gloo, CPU)\n\n{meta['date']}, {meta['hardware']['cpu_model']}, "
              f"{meta['hardware']['usable_cores']} usable cores; commit {str(meta['provenance']['commit'])[:10]}; "
              f"sequence length {args.seq_len}, {args.warmup} warm-up + {args.steps} timed steps; other processes' "
              f"load (cores) during the runs: {json.dumps({k: v['other_processes_cores'] for k, v in contention.items()})}."
              "\n\n")
    extra = {r["method"]: (r["unused_map_bytes_per_step"], r["check_bytes_per_step"]) for r in rows if r["processes"] > 1}
    note = ("\n\n'all-reduced / step' counts DDP's gradient buckets only. Besides them, each step of 2 processes "
            "exchanges: " + "; ".join(f"{m}: {u} B of DDP's used-parameter map (all-reduced, with the unused-parameter "
                                       f"search only) and {c} B of the draw/batch check (all-gathered)"
                                       for m, (u, c) in extra.items()) + ".\n")
    (out / f"{stem}.md").write_text(header + report(rows) + note)
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
