"""The method registry: a method name maps to its config class and layer factory.

Methods register themselves (``@register_method``); the core never imports a method by name,
so adding a method never edits core files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from torch import nn

from ..errors import ConfigError, UnknownMethodError
from .targeting import select_modules

if TYPE_CHECKING:
    from .config import AdapterConfig
    from .layers import AdapterLayer
    from ..io.peft_format import PeftCodec


class AdapterMethod:
    """What the core needs to know about one adapter method.

    Subclasses set :attr:`name` and :attr:`config_class` and implement :meth:`supports` and
    :meth:`create_layer`. A method that can be exchanged with the ``peft`` package also sets
    :attr:`peft` to a :class:`~adapterkit.peft_format.PeftCodec`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type["AdapterConfig"]]
    peft: ClassVar["PeftCodec | None"] = None
    #: True when :meth:`setup` changes the model's values (trains it): the core then keeps a copy
    #: of every parameter and buffer during setup to put back (otherwise only flags, module
    #: objects and tensor objects are restored, which costs no memory)
    setup_trains_model: ClassVar[bool] = False
    #: AdamW learning rate :func:`adapterkit.train` (and ``adapterkit train``) use for this method's
    #: adapters when no ``lr`` is given; chosen on validation in ``bench/results`` (see the README).
    default_learning_rate: ClassVar[float] = 1e-3

    def supports(self, module: nn.Module) -> bool:
        """Whether this method can adapt ``module`` (e.g. only ``nn.Linear``; ``""`` names the
        model itself for model-level adapters)."""
        raise NotImplementedError

    def select(self, model: nn.Module, config: "AdapterConfig") -> tuple[list[str], list[str]]:
        """The module paths to adapt and to copy (``modules_to_save``). By default the config's
        PEFT matching rules; a model-level method returns ``[""]`` (the model itself)."""
        return select_modules(model, config)

    def setup(self, model: nn.Module, config: "AdapterConfig", adapter_name: str,
              targets: dict[str, nn.Module], **options: Any) -> Any:
        """Model-wide work before the layers are built, e.g. calibration gradients for a mask.

        ``options`` are the extra keyword arguments of :func:`adapterkit.attach`. The returned
        context is handed to :meth:`create_layer`. It may run a procedure on the model (train
        it to choose a mask, distil a teacher; set :attr:`setup_trains_model`): the core
        restores the model bit-identical after ``setup`` returns or raises, so only the returned
        context carries results.
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

    def trains_every_parameter(self, config: "AdapterConfig") -> bool:
        """Whether every training step gives all of the adapter's trainable parameters a gradient.
        ``False`` for methods that train a per-step subset (MoSA's chosen modules): data-parallel
        training then searches each step's graph for the unused ones (DDP's ``find_unused_parameters``)."""
        return True

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
    if not isinstance(getattr(method, "name", None), str) or not method.name:
        raise ConfigError(f"{method_class.__name__} needs a non-empty string 'name'")
    if method.name in _METHODS:
        raise ConfigError(f"an adapter method named {method.name!r} is already registered "
                          f"({type(_METHODS[method.name]).__name__})")
    owner = next((m for m in _METHODS.values() if m.config_class is method.config_class), None)
    if owner is not None:
        raise ConfigError(f"config class {method.config_class.__name__} already belongs to method {owner.name!r}")
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
