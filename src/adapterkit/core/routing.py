"""The token-routing mask of an active :class:`~adapterkit.Split`, per model and per thread.

Every adapted module of a model reads the mask of the forward running in its own thread, so
several threads may run one model with different masks at once (nothing process-global). The
mask comes from ``with ak.routing(model, mask)`` or, for ``Split(..., by="token_type_ids")``,
from a forward pre-hook on the model that derives it from the call's ``token_type_ids``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .threadstack import ThreadStacks


def document_mask(token_type_ids: Tensor) -> Tensor:
    """``True`` from the first 1 of each row on (the document of ``[CLS] q [SEP] d [SEP] pad``):
    the padding after the document goes with the document; a row without a 1 is all query."""
    return token_type_ids.ne(0).cumsum(dim=-1).gt(0)


def check_mask(mask: Any) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        dtype = mask.dtype if isinstance(mask, Tensor) else ""
        raise ConfigError(f"a routing mask is a (batch, tokens) bool tensor, got {shape} {dtype}")
    return mask


class Routing(ThreadStacks):
    """The masks of the forwards running on one model, one stack per thread.

    Explicit masks (:func:`adapterkit.routing`) win over masks derived from ``token_type_ids``.
    Copies of a model (``copy.deepcopy``, pickling) get a fresh, empty one.
    """

    def _stack(self, kind: str) -> list[Tensor | None]:
        return self.stack(kind)

    def push(self, mask: Tensor | None, explicit: bool = True) -> None:
        self._stack("explicit" if explicit else "derived").append(mask)

    def pop(self, explicit: bool = True) -> None:
        stack = self._stack("explicit" if explicit else "derived")
        if stack:  # a pre-hook that never ran (another one raised first) pushed nothing
            stack.pop()

    def mask(self, by: str) -> Tensor:
        """The mask of the calling thread's forward, or a ConfigError saying how to give one."""
        explicit, derived = self._stack("explicit"), self._stack("derived")
        if explicit:
            return explicit[-1]
        if derived and derived[-1] is not None:
            return derived[-1]
        how = "pass token_type_ids to the model or use" if by == "token_type_ids" else "run the model inside"
        raise ConfigError(f"a Split routes tokens by {by!r} but this forward has no mask: {how} "
                          "`with ak.routing(model, mask): ...`")

    # -- the model hooks of Split(by="token_type_ids") ------------------------------------------
    def before(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        token_types = kwargs.get("token_type_ids")
        if token_types is None and args:
            try:
                token_types = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments.get("token_type_ids")
            except TypeError:
                token_types = None
        valid = isinstance(token_types, Tensor) and token_types.dim() == 2
        self.push(document_mask(token_types) if valid else None, explicit=False)  # never raises: after() pops

    def after(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.pop(explicit=False)


def _hidden(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def select(mask: Tensor, a: Any, b: Any, where: str) -> Any:
    """``b`` at the masked tokens, ``a`` elsewhere. Outputs are (batch, tokens, ...) or
    (batch·tokens, ...); of tuple outputs (blocks) the first element is selected and the rest
    taken from ``a``."""
    hidden_a, hidden_b = _hidden(a), _hidden(b)
    shape = hidden_a.shape
    if hidden_a.dim() >= 2 and tuple(shape[:2]) == tuple(mask.shape):
        chosen = mask.view(*mask.shape, *([1] * (hidden_a.dim() - 2)))
    elif hidden_a.dim() >= 1 and shape[0] == mask.numel():
        chosen = mask.reshape(-1, *([1] * (hidden_a.dim() - 1)))
    else:
        raise ConfigError(f"a routed {where} module: its output {tuple(shape)} does not fit the routing mask "
                          f"{tuple(mask.shape)} (batch, tokens); route only modules that see every token")
    picked = torch.where(chosen.to(hidden_a.device), hidden_b, hidden_a)
    return (picked, *a[1:]) if isinstance(a, tuple) else picked
