"""Mixed-adapter batches: every row of one forward runs its own adapter (or none).

:func:`adapterkit.per_row` (in :mod:`adapterkit.core.per_row`) pushes a :class:`RowAssignment`
onto the :class:`RowSlot` of every adapted module of the model; while one is there, the
module's forward is :func:`run_rows` instead of its activation plan:

* the base module runs once for the whole batch (unfused, so every row starts from the base);
* per adapter, only at that adapter's rows: LoRA-like deltas (``delta_output``) are added with
  one ``index_add``; deltas of tensors (no ``delta_output``) and replacing copies
  (``modules_to_save``) run the module again on those rows; inserted modules (bottleneck)
  adapt those rows of the output;
* many small LoRA groups are batched the Punica way: each row's ``A`` and ``B`` are gathered
  into one ``bmm`` instead of one pair of matmuls per adapter (:class:`FactoredRows`).

The assignment (which rows use which adapter) is computed once per call, not per module. Each
thread has its own slot stack per module, so threads may run one model with different rows.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedError
from .functional import call_with
from .layers import DeltaLayer, ModuleCopy, ModuleLayer
from .threadstack import ThreadStacks

if TYPE_CHECKING:
    from .host import AdaptedModule

#: gather per-row factors into one bmm from this many LoRA groups of one shape on. Measured on
#: MiniLM q/v, windows of 32 rows: with 27-29 groups of 1-2 rows gathering saved 5-6% of the whole
#: forward; with one large group a plain matmul pair is faster (bench/serve_mixed.py keeps both)
GATHER_MIN_GROUPS = 8


class FactoredRows(Protocol):
    """A delta whose ``delta_output(x, s)`` is ``s · scaling · (x Aᵀ) Bᵀ`` for a linear module (LoRA
    and its variants), so rows of many such adapters can share one batched matmul. Layers opt in
    by defining :meth:`row_factors` (looked up by name: a runtime protocol check costs more than
    the small matmuls it guards)."""

    def row_factors(self) -> tuple[Tensor, Tensor, float] | None:
        """``(A (r × in), B (out × r), scaling)`` as :meth:`delta_output` uses them now, or
        ``None`` when the output is not that product (a conv, active dropout)."""


class ModelWatch(Protocol):
    """What :func:`adapterkit.per_row` checks at every adapted module: that the model's adapters
    are still those the block was entered with."""

    def check(self) -> None:
        """Raise ``ConfigError`` (naming the change) when they are not."""


@dataclasses.dataclass(frozen=True)
class GatherPlan:
    """The rows of one gathered bmm: ``rows`` (``None``: every row of the batch) and, for each of
    them, the index of its adapter in the stacked factors (``which``)."""

    rows: Tensor | None
    which: Tensor


@dataclasses.dataclass(frozen=True)
class RowAssignment:
    """The adapter of each row of one forward, grouped: ``rows[k]`` are the rows of ``adapters[k]``.

    ``groups`` holds each row's index into ``adapters`` (-1: the base only). ``paths`` names the
    adapted modules for error messages; ``watch`` is checked at every module. Index tensors live
    on ``device``; :meth:`on` gives (and keeps) the copy for another device, so every index is
    built on the CPU and moved once per device, not per module.
    """

    names: tuple[str | None, ...]
    adapters: tuple[str, ...]
    rows: tuple[Tensor, ...]
    groups: tuple[int, ...]
    paths: Mapping[int, str] = dataclasses.field(default_factory=dict, repr=False)
    watch: ModelWatch | None = dataclasses.field(default=None, repr=False, compare=False)
    device: torch.device = torch.device("cpu")
    _on: dict[torch.device, "RowAssignment"] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    _plans: dict[tuple[int, ...], GatherPlan] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, names: Sequence[str | None], paths: Mapping[int, str] | None = None,
           watch: ModelWatch | None = None) -> "RowAssignment":
        """Group ``names`` (one adapter name or ``None`` per row) by adapter, in order of first
        appearance; the index tensors are made on the CPU."""
        grouped: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            if name is not None:
                grouped.setdefault(name, []).append(i)
        adapters = tuple(grouped)
        groups = [-1] * len(names)
        for k, rows in enumerate(grouped.values()):
            for i in rows:
                groups[i] = k
        return cls(tuple(names), adapters, tuple(torch.tensor(r, dtype=torch.int64) for r in grouped.values()),
                   tuple(groups), paths or {}, watch)

    def on(self, device: torch.device) -> "RowAssignment":
        """The same assignment with its index tensors on ``device``."""
        if device == self.device:
            return self
        moved = self._on.get(device)
        if moved is None:
            moved = self._on[device] = dataclasses.replace(
                self, rows=tuple(r.to(device) for r in self.rows), device=device, _on={}, _plans={})
        return moved

    def gather_plan(self, members: tuple[int, ...]) -> GatherPlan:
        """The :class:`GatherPlan` of the rows whose adapter is one of ``members`` (indices into
        ``adapters``; position ``i`` in ``members`` is the factors' index ``i``), made once."""
        plan = self._plans.get(members)
        if plan is None:
            slot = {k: i for i, k in enumerate(members)}
            which = [slot.get(g, -1) for g in self.groups]
            kept = [i for i, w in enumerate(which) if w >= 0]
            rows = None if len(kept) == len(which) else torch.tensor(kept, dtype=torch.int64).to(self.device)
            plan = self._plans[members] = GatherPlan(rows, torch.tensor([which[i] for i in kept], dtype=torch.int64).to(self.device))
        return plan


class RowSlot(ThreadStacks):
    """The row assignments of the forwards running through one adapted module, one stack per
    thread (empty outside :func:`adapterkit.per_row`). Copies of a model get an empty one."""

    def current(self) -> RowAssignment | None:
        """The assignment of the calling thread's innermost ``per_row`` block, or ``None``."""
        return self.top("rows")

    def push(self, assignment: RowAssignment) -> None:
        """Enter a block on the calling thread (its forwards now run ``assignment``)."""
        self.stack("rows").append(assignment)

    def pop(self) -> None:
        """Leave the calling thread's innermost block."""
        self.stack("rows").pop()


#: modules whose output is always a new tensor: rows may be written into it in place
FRESH_OUTPUT = (nn.Linear, nn.Conv2d, nn.Embedding)


@dataclasses.dataclass
class _Output:
    """The module's output being built: writes go out of place first (a module may hand back a
    tensor it still uses, e.g. its input) and in place afterwards, unless autograd records."""

    value: Any
    owned: bool = False

    @property
    def in_place(self) -> bool:
        return self.owned and not torch.is_grad_enabled()

    @property
    def hidden(self) -> Tensor:
        hidden = self.value[0] if isinstance(self.value, tuple) else self.value
        if not isinstance(hidden, Tensor):
            raise UnsupportedError(f"ak.per_row: a module returns {type(hidden).__name__}, not a tensor")
        return hidden

    def _set(self, hidden: Tensor) -> None:
        self.value = (hidden, *self.value[1:]) if isinstance(self.value, tuple) else hidden
        self.owned = True

    def add(self, rows: Tensor | None, delta: Tensor) -> None:
        hidden = self.hidden
        delta = delta.to(hidden.dtype)
        in_place = self.in_place
        if rows is None:
            self._set(hidden.add_(delta) if in_place else hidden + delta)
        else:
            self._set(hidden.index_add_(0, rows, delta) if in_place else hidden.index_add(0, rows, delta))

    def put(self, rows: Tensor, values: Tensor) -> None:
        hidden = self.hidden
        values = values.to(hidden.dtype)
        in_place = self.in_place
        self._set(hidden.index_copy_(0, rows, values) if in_place else hidden.index_copy(0, rows, values))


def run_rows(host: AdaptedModule, assignment: RowAssignment, x: Tensor, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
    """The forward of ``host`` with each row's own adapter (at weight 1.0)."""
    if assignment.watch is not None:
        assignment.watch.check()  # the model may have changed since the block began (another thread)
    present = [(k, layer) for k, name in enumerate(assignment.adapters) if (layer := host.layer(name)) is not None]
    if not present:
        return host.base_layer(x, *args, **kwargs)
    _check_rows(host, assignment, x)
    device = x.device
    a = assignment.on(device)
    out = _Output(host.base_layer(x, *args, **kwargs), owned=type(host.base_layer) in FRESH_OUTPUT)
    factored: dict[tuple[Any, ...], list[tuple[int, DeltaLayer, tuple[Tensor, Tensor, float]]]] = {}
    modules: list[tuple[int, ModuleLayer]] = []
    for k, layer in present:
        if isinstance(layer, ModuleLayer):
            modules.append((k, layer))
        elif isinstance(layer, ModuleCopy):
            out.put(a.rows[k], _rerun(layer, {}, x, a.rows[k], args, kwargs))
        elif isinstance(layer, DeltaLayer) and not layer.output_delta():
            replaced = {t: layer.part(t).apply(host.base_layer.get_parameter(t), 1.0) for t in layer.delta_tensors()}
            out.put(a.rows[k], _rerun(host.base_layer, replaced, x, a.rows[k], args, kwargs))
        elif isinstance(layer, DeltaLayer):
            row_factors = getattr(layer, "row_factors", None)
            factors = row_factors() if row_factors is not None else None
            if factors is None:
                out.add(a.rows[k], layer.delta_output(x.index_select(0, a.rows[k]), 1.0))
            else:
                left, right, _ = factors
                key = (tuple(left.shape), tuple(right.shape), left.dtype, left.device)
                factored.setdefault(key, []).append((k, layer, factors))
        else:
            raise UnsupportedError(f"ak.per_row: {type(layer).__name__} layers cannot run per row")
    for group in factored.values():
        if len(group) >= GATHER_MIN_GROUPS:
            _gathered(out, a, x, group)
        else:
            for k, layer, _ in group:
                out.add(a.rows[k], layer.delta_output(x.index_select(0, a.rows[k]), 1.0))
    for k, layer in modules:
        rows = a.rows[k]
        out.put(rows, layer.adapt(x.index_select(0, rows), out.hidden.index_select(0, rows), 1.0))
    return out.value


def _check_rows(host: AdaptedModule, assignment: RowAssignment, x: Any) -> None:
    if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[0] == len(assignment.names):
        return
    path = assignment.paths.get(id(host), type(host.base_layer).__name__)
    got = f"an input of shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__} input"
    raise ConfigError(f"ak.per_row names {len(assignment.names)} rows, but module {path!r} "
                      f"({type(host.base_layer).__name__}) gets {got}; dim 0 of every adapted module's "
                      "input must be the batch row (one name per row)")


def _rerun(module: nn.Module, replaced: dict[str, Tensor], x: Tensor, rows: Tensor, args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> Tensor:
    """``module`` (with ``replaced`` tensors) at ``rows``. A module called with further arguments
    (masks, positions shaped by the batch) runs on the whole batch and the rows are picked after,
    since which of its arguments are per row is unknown."""
    if isinstance(module, ModuleCopy):
        module = module.module
    if args or kwargs:
        full = call_with(module, replaced, (x, *args), kwargs) if replaced else module(x, *args, **kwargs)
        return _first(full).index_select(0, rows)
    sub = x.index_select(0, rows)
    return _first(call_with(module, replaced, (sub,), {}) if replaced else module(sub))


def _first(output: Any) -> Tensor:
    hidden = output[0] if isinstance(output, tuple) else output
    if not isinstance(hidden, Tensor):
        raise UnsupportedError(f"ak.per_row: a replaced module returns {type(hidden).__name__}, not a tensor")
    return hidden


def _gathered(out: _Output, a: RowAssignment, x: Tensor,
              group: list[tuple[int, DeltaLayer, tuple[Tensor, Tensor, float]]]) -> None:
    """One batched matmul pair for many LoRA groups: each row's A and B gathered (BGMV). The row
    indices come from the assignment (made once, on the CPU): nothing here waits for the device."""
    lefts = torch.stack([f[0] for _, _, f in group])  # (n, r, in)
    rights = torch.stack(torch._foreach_mul([f[1] for _, _, f in group], [f[2] for _, _, f in group]))  # scaled
    plan = a.gather_plan(tuple(k for k, _, _ in group))
    rows, which = plan.rows, plan.which
    sub = x if rows is None else x.index_select(0, rows)
    flat = sub.reshape(sub.shape[0], -1, sub.shape[-1]).to(lefts.dtype)
    which = which.to(lefts.device)
    h = torch.bmm(flat, lefts.index_select(0, which).transpose(1, 2))
    right_rows = rights.index_select(0, which).transpose(1, 2)
    hidden = out.hidden
    if rows is None and out.in_place and hidden.dtype == h.dtype and hidden.is_contiguous():
        # every row: accumulate straight into the output (no delta tensor, no extra pass)
        hidden.view(h.shape[0], h.shape[1], -1).baddbmm_(h, right_rows)
        return
    delta = torch.bmm(h, right_rows)
    out.add(rows, delta.view(*sub.shape[:-1], delta.shape[-1]))
