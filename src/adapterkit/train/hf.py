"""``transformers.Trainer`` integration: per-step adapter hooks and adapter-only checkpoints.

Any ``Trainer`` already trains adapters (only they require gradients); add
:class:`StepCallback` so adapters with per-step randomness (DyLoRA's rank) draw it once per
optimizer step. :class:`AdapterTrainer` includes that callback and makes every checkpoint and
``save_model`` call write the adapters with :func:`adapterkit.save` — a few hundred kB instead
of the whole model.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, Sequence

from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainerCallback

from ..core.api import adapters, detach
from ..core.packing import refuse_training
from ..core.state import get_state
from ..errors import MissingFileError
from ..io.artefact import load
from ..io.artefact import save
from ..core.steps import step
from ..methods.mosa.consistency import two_pass_loss
from .distributed import check_draws, may_skip_parameters, two_pass_in_one_forward
from .draws import read_draws, restore_generator_states, save_draws
from .loop import FrozenNormStatistics


class StepCallback(TrainerCallback):
    """Calls :func:`adapterkit.step` at the start of every optimizer step (once per
    gradient-accumulated step, not per micro-batch), and keeps frozen batch-norm statistics
    fixed during training (:class:`~adapterkit.training.FrozenNormStatistics`). On several
    processes it then checks that every rank drew alike (:func:`~adapterkit.train.distributed.check_draws`)."""

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
            check_draws(model)


def load_values(model: Any, directory: Path, names: Sequence[str]) -> None:
    """Copy the values saved under ``directory/<name>`` into the attached adapters ``names``.

    Each file is loaded (and validated) as a temporary adapter first; only then are values
    copied, so a bad checkpoint changes nothing.
    """
    missing = [name for name in names if not (directory / name).is_dir()]
    if missing:
        raise MissingFileError(f"{directory} holds no saved adapter(s) {missing}")
    state = get_state(model)
    active = list(state.active)
    loaded = []
    try:
        for name in names:
            loaded.append((name, load(model, directory / name, f"_resume_{name}")))
        for name, temporary in loaded:
            for path, source in state.layers(temporary):
                state.host(path).layer(name).load_state_dict(source.state_dict())
    finally:
        for _, temporary in loaded:
            detach(model, temporary)
        state.active = tuple(active)
        state.refresh_plans()


class AdapterTrainer(Trainer):
    """A ``Trainer`` whose checkpoints hold only adapters, one sub-directory per adapter.

    Args:
        adapter_names: which adapters to save (default: all attached ones).
        save_format: ``"adapterkit"`` or ``"peft"``.

    ``resume_from_checkpoint`` and ``load_best_model_at_end`` work: the checkpoint's adapter
    values are copied into the attached adapters of the same names, in place (the parameter
    objects stay, so the optimizer state the Trainer restores lines up with them). Checkpoints
    also hold the adapters' per-step generator states (:mod:`adapterkit.train.draws`), so a resumed
    run draws DyLoRA ranks / MoSA choices as the uninterrupted run would. Only the main process
    writes adapter files (``args.should_save``).

    Under DDP, ``ddp_find_unused_parameters`` left unset (``None``) is chosen from the adapters:
    on only when a step may leave trainable parameters without a gradient
    (:func:`~adapterkit.train.distributed.may_skip_parameters`: MoSA, an inactive adapter, a
    Split). The Trainer's own default ignores that (off with gradient checkpointing, which breaks
    MoSA; on otherwise, which costs a graph search and a warning every step).
    """

    def __init__(self, *args: Any, adapter_names: Sequence[str] | None = None, save_format: str = "adapterkit", **kwargs: Any) -> None:
        args, kwargs = _with_unused_search(args, kwargs)
        super().__init__(*args, **kwargs)
        self.add_callback(StepCallback())
        self.adapter_names = list(adapter_names) if adapter_names is not None else None
        self.save_format = save_format

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; refused with an UnsupportedError while a packed adapter is active and
        would train or is all there is to train (:func:`adapterkit.unpack` it first)."""
        refuse_training(self.model)
        return super().train(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.args.should_save:
            return
        directory = Path(output_dir or self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model)
        for name in self.adapter_names or adapters(model):
            save(model, directory / name, name, format=self.save_format)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.args.should_save:  # the ranks' generators are equal (StepCallback checks)
            save_draws(self.accelerator.unwrap_model(self.model), output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        draws = read_draws(model, resume_from_checkpoint)  # checked first: a bad file changes nothing
        load_values(model, Path(resume_from_checkpoint), self.adapter_names or adapters(model))
        restore_generator_states(model, draws)

    def _load_best_model(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        load_values(model, Path(self.state.best_model_checkpoint), self.adapter_names or adapters(model))


def _with_unused_search(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The Trainer's arguments with ``ddp_find_unused_parameters`` chosen when it is unset; the
    caller's ``TrainingArguments`` object is copied, not changed."""
    bound = inspect.signature(Trainer.__init__).bind_partial(None, *args, **kwargs)
    model, training_args = bound.arguments.get("model"), bound.arguments.get("args")
    if model is None or training_args is None or training_args.ddp_find_unused_parameters is not None:
        return args, kwargs
    training_args = copy.copy(training_args)
    training_args.ddp_find_unused_parameters = may_skip_parameters(model)
    bound.arguments["args"] = training_args
    return bound.args[1:], bound.kwargs


class MoSATrainer(AdapterTrainer):
    """An :class:`~adapterkit.AdapterTrainer` whose loss is :func:`two_pass_loss` (per-step
    module choice comes from the :class:`~adapterkit.StepCallback` it already has)."""

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        if return_outputs:  # evaluation: merged weights, one pass
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if isinstance(model, DistributedDataParallel):
            return two_pass_in_one_forward(model, inputs)
        return two_pass_loss(model, inputs)
