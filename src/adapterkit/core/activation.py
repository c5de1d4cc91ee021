"""Composition blocks checked against a model's adapters, and the routing mask of a Split.

:func:`check_block` refuses (``ConfigError``, before anything changes) what a block cannot mean
for the attached adapters: unknown names, inserted modules inside an ``Add``, model-level
adapters or replacing copies (``modules_to_save``) inside a ``Split``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import Tensor, nn

from ..errors import ConfigError, UnknownMemberError
from .composition import Add, Block, Split, Stack, Weighted, splits, walk
from .routing import check_mask
from .state import ModelState, adapted_states

BLOCK_TYPES = (Add, Stack, Split)


def check_block(state: ModelState, block: Block, fusing: bool = False) -> None:
    """Refuse a block these adapters cannot form (``fusing``: a block to fold into the weights)."""
    unknown = [n for n in block.names if n not in state.adapters]
    if unknown:
        known = ", ".join(state.adapters) or "none"
        raise UnknownMemberError(f"the composition names adapter(s) {unknown} that are not attached (attached: {known})")
    for inner in walk(block):
        if isinstance(inner, Add):
            modules = [n for n in inner.names if not state.adapters[n].fusable]
            if modules:
                raise ConfigError(f"Add sums weight deltas; adapter(s) {modules} insert modules (use a Stack for them)")
    for split in splits(block):
        for name in split.names:
            record = state.adapters[name]
            if "" in record.targets:
                raise ConfigError(f"adapter {name!r} works on the whole model and cannot be routed per token by a Split")
            if record.copies:
                raise ConfigError(f"adapter {name!r} replaces modules {list(record.copies)} (modules_to_save), which "
                                  "cannot be routed per token by a Split; keep it outside the Split")
    if fusing:
        if splits(block):
            raise ConfigError("a composition with a Split cannot be fused: its deltas differ per token")
        modules = [n for n in block.names if not state.adapters[n].fusable]
        if modules:
            raise ConfigError(f"adapter(s) {modules} insert modules and cannot be fused; fuse the weight deltas only")


def routed_names(block: Block | None) -> frozenset[str]:
    """The adapters inside a Split of ``block``."""
    return frozenset() if block is None else frozenset(n for s in splits(block) for n in s.names)


def fusable_part(state: ModelState, active: Weighted, block: Block | None) -> Weighted:
    """The weight deltas of ``active`` that can be folded into the weights: all but those inside
    a Split (they differ per token and keep running unfused)."""
    routed = routed_names(block)
    return tuple((n, w) for n, w in active if state.adapters[n].fusable and n not in routed)


def sync_hooks(model: nn.Module, state: ModelState) -> None:
    """Install the model hooks that derive the routing mask from ``token_type_ids`` while a
    ``Split(by="token_type_ids")`` is in effect, and remove them otherwise."""
    spec = state.routed()
    needed = spec is not None and spec.by == "token_type_ids"
    if needed and not state.routing_hooks:
        state.routing_hooks = (
            model.register_forward_pre_hook(state.routing.before, with_kwargs=True),
            model.register_forward_hook(state.routing.after, always_call=True),  # also pops after an error
        )
    elif not needed and state.routing_hooks:
        for handle in state.routing_hooks:
            handle.remove()
        state.routing_hooks = ()


@contextlib.contextmanager
def routing(model: nn.Module, mask: Tensor) -> Iterator[None]:
    """Route tokens for the forwards of ``model`` run by this thread inside the block::

        with ak.routing(model, mask):   # mask: (batch, tokens) bool; True -> the Split's b
            model(input_ids=ids)

    For ``Split(..., by="mask")`` (decoders without token types: the caller knows where the
    document starts) and to override ``by="token_type_ids"``. Other threads are unaffected, so
    several threads may run one model with different masks. The mask must match the
    (batch, tokens) of the modules' inputs; put it on the model's device to save a copy per module.
    """
    mask = check_mask(mask)
    states = adapted_states(model)
    if not states:
        raise ConfigError("ak.routing: the model has no adapters")
    for state in states:
        state.routing.push(mask)
    try:
        yield
    finally:
        for state in states:
            state.routing.pop()
