#!/usr/bin/env python
"""Validation-split check of the ranking adapter's learning rate (picks the default the benchmark uses).

Trains the default adapter (seed 0) on a task's train split at each learning rate and prints one JSON
line per rate: mean SRCC on the validation split (counting: images that show the object), the first
loss and the mean of the last ten. Usage: ``rank_lr_check.py counting 5e-5,1e-4,3e-4 5``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import adapterkit as ak  # noqa: E402
import rank_bench  # noqa: E402
from adapterkit.analysis.ranking_metrics import mean_metrics  # noqa: E402
from adapterkit.apps.ranking import RankingTrainSettings, attach_ranking, evaluate_ranking, train_ranking  # noqa: E402
from adapterkit.methods.ranking import RankingAdapterConfig  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=list(rank_bench.TASKS))
    parser.add_argument("lrs", help="comma-separated learning rates")
    parser.add_argument("epochs", type=int)
    parser.add_argument("--tokens", default=None, help="token cache root (as rank_bench.py --tokens)")
    parser.add_argument("--work", default="/tmp/rank_lr_check")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    bench = rank_bench.Bench(argparse.Namespace(work=args.work, tokens=args.tokens, epochs=args.epochs, batch_size=16,
                                                tail_blocks=2, threads=2, limit=None, pair_sizes=[4], pair_repeats=1))
    data, encoders = bench.data(args.task), bench.encoders
    pools = data.val.eval_pools(data.min_positive) if data.min_positive is not None else data.val.eval_pools()
    for lr in (float(x) for x in args.lrs.split(",")):
        config = RankingAdapterConfig(image_dim=bench.cache.token_dim, text_dim=encoders.text_token_dim)
        attach_ranking(encoders, config, "rank", 0)
        start = time.perf_counter()
        try:
            losses = train_ranking(encoders, "rank", data.train.images, data.train.texts, data.train_pools,
                                   RankingTrainSettings(epochs=args.epochs, lr=lr, seed=0), progress=False)
            metrics = mean_metrics(evaluate_ranking(encoders, "rank", data.val.images, data.val.texts, pools))
        finally:
            ak.detach(encoders, "rank")
        print(json.dumps({"task": args.task, "lr": lr, "epochs": args.epochs, "val_srcc": round(metrics["srcc"], 4),
                          "first_loss": round(losses[0], 3), "last10_loss": round(sum(losses[-10:]) / 10, 3),
                          "seconds": round(time.perf_counter() - start)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
