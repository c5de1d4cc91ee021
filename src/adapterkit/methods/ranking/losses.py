"""The ranking-aware adapter's losses: pairwise BCE on the pair logits plus ``log(1 + SmoothL1)``
on the regression scores (the official code's ``L_rank + 0.2·L_reg``)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from .modules import RankingOutput


def pair_labels(targets: Tensor) -> Tensor:
    """``1[y_i > y_j]`` for every ordered pair (N, N); ties and the diagonal are 0."""
    return (targets.unsqueeze(1) > targets.unsqueeze(0)).to(targets.dtype if targets.is_floating_point() else torch.float32)


def pairwise_rank_loss(pair_logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy over all N² ordered pairs (diagonal included, as the official code)."""
    return F.binary_cross_entropy_with_logits(pair_logits, pair_labels(targets).to(pair_logits.dtype))


def log_smooth_l1(scores: Tensor, targets: Tensor) -> Tensor:
    """``log(1 + SmoothL1(s, y))`` with SmoothL1 averaged over the batch, on the raw targets."""
    return torch.log1p(F.smooth_l1_loss(scores, targets.to(scores.dtype)))


@dataclasses.dataclass(frozen=True)
class RankingLoss:
    """``total = rank_weight · L_rank + regression_weight · L_reg`` (L_rank is 0 without pair logits)."""

    total: Tensor
    rank: Tensor | None
    regression: Tensor


def ranking_loss(output: RankingOutput, targets: Tensor, rank_weight: float = 1.0,
                 regression_weight: float = 0.2) -> RankingLoss:
    """The adapter's training loss for one batch (one instruction, targets (N,))."""
    regression = log_smooth_l1(output.scores, targets)
    rank = None if output.pair_logits is None else pairwise_rank_loss(output.pair_logits, targets)
    total = regression_weight * regression + (rank_weight * rank if rank is not None else 0.0)
    return RankingLoss(total, rank, regression)
