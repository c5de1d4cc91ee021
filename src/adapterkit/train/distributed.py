"""Data-parallel training of adapted models on ``torch.distributed`` (DDP; FSDP2 works as well).

Nothing here is an engine of its own: :func:`wrap` builds a ``DistributedDataParallel`` with the
settings adapters need, :class:`ShardedBatches` gives each rank its share of the same global
batches, :func:`check_draws` proves that the per-step randomness (DyLoRA's rank, MoSA's module
choice) agrees on every rank, and :func:`train` puts them around :func:`adapterkit.train`::

    torch.distributed.init_process_group("gloo")          # torchrun / accelerate set the env
    ak.attach(model, config, "task")                       # same seed on every rank
    losses = distributed.train(model, batches)             # the global batches, unsharded
    distributed.on_main(ak.save, model, "out/task", "task")

Settings and why (measured with gloo on CPU, torch 2.13; see tests/test_distributed.py):

* The loss is computed inside the one DDP forward (:class:`LossModule`): MoSA's consistency loss
  runs the model twice, and DDP allows one forward per backward when it must look for unused
  parameters (with two, a parameter only the first pass used is "marked ready twice").
* ``find_unused_parameters`` is switched on only when a step may leave trainable parameters
  without a gradient (:func:`may_skip_parameters`): MoSA's unchosen modules, an inactive adapter,
  a Split composition. Without it DDP waits forever for those gradients and fails at the next
  step (the last step's buckets would silently stay unreduced). ``static_graph=True`` is no
  substitute: MoSA's choice changes every step and DDP refuses the changed graph. Globally unused
  parameters keep ``grad=None``, so the optimizer skips them exactly as in one process.
* ``forward_sync_buffers=False``: adapters' buffers (partitions, codes, frozen inits) and the
  base model's are constants while training (frozen batch-norm statistics stay in eval mode,
  :class:`~adapterkit.FrozenNormStatistics`), so re-broadcasting them every forward would only
  cost bandwidth; the initial sync still copies rank 0's values everywhere.
* Collectives of these helpers (the draw check, :func:`on_main`) use :func:`collective_device`:
  the CPU under gloo, the current CUDA device under NCCL (accelerate on GPUs).
* Without the unused-parameter search, :func:`train` checks after the first step that every
  trainable parameter got a gradient, and names the adapter modules that did not (a module the
  forward never runs) instead of DDP's failure at the next step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping, Sized

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..core.composition import splits
from ..core.outputs import logits_of, loss_of
from ..core.state import adapted_states
from ..errors import AdapterError, ConfigError
from ..methods.mosa.consistency import active_consistency_weight, consistency_loss
from ..methods.mosa.method import resample
from . import draws
from .collectives import (RankMismatchError, agree, collective_device, gather_ints, grouped, is_main, on_main,
                          rank_and_world)
from .launcher import RankFailedError, launch
from .loop import train as train_loop

__all__ = ["LossModule", "RankFailedError", "RankMismatchError", "Shard", "ShardedBatches", "batch_fingerprint",
           "check_draws", "check_in_sync", "collective_device", "inner_model", "is_main", "launch", "may_skip_parameters",
           "on_main", "rank_and_world", "shard_batch", "shard_loss", "train", "two_pass_in_one_forward", "wrap"]
DRAWS_HINT = "every rank must attach the same adapters with the same seeds and call adapterkit.step once per optimizer step"
BATCH_HINT = "every rank must be given the same global batches in the same order (each takes its own rows)"


def _require_group() -> None:
    if not grouped():
        raise ConfigError("no torch.distributed process group: call torch.distributed.init_process_group first "
                          "(torchrun / accelerate launch set up its environment)")


def may_skip_parameters(model: nn.Module) -> bool:
    """Whether a training step may leave some trainable adapter parameters without a gradient:
    an adapter whose method trains a per-step subset (:meth:`AdapterMethod.trains_every_parameter`),
    an attached but inactive adapter that still requires gradients, or an active Split composition."""
    for state in adapted_states(model):
        active = {name for name, _ in state.active}
        block = state.block()
        if block is not None and splits(block):
            return True
        for name, record in state.adapters.items():
            if name not in active:
                if any(p.requires_grad for _, layer in state.layers(name) for p in layer.parameters()):
                    return True
            elif not record.method.trains_every_parameter(record.config):
                return True
    return False


LossFn = Callable[[nn.Module, Any], Tensor]


def _model_loss(model: nn.Module, batch: Any) -> Tensor:
    return loss_of(model(**batch))


class LossModule(nn.Module):
    """The adapted model and its loss function as one module, so the whole loss — every pass
    of the model it needs — runs inside one DDP forward. ``forward(batch, weight)`` returns
    ``weight · loss_fn(model, batch)`` (see :class:`Shard` for the weight); at weight 0 (a rank
    without rows of its own, given row 0 of the batch) an exact zero instead, so a NaN loss of
    that row (e.g. every label -100) cannot reach the global loss."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn or _model_loss

    def forward(self, batch: Any, weight: float | Tensor = 1.0) -> Tensor:
        loss = self.loss_fn(self.model, batch)
        if isinstance(weight, Tensor) or weight != 0:
            return loss * weight
        # the row still runs, so DDP sees the parameters used that the other ranks use (MoSA's
        # choice): skipping it would hand AdamW zero gradients where one process has none
        return torch.where(torch.zeros((), dtype=torch.bool, device=loss.device), loss, torch.zeros_like(loss))


def wrap(model: nn.Module, loss_fn: LossFn | None = None, **options: Any) -> DistributedDataParallel:
    """``DistributedDataParallel(LossModule(model, loss_fn))`` with the settings of the module
    docstring; ``options`` override them (any DDP keyword). Parameters and buffers are copied
    from rank 0 to every rank here."""
    _require_group()
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters; attach an adapter first")
    settings: dict[str, Any] = dict(find_unused_parameters=may_skip_parameters(model), forward_sync_buffers=False)
    settings.update(options)
    return DistributedDataParallel(LossModule(model, loss_fn), **settings)


def inner_model(module: nn.Module) -> nn.Module:
    """The adapted model inside a :func:`wrap` result (or ``module`` itself)."""
    module = getattr(module, "module", module)  # DDP
    return module.model if isinstance(module, LossModule) else module


@dataclasses.dataclass
class Shard:
    """One rank's rows of a global batch. ``weight = rows · world / global rows`` makes the
    ranks' averaged gradient (DDP averages) that of the global batch's mean loss, also when the
    rows do not divide evenly; a rank with no row of its own gets one row at weight 0.
    ``fingerprint`` identifies the global batch (:func:`batch_fingerprint`; 0: not known)."""

    batch: Any
    weight: float
    rows: int
    fingerprint: int = 0


def _rows(batch: Mapping[str, Any]) -> int:
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ConfigError(f"a batch to shard needs tensors that share their first (row) dimension, got sizes "
                          f"{sorted(sizes)}")
    return sizes.pop()


def batch_fingerprint(batch: Mapping[str, Any]) -> int:
    """A digest of a global batch's row count and of its first tensor (e.g. the token ids): equal
    on all ranks when they were given the same batch. That tensor is copied to the CPU once."""
    rows = _rows(batch)  # ConfigError without tensors
    first = next(v for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0)
    data = first.detach().reshape(-1).cpu()
    return draws.digest([f"{rows} {first.dtype} {tuple(first.shape)}".encode(),
                         data.view(torch.uint8).numpy().tobytes()])


def shard_batch(batch: Mapping[str, Any], rank: int, world: int) -> Shard:
    """Rank ``rank``'s contiguous block of rows (``torch.tensor_split``: sizes differ by at most 1)."""
    if not isinstance(batch, Mapping):
        raise ConfigError(f"a batch to shard must be a dict of keyword arguments, got {type(batch).__name__}")
    total = _rows(batch)
    bounds = [len(c) for c in torch.arange(total).tensor_split(world)]
    start, count = sum(bounds[:rank]), bounds[rank]
    rows = slice(start, start + count) if count else slice(0, 1)
    part = {k: v[rows] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in batch.items()}
    return Shard(part, count * world / total, count, batch_fingerprint(batch))


class ShardedBatches:
    """This rank's :class:`Shard` of every global batch of ``batches`` (re-iterable when
    ``batches`` is; with a length when it has one). One process with the global batches and N
    ranks with their shards then see the same examples in the same order at every step."""

    def __new__(cls, batches: Iterable[Mapping[str, Any]], rank: int | None = None,
                world: int | None = None) -> "ShardedBatches":
        sized = cls is ShardedBatches and isinstance(batches, Sized)
        return super().__new__(SizedShardedBatches if sized else cls)

    def __init__(self, batches: Iterable[Mapping[str, Any]], rank: int | None = None, world: int | None = None) -> None:
        own_rank, own_world = rank_and_world()
        self.batches = batches
        self.rank = own_rank if rank is None else rank
        self.world = own_world if world is None else world
        if not 0 <= self.rank < self.world:
            raise ConfigError(f"rank {self.rank} outside a world of {self.world}")

    def __iter__(self) -> Iterator[Shard]:
        for batch in self.batches:
            yield shard_batch(batch, self.rank, self.world)


class SizedShardedBatches(ShardedBatches):
    """:class:`ShardedBatches` of batches with a length (what ``ShardedBatches(...)`` returns then)."""

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def check_draws(model: nn.Module, shard: Shard | None = None) -> None:
    """Raise :class:`RankMismatchError` unless every rank's per-step draws agree (call after
    :func:`adapterkit.step`) and, given this rank's ``shard``, all ranks hold shards of the same
    global batch (:attr:`Shard.fingerprint`). One all-gather of 8 bytes per rank (16 with a
    shard). A no-op without a process group."""
    if not grouped():
        return
    values = [draws.fingerprint(model)] + ([shard.fingerprint] if shard is not None else [])
    gathered = gather_ints(values)
    agree([v[0] for v in gathered], "per-step draws (DyLoRA ranks, MoSA module choices, ...)", DRAWS_HINT)
    if shard is not None:
        agree([v[1] for v in gathered], "global batches (row count and first tensor)", BATCH_HINT)


def check_in_sync(model: nn.Module) -> None:
    """Raise :class:`RankMismatchError` unless every trainable value is bit-identical on all ranks."""
    if grouped():
        params = [p.detach().cpu().contiguous() for p in inner_model(model).parameters() if p.requires_grad]
        digest = draws.digest(p.reshape(-1).view(torch.uint8).numpy().tobytes() for p in params)
        agree([v[0] for v in gather_ints([digest])], "trainable values", DRAWS_HINT)


def shard_loss(ddp: nn.Module, shard: Shard) -> Tensor:
    """The loss function :func:`adapterkit.train` gets for a :func:`wrap` model and
    :class:`ShardedBatches`: checks the step's draws and global batch, then one DDP forward of
    the weighted loss."""
    check_draws(ddp, shard)
    return ddp(shard.batch, shard.weight)


class _GradientWatch:
    """Which trainable parameters receive a gradient in the first step, for a DDP without the
    unused-parameter search: one that gets none stalls DDP's reduction, and DDP itself only
    reports it at the next step as parameter indices."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.seen: set[int] = set()
        self.handles = [p.register_post_accumulate_grad_hook(lambda p: self.seen.add(id(p))) for _, p in self.params]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def check(self) -> None:
        """After the first backward: raise :class:`AdapterError` naming what got no gradient."""
        if not self.handles:
            return
        self.close()
        missing = {id(p): n for n, p in self.params if id(p) not in self.seen}
        if not missing:
            return
        where: dict[str, set[str]] = {}
        for state in adapted_states(self.model):
            for name in state.adapters:
                for path, layer in state.layers(name):
                    for p in layer.parameters():
                        if missing.pop(id(p), None) is not None:
                            where.setdefault(name, set()).add(path or "<model>")
        named = [f"adapter {name!r} on {sorted(paths)}" for name, paths in where.items()]
        named += [f"parameter {n!r}" for n in missing.values()]
        raise AdapterError(f"{'; '.join(named)} got no gradient in the first step (a module the forward does not "
                           "run, or a loss that ignores it), but DDP was built without the unused-parameter search "
                           "and would fail at the next step: attach adapters only to modules the forward uses, or "
                           "pass ddp_options={'find_unused_parameters': True}")


def train(model: nn.Module, batches: Iterable[Mapping[str, Any]], loss_fn: LossFn | None = None,
          ddp_options: Mapping[str, Any] | None = None, **options: Any) -> list[float]:
    """:func:`adapterkit.train` on this rank's share of ``batches`` (the global batches: every rank
    passes the same ones) under :func:`wrap`; returns the global batches' losses (equal on every
    rank). ``batches`` may be any iterable (with a length, the learning-rate schedule decays over
    it). ``options`` are :func:`adapterkit.train`'s; a progress bar shows on rank 0 only. Without
    the unused-parameter search, a trainable parameter that gets no gradient in the first step is
    an :class:`AdapterError` naming its adapter and module. After training, the trainable values
    are checked to be identical on all ranks."""
    _require_group()
    options.setdefault("progress", is_main())
    ddp = wrap(model, loss_fn, **dict(ddp_options or {}))
    watch = None if ddp.find_unused_parameters or ddp.static_graph else _GradientWatch(model)
    calls = 0

    def loss(module: nn.Module, shard: Shard) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 2 and watch is not None:  # the first backward is done
            watch.check()
        return shard_loss(module, shard)

    try:
        local = train_loop(ddp, ShardedBatches(batches), loss_fn=loss, **options)
        if watch is not None:
            watch.check()  # a run of one step
    finally:
        if watch is not None:
            watch.close()
    check_in_sync(model)
    summed = torch.tensor(local, dtype=torch.float64, device=collective_device())
    dist.all_reduce(summed)  # each rank's weighted loss; their mean is the global batch's loss
    return (summed / dist.get_world_size()).tolist()


def two_pass_in_one_forward(ddp: DistributedDataParallel, inputs: Any) -> Any:
    """:func:`two_pass_loss` through a DDP-wrapped model with both passes inside one DDP forward:
    the second runs in a forward hook of the wrapped model. DDP looks for unused parameters
    (MoSA's unchosen modules) from one forward's output; with two forwards per backward, a module
    only the first pass chose would be reported ready twice."""
    inner = ddp.module
    weight = active_consistency_weight(inner)
    if weight == 0:
        return loss_of(ddp(**inputs))
    running = []

    def second_pass(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        if running:  # the second pass's own call
            return None
        if not isinstance(output, dict):  # ModelOutput and dicts: the loss is replaced in place
            raise ConfigError(f"MoSA's consistency loss under DDP needs a model whose output is a dict or ModelOutput, "
                              f"got {type(output).__name__}")
        running.append(True)
        try:
            resample(module)
            second = module(*args, **kwargs)
        finally:
            running.clear()
        output["loss"] = loss_of(output) + weight * consistency_loss(logits_of(output), logits_of(second))
        return output

    handle = inner.register_forward_hook(second_pass, with_kwargs=True)
    try:
        return loss_of(ddp(**inputs))
    finally:
        handle.remove()


