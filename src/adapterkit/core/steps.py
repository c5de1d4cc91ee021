"""The per-optimizer-step hook shared by every method with per-step randomness."""

from __future__ import annotations

from torch import nn

from .state import active_records


def step(model: nn.Module) -> None:
    """Start an optimizer step: adapters with per-step randomness draw it now (DyLoRA samples a
    rank, ...). Call it once per optimizer step, before the step's first forward; every
    micro-batch of a gradient-accumulated step then shares the draw. :func:`train` and
    :class:`~adapterkit.AdapterTrainer` (or :class:`~adapterkit.StepCallback`
    in any ``Trainer``) call it for you."""
    for state, record in active_records(model):
        record.method.on_step(record.config, [layer for _, layer in state.layers(record.name)])
