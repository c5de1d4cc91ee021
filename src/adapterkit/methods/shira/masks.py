"""SHiRA mask rules: which entries of a weight an adapter trains.

Every rule returns sorted, unique flat indices (int64) of exactly ``budget`` entries — except
``struct``, whose pattern (rows plus the diagonal) may fall short of the budget. Random choices
come from NumPy's PCG64 raw bit stream, which NumPy keeps stable across versions, so a ``rand``
mask can be regenerated from its seed instead of being stored. Top-K rules break ties towards
the lower index, so they give the same mask on every machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from ...errors import ConfigError, FusedStateError
from ...core.state import get_state


def top_k(scores: Tensor, k: int) -> Tensor:
    """Sorted flat indices of the ``k`` largest scores; ties go to the lower index."""
    scores = scores.reshape(-1)
    threshold = torch.topk(scores, k, sorted=False).values.min()
    above = (scores > threshold).nonzero().view(-1)
    tied = (scores == threshold).nonzero().view(-1)[: k - above.numel()]
    return torch.cat([above, tied]).sort().values


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    ordered = np.sort(values)
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))] if ordered.size else ordered


def _absent(sorted_pool: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mask of ``values`` not in ``sorted_pool`` (a binary search; np.isin is slower here)."""
    if sorted_pool.size == 0:
        return np.ones(values.size, dtype=bool)
    return sorted_pool[np.minimum(np.searchsorted(sorted_pool, values), sorted_pool.size - 1)] != values


def rand(numel: int, k: int, seed: int, exclude: Tensor | None = None) -> Tensor:
    """``k`` distinct uniformly random entries: the first ``k`` distinct values (outside ``exclude``)
    of the seeded PCG64 stream taken modulo ``numel``. Memory O(k), the same on every platform.

    The first ``k`` draws are deduplicated by one sort; the few repeats are replaced by the next
    new values in stream order (about 25 ms for 262,144 of 16.8M entries).
    """
    banned = np.sort(exclude.cpu().numpy().astype(np.int64)) if exclude is not None else np.empty(0, np.int64)
    if k > numel - banned.size:
        raise ConfigError(f"rand mask: {k} entries requested but only {numel - banned.size} are available")
    stream = np.random.PCG64(seed)

    def draw(count: int) -> np.ndarray:
        values = (stream.random_raw(count) % np.uint64(numel)).astype(np.int64)
        return values[_absent(banned, values)]

    chosen = _sorted_unique(draw(k))[:k]
    while chosen.size < k:
        need = k - chosen.size
        extra = draw(need + 64 + need // 4)
        fresh = extra[_absent(chosen, extra)]
        if fresh.size == 0:
            continue
        order = np.argsort(fresh, kind="stable")
        ordered = fresh[order]
        first_seen = np.sort(order[np.concatenate(([True], ordered[1:] != ordered[:-1]))])[:need]
        chosen = np.sort(np.concatenate([chosen, fresh[first_seen]]))
    return torch.from_numpy(chosen)


def struct(rows: int, cols: int, k: int, axis: str = "rows") -> Tensor:
    """Every f-th full row (or column) plus the diagonal, within ``k`` entries."""
    if axis == "cols":
        transposed = struct(cols, rows, k, "rows")
        r, c = transposed // rows, transposed % rows
        return (c * cols + r).sort().values
    diagonal = min(rows, cols)
    if k < diagonal:
        raise ConfigError(f"struct mask: the diagonal alone needs {diagonal} entries, the budget is {k}")
    full_rows = (k - diagonal) // cols
    selected = torch.zeros(rows, cols, dtype=torch.bool)
    if full_rows:
        step = max(1, rows // full_rows)
        selected[torch.arange(0, rows, step)[:full_rows]] = True
    idx = torch.arange(diagonal)
    selected[idx, idx] = True
    return selected.view(-1).nonzero().view(-1)


def from_scores(scores: Tensor, k: int, exclude: Tensor | None = None) -> Tensor:
    scores = scores.detach().float().reshape(-1).clone()
    if exclude is not None:
        scores[exclude] = -float("inf")
    return top_k(scores, k)


def from_callable(fn: Any, weight: Tensor, k: int, seed: int, gradient: Tensor | None, module_name: str) -> Tensor:
    """Run a user mask function and check what it returns."""
    generator = torch.Generator().manual_seed(seed)
    mask = fn(weight.detach(), k, generator=generator, gradient=gradient)
    where = f"mask function {getattr(fn, '__qualname__', fn)!r} for {module_name}"
    if not isinstance(mask, Tensor):
        raise ConfigError(f"{where} returned {type(mask).__name__}, expected a bool tensor")
    if mask.dtype != torch.bool:
        raise ConfigError(f"{where} returned dtype {mask.dtype}, expected torch.bool")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ConfigError(f"{where} returned shape {tuple(mask.shape)}, expected {tuple(weight.shape)}")
    count = int(mask.sum())
    if not 0 < count <= k:
        raise ConfigError(f"{where} selected {count} entries; it must select between 1 and the budget {k} "
                          f"(density in (0, 1])")
    return mask.reshape(-1).nonzero().view(-1).cpu()


def calibration_gradients(model: nn.Module, targets: Mapping[str, nn.Module], batches: Iterable[Any],
                          loss_fn: Any = None, accumulate: str = "sum") -> dict[str, Tensor]:
    """∇W of the calibration loss of the base model for every targeted weight, without changing
    the model.

    Gradients come from ``torch.autograd.grad``, so no ``.grad`` is written; attached adapters
    are switched off meanwhile; activation, requires_grad flags and train/eval mode are restored.
    """
    from ...core.outputs import loss_of

    state = get_state(model)
    if state.fused:
        raise FusedStateError("calibration needs the base weights: unfuse the fused adapters first")
    weights = {path: module.weight for path, module in targets.items()}
    flags = {path: w.requires_grad for path, w in weights.items()}
    was_training, active = model.training, state.active
    state.active = ()
    state.refresh_plans()
    totals = {path: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for path, w in weights.items()}
    seen = 0
    try:
        model.eval()
        for weight in weights.values():
            weight.requires_grad_(True)
        for batch in batches:
            if loss_fn is not None:
                loss = loss_fn(model, batch)
            else:
                loss = loss_of(model(**batch) if isinstance(batch, Mapping) else model(batch))
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for (path, total), grad in zip(totals.items(), grads):
                if grad is None:
                    raise ConfigError(f"the calibration loss does not depend on {path}")
                total += grad.float().abs() if accumulate == "abs" else grad.float()
            seen += 1
    finally:
        for path, weight in weights.items():
            weight.requires_grad_(flags[path])
        model.train(was_training)
        state.active = active
        state.refresh_plans()
    if seen == 0:
        raise ConfigError("calibration data yielded no batches")
    return totals
