"""Run one module with some of its parameters replaced, without writing to the module.

Unfused deltas over a module's tensors (a sparse diff of a LayerNorm's scale, of an embedding
table) run the module on ``base + Δ``. Common module types are called through their functional
form, which never touches the module, so concurrent forwards stay safe; other types go through
``torch.func.functional_call``, which swaps the parameters in for the duration of the call.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Forward = Callable[[nn.Module, Mapping[str, Tensor], tuple[Any, ...], dict[str, Any]], Any]


def _linear(m: nn.Linear, p: Mapping[str, Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return F.linear(args[0], p["weight"], p.get("bias"))


def _embedding(m: nn.Embedding, p: Mapping[str, Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return F.embedding(args[0], p["weight"], m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)


def _layer_norm(m: nn.LayerNorm, p: Mapping[str, Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return F.layer_norm(args[0], m.normalized_shape, p.get("weight"), p.get("bias"), m.eps)


def _conv2d(m: nn.Conv2d, p: Mapping[str, Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return m._conv_forward(args[0], p["weight"], p.get("bias"))


FORWARDS: dict[type[nn.Module], Forward] = {
    nn.Linear: _linear, nn.Embedding: _embedding, nn.LayerNorm: _layer_norm, nn.Conv2d: _conv2d,
}


def call_with(module: nn.Module, replaced: Mapping[str, Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``module(*args, **kwargs)`` with its direct parameters ``replaced``."""
    forward = FORWARDS.get(type(module))
    if forward is not None and not kwargs and len(args) == 1:
        params = {name: replaced.get(name, param) for name, param in module.named_parameters(recurse=False)}
        return forward(module, params, args, kwargs)
    return torch.func.functional_call(module, dict(replaced), args, kwargs, strict=False)
