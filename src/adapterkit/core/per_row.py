"""``ak.per_row``: one forward in which every batch row runs its own adapter (see :mod:`.rows`).

The request is checked whole before any module sees it: the names are attached, nothing is
fused, no named adapter works on the whole model, no model-level adapter or Split is active.
Those checks hold for the whole block: :class:`StateWatch` refuses a model changed meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

from torch import nn

from ..errors import ConfigError, FusedStateError
from .rows import RowAssignment
from .state import ModelState, Weighted, adapted_states


@dataclasses.dataclass(frozen=True)
class _Seen:
    """What a change of the adapters is described by."""

    adapters: tuple[str, ...]
    modules: tuple[str, ...]
    active: Weighted
    fused: Weighted

    @classmethod
    def of(cls, state: ModelState) -> "_Seen":
        return cls(tuple(state.adapters), tuple(state.wrappers), state.active, state.fused)

    def changes(self, now: "_Seen") -> str:
        said = []
        for label, before, after in (("attached", self.adapters, now.adapters), ("detached", now.adapters, self.adapters)):
            if names := [n for n in after if n not in before]:
                said.append(f"adapter(s) {names} {label}")
        if modules := [m for m in now.modules if m not in self.modules]:
            said.append(f"module(s) {modules} newly adapted")
        if now.fused != self.fused:
            said.append(f"fused now: {[n for n, _ in now.fused]}" if now.fused else "unfused")
        if now.active != self.active:
            said.append(f"activation now: {list(now.active)}")
        return "; ".join(said) or "adapters changed and changed back, or fused weights being written"


class StateWatch:
    """The models' adapter states as a ``per_row`` block found them: :meth:`check` (one integer
    comparison per state) raises ``ConfigError`` once any of them changed."""

    def __init__(self, states: Sequence[ModelState]) -> None:
        self.entries = [(state, state.version, _Seen.of(state)) for state in states]

    def check(self) -> None:
        for state, version, seen in self.entries:
            if state.version != version:
                raise ConfigError(f"ak.per_row: the model's adapters changed inside the block ({seen.changes(_Seen.of(state))}); "
                                  "its rows were checked against the adapters at its start, so attach, detach, "
                                  "activate, fuse or switch between blocks, not during one (on any thread)")


def check_rows(state: ModelState, names: Sequence[str | None]) -> None:
    """Refuse row names these adapters cannot serve (before anything runs)."""
    for name in dict.fromkeys(n for n in names if n is not None):
        record = state.record(name)  # AdapterNotFoundError
        if "" in record.targets:
            raise ConfigError(f"ak.per_row: adapter {name!r} works on the whole model (a model-level adapter) and "
                              "cannot run on some rows only")
    if state.fused:
        raise FusedStateError(f"ak.per_row: adapters {[n for n, _ in state.fused]} are fused into the base weights, "
                              "so no row would see the base model; call ak.unfuse(model) first")
    if state.model_host is not None and state.model_host.plan:
        active = [layer.adapter_name for layer, _ in state.model_host.plan]
        raise ConfigError(f"ak.per_row: model-level adapter(s) {active} are active and would run on every row; "
                          "deactivate them (ak.activate) first")
    if state.routed() is not None:
        raise ConfigError("ak.per_row: a composition with a Split is active (it routes tokens, per_row routes rows); "
                          "activate plain adapters first")


@contextlib.contextmanager
def per_row(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Run each batch row of the forwards inside the block with its own adapter::

        with ak.per_row(model, ["a", None, "b", "a"]):   # an adapter name or None per row
            logits = model(**batch).logits               # row 1 sees the base model

    Every row gets the output of running it alone with only its adapter active (weight 1.0,
    unfused), up to float rounding (a batch's matmuls round differently from one row's; many LoRA
    adapters gathered into one batched matmul differ by about 2e-7 in fp32), while the base module
    runs once for the whole batch. Weight deltas are added at their rows, replacing copies
    (``modules_to_save``) and inserted modules run on their rows. Dim 0 of every adapted module's
    input must be the batch row (``ConfigError`` at the first module where it is not);
    ``generate`` works with padded batches.

    The block is bound to the thread that entered it: forwards that thread runs inside it use the
    rows; forwards on other threads (and modules a forward runs on other threads) run the model's
    own activation, which the block leaves untouched and ignores. Several threads may therefore
    run one model with different rows. Refused before anything runs: unknown names
    (``AdapterNotFoundError``), fused adapters (``FusedStateError``: unfuse first), model-level
    adapters and active Split compositions (``ConfigError``). The model must not change while the
    block is open: an attach, detach, activate, fuse, unfuse or switch, on any thread, makes the
    next adapted module of a forward in the block, or the block's end, raise ``ConfigError``
    naming the change, rather than return rows that mix old and new adapters.
    """
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise ConfigError(f"ak.per_row takes one adapter name (or None) per row, got {type(names).__name__}")
    names = tuple(names)
    wrong = [n for n in names if n is not None and not isinstance(n, str)]
    if wrong:
        raise ConfigError(f"ak.per_row: each row names one adapter (a string) or None, got {wrong[0]!r}")
    if not names:
        raise ConfigError("ak.per_row: no rows named")
    states = adapted_states(model)
    if not states:
        raise ConfigError("ak.per_row: the model has no adapters")
    for state in states:
        check_rows(state, names)
    slots = [wrapper.row_slot for state in states for wrapper in state.wrappers.values()]
    paths = {id(wrapper): path for state in states for path, wrapper in state.wrappers.items()}
    watch = StateWatch(states)
    assignment = RowAssignment.of(names, paths, watch)
    pushed = 0
    try:
        for slot in slots:
            slot.push(assignment)
            pushed += 1
        yield
        watch.check()  # a change after the last module ran (e.g. a fuse on another thread) fails too
    finally:
        for slot in slots[:pushed]:
            slot.pop()
