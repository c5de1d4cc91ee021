"""The ranking-aware adapter behind the registry: a model-level adapter on a model that holds a
frozen image encoder and a frozen text encoder (any model with ``image_token_dim`` and
``text_token_dim``, or any model when the config gives ``image_dim`` and ``text_dim``)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...core.config import AdapterConfig
from ...core.layers import ModelLayer
from ...core.registry import AdapterMethod, register_method
from ...core.state import get_state
from ...errors import ConfigError, TargetError
from .config import RankingAdapterConfig
from .modules import RankingAdapter, RankingOutput


class RankingLayer(ModelLayer):
    """Holds the :class:`RankingAdapter` beside the frozen encoders; the model's own forward is
    unchanged. Applications call :meth:`forward` on encoder tokens (or cached tokens)."""

    def __init__(self, adapter_name: str, config: RankingAdapterConfig, image_dim: int, text_dim: int) -> None:
        super().__init__(adapter_name)
        self.adapter = RankingAdapter(config, image_dim, text_dim)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor | None = None,
                pairs: bool = False) -> RankingOutput:
        return self.adapter(image_tokens, text_tokens, text_mask, pairs=pairs)


def token_dims(model: nn.Module, config: RankingAdapterConfig) -> tuple[int, int]:
    """The encoders' token widths: the config's, else the model's attributes."""
    dims = []
    for given, attribute in ((config.image_dim, "image_token_dim"), (config.text_dim, "text_token_dim")):
        value = given if given is not None else getattr(model, attribute, None)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"the ranking adapter needs the token widths: give image_dim/text_dim in the config "
                              f"or attach to a model with an integer {attribute!r} attribute ({type(model).__name__})")
        dims.append(value)
    return dims[0], dims[1]


@register_method
class RankingMethod(AdapterMethod):
    name = "ranking"
    config_class = RankingAdapterConfig
    default_learning_rate = 1e-4

    def select(self, model: nn.Module, config: AdapterConfig) -> tuple[list[str], list[str]]:
        assert isinstance(config, RankingAdapterConfig)
        token_dims(model, config)  # a clear error before anything is built
        names = dict(model.named_modules())
        missing = [m for m in config.modules_to_save or () if m not in names or not m]
        if missing:
            raise TargetError(f"modules_to_save {missing} name no module of {type(model).__name__}")
        return [""], list(config.modules_to_save or ())

    def supports(self, module: nn.Module) -> bool:
        return True

    def create_layer(self, config: AdapterConfig, adapter_name: str, module_name: str, module: nn.Module,
                     context: Any = None) -> RankingLayer:
        assert isinstance(config, RankingAdapterConfig)
        layer = RankingLayer(adapter_name, config, *token_dims(module, config))
        param = next(module.parameters(), None)
        return layer if param is None else layer.to(param.device)


def ranking_layer(model: nn.Module, name: str) -> RankingLayer:
    """The ranking adapter ``name`` attached to ``model``."""
    state = get_state(model)
    record = state.record(name)
    if not isinstance(record.config, RankingAdapterConfig):
        raise ConfigError(f"adapter {name!r} is a {record.config.method!r} adapter, not a ranking adapter")
    layer = state.host("").layer(name)
    assert isinstance(layer, RankingLayer)
    return layer
