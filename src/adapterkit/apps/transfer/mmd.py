"""Maximum mean discrepancy between two sets of embeddings (the paper's Table 8 distance)."""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import ConfigError


def mmd(x: Tensor, y: Tensor, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with a Gaussian kernel; ``bandwidth`` defaults to the median pairwise
    distance of the pooled sets (the usual heuristic), so the value is comparable across pairs only
    when the bandwidth is fixed — pass the same one for filtered and unfiltered sets."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or len(x) < 2 or len(y) < 2:
        raise ConfigError(f"mmd needs two [n, d] sets with n >= 2 and one d, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    if bandwidth is None:
        bandwidth = median_distance(torch.cat([x, y]))
    gamma = 1.0 / (2 * bandwidth ** 2)

    def mean_kernel(a: Tensor, b: Tensor, same: bool) -> Tensor:
        k = torch.exp(-gamma * torch.cdist(a, b) ** 2)
        if same:
            n = len(a)
            return (k.sum() - k.diagonal().sum()) / (n * (n - 1))
        return k.mean()

    return float(mean_kernel(x, x, True) + mean_kernel(y, y, True) - 2 * mean_kernel(x, y, False))


def median_distance(points: Tensor) -> float:
    """The median of the pairwise Euclidean distances (a kernel bandwidth)."""
    d = torch.cdist(points.double(), points.double())
    upper = d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)]
    return float(upper.median().clamp(min=1e-12))
