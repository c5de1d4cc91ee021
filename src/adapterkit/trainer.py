"""``transformers.Trainer`` integration: adapter-only checkpoints.

Any ``Trainer`` already trains adapters (only they require gradients). :class:`AdapterTrainer`
additionally makes every checkpoint and ``save_model`` call write the adapters with
:func:`adapterkit.save` — a few hundred kB instead of the whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from transformers import Trainer

from .api import adapters
from .artefact import save


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
        self.adapter_names = list(adapter_names) if adapter_names is not None else None
        self.save_format = save_format

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.args.should_save:
            return
        directory = Path(output_dir or self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model)
        for name in self.adapter_names or adapters(model):
            save(model, directory / name, name, format=self.save_format)
