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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

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
from .loop import train as train_loop

Result = TypeVar("Result")
MESSAGE_BYTES = 1024  # of rank 0's error message that on_main passes to the other ranks


class RankMismatchError(AdapterError):
    """Ranks disagree on what must be identical: per-step draws or trainable values."""


class RankFailedError(AdapterError):
    """A process started by :func:`launch` died (an uncaught error, a signal)."""


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and without a process group)."""
    return rank_and_world()[0] == 0


def _require_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
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
    ``weight · loss_fn(model, batch)`` (see :class:`Shard` for the weight)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn or _model_loss

    def forward(self, batch: Any, weight: float | Tensor = 1.0) -> Tensor:
        return self.loss_fn(self.model, batch) * weight


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
    rows do not divide evenly; a rank with no row of its own gets one row at weight 0."""

    batch: Any
    weight: float
    rows: int


def _rows(batch: Mapping[str, Any]) -> int:
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ConfigError(f"a batch to shard needs tensors that share their first (row) dimension, got sizes "
                          f"{sorted(sizes)}")
    return sizes.pop()


def shard_batch(batch: Mapping[str, Any], rank: int, world: int) -> Shard:
    """Rank ``rank``'s contiguous block of rows (``torch.tensor_split``: sizes differ by at most 1)."""
    if not isinstance(batch, Mapping):
        raise ConfigError(f"a batch to shard must be a dict of keyword arguments, got {type(batch).__name__}")
    total = _rows(batch)
    bounds = [len(c) for c in torch.arange(total).tensor_split(world)]
    start, count = sum(bounds[:rank]), bounds[rank]
    rows = slice(start, start + count) if count else slice(0, 1)
    part = {k: v[rows] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in batch.items()}
    return Shard(part, count * world / total, count)


class ShardedBatches:
    """This rank's :class:`Shard` of every global batch of ``batches`` (re-iterable when
    ``batches`` is, same length). One process with the global batches and N ranks with their
    shards then see the same examples in the same order at every step."""

    def __init__(self, batches: Iterable[Mapping[str, Any]], rank: int | None = None, world: int | None = None) -> None:
        own_rank, own_world = rank_and_world()
        self.batches = batches
        self.rank = own_rank if rank is None else rank
        self.world = own_world if world is None else world
        if not 0 <= self.rank < self.world:
            raise ConfigError(f"rank {self.rank} outside a world of {self.world}")

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Shard]:
        for batch in self.batches:
            yield shard_batch(batch, self.rank, self.world)


def _gather(value: int) -> list[int]:
    out = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.int64))
    return [int(t) for t in out]


def _agree(values: list[int], what: str) -> None:
    if len(set(values)) > 1:
        groups = {v: [r for r, x in enumerate(values) if x == v] for v in values}
        raise RankMismatchError(f"{what} differ across ranks (ranks grouped by value: {sorted(groups.values())}); "
                                "every rank must attach the same adapters with the same seeds and call "
                                "adapterkit.step once per optimizer step")


def check_draws(model: nn.Module) -> None:
    """Raise :class:`RankMismatchError` unless every rank's per-step draws agree (call after
    :func:`adapterkit.step`; one all-gather of 8 bytes). A no-op without a process group."""
    if rank_and_world()[1] > 1:
        _agree(_gather(draws.fingerprint(model)), "per-step draws (DyLoRA ranks, MoSA module choices, ...)")


def check_in_sync(model: nn.Module) -> None:
    """Raise :class:`RankMismatchError` unless every trainable value is bit-identical on all ranks."""
    if rank_and_world()[1] > 1:
        params = [p.detach().cpu().contiguous() for p in inner_model(model).parameters() if p.requires_grad]
        _agree(_gather(draws.digest(p.reshape(-1).view(torch.uint8).numpy().tobytes() for p in params)), "trainable values")


def shard_loss(ddp: nn.Module, shard: Shard) -> Tensor:
    """The loss function :func:`adapterkit.train` gets for a :func:`wrap` model and
    :class:`ShardedBatches`: checks the step's draws, then one DDP forward of the weighted loss."""
    check_draws(ddp)
    return ddp(shard.batch, shard.weight)


def train(model: nn.Module, batches: Iterable[Mapping[str, Any]], loss_fn: LossFn | None = None,
          ddp_options: Mapping[str, Any] | None = None, **options: Any) -> list[float]:
    """:func:`adapterkit.train` on this rank's share of ``batches`` (the global batches: every rank
    passes the same ones) under :func:`wrap`; returns the global batches' losses (equal on every
    rank). ``options`` are :func:`adapterkit.train`'s; a progress bar shows on rank 0 only. After
    training, the trainable values are checked to be identical on all ranks."""
    _require_group()
    options.setdefault("progress", is_main())
    ddp = wrap(model, loss_fn, **dict(ddp_options or {}))
    sharded = ShardedBatches(batches)
    local = train_loop(ddp, sharded, loss_fn=shard_loss, **options)
    check_in_sync(model)
    summed = torch.tensor(local, dtype=torch.float64)
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


def on_main(fn: Callable[..., Result], *args: Any, **kwargs: Any) -> Result | None:
    """Run ``fn`` on rank 0 only (e.g. :func:`adapterkit.save`) while the other ranks wait; its
    error is raised on every rank (as :class:`RankMismatchError` elsewhere), never a hang.
    Returns ``fn``'s result on rank 0, ``None`` elsewhere."""
    rank, world = rank_and_world()
    if world == 1:
        return fn(*args, **kwargs)
    result, failure = None, ""
    if rank == 0:
        try:
            result = fn(*args, **kwargs)
        except BaseException as error:  # told to the others first, then re-raised here
            failure = f"{type(error).__name__}: {error}"
            _tell(failure)
            raise
    _tell(failure)
    return result


def _tell(failure: str) -> None:
    """Rank 0's error message (empty: success) to every rank, as bytes (no pickling)."""
    message = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    data = failure.encode()[:MESSAGE_BYTES]
    message[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else message[:0]
    dist.broadcast(message, src=0)
    text = bytes(message.tolist()).rstrip(b"\0").decode(errors="replace")
    if text and dist.get_rank() != 0:
        raise RankMismatchError(f"rank 0 failed: {text}")


def launch(fn: Callable[..., Any], nproc: int, args: Sequence[Any] = ()) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nproc`` local processes through ``torch.distributed.run``'s Python API
    (elastic_launch, the engine behind ``torchrun --standalone``): each gets RANK, WORLD_SIZE and
    a free MASTER_PORT in its environment. ``fn`` must be importable (a module-level function).
    Returns each rank's return value; a rank that died raises :class:`RankFailedError`."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConfigError(f"nproc must be an integer >= 1, got {nproc!r}")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, start_method="spawn")
    try:
        return elastic_launch(config, fn)(*args)
    except ChildFailedError as error:
        failed = ", ".join(f"rank {rank} (exit status {f.exitcode})" for rank, f in sorted(error.failures.items()))
        raise RankFailedError(f"{failed} failed; its error is printed above") from None
