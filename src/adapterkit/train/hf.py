"""``transformers.Trainer`` integration: per-step adapter hooks and adapter-only checkpoints.

Any ``Trainer`` already trains adapters (only they require gradients); add
:class:`StepCallback` so adapters with per-step randomness (DyLoRA's rank) draw it once per
optimizer step. :class:`AdapterTrainer` includes that callback and makes every checkpoint and
``save_model`` call write the adapters with :func:`adapterkit.save` — a few hundred kB instead
of the whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from transformers import Trainer, TrainerCallback

from ..core.api import adapters
from ..io.artefact import save
from ..core.steps import step
from ..methods.mosa.consistency import two_pass_loss
from .loop import FrozenNormStatistics


class StepCallback(TrainerCallback):
    """Calls :func:`adapterkit.step` at the start of every optimizer step (once per
    gradient-accumulated step, not per micro-batch), and keeps frozen batch-norm statistics
    fixed during training (:class:`~adapterkit.training.FrozenNormStatistics`)."""

    def __init__(self) -> None:
        self._frozen_norms: FrozenNormStatistics | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            self._frozen_norms = FrozenNormStatistics(model)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._frozen_norms is not None:
            self._frozen_norms.remove()
            self._frozen_norms = None

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:  # also finds the adapted model inside DistributedDataParallel & co.
            step(model)


class AdapterTrainer(Trainer):
    """A ``Trainer`` whose checkpoints hold only adapters, one sub-directory per adapter.

    Args:
        adapter_names: which adapters to save (default: all attached ones).
        save_format: ``"adapterkit"`` or ``"peft"``.

    Checkpoints hold no base weights, so ``resume_from_checkpoint`` and
    ``load_best_model_at_end`` are not wired in: load the wanted checkpoint's adapters with
    :func:`adapterkit.load` (or ``ak.detach`` + ``ak.load``) before training or evaluating.
    """

    def __init__(self, *args: Any, adapter_names: Sequence[str] | None = None, save_format: str = "adapterkit", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(StepCallback())
        self.adapter_names = list(adapter_names) if adapter_names is not None else None
        self.save_format = save_format

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.args.should_save:
            return
        directory = Path(output_dir or self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model)
        for name in self.adapter_names or adapters(model):
            save(model, directory / name, name, format=self.save_format)


class MoSATrainer(AdapterTrainer):
    """An :class:`~adapterkit.AdapterTrainer` whose loss is :func:`two_pass_loss` (per-step
    module choice comes from the :class:`~adapterkit.StepCallback` it already has)."""

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        if return_outputs:  # evaluation: merged weights, one pass
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return two_pass_loss(model, inputs)
