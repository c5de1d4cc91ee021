"""The discriminator: an adapter on the source model that answers whether an input looks like the
task's real data (``yes``) or like a language model's imitation of it (``no``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ...core import api
from ...core.config import AdapterConfig
from ...core.snapshot import rollback_on_error
from ...errors import ConfigError
from ...train.causal import Completion, answer_log_probs, train_completions


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The question the discriminator answers: the task instruction, the input, then
    ``"Is the above question from {descriptor} dataset?"``, answered ``yes`` or ``no``."""

    descriptor: str
    instruction: str = ""
    question: str = "Is the above question from {descriptor} dataset?"
    yes: str = "yes"
    no: str = "no"

    def __post_init__(self) -> None:
        if not all(isinstance(getattr(self, f.name), str) for f in dataclasses.fields(self)):
            raise ConfigError("the verdict template's fields must be strings")
        if not self.descriptor.strip() or self.yes == self.no or not self.yes or not self.no:
            raise ConfigError("the verdict template needs a descriptor and two different non-empty answers")

    def render(self, text: str) -> str:
        head = f"{self.instruction}\n\n" if self.instruction else ""
        return f"{head}{text}\n{self.question.format(descriptor=self.descriptor)}"


class Discriminator:
    """Adapter ``adapter`` of ``model`` judging inputs with :class:`Verdict`. :meth:`accept` keeps an
    input iff ``log p(yes) > log p(no)`` — strictly, so a tie is a rejection. While it judges, only
    its adapter is active; the model's previous activation is restored afterwards."""

    def __init__(self, model: nn.Module, tokenizer: Any, adapter: str, verdict: Verdict, batch_size: int = 32) -> None:
        if adapter not in api.adapters(model):
            raise ConfigError(f"the model has no adapter {adapter!r}; attach or load the discriminator first")
        self.model, self.tokenizer, self.adapter, self.verdict, self.batch_size = model, tokenizer, adapter, verdict, batch_size

    def log_probs(self, texts: Sequence[str]) -> Tensor:
        """``[len(texts), 2]``: log p(yes), log p(no) for each input."""
        active = api.active_adapters(self.model)
        api.activate(self.model, self.adapter)
        try:
            return answer_log_probs(self.model, self.tokenizer, [self.verdict.render(t) for t in texts],
                                    [self.verdict.yes, self.verdict.no], batch_size=self.batch_size)
        finally:
            api.activate(self.model, [n for n, _ in active] or None, [w for _, w in active] or None)

    def accept(self, texts: Sequence[str]) -> list[bool]:
        if not texts:
            return []
        scores = self.log_probs(texts)
        return (scores[:, 0] > scores[:, 1]).tolist()

    def accuracy(self, real: Sequence[str], synthetic: Sequence[str]) -> float:
        """Share of ``real`` accepted and ``synthetic`` rejected."""
        right = sum(self.accept(real)) + sum(not ok for ok in self.accept(synthetic))
        return right / max(1, len(real) + len(synthetic))


def train_discriminator(model: nn.Module, tokenizer: Any, real: Sequence[str], synthetic: Sequence[str],
                        verdict: Verdict, config: AdapterConfig, name: str = "discriminator", *, epochs: int = 2,
                        lr: float | None = None, batch_size: int = 8, seed: int = 0, progress: bool = True) -> Discriminator:
    """Attach adapter ``name`` (any method) and train it to answer ``yes`` on ``real`` inputs and
    ``no`` on ``synthetic`` ones (Eq. 1 of the paper: the log-likelihood of the right verdict).
    The model's other adapters keep their state; on failure the new adapter is removed."""
    if not real or not synthetic:
        raise ConfigError(f"the discriminator needs real and synthetic inputs, got {len(real)} and {len(synthetic)}")
    examples = [Completion(verdict.render(t), verdict.yes) for t in real]
    examples += [Completion(verdict.render(t), verdict.no) for t in synthetic]
    active = api.active_adapters(model)
    # a failure removes the adapter and restores the rest (detach alone would leave the base frozen)
    with rollback_on_error(model, values=False), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the adapter's initial values too: the caller's RNG state does not matter
        api.attach(model, config, name)
        try:
            api.activate(model, name)
            train_completions(model, tokenizer, examples, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                              progress=progress, close=False)
        finally:
            api.activate(model, [n for n, _ in active] or None, [w for _, w in active] or None)
    return Discriminator(model, tokenizer, name, verdict)
