"""Ordering metrics for text-driven image ranking: SRCC, PLCC, Kendall τ, pairwise accuracy over
strict i < j pairs, MAE — per instruction, then averaged (correlations from scipy)."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from ..errors import ConfigError

METRICS = ("srcc", "plcc", "kendall", "pairwise", "mae")


def _arrays(scores: Sequence[float], targets: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(targets, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ConfigError(f"scores and targets differ in length: {s.size} vs {y.size}")
    if s.size < 2:
        raise ConfigError(f"ordering metrics need at least 2 images, got {s.size}")
    if not (np.isfinite(s).all() and np.isfinite(y).all()):
        raise ConfigError("scores and targets must be finite")
    return s, y


def _correlation(value: float) -> float:
    return float("nan") if value is None or math.isnan(value) else float(value)


def pairwise_accuracy(scores: Sequence[float], targets: Sequence[float]) -> float:
    """Share of the strict i < j pairs with different targets that the scores order correctly (a tie
    in the scores counts one half). Without ties it equals ``(Kendall τ_a + 1) / 2``. NaN when every
    target is equal."""
    s, y = _arrays(scores, targets)
    upper = np.triu_indices(s.size, k=1)
    ds, dy = (s[:, None] - s[None, :])[upper], (y[:, None] - y[None, :])[upper]
    ordered = dy != 0
    if not ordered.any():
        return float("nan")
    agree = np.sign(ds[ordered]) * np.sign(dy[ordered])
    return float(np.mean(np.where(agree == 0, 0.5, agree > 0)))


def offset_pairwise_accuracy(scores: Sequence[float], targets: Sequence[float]) -> float:
    """The official code's variant (for comparison only): it counts the lower-triangle pairs with
    index offset +1, i.e. j ≤ i + 1, which includes the diagonal (always "correct") and the first
    super-diagonal, and scores ``(s_i > s_j) == (y_i > y_j)``. It overstates pairwise accuracy."""
    s, y = _arrays(scores, targets)
    rows, cols = np.tril_indices(s.size, k=1)
    return float(np.mean((s[rows] > s[cols]) == (y[rows] > y[cols])))


def kendall_tau_a(scores: Sequence[float], targets: Sequence[float]) -> float:
    """``(concordant − discordant) / (n(n−1)/2)`` over all strict i < j pairs."""
    s, y = _arrays(scores, targets)
    upper = np.triu_indices(s.size, k=1)
    signs = np.sign((s[:, None] - s[None, :])[upper]) * np.sign((y[:, None] - y[None, :])[upper])
    return float(signs.sum() / signs.size)


@dataclasses.dataclass(frozen=True)
class OrderingMetrics:
    """The metrics of one instruction's images (Kendall τ is τ-b, scipy's default, which handles ties)."""

    srcc: float
    plcc: float
    kendall: float
    pairwise: float
    mae: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in METRICS}


def ordering_metrics(scores: Sequence[float], targets: Sequence[float]) -> OrderingMetrics:
    """SRCC, PLCC, Kendall τ-b, strict pairwise accuracy and MAE of one instruction's scores.
    Constant scores on varying targets order nothing: their correlations are 0 (a collapsed model
    scores as chance, it is not dropped from averages); with constant targets they are NaN."""
    s, y = _arrays(scores, targets)
    if np.ptp(y) == 0:
        srcc = plcc = kendall = float("nan")
    elif np.ptp(s) == 0:
        srcc = plcc = kendall = 0.0
    else:
        srcc = _correlation(stats.spearmanr(s, y).statistic)
        plcc = _correlation(stats.pearsonr(s, y).statistic)
        kendall = _correlation(stats.kendalltau(s, y).statistic)
    return OrderingMetrics(srcc=srcc, plcc=plcc, kendall=kendall, pairwise=pairwise_accuracy(s, y),
                           mae=float(np.mean(np.abs(s - y))), n=int(s.size))


def mean_metrics(per_instruction: Mapping[str, OrderingMetrics]) -> dict[str, float]:
    """The unweighted mean over instructions of each metric (NaNs ignored; NaN if all are)."""
    if not per_instruction:
        raise ConfigError("no instructions to average")
    out = {}
    for name in METRICS:
        values = [getattr(m, name) for m in per_instruction.values() if not math.isnan(getattr(m, name))]
        out[name] = float(np.mean(values)) if values else float("nan")
    return out
