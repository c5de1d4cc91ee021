"""The method registry: a method name maps to its config class and layer factory.

Methods register themselves (``@register_method``); the core never imports a method by name,
so adding a method never edits core files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from torch import nn

from .errors import ConfigError, UnknownMethodError

if TYPE_CHECKING:
    from .config import AdapterConfig
    from .layers import AdapterLayer
    from .peft_format import PeftCodec


class AdapterMethod:
    """What the core needs to know about one adapter method.

    Subclasses set :attr:`name` and :attr:`config_class` and implement :meth:`supports` and
    :meth:`create_layer`. A method that can be exchanged with the ``peft`` package also sets
    :attr:`peft` to a :class:`~adapterkit.peft_format.PeftCodec`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type["AdapterConfig"]]
    peft: ClassVar["PeftCodec | None"] = None

    def supports(self, module: nn.Module) -> bool:
        """Whether this method can adapt ``module`` (e.g. only ``nn.Linear``)."""
        raise NotImplementedError

    def setup(self, model: nn.Module, config: "AdapterConfig", adapter_name: str,
              targets: dict[str, nn.Module], **options: Any) -> Any:
        """Model-wide work before the layers are built, e.g. calibration gradients for a mask.

        ``options`` are the extra keyword arguments of :func:`adapterkit.attach`. The returned
        context is handed to :meth:`create_layer`. It must not change the model.
        """
        if options:
            raise ConfigError(f"method {self.name!r} takes no attach options, got {sorted(options)}")
        return None

    def create_layer(self, config: "AdapterConfig", adapter_name: str, module_name: str, module: nn.Module,
                     context: Any = None) -> "AdapterLayer":
        """Build the adapter's state for one base module, on the module's device.

        ``context`` (the result of :meth:`setup`) is passed only when it is not ``None``.
        """
        raise NotImplementedError

    def on_step(self, config: "AdapterConfig", layers: "list[AdapterLayer]") -> None:
        """Called by :func:`adapterkit.step` once per optimizer step for every active adapter of
        this method: the place for per-step randomness (e.g. DyLoRA's sampled rank), shared by all
        micro-batches of the step. ``layers`` are the adapter's layers in module order."""

    def portable(self, config: "AdapterConfig", layers: "Mapping[str, AdapterLayer]", bases: "Mapping[str, nn.Module]",
                 **options: Any) -> "tuple[AdapterConfig, dict[str, AdapterLayer]]":
        """The adapter as :func:`adapterkit.export` writes it: a config and layers (by module path)
        that other tools load. ``bases`` are the unadapted modules. By default the adapter itself;
        a method whose adapters have a plainer equivalent (a DyLoRA adapter at one rank is a LoRA)
        builds it here, without changing the model."""
        if options:
            raise ConfigError(f"method {self.name!r} takes no export options, got {sorted(options)}")
        return config, dict(layers)

    def empty_layer(self, config: "AdapterConfig", adapter_name: str, module_name: str, module: nn.Module) -> "AdapterLayer":
        """A layer about to receive saved tensors (no initialisation work needed)."""
        return self.create_layer(config, adapter_name, module_name, module)


_METHODS: dict[str, AdapterMethod] = {}


def register_method(method_class: type[AdapterMethod]) -> type[AdapterMethod]:
    """Class decorator: register an :class:`AdapterMethod` under its ``name``."""
    method = method_class()
    _METHODS[method.name] = method
    method.config_class.method = method.name
    return method_class


def get_method(name: str) -> AdapterMethod:
    """The registered method called ``name``."""
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(sorted(_METHODS)) or "none"
        raise UnknownMethodError(f"unknown adapter method {name!r} (registered: {known})") from None


def method_for(config: "AdapterConfig") -> AdapterMethod:
    """The method a config belongs to."""
    return get_method(type(config).method)


def registered_methods() -> list[AdapterMethod]:
    """All registered methods, by name."""
    return [_METHODS[name] for name in sorted(_METHODS)]
