"""Choosing the K entries of an SFT: one global top-K over many tensors, random, or a user rule.

Every rule returns, per parameter name, sorted unique flat (row-major) int64 indices; entries
already in the support (``exclude``) are never chosen again. Top-K is exact and deterministic:
the K-th largest ``|Δ|`` over all tensors is the threshold ``t``, every entry above ``t`` is taken
and the ties at ``t`` go to the lowest flat index (tensors in the given order, then row-major),
so exactly K entries come back on every machine.

Two paths find ``t`` and give identical selections:

* exact: all ``|Δ|`` concatenated into one flat fp32 tensor (4 bytes an entry) and ``torch.topk``;
* histogram, when that tensor would be too big: chunked passes over the tensors with shared bin
  edges over ``[lo, hi]`` (counts, minima and maxima per bin summed over chunks); the bin that
  holds the K-th largest becomes the next ``[lo, hi]`` until it holds few enough entries to sort
  exactly. Bins come from one monotone float64 formula used in every pass, so a value always
  lands in the same bin.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ...errors import ConfigError

Scores = Sequence[tuple[str, Tensor]]  # (parameter name, |Δ|) in the order that breaks ties
Support = Mapping[str, Tensor]  # parameter name -> sorted flat indices

EXACT_LIMIT = 1 << 28  # entries: above this (1 GiB of fp32 scores) the histogram path runs
CHUNK = 1 << 22  # entries per chunk of the histogram path
BINS = 4096
EXCLUDED = -1.0  # the score of an entry already in the support (real scores are >= 0)


def _excluded(exclude: Support | None, key: str, device: torch.device) -> Tensor | None:
    found = None if exclude is None else exclude.get(key)
    return None if found is None or found.numel() == 0 else found.to(device=device, dtype=torch.int64)


def _check(sizes: Sequence[tuple[str, int]], k: int, exclude: Support | None) -> None:
    keys = [key for key, _ in sizes]
    if len(set(keys)) != len(keys):
        raise ConfigError("selection: parameter names repeat")
    unknown = sorted(set(exclude or {}) - set(keys))
    if unknown:
        raise ConfigError(f"selection: excluded entries of unknown parameters {unknown[:3]}")
    taken = sum(int(v.numel()) for v in (exclude or {}).values())
    available = sum(n for _, n in sizes) - taken
    if not (isinstance(k, int) and 0 < k <= available):
        raise ConfigError(f"selection: cannot choose {k!r} new entries; {available} are available")


def _finite(values: Tensor) -> None:
    if not bool(torch.isfinite(values).all()):
        raise ConfigError("the dense phase produced non-finite changes (NaN or Inf): lower full_lr or check the loss")


def _pick(values: Tensor, threshold: float, ties: int) -> tuple[Tensor, int]:
    """Positions above ``threshold`` and the first ``ties`` positions equal to it, sorted."""
    above = (values > threshold).nonzero().view(-1)
    tied = (values == threshold).nonzero().view(-1)[:max(0, ties)]
    return torch.cat([above, tied]).sort().values, tied.numel()


def top_k(scores: Scores, k: int, exclude: Support | None = None, exact_limit: int | None = None,
          chunk: int | None = None, bins: int | None = None) -> tuple[dict[str, Tensor], float]:
    """The ``k`` largest scores over all tensors (ties: lowest flat index) and the threshold;
    the exact path up to ``exact_limit`` entries, the histogram path beyond (defaults: the
    module's :data:`EXACT_LIMIT`, :data:`CHUNK` and :data:`BINS`, read at call time)."""
    total = sum(s.numel() for _, s in scores)
    if total <= (EXACT_LIMIT if exact_limit is None else exact_limit):
        return top_k_exact(scores, k, exclude)
    return top_k_histogram(scores, k, exclude, CHUNK if chunk is None else chunk, BINS if bins is None else bins)


@torch.no_grad()
def top_k_exact(scores: Scores, k: int, exclude: Support | None = None) -> tuple[dict[str, Tensor], float]:
    """:func:`top_k` on one concatenated fp32 tensor."""
    _check([(key, s.numel()) for key, s in scores], k, exclude)
    flat = torch.cat([s.detach().reshape(-1).float() for _, s in scores])  # a copy: safe to overwrite
    offsets = np.cumsum([0] + [s.numel() for _, s in scores]).tolist()
    for (key, _), start in zip(scores, offsets):
        excluded = _excluded(exclude, key, flat.device)
        if excluded is not None:
            flat[excluded + start] = EXCLUDED
    _finite(flat)
    threshold = float(torch.topk(flat, k, sorted=False).values.min())
    chosen, _ = _pick(flat, threshold, k - int((flat > threshold).sum()))
    del flat
    out: dict[str, Tensor] = {}
    bounds = torch.tensor(offsets, device=chosen.device)
    cuts = torch.searchsorted(chosen, bounds).tolist()
    for i, (key, _) in enumerate(scores):
        if cuts[i + 1] > cuts[i]:
            out[key] = chosen[cuts[i]:cuts[i + 1]] - offsets[i]
    return out, threshold


def _chunks(scores: Scores, exclude: Support | None, chunk: int) -> Iterator[tuple[str, int, Tensor]]:
    """``(name, start, fp32 scores)`` in order; entries of the support score :data:`EXCLUDED`."""
    for key, score in scores:
        flat = score.detach().reshape(-1)
        excluded = _excluded(exclude, key, flat.device)
        for start in range(0, flat.numel(), chunk):
            values = flat[start:start + chunk]
            if excluded is not None:
                lo, hi = torch.searchsorted(excluded, torch.tensor([start, start + values.numel()],
                                                                   device=excluded.device)).tolist()
                if hi > lo:
                    values = values.to(torch.float32, copy=True)
                    values[excluded[lo:hi] - start] = EXCLUDED
            yield key, start, values.float()


def _kth_largest(passes: Callable[[], Iterator[tuple[str, int, Tensor]]], k: int, hi: float, bins: int,
                 gather_limit: int) -> float:
    """The ``k``-th largest non-excluded score, by narrowing histograms over ``[lo, hi]``."""
    lo, need = 0.0, k
    while lo < hi:
        scale = bins / (hi - lo)
        counts = torch.zeros(bins, dtype=torch.int64)
        mins = torch.full((bins,), float("inf"), dtype=torch.float64)
        maxs = torch.full((bins,), -float("inf"), dtype=torch.float64)
        for _, _, values in passes():
            inside = values[(values >= lo) & (values <= hi)].double()
            if inside.numel() == 0:
                continue
            which = ((inside - lo) * scale).floor_().clamp_(0, bins - 1).long()
            counts += torch.bincount(which, minlength=bins).cpu()
            mins.scatter_reduce_(0, which.cpu(), inside.cpu(), "amin")
            maxs.scatter_reduce_(0, which.cpu(), inside.cpu(), "amax")
        at_or_above = counts.flip(0).cumsum(0).flip(0)
        boundary = int((at_or_above >= need).nonzero().max())
        need -= int(at_or_above[boundary + 1]) if boundary + 1 < bins else 0
        lo_bin, hi_bin = float(mins[boundary]), float(maxs[boundary])
        if int(counts[boundary]) <= gather_limit:  # few enough: sort that bin's values exactly
            found = []
            for _, _, values in passes():
                found.append(values[(values >= lo_bin) & (values <= hi_bin)])
            return float(torch.topk(torch.cat(found), need, sorted=False).values.min())
        lo, hi = lo_bin, hi_bin
    return hi


@torch.no_grad()
def top_k_histogram(scores: Scores, k: int, exclude: Support | None = None, chunk: int = CHUNK,
                    bins: int = BINS) -> tuple[dict[str, Tensor], float]:
    """:func:`top_k` without ever holding more than a chunk of scores (plus one bin) at once."""
    _check([(key, s.numel()) for key, s in scores], k, exclude)
    if chunk < 1 or bins < 2:
        raise ConfigError(f"selection: chunk must be >= 1 and bins >= 2, got {chunk}, {bins}")

    def passes() -> Iterator[tuple[str, int, Tensor]]:
        return _chunks(scores, exclude, chunk)

    hi = 0.0
    for _, _, values in passes():
        _finite(values)
        if values.numel():
            hi = max(hi, float(values.max()))
    threshold = _kth_largest(passes, k, hi, bins, chunk)
    ties = k - sum(int((values > threshold).sum()) for _, _, values in passes())
    parts: dict[str, list[Tensor]] = {}
    for key, start, values in passes():
        chosen, used = _pick(values, threshold, ties)
        ties -= used
        if chosen.numel():
            parts.setdefault(key, []).append(chosen + start)
    return {key: torch.cat(found) for key, found in parts.items()}, threshold


def _distinct(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``k`` distinct uniform draws from ``[0, n)``, sorted, in O(k) memory: the first distinct
    values of the stream (at most half of ``[0, n)``; beyond that, the complement is drawn)."""
    if k > n // 2:
        return np.setdiff1d(np.arange(n, dtype=np.int64), _distinct(rng, n, n - k), assume_unique=True)
    picks = np.unique(rng.integers(0, n, size=k, dtype=np.int64))
    while picks.size < k:
        extra = rng.integers(0, n, size=2 * (k - picks.size) + 16, dtype=np.int64)
        extra = extra[picks[np.minimum(np.searchsorted(picks, extra), picks.size - 1)] != extra]
        _, first = np.unique(extra, return_index=True)  # new values in stream order
        picks = np.union1d(picks, extra[np.sort(first)][:k - picks.size])
    return picks


def random_k(sizes: Sequence[tuple[str, int]], k: int, seed: int, exclude: Support | None = None) -> dict[str, Tensor]:
    """``k`` distinct entries drawn uniformly (seeded NumPy PCG64) from the entries outside ``exclude``."""
    _check(sizes, k, exclude)
    offsets = np.cumsum([0] + [n for _, n in sizes])
    taken = [exclude[key].cpu().numpy().astype(np.int64) + offsets[i]
             for i, (key, _) in enumerate(sizes) if exclude is not None and key in exclude]
    banned = np.sort(np.concatenate(taken)) if taken else np.empty(0, np.int64)
    picks = _distinct(np.random.Generator(np.random.PCG64(seed)), int(offsets[-1]) - banned.size, k)
    # the p-th free entry is p plus the number of banned entries before it
    flat = picks + np.searchsorted(banned - np.arange(banned.size), picks, side="right")
    out = {}
    for i, (key, _) in enumerate(sizes):
        lo, hi = np.searchsorted(flat, [offsets[i], offsets[i + 1]])
        if hi > lo:
            out[key] = torch.from_numpy(flat[lo:hi] - offsets[i])
    return out


def from_callable(fn: Callable[..., Any], changes: Mapping[str, Tensor], k: int,
                  exclude: Support | None = None) -> dict[str, Tensor]:
    """Run a user selection ``fn(changes, k) -> {name: bool mask}`` and check what it returns:
    between 1 and ``k`` entries in all, none of them already in the support."""
    where = f"selection function {getattr(fn, '__qualname__', fn)!r}"
    _check([(key, v.numel()) for key, v in changes.items()], k, exclude)
    masks = fn({key: v.detach() for key, v in changes.items()}, k)
    if not isinstance(masks, Mapping):
        raise ConfigError(f"{where} returned {type(masks).__name__}, expected a dict of bool masks by parameter name")
    unknown = sorted(set(masks) - set(changes))
    if unknown:
        raise ConfigError(f"{where} returned masks for unknown parameters {unknown[:3]}")
    out, count = {}, 0
    for key, mask in masks.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(changes[key].shape):
            raise ConfigError(f"{where}: the mask of {key!r} must be a bool tensor of shape {tuple(changes[key].shape)}")
        indices = mask.reshape(-1).nonzero().view(-1).cpu()
        excluded = _excluded(exclude, key, indices.device)
        if excluded is not None and bool(torch.isin(indices, excluded).any()):
            raise ConfigError(f"{where}: the mask of {key!r} selects entries already in the support")
        if indices.numel():
            out[key] = indices
            count += indices.numel()
    if not 0 < count <= k:
        raise ConfigError(f"{where} selected {count} entries; it must select between 1 and k={k}")
    return out
