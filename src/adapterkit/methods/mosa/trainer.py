"""``transformers.Trainer`` with MoSA's two-pass consistency loss."""

from __future__ import annotations

from typing import Any

from ...trainer import AdapterTrainer
from .consistency import two_pass_loss


class MoSATrainer(AdapterTrainer):
    """An :class:`~adapterkit.AdapterTrainer` whose loss is :func:`two_pass_loss` (per-step
    module choice comes from the :class:`~adapterkit.StepCallback` it already has)."""

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        if return_outputs:  # evaluation: merged weights, one pass
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return two_pass_loss(model, inputs)
