"""``ak.per_row``: one forward in which every batch row runs its own adapter (see :mod:`.rows`).

The request is checked whole before any module sees it: the names are attached, nothing is
fused, no named adapter works on the whole model, no model-level adapter or Split is active.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from torch import nn

from ..errors import ConfigError, FusedStateError
from .rows import RowAssignment
from .state import ModelState, adapted_states


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

    Every row gets exactly the output of running it alone with only its adapter active (weight
    1.0, unfused), while the base module runs once for the whole batch. Weight deltas are added
    at their rows, replacing copies (``modules_to_save``) and inserted modules run on their rows.
    Dim 0 of every adapted module's input must be the batch row (``ConfigError`` at the first
    module where it is not); ``generate`` works with padded batches.

    The model's own activation is untouched and ignored inside the block; other threads are
    unaffected (several threads may run one model with different rows). Refused before anything
    runs: unknown names (``AdapterNotFoundError``), fused adapters (``FusedStateError``: unfuse
    first), model-level adapters and active Split compositions (``ConfigError``).
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
    assignment = RowAssignment.of(names, paths)
    pushed = 0
    try:
        for slot in slots:
            slot.push(assignment)
            pushed += 1
        yield
    finally:
        for slot in slots[:pushed]:
            slot.pop()
