"""MoSA's consistency regulariser: two stochastic passes, symmetric KL with stop-gradient."""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from ...core.state import active_records
from ...core.outputs import logits_of, loss_of
from .config import MoSAConfig
from .method import resample


def consistency_loss(first: Tensor, second: Tensor) -> Tensor:
    """``½ [KL(p₁ ‖ sg(p₂)) + KL(p₂ ‖ sg(p₁))]`` over the last dimension, averaged over the rest;
    each side gets gradient only through its own distribution."""
    log_p1, log_p2 = F.log_softmax(first.float(), dim=-1), F.log_softmax(second.float(), dim=-1)
    kl_12 = (log_p1.exp() * (log_p1 - log_p2.detach())).sum(-1)
    kl_21 = (log_p2.exp() * (log_p2 - log_p1.detach())).sum(-1)
    return 0.5 * (kl_12 + kl_21).mean()


def active_consistency_weight(model: nn.Module) -> float:
    """The largest ``consistency_weight`` among the model's active MoSA adapters (0 if none)."""
    weights = [record.config.consistency_weight for _, record in active_records(model)
               if isinstance(record.config, MoSAConfig)]
    return max(weights, default=0.0)


def two_pass_loss(model: nn.Module, batch: Mapping[str, Any], weight: float | None = None) -> Tensor:
    """Task loss of one pass plus ``weight`` × :func:`consistency_loss` against a second pass with
    fresh module choices (``weight`` defaults to the active MoSA adapters' ``consistency_weight``;
    with 0 it is a single ordinary pass). Use as ``ak.train(..., loss_fn=ak.mosa.two_pass_loss)``
    or through :class:`adapterkit.MoSATrainer`."""
    weight = active_consistency_weight(model) if weight is None else weight
    first = model(**batch)
    loss = loss_of(first)
    if weight == 0:
        return loss
    resample(model)
    second = model(**batch)
    return loss + weight * consistency_loss(logits_of(first), logits_of(second))
