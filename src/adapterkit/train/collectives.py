"""The few collectives the data-parallel helpers need, on the default process group.

Each rank's rank and world size, rank-0-only work whose error reaches every rank
(:func:`on_main`), and small integer all-gathers behind the cross-rank checks of
:mod:`adapterkit.train.distributed`. Their tensors live on :func:`collective_device`: the CPU under
gloo, the current CUDA device under NCCL (which has no CPU transport).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..errors import AdapterError

Result = TypeVar("Result")
MESSAGE_BYTES = 1024  # of rank 0's error message that on_main passes to the other ranks


class RankMismatchError(AdapterError):
    """Ranks disagree on what must be identical: per-step draws, global batches or trainable values."""


def grouped() -> bool:
    """Whether a default process group is set up."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if grouped():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and without a process group)."""
    return rank_and_world()[0] == 0


def collective_device() -> torch.device:
    """Where tensors for collectives of the default process group must live: the current CUDA
    device when its backend is NCCL (accelerate and torchrun on GPUs), else the CPU."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_ints(values: Sequence[int]) -> list[tuple[int, ...]]:
    """Every rank's ``values`` (int64s, the same count on every rank), in rank order."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=collective_device())
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [tuple(t.tolist()) for t in out]


def agree(values: Sequence[Any], what: str, hint: str) -> None:
    """Raise :class:`RankMismatchError` unless the ranks' ``values`` are all equal."""
    if len(set(values)) > 1:
        groups = {v: [r for r, x in enumerate(values) if x == v] for v in values}
        raise RankMismatchError(f"{what} differ across ranks (ranks grouped by value: {sorted(groups.values())}); {hint}")


def on_main(fn: Callable[..., Result], *args: Any, **kwargs: Any) -> Result | None:
    """Run ``fn`` on rank 0 only (e.g. :func:`adapterkit.save`) while the other ranks wait; its
    error is raised on every rank (as :class:`RankMismatchError` elsewhere), never a hang.
    Returns ``fn``'s result on rank 0, ``None`` elsewhere (without a process group: ``fn(...)``).
    The other ranks wait as long as ``fn`` runs, within the process group's timeout."""
    if not grouped():
        return fn(*args, **kwargs)
    result, failure = None, ""
    if dist.get_rank() == 0:
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
    message = message.to(collective_device())
    dist.broadcast(message, src=0)
    text = bytes(message.tolist()).rstrip(b"\0").decode(errors="replace")
    if text and dist.get_rank() != 0:
        raise RankMismatchError(f"rank 0 failed: {text}")
