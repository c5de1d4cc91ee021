"""Reusable scratch buffers owned by a model, one set per thread.

Fresh allocations of weight-sized buffers cost more than the arithmetic on them (page faults),
so e.g. bf16 fusing accumulates in an fp32 buffer and SHiRA's forward builds ``W + S`` in one.
The buffers belong to the adapted model (every layer of a model shares its :class:`Workspace`)
and to the calling thread, so concurrent forwards — several threads on one model, or on
several models — never write into each other's buffers, and the memory goes with the model.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
from torch import Tensor


class Workspace:
    """Scratch buffers keyed by (device, dtype), grown as needed, private to each thread.

    A buffer's content is valid until the same thread asks this workspace for a buffer of the
    same device and dtype again. Copies of a model (``copy.deepcopy``, pickling) get an empty
    workspace of their own.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def buffer(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
        buffers: dict[tuple[torch.device, torch.dtype], Tensor] = self._local.__dict__.setdefault("buffers", {})
        numel = math.prod(shape)
        key = (torch.device(device), dtype)
        buffer = buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            buffers[key] = buffer
        return buffer[:numel].view(shape)

    def free(self) -> None:
        """Release the calling thread's buffers (other threads' go when those threads end)."""
        self._local.__dict__.pop("buffers", None)

    @property
    def nbytes(self) -> int:
        """Bytes held for the calling thread."""
        return sum(b.numel() * b.element_size() for b in self._local.__dict__.get("buffers", {}).values())

    def __deepcopy__(self, memo: dict[int, Any]) -> "Workspace":
        return Workspace()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
