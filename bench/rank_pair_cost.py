"""The pair branch's cost for bench/rank_bench.py: forward+backward time and memory of the library's
factorised ranking-aware attention against a naive joint softmax written here as a yardstick, and a
whole adapter training step with and without the pair branch, per batch size N."""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable

import torch

from adapterkit.methods.ranking import RankingAdapter, RankingAdapterConfig, RankingAwareAttention, ranking_loss
from _timing import timed


def naive_pair_logits(att: RankingAwareAttention, tokens: torch.Tensor) -> torch.Tensor:
    """The pair branch with the joint softmax over both images' 2P tokens materialised for every
    ordered pair (N, N, H, 2P, dh): the textbook form, to measure what the factorisation saves."""
    split = lambda x: x.unflatten(-1, (att.heads, -1)).transpose(-3, -2)  # noqa: E731 (..., L, w) -> (..., H, L, dh)
    queries = split(att.q_norm(att.q_proj(att.queries)))  # (H, M, dh)
    values = split(att.kv_norm(att.kv_proj(tokens)))  # (N, H, P, dh)
    n, h, p, dh = values.shape
    joint = torch.cat([values.unsqueeze(1).expand(n, n, h, p, dh), values.unsqueeze(0).expand(n, n, h, p, dh)], dim=3)
    weights = torch.softmax(torch.einsum("hmd,ijhpd->ijhmp", queries, joint) / math.sqrt(dh), dim=-1)
    merge = lambda x: x.transpose(-3, -2).flatten(-2)  # noqa: E731 (N, N, M, width)
    first, second = merge(weights[..., :p] @ joint[..., :p, :]), merge(weights[..., p:] @ joint[..., p:, :])
    pair = first - second if att.combine == "subtract" else torch.cat([first, second], dim=-1)
    return att.head(att.out_proj(pair).sum(dim=2)).squeeze(-1)


def measured_memory(run: Callable[[], None], held: list[torch.Tensor]) -> dict[str, int | None]:
    """What ``run`` (a forward+backward) allocates, measured: ``peak_bytes``, the highest running sum of
    the profiler's CPU allocation events (frees negative) above the level at its start, and
    ``saved_bytes``, the distinct storages autograd saved for backward (``held``: inputs and weights that
    exist anyway, not counted). The profiler's raw events are a private API: ``None`` if it moves."""
    from torch.profiler import ProfilerActivity, profile

    exclude, saved = {t.untyped_storage().data_ptr() for t in held}, {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    try:
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        live = peak = 0
        for event in events:
            live += event.nbytes()
            peak = max(peak, live)
    except AttributeError:
        peak = None
    return {"peak_bytes": peak, "saved_bytes": sum(saved.values())}


def pair_cost(image_dim: int, text_dim: int, tokens_per_image: int, sizes: list[int], repeats: int,
              batch_size: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time (median of ``--pair-repeats``) and measured memory of forward+backward of the pair branch,
    factorised and naive, and of a whole adapter training step with and without it, per batch size N
    (``batch_size``: the benchmark's, recorded for the report)."""
    config = RankingAdapterConfig(image_dim=image_dim, text_dim=text_dim)
    width, m, h = config.width, config.relation_tokens, config.heads
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        attention, adapter = RankingAwareAttention(config), RankingAdapter(config, config.image_dim, config.text_dim)
    adapter.train()
    text = torch.randn(12, config.text_dim, generator=gen)
    mask = torch.ones(12, dtype=torch.bool)
    rows = []
    for n in sizes:
        z = torch.randn(n, tokens_per_image, width, generator=gen).requires_grad_(True)
        images = torch.randn(n, tokens_per_image, config.image_dim, generator=gen)
        targets = torch.randint(0, 5, (n,), generator=gen).float()
        with torch.no_grad():
            diff = (attention(z) - naive_pair_logits(attention, z)).abs().max().item()

        def branch(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
            def run() -> None:  # gradients start from None every time: their buffers count too
                attention.zero_grad(set_to_none=True)
                z.grad = None
                fn(z).sum().backward()
            return run

        def step(pairs: bool) -> Callable[[], None]:
            def run() -> None:
                adapter.zero_grad(set_to_none=True)
                ranking_loss(adapter(images, text, mask, pairs=pairs), targets).total.backward()
            return run

        cases = {"factorised": (branch(attention), [z, *attention.parameters()]),
                 "naive": (branch(lambda x: naive_pair_logits(attention, x)), [z, *attention.parameters()]),
                 "step_with_pairs": (step(True), [images, text, targets, *adapter.parameters()]),
                 "step_without_pairs": (step(False), [images, text, targets, *adapter.parameters()])}
        times, memory = {}, {}
        for label, (fn, held) in cases.items():
            fn()  # warm-up
            times[label] = statistics.median(timed(fn) for _ in range(repeats))
            memory[label] = measured_memory(fn, held)
        rows.append({"n": n, "max_abs_diff": diff, **{f"{k}_s": v for k, v in times.items()},
                     **{f"{k}_{b}": v for k, d in memory.items() for b, v in d.items()},
                     # analytic, float32: the factorised halves O_i, O_j (N², M, width) against the
                     # naive joint keys/values (N², 2P, width) and its attention (N², H, M, 2P)
                     "factorised_bytes": 4 * n * n * m * width,
                     "naive_bytes": 4 * n * n * max(2 * tokens_per_image * width, h * m * 2 * tokens_per_image)})
        mb = lambda label: f"{(memory[label]['peak_bytes'] or 0) / 2**20:.1f}"  # noqa: E731
        log(f"pair cost N={n}: factorised {1e3 * times['factorised']:.1f} ms {mb('factorised')} MB, naive "
            f"{1e3 * times['naive']:.1f} ms {mb('naive')} MB, step {1e3 * times['step_with_pairs']:.1f} / "
            f"{1e3 * times['step_without_pairs']:.1f} ms")
    return {"rows": rows, "tokens_per_image": tokens_per_image, "width": width, "relation_tokens": m, "heads": h,
            "repeats": repeats, "batch_size": batch_size}
