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
from ..core.packing import refuse_training
from ..core.snapshot import ModelSnapshot
from ..core.registry import AdapterMethod
from ..core.state import active_records
from ..core.steps import step
from ..errors import AdapterError, ConfigError

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


def length_windowed_order(sizes: Sequence[int], batch_size: int, rng: random.Random) -> list[int]:
    """A shuffled order of ``range(len(sizes))`` whose consecutive ``batch_size`` runs hold items of
    similar size (sorted within windows of 8 batches, then the batches shuffled): less padding."""
    order = list(range(len(sizes)))
    rng.shuffle(order)
    window = batch_size * 8
    chunks = [sorted(order[i:i + window], key=lambda j: sizes[j]) for i in range(0, len(order), window)]
    batches = [c[i:i + batch_size] for c in chunks for i in range(0, len(c), batch_size)]
    rng.shuffle(batches)
    return [j for b in batches for j in b]


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
        return length_windowed_order([len(f["input_ids"]) for f in self.features], self.batch_size,
                                     random.Random(self.seed + self.epoch))

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
    _check_options(epochs, lr, weight_decay, warmup, max_grad_norm)
    _check_iterable(batches)
    params = [p for p in model.parameters() if p.requires_grad]
    refuse_training(model)  # packed adapters are inference-only
    if not params:
        raise ConfigError("the model has no trainable parameters; attach an adapter first")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = epochs * len(batches) if hasattr(batches, "__len__") else None
    warm = max(1, int(warmup * total)) if total else 1

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm)) if total else 1.0

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rollback = _Rollback(model, params)  # a failed run leaves the model as it was
    model.train()
    frozen_norms = FrozenNormStatistics(model)
    losses: list[float] = []
    bar = tqdm(total=total, desc="train", disable=not progress, leave=False, mininterval=1.0)
    where = "before the first batch"
    try:
        for epoch in range(epochs):
            for index, batch in enumerate(batches):
                where = f"epoch {epoch}, batch {index}"
                step(model)
                loss = loss_fn(model, batch) if loss_fn is not None else loss_of(model(**_kwargs(batch, where)))
                if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.requires_grad:
                    raise ConfigError(f"{where}: the model returned no differentiable scalar loss (got "
                                      f"{type(loss).__name__}); include labels in the batches or pass loss_fn")
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
    except Exception as error:  # interrupting (KeyboardInterrupt) keeps the progress made
        rollback.restore()
        raise _as_adapter_error(error, f"training ({where})") from error
    finally:
        bar.close()
        frozen_norms.remove()
    rollback.modes()
    return losses


def _check_options(epochs: Any, lr: Any, weight_decay: Any, warmup: Any, max_grad_norm: Any) -> None:
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ConfigError(f"epochs must be a non-negative integer, got {epochs!r}")
    if not number(lr) or lr <= 0:
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
    if not number(weight_decay) or weight_decay < 0:
        raise ConfigError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not number(warmup) or not 0 <= warmup <= 1:
        raise ConfigError(f"warmup must be a fraction of the steps in [0, 1], got {warmup!r}")
    if max_grad_norm is not None and (not number(max_grad_norm) or max_grad_norm <= 0):
        raise ConfigError(f"max_grad_norm must be None or a finite number > 0, got {max_grad_norm!r}")


def _check_iterable(batches: Any) -> None:
    if isinstance(batches, (Mapping, str, bytes, Tensor)) or not isinstance(batches, Iterable):
        raise ConfigError(f"batches must be an iterable of keyword-argument dicts (e.g. a list of them), "
                          f"got {type(batches).__name__}")


def _kwargs(batch: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(batch, Mapping) or not all(isinstance(k, str) for k in batch):
        raise ConfigError(f"{where}: a batch must be a dict of keyword arguments for model(**batch), "
                          f"got {type(batch).__name__}")
    return batch


def _as_adapter_error(error: Exception, doing: str) -> Exception:
    """Errors of the model's own forward on a bad batch, as a :class:`ConfigError` (ours, and
    running out of memory, pass unchanged)."""
    if isinstance(error, AdapterError) or isinstance(error, torch.OutOfMemoryError):
        return error
    return ConfigError(f"{doing} failed; the model is unchanged: {type(error).__name__}: {error}")


class _Rollback:
    """Undo a training run: module tree, hooks and every module's train/eval flag, gradients,
    and the values of the trainable parameters and of all buffers (the frozen base weights are
    never written by the loop, so they are not copied)."""

    def __init__(self, model: nn.Module, params: list[Tensor]) -> None:
        self.snapshot = ModelSnapshot(model, values=False)
        self.values = [(t, t.detach().clone()) for t in [*params, *model.buffers()]]

    def modes(self) -> None:
        """Only the train/eval flags back (after a successful run)."""
        for state in self.snapshot.modules:
            state.module.training = state.training

    def restore(self) -> None:
        self.snapshot.restore()
        with torch.no_grad():
            for tensor, value in self.values:
                tensor.copy_(value)


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Batch]) -> Tensor:
    """Logits for every batch, concatenated (labels in the batches are ignored)."""
    _check_iterable(batches)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    where = "before the first batch"
    try:
        logits = []
        for index, batch in enumerate(batches):
            where = f"batch {index}"
            inputs = {k: v for k, v in _kwargs(batch, f"batch {index}").items() if k != "labels"}
            out = logits_of(model(**inputs))
            if not isinstance(out, Tensor) or out.dim() == 0:
                raise ConfigError(f"batch {index}: the model's output has no logits tensor (got {type(out).__name__})")
            logits.append(out)
        if not logits:
            raise ConfigError("predict got no batches")
        return torch.cat(logits)
    except Exception as error:
        raise _as_adapter_error(error, f"prediction ({where})") from error
    finally:
        for module, mode in modes:  # every module's own flag, not one flag for all
            module.training = mode


def accuracy(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Fraction of examples whose arg-max logit equals the label."""
    _check_iterable(batches)
    batches = list(batches)
    for index, batch in enumerate(batches):
        if not isinstance(_kwargs(batch, f"batch {index}").get("labels"), Tensor):
            raise ConfigError(f"batch {index}: accuracy needs a 'labels' tensor in every batch")
    predictions = predict(model, batches).argmax(-1)
    labels = torch.cat([b["labels"].reshape(-1) for b in batches])
    if labels.shape != predictions.reshape(-1).shape:
        raise ConfigError(f"{labels.numel()} labels for {predictions.numel()} predictions; give one label per example")
    predictions = predictions.reshape(-1).to(labels.device)
    return (predictions == labels).float().mean().item()
