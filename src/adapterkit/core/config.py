"""Base class of adapter configurations.

A config is an immutable dataclass: which modules to adapt (PEFT's matching rules) plus the
method's own hyper-parameters. Configs serialise to plain JSON dictionaries and back.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Sequence, TypeVar

from ..errors import ConfigError

TargetSpec = str | Sequence[str] | None
C = TypeVar("C", bound="AdapterConfig")


def _as_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    return value


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Module selection shared by every method.

    Attributes:
        target_modules: a regex (full match) as a string, a list of exact module names or
            ``.name`` suffixes, or ``"all-linear"`` (every linear layer except the output head).
        exclude_modules: same forms as ``target_modules``; exclusion wins.
        layers_to_transform: only adapt modules whose layer index is in this list.
        layers_pattern: the module-list name(s) that carry the layer index (e.g. ``"layers"``).
        modules_to_save: modules trained and saved in full with the adapter (e.g. a classifier head).
        bits: 1, 2, 4 or 8 for a low-bit adapter (quantisation-aware training, bit-packed files;
            :mod:`adapterkit.quantization`); 32 (default) for full precision.
        quantization: ``"gaussian_median"`` (the paper's codebook) or ``"sign_mean"`` (XNOR, 1 bit).
    """

    method: ClassVar[str] = ""
    #: False for model-level methods (prompt tokens, heads), which adapt the model as a whole
    requires_targets: ClassVar[bool] = True

    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    modules_to_save: Sequence[str] | None = None
    bits: int = 32
    quantization: str = "gaussian_median"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _as_tuple(getattr(self, field.name)))
        if isinstance(self.layers_to_transform, int):
            object.__setattr__(self, "layers_to_transform", (self.layers_to_transform,))
        if self.requires_targets and self.target_modules is None and not self.modules_to_save:
            raise ConfigError(f"{type(self).__name__}: target_modules is required")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, tuple)):
                raise ConfigError(f"{type(self).__name__}.{name} must be a string or a list of strings")
            if isinstance(value, tuple) and not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{type(self).__name__}.{name} must contain non-empty strings")
        from .quantization import check

        check(self.bits, self.quantization)
        self.validate()

    def validate(self) -> None:
        """Check method-specific values; raise :class:`ConfigError` when invalid."""

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary (tuples become lists)."""

        def plain(value: Any) -> Any:
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build a config from :meth:`to_dict` output; unknown keys are dropped with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown config keys {unknown}", stacklevel=2)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ConfigError(f"{cls.__name__}: {exc}") from None
