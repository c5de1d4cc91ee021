"""The LT-SFT procedure: the dense phase and selection (shared by :func:`adapterkit.attach` and
:func:`train_sft`), the sparse phase, the L1 pull, and iterative LT-SFT.

Phase 2 trains the adapter's values only (``K`` numbers plus any ``modules_to_save`` head), so its
optimizer state is ``2K`` for AdamW; base entries outside the support are not parameters at all
and stay bit-identical whatever the optimizer (weight decay, clipping) does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...core.api import activate, adapter_parameters, attach
from ...core.outputs import loss_of
from ...core.seeding import layer_seed
from ...core.snapshot import ModelSnapshot, rollback_on_error
from ...core.state import get_state
from ...core.steps import step
from ...errors import AdapterError, ConfigError, FusedStateError
from . import select
from .config import SFTConfig
from .layer import SFTLayer

LossFn = Callable[[nn.Module, Any], Tensor]
PROGRESS_MIN_STEPS = 20  # attach shows a progress bar for dense phases at least this long


@dataclasses.dataclass(frozen=True)
class TargetTensor:
    """One parameter an SFT may change: ``module`` path, parameter name ``tensor`` inside it."""

    module: str
    tensor: str
    param: nn.Parameter

    @property
    def name(self) -> str:
        return f"{self.module}.{self.tensor}"


@dataclasses.dataclass
class Chosen:
    """The result of one selection: new flat indices by module path, then parameter name."""

    indices: dict[str, dict[str, Tensor]]
    count: int
    threshold: float | None

    @classmethod
    def of(cls, tensors: list[TargetTensor], by_name: Mapping[str, Tensor], threshold: float | None) -> "Chosen":
        indices: dict[str, dict[str, Tensor]] = {}
        for t in tensors:
            found = by_name.get(t.name)
            if found is not None and found.numel():
                indices.setdefault(t.module, {})[t.tensor] = found.to(t.param.device)
        return cls(indices, sum(int(v.numel()) for v in by_name.values()), threshold)


def base_parameter_count(model: nn.Module) -> int:
    """Parameters of the model without any adapter's (the N of the L1 term)."""
    own = {id(p) for host in get_state(model).hosts() for p in host.adapters.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in own)


def compute_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> Tensor:
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        loss = loss_of(model(**batch) if isinstance(batch, Mapping) else model(batch))
    if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.requires_grad:
        raise ConfigError(f"the loss must be a differentiable scalar tensor, got {type(loss).__name__}; include labels "
                          "in the batches or pass loss_fn")
    return loss


def cycle(batches: Iterable[Any]) -> Iterator[Any]:
    """The batches over and over (re-iterating the iterable each time)."""
    if isinstance(batches, (Mapping, str, bytes, Tensor)) or not isinstance(batches, Iterable):
        raise ConfigError(f"batches must be an iterable of batches (e.g. a list of dicts), got {type(batches).__name__}")
    while True:
        seen = False
        for batch in batches:
            seen = True
            yield batch
        if not seen:
            raise ConfigError("the batches yielded nothing (a generator runs out after one pass: pass a list)")


def run_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Any], steps: int, accumulation: int,
              loss_fn: LossFn | None, penalty: Callable[[], Tensor] | None = None, max_grad_norm: float | None = None,
              desc: str = "sft", progress: bool = True) -> list[float]:
    """``steps`` optimizer steps of ``accumulation`` micro-batches each: every micro-batch's loss
    counts ``1/accumulation``; ``penalty()`` is added once per optimizer step (not per micro-batch)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)  # gradients left from before do not leak into the first step
    losses: list[float] = []
    for index in tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0):
        step(model)
        total = 0.0
        for micro in range(accumulation):
            try:
                loss = compute_loss(model, next(batches), loss_fn) / accumulation
            except (AdapterError, torch.OutOfMemoryError):
                raise
            except Exception as error:  # the model's own forward on a bad batch
                raise ConfigError(f"{desc} failed at step {index}, micro-batch {micro}: {type(error).__name__}: "
                                  f"{error}") from error
            if micro == 0 and penalty is not None:
                loss = loss + penalty()
            loss.backward()
            total += loss.item()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def dense_phase(model: nn.Module, config: SFTConfig, tensors: list[TargetTensor], batches: Iterable[Any],
                loss_fn: LossFn | None, dense: Iterable[nn.Parameter] = (), progress: bool | None = None) -> dict[str, Tensor]:
    """Phase 1: fine-tune ``tensors`` (and ``dense``, e.g. a head, without L1) densely with AdamW at
    ``full_lr`` on the model as it is (active adapters included); return ``|θ − θ₀|`` by parameter
    name. The caller restores the model (the lottery-ticket rewind)."""
    model.requires_grad_(False)
    params = [t.param for t in tensors]
    extra = [p for p in dense if all(p is not q for q in params)]
    before = [p.detach().clone() for p in params]
    for p in params + extra:
        p.requires_grad_(True)
        p.grad = None
    optimizer = torch.optim.AdamW(params + extra, lr=config.full_lr, weight_decay=0.0)
    penalty = None
    if config.l1:
        scale = config.l1 / base_parameter_count(model)

        def penalty() -> Tensor:
            return scale * sum((p - b).abs().sum() for p, b in zip(params, before))

    model.train()
    if progress is None:
        progress = config.full_steps >= PROGRESS_MIN_STEPS
    run_steps(model, optimizer, cycle(batches), config.full_steps, config.accumulation, loss_fn, penalty,
              desc="sft dense phase", progress=progress)
    del optimizer  # its state before the |Δ| buffers (the copies θ₀ become |Δ| in place)
    changes = {}
    with torch.no_grad():
        for t, b in zip(tensors, before):
            t.param.grad = None
            changes[t.name] = b.sub_(t.param).abs_()
    return changes


def choose(config: SFTConfig, adapter_name: str, iteration: int, tensors: list[TargetTensor], k: int,
           changes: Mapping[str, Tensor] | None, exclude: Mapping[str, Tensor] | None = None) -> Chosen:
    """Select ``k`` new entries by the config's rule (``exclude``: the support so far, by name)."""
    rule = config.selection
    if rule == "random":
        seed = layer_seed(config.seed, adapter_name, f"iteration-{iteration}")
        return Chosen.of(tensors, select.random_k([(t.name, t.param.numel()) for t in tensors], k, seed, exclude), None)
    assert changes is not None
    if callable(rule):
        return Chosen.of(tensors, select.from_callable(rule, changes, k, exclude), None)
    if rule == "most_changed":
        found, threshold = select.top_k([(t.name, changes[t.name]) for t in tensors], k, exclude)
        return Chosen.of(tensors, found, threshold)
    raise ConfigError(f"selection {rule!r} names a function, which is not saved with an adapter; pass the function "
                      "itself as SFTConfig(selection=...)")


def sft_layers(model: nn.Module, name: str) -> dict[str, SFTLayer]:
    """Adapter ``name``'s SFT layers by module path (raises for other adapters)."""
    record = get_state(model).record(name)
    if not isinstance(record.config, SFTConfig):
        raise ConfigError(f"adapter {name!r} is a {record.method.name} adapter, not an SFT")
    return {path: layer for path, layer in get_state(model).layers(name) if isinstance(layer, SFTLayer)}


def l1_penalty(model: nn.Module, name: str) -> Tensor:
    """``Σ|values| / N`` of SFT adapter ``name`` (N: the base model's parameter count): phase 1's
    L1 term ``Σ|θ − θ₀|/N`` in the sparse parametrisation. Add ``λ ·`` it once per optimizer step."""
    layers = list(sft_layers(model, name).values())
    return torch.stack([layer.l1() for layer in layers]).sum() / base_parameter_count(model)


def _freeze_batch_norm(model: nn.Module) -> list[Any]:
    """Batch-norm running statistics are the base model's: keep them (eval mode) while the diff trains."""
    def evaluate(module: nn.Module, args: Any) -> None:
        module.training = False

    return [m.register_forward_pre_hook(evaluate) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def sparse_phase(model: nn.Module, config: SFTConfig, name: str, batches: Iterable[Any], loss_fn: LossFn | None,
                 lr: float, weight_decay: float, max_grad_norm: float | None, progress: bool) -> list[float]:
    """Phase 2: AdamW on adapter ``name``'s parameters only (the values and any dense head)."""
    params = list(adapter_parameters(model, name))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    penalty = (lambda: config.l1 * l1_penalty(model, name)) if config.l1 else None
    modes = [(m, m.training) for m in model.modules()]
    hooks = _freeze_batch_norm(model)
    model.train()
    try:
        return run_steps(model, optimizer, cycle(batches), config.sparse_steps, config.accumulation, loss_fn, penalty,
                         max_grad_norm, desc="sft sparse phase", progress=progress)
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes:
            module.training = mode


def _check_number(name: str, value: Any, minimum: float, strict: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        raise ConfigError(f"{name} must be a finite number {'>' if strict else '>='} {minimum}, got {value!r}")


def train_sft(model: nn.Module, config: SFTConfig, name: str, batches: Iterable[Any], loss_fn: LossFn | None = None,
              lr: float = 5e-5, weight_decay: float = 0.0, max_grad_norm: float | None = None,
              progress: bool = True) -> list[float]:
    """The whole LT-SFT procedure; returns the sparse-phase losses (one per optimizer step).

    Attaches SFT adapter ``name`` (dense phase 1 on ``batches`` and selection of ``K/iterations``
    entries, then the rewind), activates it on top of the adapters active before, and trains it
    for ``config.sparse_steps`` steps (AdamW at ``lr``). Each further iteration runs a dense phase
    from the current model (the diff so far included), selects ``K/iterations`` new entries outside
    the support, grows the diff (trained values kept) and trains it again. Other adapters stay as
    they are (frozen). The chosen K, density and per-iteration counts go to ``config.outcome``
    (saved with the adapter). On failure the model is left as it was.
    """
    if not isinstance(config, SFTConfig):
        raise ConfigError(f"train_sft needs an SFTConfig, got {type(config).__name__}")
    if config.selection == "given":
        raise ConfigError("train_sft selects the support itself; selection='given' is for attaching a known support")
    _check_number("lr", lr, 0.0, strict=True)
    _check_number("weight_decay", weight_decay, 0.0, strict=False)
    if max_grad_norm is not None:
        _check_number("max_grad_norm", max_grad_norm, 0.0, strict=True)
    state = get_state(model)
    if state.fused:
        raise FusedStateError(f"adapters {[n for n, _ in state.fused]} are fused; unfuse them before training an SFT")
    batches = list(batches) if isinstance(batches, Iterator) else batches  # a generator serves every phase
    with rollback_on_error(model, values=False):  # the base is never written; a failure detaches the adapter
        before = state.active
        dense = {"calibration": batches, "loss_fn": loss_fn} if config.needs_dense_phase else {}
        attach(model, config, name, **dense)
        activate(model, [n for n, _ in before] + [name], [w for _, w in before] + [1.0])
        flags = [(p, p.requires_grad) for p in model.parameters()]
        own = {id(p) for p in adapter_parameters(model, name)}
        try:
            for p, _ in flags:  # other adapters stay as they are
                p.requires_grad_(id(p) in own)
            losses = _iterate(model, config, name, batches, loss_fn, lr, weight_decay, max_grad_norm, progress)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
    return losses


def _iterate(model: nn.Module, config: SFTConfig, name: str, batches: Iterable[Any], loss_fn: LossFn | None,
             lr: float, weight_decay: float, max_grad_norm: float | None, progress: bool) -> list[float]:
    layers = sft_layers(model, name)
    wrappers = get_state(model).wrappers
    tensors = [TargetTensor(path, t, wrappers[path].base_layer.get_parameter(t))
               for path, layer in layers.items() for t in layer.tensor_names]
    shares = config.shares(sum(t.param.numel() for t in tensors))
    outcome = dict(next(iter(layers.values())).outcome or {})
    outcome["iterations"] = list(outcome.get("iterations", []))  # a copy: the layers keep attach's record
    losses = sparse_phase(model, config, name, batches, loss_fn, lr, weight_decay, max_grad_norm, progress)
    record = get_state(model).record(name)
    heads = [p for path in record.copies for p in get_state(model).host(path).layer(name).parameters()]
    for iteration in range(1, config.iterations):
        exclude = {f"{path}.{t}": idx for path, layer in layers.items() for t, idx in layer.supports().items()}
        with ModelSnapshot(model, values=True):  # the rewind after this iteration's dense phase
            changes = dense_phase(model, config, tensors, batches, loss_fn, dense=heads, progress=progress) \
                if config.needs_dense_phase else None
            chosen = choose(config, name, iteration, tensors, shares[iteration], changes, exclude)
            del changes
        for path, by_tensor in chosen.indices.items():
            for tensor, indices in by_tensor.items():
                layers[path].grow(tensor, indices)
        outcome["iterations"].append({"new": chosen.count, "threshold": chosen.threshold})
        losses += sparse_phase(model, config, name, batches, loss_fn, lr, weight_decay, max_grad_norm, progress)
    outcome["k"] = sum(layer.nnz for layer in layers.values())
    outcome["density"] = outcome["k"] / max(1, outcome.get("entries", 0))
    state = get_state(model)
    state.adapters[name] = dataclasses.replace(record, config=record.config.replace(outcome=outcome))
    return losses


def outcome(model: nn.Module, name: str) -> dict[str, Any]:
    """What SFT adapter ``name``'s selection produced: K, targeted entries, density, the base model's
    parameter count, and per iteration the new entries and the threshold (``most_changed``)."""
    config = get_state(model).record(name).config
    layers = sft_layers(model, name)
    if isinstance(config, SFTConfig) and config.outcome is not None:
        return dict(config.outcome)
    found = next((layer.outcome for layer in layers.values() if layer.outcome is not None), None)
    if found is not None:
        return dict(found)
    k = sum(layer.nnz for layer in layers.values())  # a loaded adapter saved without a record
    entries = sum(layer.part(t).shape.numel() for layer in layers.values() for t in layer.tensor_names)
    return {"k": k, "entries": entries, "density": k / max(1, entries)}
