"""Put a model back exactly as it was: values, tensor objects, module tree, flags.

Used where a call must leave no trace: a method's :meth:`~adapterkit.AdapterMethod.setup` may run
a procedure on the model (dense fine-tuning to choose a sparse mask, distillation) and the model
is restored afterwards; public calls that fail half-way roll back with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from .state import drop_state, peek_state, set_state


@dataclasses.dataclass
class _ModuleState:
    module: nn.Module
    parameters: dict[str, Any]
    buffers: dict[str, Any]
    children: dict[str, Any]
    training: bool
    hooks: dict[str, dict[Any, Any]]


HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called")


class ModelSnapshot:
    """Everything needed to restore ``model`` bit for bit.

    ``values=False`` keeps only the structure, flags and tensor objects, not copies of their
    values: enough to undo calls that never write into existing tensors.
    """

    def __init__(self, model: nn.Module, values: bool = True) -> None:
        self.model = model
        self.modules = [_ModuleState(m, dict(m._parameters), dict(m._buffers), dict(m._modules), m.training,
                                     {h: dict(getattr(m, h)) for h in HOOK_DICTS if hasattr(m, h)})
                        for m in model.modules()]
        self.state = peek_state(model)
        self.state_fields = None if self.state is None else self.state.fields()
        tensors: dict[int, tuple[Tensor, Tensor, bool, Tensor | None]] = {}
        for state in self.modules:
            for tensor in [*state.parameters.values(), *state.buffers.values()]:
                if tensor is None or id(tensor) in tensors:
                    continue
                data = tensor.data
                copy = data.clone() if values else None
                tensors[id(tensor)] = (tensor, data, tensor.requires_grad, copy)
        self.tensors = list(tensors.values())
        self.grads = {id(t): t.grad for t, *_ in self.tensors if isinstance(t, nn.Parameter)}

    def restore(self) -> None:
        """Put back every module's parameters, buffers, children and mode, and every tensor's
        data object, values, ``requires_grad`` and ``.grad``."""
        for state in self.modules:
            module = state.module
            module._parameters.clear()
            module._parameters.update(state.parameters)
            module._buffers.clear()
            module._buffers.update(state.buffers)
            module._modules.clear()
            module._modules.update(state.children)
            module.training = state.training
            for name, hooks in state.hooks.items():
                getattr(module, name).clear()
                getattr(module, name).update(hooks)
        if self.state is None:
            drop_state(self.model)
        else:
            self.state.set_fields(self.state_fields)
            set_state(self.model, self.state)
        with torch.no_grad():
            for tensor, data, requires_grad, copy in self.tensors:
                if tensor.data is not data:
                    tensor.data = data
                if copy is not None:
                    data.copy_(copy)
                if tensor.is_leaf:
                    tensor.requires_grad_(requires_grad)
        for tensor, *_ in self.tensors:
            if isinstance(tensor, nn.Parameter):
                tensor.grad = self.grads[id(tensor)]

    def __enter__(self) -> "ModelSnapshot":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def rollback_on_error(model: nn.Module, values: bool = True) -> "_Rollback":
    """``with rollback_on_error(model): ...`` restores the model if the block raises."""
    return _Rollback(model, values)


class _Rollback:
    def __init__(self, model: nn.Module, values: bool) -> None:
        self.snapshot = ModelSnapshot(model, values=values)

    def __enter__(self) -> ModelSnapshot:
        return self.snapshot

    def __exit__(self, kind: Any, *exc: Any) -> None:
        if kind is not None:
            self.snapshot.restore()
