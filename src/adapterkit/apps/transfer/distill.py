"""Distillation from the source model + its adapter (the teacher) into a fresh adapter on the target.

* ``sequence`` (default, works across tokenizers): the teacher answers each synthetic prompt
  (greedy by default) and the student learns those answers, loss on the answer tokens only;
* ``logits`` (same vocabulary only): the student matches the teacher's next-token distribution
  at every answer position, ``CE(student log-softmax, teacher softmax)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ...core import api
from ...errors import ConfigError, UnsupportedError
from ...train.causal import IGNORE, Completion, Sampling, completion_logits, generate, train_completions

MODES = ("sequence", "logits")


@contextlib.contextmanager
def activated(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Run with only ``adapter`` active (``None``: the base model); the activation is restored after."""
    before = api.active_adapters(model)
    api.activate(model, adapter)
    try:
        yield
    finally:
        api.activate(model, [n for n, _ in before] or None, [w for _, w in before] or None)


@dataclasses.dataclass
class Teacher:
    """A model, its tokenizer, and the adapter that holds the task (``None``: the base model)."""

    model: nn.Module
    tokenizer: Any
    adapter: str | None = None

    def answers(self, prompts: Sequence[str], sampling: Sampling = Sampling(max_new_tokens=32), *,
                batch_size: int = 32, progress: bool = True) -> list[str]:
        with activated(self.model, self.adapter):
            return generate(self.model, self.tokenizer, prompts, sampling, batch_size=batch_size, progress=progress,
                            desc="label")


def _vocabulary_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_same_vocabulary(teacher: Teacher, student: nn.Module, student_tokenizer: Any) -> None:
    """Logit distillation compares distributions token by token: refuse different vocabularies."""
    if teacher.tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise UnsupportedError("logit-level distillation needs one vocabulary; the teacher's and student's tokenizers "
                               "differ (use mode='sequence', which works across tokenizers)")
    if _vocabulary_size(teacher.model) != _vocabulary_size(student):
        raise UnsupportedError(f"logit-level distillation needs one output size; the teacher has "
                               f"{_vocabulary_size(teacher.model)} logits, the student {_vocabulary_size(student)}")


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over ``mask`` positions of ``-sum_v softmax(teacher/T)_v * log_softmax(student/T)_v``."""
    target = (teacher_logits.float() / temperature).softmax(-1)
    per_position = -(target * (student_logits.float() / temperature).log_softmax(-1)).sum(-1)
    return per_position[mask].mean()


def logit_kd_loss(teacher: Teacher, temperature: float = 1.0) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
    """A ``loss_fn`` for :func:`adapterkit.train`: the student's answer-position distributions against
    the teacher's on the same batch (the teacher may be the student's own model with another adapter)."""
    def loss(student: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        with torch.no_grad(), activated(teacher.model, teacher.adapter):
            reference, _ = completion_logits(teacher.model, batch)
        logits, targets = completion_logits(student, batch)
        return soft_cross_entropy(logits, reference, targets != IGNORE, temperature)

    return loss


def distill(student: nn.Module, student_tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *,
            mode: str = "sequence", teacher: Teacher | None = None, epochs: int = 2, lr: float | None = None,
            batch_size: int = 8, max_length: int = 256, seed: int = 0, progress: bool = True) -> list[float]:
    """Train the student's active adapter (any method) on the teacher's ``answers`` to ``prompts``.
    Empty answers are skipped (nothing to learn). ``logits`` mode also needs ``teacher``."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if len(prompts) != len(answers):
        raise ConfigError(f"{len(prompts)} prompts but {len(answers)} answers")
    loss_fn = None
    if mode == "logits":
        if teacher is None:
            raise ConfigError("logit-level distillation needs the teacher model")
        check_same_vocabulary(teacher, student, student_tokenizer)
        loss_fn = logit_kd_loss(teacher)
    pairs = [Completion(p, a.strip()) for p, a in zip(prompts, answers) if a.strip()]
    if not pairs:
        raise ConfigError("the teacher gave no non-empty answer to learn from")
    options = {"loss_fn": loss_fn} if loss_fn is not None else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return train_completions(student, student_tokenizer, pairs, epochs=epochs, lr=lr, batch_size=batch_size,
                                 max_length=max_length, seed=seed, progress=progress, **options)
