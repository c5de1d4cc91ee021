"""A thin training loop with a progress bar, text batching, and ``transformers.Trainer`` support.

Adapters need no special loop: any optimizer over ``p for p in model.parameters() if
p.requires_grad`` trains them. :func:`train` is that loop with linear warm-up/decay and tqdm.
:class:`AdapterTrainer` makes the Hugging Face ``Trainer`` write adapter-only checkpoints.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.outputs import loss_of, logits_of
from ..core.registry import AdapterMethod
from ..core.state import active_records
from ..core.steps import step

Batch = Mapping[str, Tensor]

#: Low-bit adapters (``bits <= LOW_BIT_MAX_BITS``) train at this multiple of their method's default LR:
#: the straight-through estimator moves a 1-2-bit code only after a larger latent step (a 1-bit
#: LoRA at the fp32 LR lost about 9 points on held-out sentiment and matched fp32 at 4x the LR).
LOW_BIT_LR_FACTOR = 4.0
LOW_BIT_MAX_BITS = 2


def default_learning_rate(model: nn.Module) -> float:
    """The LR :func:`train` uses when none is given: the largest default of the active adapters'
    methods (:attr:`AdapterMethod.default_learning_rate`), each times :data:`LOW_BIT_LR_FACTOR` when
    the adapter has ``bits <= 2``; :attr:`AdapterMethod.default_learning_rate` (1e-3) with no adapter."""
    rates = [record.method.default_learning_rate
             * (LOW_BIT_LR_FACTOR if record.config.bits <= LOW_BIT_MAX_BITS else 1.0)
             for _, record in active_records(model)]
    return max(rates, default=AdapterMethod.default_learning_rate)



class LabelledTexts(Protocol):
    """Texts with one integer label each (e.g. :class:`adapterkit.zoo.data.LabelledTexts`)."""

    texts: Sequence[str]
    labels: Sequence[int]

    def __len__(self) -> int: ...


class TextBatches:
    """Re-iterable tokenised mini-batches of labelled texts.

    Texts are tokenised once. With ``shuffle`` the order changes every epoch (seeded) and
    batches are formed from windows of similar length, which cuts padding. ``by_length``
    (for evaluation) orders the whole set by length; labels travel with their batches.
    """

    def __init__(self, tokenizer: Any, data: LabelledTexts, batch_size: int = 32, max_length: int = 64,
                 shuffle: bool = False, seed: int = 0, by_length: bool = False) -> None:
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.by_length = by_length
        self.seed = seed
        self.epoch = 0
        encoded = tokenizer(list(data.texts), truncation=True, max_length=max_length)
        self.features = [{k: encoded[k][i] for k in encoded} for i in range(len(data))]
        self.labels = list(data.labels)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def _order(self) -> list[int]:
        order = list(range(len(self.labels)))
        if self.by_length:
            return sorted(order, key=lambda j: len(self.features[j]["input_ids"]))
        if not self.shuffle:
            return order
        rng = random.Random(self.seed + self.epoch)
        rng.shuffle(order)
        window = self.batch_size * 8
        chunks = [sorted(order[i:i + window], key=lambda j: len(self.features[j]["input_ids"])) for i in range(0, len(order), window)]
        batches = [c[i:i + self.batch_size] for c in chunks for i in range(0, len(c), self.batch_size)]
        rng.shuffle(batches)
        return [j for b in batches for j in b]

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        order = self._order()
        self.epoch += 1
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer.pad([self.features[i] for i in idx], return_tensors="pt")
            batch["labels"] = torch.tensor([self.labels[i] for i in idx])
            yield dict(batch)


class FrozenNormStatistics:
    """Keeps every batch-norm layer whose parameters are all frozen (the base model's) in eval mode
    during training, so its running statistics — part of the base model — never change and the
    adapters learn against the statistics the model was pretrained with. Undo with :meth:`remove`
    (or use it as a context manager). :func:`train` and :class:`~adapterkit.AdapterTrainer` do
    this for you; call it yourself in a plain loop over a CNN."""

    def __init__(self, model: nn.Module) -> None:
        frozen = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  and not any(p.requires_grad for p in m.parameters(recurse=False))]
        # a forward pre-hook, because model.train() (the Trainer calls it every step) resets modes
        self._handles = [m.register_forward_pre_hook(_evaluate_mode) for m in frozen]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "FrozenNormStatistics":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _evaluate_mode(module: nn.Module, args: Any) -> None:
    module.training = False


def train(
    model: nn.Module,
    batches: Iterable[Batch],
    epochs: int = 1,
    lr: float | None = None,
    weight_decay: float = 0.0,
    warmup: float = 0.06,
    max_grad_norm: float | None = 1.0,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    loss_fn: Callable[[nn.Module, Batch], Tensor] | None = None,
) -> list[float]:
    """Train the model's trainable parameters (the adapters) with AdamW; return the step losses.

    ``batches`` yields keyword-argument dicts for ``model(**batch)``, which must return a loss
    (a ``"loss"`` key, a ``.loss`` attribute or the first element), unless ``loss_fn(model, batch)``
    computes the loss itself (e.g. :func:`adapterkit.mosa.two_pass_loss`).

    ``lr=None`` uses :func:`default_learning_rate`: the largest default of the active adapters'
    methods, chosen on validation in ``bench/results``:

    ==========  ==========  =================================================
    method      default LR  evidence
    ==========  ==========  =================================================
    lora        3e-3        shira_quality.md, dylora_bench.md, mosa_bench.md
    dylora      3e-3        dylora_bench.md (every variant chose 3e-3)
    shira       1e-2        shira_quality.md (rand, wm, snip masks)
    bottleneck  1e-3        mosa_bench.md (text)
    mosa        3e-3        mosa_bench.md (text)
    ==========  ==========  =================================================

    A low-bit adapter (``bits`` 1 or 2) trains at 4x its method's default (:data:`LOW_BIT_LR_FACTOR`).
    """
    if lr is None:
        lr = default_learning_rate(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; attach an adapter first")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = epochs * len(batches) if hasattr(batches, "__len__") else None
    warm = max(1, int(warmup * total)) if total else 1

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm)) if total else 1.0

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    was_training = model.training
    model.train()
    frozen_norms = FrozenNormStatistics(model)
    losses: list[float] = []
    bar = tqdm(total=total, desc="train", disable=not progress, leave=False, mininterval=1.0)
    try:
        for _ in range(epochs):
            for batch in batches:
                step(model)
                loss = loss_fn(model, batch) if loss_fn is not None else loss_of(model(**batch))
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if on_step is not None:
                    on_step(len(losses), losses[-1])
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    finally:
        bar.close()
        frozen_norms.remove()
        model.train(was_training)
    return losses


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Batch]) -> Tensor:
    """Logits for every batch, concatenated (labels in the batches are ignored)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([logits_of(model(**{k: v for k, v in b.items() if k != "labels"})) for b in batches])
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Fraction of examples whose arg-max logit equals the label."""
    batches = list(batches)
    predictions = predict(model, batches).argmax(-1)
    labels = torch.cat([b["labels"] for b in batches])
    return (predictions == labels).float().mean().item()
