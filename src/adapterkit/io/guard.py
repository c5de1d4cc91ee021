"""A work budget for building an adapter from a file's config.

A config read from disk can ask for absurd sizes (``"r": 1e12``, a MoSA with a billion
modules); left alone, building its empty layers allocates terabytes or loops for hours before
the shapes are compared with the stored tensors. While the layers are built, every torch call
is charged against a budget derived from the file (its stored values, the targeted base
weights): factory calls by the elements they allocate, every call by a small flat cost. Going
over raises :class:`CorruptFileError` before the allocation happens; the model is untouched.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..errors import CorruptFileError

CALL_COST = 16  # elements charged for any torch call: bounds loops whose length a file sets
SLACK = 2**20  # elements every load may use beyond its file (small models, bookkeeping)
PER_STORED = 16  # latent elements per stored element: a 1-bit tensor stores 1/8 byte per value
_SIZED = (tuple, list, torch.Size)
_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint,
              torch.empty_strided}
_METHODS = {Tensor.new_empty, Tensor.new_zeros, Tensor.new_ones, Tensor.new_full}


def _requested(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Elements a factory call asks for (0 for other calls)."""
    if func is torch.randperm:
        return int(args[0] if args else kwargs.get("n", 0))
    if func is torch.arange:
        bounds = [float(a) for a in args[:3] if isinstance(a, (int, float))]
        if len(bounds) == 1:
            bounds = [0.0, bounds[0]]
        step = bounds[2] if len(bounds) == 3 else 1.0
        return 0 if len(bounds) < 2 or step == 0 else max(0, math.ceil((bounds[1] - bounds[0]) / step))
    if func in _METHODS:
        args = args[1:]
    elif func not in _FACTORIES:
        return 0
    size: Any = kwargs.get("size")
    if size is None:
        size = next((a for a in args if isinstance(a, _SIZED)), None)
    if size is None:
        size = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
    return math.prod(int(d) for d in size)


class WorkBudget(TorchFunctionMode):
    """Charges torch calls against ``budget`` elements; :class:`CorruptFileError` beyond it."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.left = budget

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        try:
            cost = CALL_COST + _requested(func, args, kwargs)
        except (TypeError, ValueError, OverflowError):
            cost = CALL_COST  # an unusual signature: torch itself validates it
        self.left -= cost
        if self.left < 0:
            raise CorruptFileError("the adapter config asks for far more memory or work than the "
                                   "stored tensors can fill (a damaged or hostile size field)")
        return func(*args, **kwargs)


def load_budget(stored: Iterable[Tensor], bases: Iterable[Tensor]) -> int:
    """The elements a load may allocate: a multiple of the stored values, plus the largest
    targeted base tensor, plus :data:`SLACK`."""
    return PER_STORED * sum(t.numel() for t in stored) + max((t.numel() for t in bases), default=0) + SLACK
