"""LT-SFT behind the registry: which tensors it targets, phase 1 + selection at attach, the layers."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from ...core.config import AdapterConfig
from ...core.registry import AdapterMethod, register_method
from ...core.targeting import logical_modules, select_modules
from ...errors import BaseModelMismatchError, ConfigError, TargetError
from .config import SFTConfig
from .layer import SFTLayer, eligible_tensors
from .train import Chosen, TargetTensor, base_parameter_count, choose, dense_phase


@dataclasses.dataclass
class SFTContext:
    """What :meth:`SFTMethod.setup` hands to the layers: the chosen entries and the outcome record."""

    chosen: Chosen
    outcome: dict[str, Any]


def _excluded(config: AdapterConfig, name: str) -> bool:
    spec = config.exclude_modules
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith(f".{s}") for s in spec)


def _tied(model: nn.Module, config: SFTConfig, targets: list[str], modules: Mapping[str, nn.Module]) -> None:
    """Refuse targeted parameters shared by several modules (tied input/output embeddings): a diff
    of one would change the other only while fused."""
    owners: dict[int, list[str]] = {}
    for name, module in modules.items():
        for tensor, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append(f"{name}.{tensor}")
    for path in targets:
        for tensor in eligible_tensors(modules[path], config.tensors, config.freeze_norms):
            shared = owners[id(modules[path].get_parameter(tensor))]
            if len(shared) > 1:
                raise ConfigError(f"{path}.{tensor} is tied to {[s for s in shared if s != f'{path}.{tensor}']}: untie "
                                  "the weights or exclude one of the modules (exclude_modules)")


def target_tensors(config: SFTConfig, targets: Mapping[str, nn.Module]) -> list[TargetTensor]:
    """Every targeted parameter, in module order: the order that breaks selection ties."""
    return [TargetTensor(path, t, module.get_parameter(t)) for path, module in targets.items()
            for t in eligible_tensors(module, config.tensors, config.freeze_norms)]


def _given(tensors: list[TargetTensor], support: Any, k: int) -> Chosen:
    if not isinstance(support, Mapping):
        raise ConfigError(f"support must map parameter names to flat indices, got {type(support).__name__}")
    by_name = {t.name: t for t in tensors}
    unknown = sorted(set(support) - set(by_name))
    if unknown:
        raise BaseModelMismatchError(f"support names parameters the adapter does not target: {unknown[:3]}")
    found = {}
    for name, indices in support.items():
        indices = torch.as_tensor(indices)
        if indices.is_floating_point() or indices.dtype == torch.bool or indices.dim() != 1:
            raise ConfigError(f"support[{name!r}] must be a 1-D integer tensor of flat indices")
        indices = indices.to(torch.int64).sort().values
        numel = by_name[name].param.numel()
        if indices.numel() and (int(indices[0]) < 0 or int(indices[-1]) >= numel):
            raise BaseModelMismatchError(f"support[{name!r}] has entries outside the parameter ({numel} entries)")
        if indices.numel() > 1 and bool((indices[1:] == indices[:-1]).any()):
            raise ConfigError(f"support[{name!r}] repeats entries")
        found[name] = indices
    count = sum(v.numel() for v in found.values())
    if not 0 < count <= k:
        raise ConfigError(f"support holds {count} entries; the budget is k={k}")
    return Chosen.of(tensors, found, None)


@register_method
class SFTMethod(AdapterMethod):
    name = "sft"
    config_class = SFTConfig
    setup_trains_model = True
    #: the rate of the LT-SFT paper's scripts (both phases; not validated in this project)
    default_learning_rate = 5e-5

    def supports(self, module: nn.Module) -> bool:
        return any(True for _ in module.parameters(recurse=False))

    def select(self, model: nn.Module, config: AdapterConfig) -> tuple[list[str], list[str]]:
        """The matched modules and every module below them with targeted parameters of its own
        (outside ``modules_to_save`` and ``exclude_modules``)."""
        assert isinstance(config, SFTConfig)
        matched, copies = select_modules(model, config)
        roots, copied = set(matched), set(copies)
        modules = dict(logical_modules(model))
        targets = []
        for name, module in modules.items():
            parts = name.split(".")
            ancestors = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
            if not ancestors & roots or ancestors & copied or _excluded(config, name):
                continue
            if eligible_tensors(module, config.tensors, config.freeze_norms):
                targets.append(name)
        if not targets:
            what = "normalisation layers are frozen (freeze_norms)" if config.freeze_norms else "no parameters of their own"
            raise TargetError(f"target_modules={config.target_modules!r} matched {sorted(roots)[:5]}, which hold no "
                              f"tensors to fine-tune (tensors={config.tensors!r}; {what})")
        _tied(model, config, targets, modules)
        return targets, copies

    def setup(self, model: nn.Module, config: AdapterConfig, adapter_name: str, targets: dict[str, nn.Module],
              calibration: Iterable[Any] | None = None, loss_fn: Any = None, support: Any = None,
              **options: Any) -> SFTContext:
        """Phase 1 and the selection of the first iteration's ``K/iterations`` entries (the core
        rewinds the model afterwards)."""
        assert isinstance(config, SFTConfig)
        if options:
            raise ConfigError(f"method 'sft' takes the attach options calibration, loss_fn and support, got {sorted(options)}")
        tensors = target_tensors(config, targets)
        total = sum(t.param.numel() for t in tensors)
        k = config.shares(total)[0]
        if (support is not None) != (config.selection == "given"):
            raise ConfigError("attach(..., support=...) goes with SFTConfig(selection='given') and only with it")
        if config.needs_dense_phase and calibration is None:
            raise ConfigError(f"the {config.selection_name!r} selection trains the model first: "
                              "ak.attach(model, config, name, calibration=batches)")
        if not config.needs_dense_phase and (calibration is not None or loss_fn is not None):
            raise ConfigError(f"the {config.selection_name!r} selection uses no calibration data or loss")
        if config.selection == "given":
            chosen = _given(tensors, support, k)
        elif config.needs_dense_phase:
            modules = dict(logical_modules(model))
            heads = [p for path in select_modules(model, config)[1] for p in modules[path].parameters()]
            changes = dense_phase(model, config, tensors, calibration, loss_fn, dense=heads)
            chosen = choose(config, adapter_name, 0, tensors, k, changes)
        else:
            chosen = choose(config, adapter_name, 0, tensors, k, None)
        outcome = {"selection": config.selection_name, "entries": total, "base_parameters": base_parameter_count(model),
                   "k": chosen.count, "density": chosen.count / total,
                   "iterations": [{"new": chosen.count, "threshold": chosen.threshold}]}
        return SFTContext(chosen, outcome)

    def create_layer(self, config: AdapterConfig, adapter_name: str, module_name: str, module: nn.Module,
                     context: Any = None) -> SFTLayer:
        assert isinstance(config, SFTConfig) and isinstance(context, SFTContext)
        layer = SFTLayer(adapter_name, module, eligible_tensors(module, config.tensors, config.freeze_norms),
                         context.chosen.indices.get(module_name, {}))
        layer.outcome = context.outcome
        return layer

    def empty_layer(self, config: AdapterConfig, adapter_name: str, module_name: str, module: nn.Module) -> SFTLayer:
        assert isinstance(config, SFTConfig)
        return SFTLayer(adapter_name, module, eligible_tensors(module, config.tensors, config.freeze_norms))


def supports_of(layers: Mapping[str, SFTLayer]) -> dict[str, Tensor]:
    """The support of an SFT adapter by parameter name (``"<module>.<tensor>"``)."""
    return {f"{path}.{t}": idx for path, layer in layers.items() for t, idx in layer.supports().items()}
