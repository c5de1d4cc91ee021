"""Where the loss and the logits are in a model's output (a tensor, a mapping, a ModelOutput or a tuple)."""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor


def loss_of(output: Any) -> Tensor:
    """The loss in a model's output: a scalar tensor, a ``"loss"`` key or attribute, or the first element."""
    if isinstance(output, Tensor) and output.dim() == 0:
        return output
    if isinstance(output, Mapping):
        return output["loss"]
    return output.loss if hasattr(output, "loss") else output[0]


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a ``"logits"`` key or attribute, or the second element."""
    if isinstance(output, Mapping):
        return output["logits"]
    return output.logits if hasattr(output, "logits") else output[1]
