"""DyLoRA behind the registry, plus its model-level operations: choosing the inference rank and
exporting a prefix rank as a plain LoRA."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from torch import nn

from ...core.api import fuse, unfuse
from ...core.config import AdapterConfig
from ...errors import ConfigError
from ...core.layers import AdapterLayer
from ...core.registry import AdapterMethod, register_method
from ...core.seeding import layer_seed
from ...core.state import ModelState, get_state
from ..lora import LoRAConfig, LoRALayer, is_lora_target
from .config import DyLoRAConfig
from .layer import DyLoRALayer


@register_method
class DyLoRAMethod(AdapterMethod):
    name = "dylora"
    config_class = DyLoRAConfig
    default_learning_rate = 3e-3

    def supports(self, module: nn.Module) -> bool:
        return is_lora_target(module)

    def create_layer(self, config: AdapterConfig, adapter_name: str, module_name: str, module: nn.Module,
                     context: Any = None) -> DyLoRALayer:
        assert isinstance(config, DyLoRAConfig)
        # global scope: every layer gets the same stream (only the first layer's is drawn from)
        stream = module_name if config.scope == "per_layer" else ""
        return DyLoRALayer(adapter_name, module, config, layer_seed(config.seed, adapter_name, stream))

    def on_step(self, config: AdapterConfig, layers: list[AdapterLayer]) -> None:
        ranked = [layer for layer in layers if isinstance(layer, DyLoRALayer)]
        if not ranked:
            return
        if config.scope == "per_layer":
            for layer in ranked:
                layer.train_rank = layer.draw_rank()
            return
        rank = ranked[0].draw_rank()
        for layer in ranked:
            layer.train_rank = rank

    def portable(self, config: AdapterConfig, layers: Mapping[str, AdapterLayer], bases: Mapping[str, nn.Module],
                 rank: int | None = None, **options: Any) -> tuple[AdapterConfig, dict[str, AdapterLayer]]:
        """The adapter at ``rank`` (default: the current inference rank) as a plain rank-``rank`` LoRA
        whose ``alpha / r`` is DyLoRA's scale at that rank. A low-bit adapter becomes a full-precision
        LoRA holding its dequantised factors, so outputs do not change."""
        assert isinstance(config, DyLoRAConfig)
        super().portable(config, layers, bases, **options)  # refuses unknown options
        ranked = {path: layer for path, layer in layers.items() if isinstance(layer, DyLoRALayer)}
        if rank is None:
            rank = next(iter(ranked.values())).eval_rank
        check_rank(config, rank)
        alpha = config.alpha if config.scaling == "alpha_over_b" else config.alpha * rank / config.r_max
        plain = LoRAConfig(r=rank, alpha=alpha, dropout=config.dropout, target_modules=sorted(ranked),
                           modules_to_save=config.modules_to_save)
        out: dict[str, AdapterLayer] = dict(layers)
        for path, layer in ranked.items():
            lora = LoRALayer(layer.adapter_name, bases[path], r=rank, scaling=plain.scaling_for(path),
                             dropout=config.dropout, init="default")
            # weight_of: a low-bit adapter's dequantised factors (what its forward uses), not the
            # fp32 latents; the slice is no codebook's image, so the LoRA is full precision
            a, b = layer.weight_of("lora_A").detach(), layer.weight_of("lora_B").detach()
            lora.load_tensors({"lora_A": a[:rank], "lora_B": b[:, :rank]}, f"DyLoRA adapter {layer.adapter_name!r} at {path}")
            out[path] = lora.train(layer.training)  # ak.to_plain: an eval model keeps its dropout off
        return plain, out


def check_rank(config: DyLoRAConfig, rank: object) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or not config.r_min <= rank <= config.r_max:
        raise ConfigError(f"rank must be an integer in [{config.r_min}, {config.r_max}] (the adapter's r_min..r_max), "
                          f"got {rank!r}")
    return rank


def dylora_adapters(state: ModelState, names: str | Sequence[str] | None) -> list[str]:
    """The named adapters (all DyLoRA adapters when ``None``), checked to be DyLoRA adapters."""
    if names is None:
        found = [n for n, record in state.adapters.items() if isinstance(record.config, DyLoRAConfig)]
        if not found:
            raise ConfigError("the model has no DyLoRA adapter")
        return found
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if not isinstance(state.record(name).config, DyLoRAConfig):
            raise ConfigError(f"adapter {name!r} is a {state.record(name).method.name} adapter, not DyLoRA")
    return names


def set_rank(model: nn.Module, rank: int, names: str | Sequence[str] | None = None) -> None:
    """Use rank ``rank`` for inference (eval mode and fusing) in DyLoRA adapters ``names`` (default: all).

    Works while fused: the base weights are restored exactly and the adapter is folded in again
    at the new rank. Training mode keeps using the rank drawn each step by :func:`adapterkit.step`.
    """
    state = get_state(model)
    chosen = dylora_adapters(state, names)
    for name in chosen:  # validate everything before changing anything
        check_rank(state.record(name).config, rank)
    fused, exact = state.fused, state.fused_exact
    refuse = any(name in chosen for name, _ in fused)
    if refuse and not exact:
        unfuse(model)  # fuse(exact=False) restores by subtracting: that needs the old rank's delta
    for name in chosen:
        for _, layer in state.layers(name):
            if isinstance(layer, DyLoRALayer):
                layer.set_eval_rank(rank)
    if refuse:
        fuse(model, [n for n, _ in fused], [w for _, w in fused], exact=exact)


def current_rank(model: nn.Module, name: str) -> int:
    """The inference rank of DyLoRA adapter ``name``."""
    state = get_state(model)
    dylora_adapters(state, name)
    return next(layer.eval_rank for _, layer in state.layers(name) if isinstance(layer, DyLoRALayer))


def ranks_of(model: nn.Module, name: str) -> Iterable[int]:
    """Every rank DyLoRA adapter ``name`` serves."""
    state = get_state(model)
    dylora_adapters(state, name)
    return state.record(name).config.ranks
