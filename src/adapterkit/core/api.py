"""The public model-level operations: attach, detach, activate, fuse, unfuse, switch.

Every function validates its whole request before it changes anything, so a call that raises
leaves the model bit-identical to before.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .activation import BLOCK_TYPES, check_block, fusable_part, routed_names, sync_hooks
from .composition import Block, flatten
from .config import AdapterConfig
from ..errors import (
    AdapterError,
    ConfigError,
    FusedStateError,
    FusionError,
    NotFusableError,
    UnsupportedError,
)
from .host import ModelHost
from .layers import DeltaLayer, ModuleCopy
from .packing import layers_packed
from .registry import method_for
from .build import commit, prepare, replace_module
from .state import ModelState, Weighted, drop_state, get_state, is_fusable

Names = str | Sequence[str] | None


def attach(model: nn.Module, config: AdapterConfig, name: str = "default", **options: Any) -> nn.Module:
    """Add a new adapter to ``model`` in place and return the model.

    The base model's parameters are frozen and the new adapter's are trainable. If no adapter
    was active, the new one becomes active. ``options`` are method-specific (e.g. SHiRA's
    ``calibration=batches`` for gradient-based masks).
    """
    commit(model, prepare(model, config, name, options=options))
    return model


def adapters(model: nn.Module) -> list[str]:
    """Names of the attached adapters, in the order they were attached."""
    return list(get_state(model).adapters)


def active_adapters(model: nn.Module) -> list[tuple[str, float]]:
    """The active adapters as ``(name, weight)`` pairs."""
    return list(get_state(model).active)


def fused_adapters(model: nn.Module) -> list[tuple[str, float]]:
    """The adapters currently folded into the base weights, as ``(name, weight)`` pairs."""
    return list(get_state(model).fused)


def config_of(model: nn.Module, name: str) -> AdapterConfig:
    """The config adapter ``name`` was attached with."""
    return get_state(model).record(name).config


def _weighted(state: ModelState, names: Names, weights: Sequence[float] | None) -> Weighted:
    if names is None:
        names = ()
    elif isinstance(names, str):
        names = (names,)
    names = tuple(names)
    if len(set(names)) != len(names):
        raise ConfigError(f"adapter names repeat: {list(names)}")
    for name in names:
        state.record(name)
    if weights is None:
        weights = [1.0] * len(names)
    weights = [float(w) for w in weights]
    if len(weights) != len(names):
        raise ConfigError(f"{len(names)} adapter names but {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"adapter weights must be finite, got {weights}")
    return tuple(zip(names, weights))


def _check_replacements(state: ModelState, active: Weighted) -> None:
    names = {name for name, _ in active}
    for path, wrapper in state.wrappers.items():
        copies = [l.adapter_name for l in wrapper.adapters.values() if isinstance(l, ModuleCopy) and l.adapter_name in names]
        if len(copies) > 1:
            raise AdapterError(f"adapters {copies} each replace module {path!r}; activate only one of them")


def activate(model: nn.Module, names: Names | Block, weights: Sequence[float] | None = None) -> None:
    """Choose the adapters that run: one name, a list, a composition block, or None.

    * A list: the weight deltas of its names add (scaled by ``weights``) and their inserted
      modules run in list order, each reading the previous one's output; i.e. a
      :class:`~adapterkit.Stack` for the modules and an :class:`~adapterkit.Add` for the deltas.
    * A block (:class:`~adapterkit.Add`, :class:`~adapterkit.Stack`, :class:`~adapterkit.Split`,
      nested): its own meaning; weights go inside it (``ak.Add(..., weights=[...])``). A Split
      routes tokens by a mask (``ak.routing`` or ``token_type_ids``).

    While adapters are fused, the weight deltas of the new set that can be fused (all but those
    inside a Split) must equal the fused set (use :func:`switch` or :func:`unfuse` to change it).
    """
    state = get_state(model)
    if isinstance(names, BLOCK_TYPES):
        if weights is not None:
            raise ConfigError("weights go inside the block: ak.Add(..., weights=[...])")
        check_block(state, names)
        active, block = flatten(names), names
    else:
        active, block = _weighted(state, names, weights), None
    _check_replacements(state, active)
    if state.fused and fusable_part(state, active, block) != state.fused:
        raise FusedStateError(
            f"adapters {[n for n, _ in state.fused]} are fused; call ak.switch(...) or ak.unfuse(...) before activating others"
        )
    state.active, state.composition = active, block
    state.refresh_plans()
    sync_hooks(model, state)


PROGRESS_BYTES = 2**30  # show a progress bar when fusing touches more than 1 GiB of weights


def _fuse_into_weights(state: ModelState, target: Weighted, exact: bool) -> None:
    state.changed()  # before the weights change: a per_row block on another thread must not miss it
    wrappers = list(state.wrappers.values())
    weights = [getattr(w.base_layer, "weight", None) for w in wrappers]
    size = sum(t.numel() * t.element_size() for t in weights if isinstance(t, torch.Tensor))
    for wrapper in tqdm(wrappers, desc="fuse", unit="layer", leave=False, disable=size < PROGRESS_BYTES):
        deltas = []
        for name, weight in target:
            layer = wrapper.layer(name)
            if isinstance(layer, DeltaLayer):
                deltas.append((layer, weight))
        if deltas or wrapper.is_fused:
            wrapper.fuse(deltas, exact)


def fuse(model: nn.Module, names: Names | Block = None, weights: Sequence[float] | None = None, exact: bool = True) -> None:
    """Fold weight-delta adapters into the base weights (the active ones, or ``names``).

    ``names`` may be an :class:`~adapterkit.Add` block (its weighted sum is fused; a block with a
    Split or inserted modules raises ConfigError). With ``names=None`` and a Split active, the
    deltas outside the Split are fused and those inside keep running unfused (they differ per token).

    Whatever was fused before is replaced. With ``exact=True`` (default) the original weights
    are kept (dense deltas: one host copy of each fused weight; sparse deltas: only the touched
    entries) so :func:`unfuse` restores them bit-for-bit. ``exact=False`` saves that memory and
    subtracts on unfuse, which drifts by rounding error.
    """
    state = get_state(model)
    block = state.block()
    if names is None:
        target = fusable_part(state, state.active, block)
        if not target:
            raise FusionError("no active weight-delta adapter to fuse (deltas inside a Split stay unfused); "
                              "name the adapters to fuse")
        active = state.active
    elif isinstance(names, BLOCK_TYPES):
        if weights is not None:
            raise ConfigError("weights go inside the block: ak.Add(..., weights=[...])")
        check_block(state, names, fusing=True)
        target = flatten(names)
        active = target + tuple((n, w) for n, w in state.active if not state.adapters[n].fusable)
        block = names if active == target else None
    else:
        target = _weighted(state, names, weights)
        unfusable = [n for n, _ in target if not state.adapters[n].fusable]
        if unfusable:
            raise NotFusableError(
                f"adapter(s) {unfusable} insert modules and cannot be folded into base weights; keep them active unfused"
            )
        active = target + tuple((n, w) for n, w in state.active if not state.adapters[n].fusable)
        block = None
    _check_replacements(state, active)
    _fuse_into_weights(state, target, exact)
    state.fused, state.fused_exact, state.active, state.composition = target, exact, active, block
    state.refresh_plans()
    sync_hooks(model, state)


def unfuse(model: nn.Module, free_memory: bool = False) -> None:
    """Restore every base weight to its original value (bit-for-bit after an exact fuse).

    The adapters stay active and now run unfused, so outputs do not change. The host buffers
    that held the originals are kept for the next fuse unless ``free_memory=True``.
    """
    state = get_state(model)
    state.changed()  # before the weights change (see _fuse_into_weights)
    for wrapper in state.wrappers.values():
        wrapper.restore()
        if free_memory:
            wrapper.free_memory()
    if free_memory:
        state.workspace.free()
    state.fused = ()
    state.refresh_plans()


def switch(model: nn.Module, name: str, weight: float = 1.0) -> None:
    """Fused mode: replace whatever is fused with adapter ``name``.

    For dense deltas this is a single pass per layer that writes ``original + ΔW_name``.
    """
    state = get_state(model)
    fuse(model, [name], [weight], exact=state.fused_exact if state.fused else True)


def detach(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and free its memory.

    If it was fused, the base weights are restored first (and the rest of the fused set is
    fused again). When no adapter is left, the model's modules are the original objects again.
    """
    state = get_state(model)
    record = state.record(name)
    if any(n == name for n, _ in state.fused):
        remaining = tuple((n, w) for n, w in state.fused if n != name)
        _fuse_into_weights(state, remaining, state.fused_exact)
        state.fused = remaining
    for path in record.modules:
        host = state.host(path)
        host.remove(name)
        if len(host.adapters) == 0:
            if isinstance(host, ModelHost):
                host.close()
                delattr(model, ModelHost.CHILD)
                state.model_host = None
            else:
                replace_module(model, path, host.base_layer)
                del state.wrappers[path]
    del state.adapters[name]
    state.active = tuple((n, w) for n, w in state.active if n != name)
    if state.composition is not None and name in state.composition.names:
        state.composition = None  # the rest stays active as a plain list
    state.refresh_plans()
    sync_hooks(model, state)
    if not state.adapters:
        drop_state(model)


def bases_of(model: nn.Module, state: ModelState, paths: Sequence[str]) -> dict[str, nn.Module]:
    """The unadapted modules at ``paths`` (``""``: the model)."""
    return {path: model if path == "" else state.wrappers[path].base_layer for path in paths}


def to_plain(model: nn.Module, name: str, **options: Any) -> None:
    """Replace adapter ``name`` in place by its plain equivalent (the form :func:`adapterkit.export`
    writes): a MoSA adapter becomes the average of its sparse modules, a plain adapter of the
    base method with the same shapes; a DyLoRA adapter becomes a LoRA at ``rank=``. The new
    layers are built before the model is touched."""
    state = get_state(model)
    record = state.record(name)
    if any(n == name for n, _ in state.fused):
        raise FusedStateError(f"adapter {name!r} is fused; unfuse it before converting it")
    bases = bases_of(model, state, record.targets)
    config, layers = record.method.portable(record.config, dict(state.layers(name)), bases, **options)
    if config is record.config:
        raise UnsupportedError(f"adapter {name!r} ({record.method.name}) is already plain; there is nothing to convert")
    for path, layer in layers.items():
        state.host(path).add(layer)
    state.adapters[name] = dataclasses.replace(
        record, config=config, method=method_for(config), fusable=all(is_fusable(l) for l in layers.values()))
    state.refresh_plans()


def merge(model: nn.Module, name: str, **options: Any) -> None:
    """Deprecated alias of :func:`to_plain` (the name suggested merging into base weights,
    which is :func:`fuse` / :func:`merge_and_unload`)."""
    warnings.warn("ak.merge is deprecated; use ak.to_plain (same behaviour)", DeprecationWarning, stacklevel=2)
    to_plain(model, name, **options)


def quantize(model: nn.Module, name: str, bits: int, method: str = "gaussian_median") -> None:
    """Make adapter ``name`` low-bit (1, 2, 4 or 8 bits; 32 turns it back to full precision):
    from now on its forward uses fake-quantised weights (straight-through gradient to the fp32
    latent weights) and :func:`adapterkit.save` stores packed codes. All-zero matrices get a
    small truncated-normal init first (the paper's rule), so quantising a fresh adapter changes
    its output slightly."""
    state = get_state(model)
    record = state.record(name)
    config = record.config.replace(bits=bits, quantization=method)  # validates
    if any(n == name for n, _ in state.fused):
        raise FusedStateError(f"adapter {name!r} is fused; unfuse it before changing its precision")
    if layers_packed([layer for _, layer in state.layers(name)]):
        raise UnsupportedError(f"adapter {name!r} is packed for inference; ak.unpack(model, {name!r}) before changing its precision")
    for _, layer in state.layers(name):
        layer.set_quantization(bits, method)
    state.adapters[name] = dataclasses.replace(record, config=config)


def adapter_parameters(model: nn.Module, name: str) -> Iterator[nn.Parameter]:
    """The trainable tensors of adapter ``name`` (e.g. for an optimizer)."""
    for _, layer in get_state(model).layers(name):
        yield from layer.parameters()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of the model, adapters included."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def merge_and_unload(model: nn.Module, names: Names = None, weights: Sequence[float] | None = None) -> nn.Module:
    """Fold weight-delta adapters into the base weights for good and remove every adapter.

    Active ``modules_to_save`` copies take the place of their base modules. The result is a
    plain model without adapterkit wrappers (e.g. to ``save_pretrained`` it).
    """
    state = get_state(model)
    if not state.adapters:
        return model
    if names is None:
        blocking = [n for n, _ in state.active if not state.adapters[n].fusable]
        if blocking:
            raise NotFusableError(f"active adapter(s) {blocking} insert modules and cannot be merged into base weights")
        if routed_names(state.block()):
            raise ConfigError("a Split is active: its deltas differ per token and cannot be merged; name the adapters to merge")
    if names is not None or fusable_part(state, state.active, None):
        fuse(model, names, weights, exact=False)
    state.composition = None
    sync_hooks(model, state)
    for path, wrapper in list(state.wrappers.items()):
        replacement = wrapper.plan.replacement
        replace_module(model, path, replacement.module if replacement is not None else wrapper.base_layer)
    if state.model_host is not None:
        state.model_host.close()
        delattr(model, ModelHost.CHILD)
    drop_state(model)
    return model
