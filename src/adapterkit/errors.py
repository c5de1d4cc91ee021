"""One exception hierarchy for everything adapterkit refuses to do.

Every error is raised *before* the model is touched, so catching an :class:`AdapterError`
means the model is exactly as it was before the failed call.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base class of every adapterkit error."""


class ConfigError(AdapterError, ValueError):
    """An adapter configuration value is invalid."""


class UnknownMethodError(ConfigError):
    """No adapter method is registered under the requested name."""


class UnsupportedError(AdapterError):
    """A valid request that this method or module type does not support."""


class AdapterNotFoundError(AdapterError, LookupError):
    """No adapter with this name is attached to the model."""


class UnknownMemberError(ConfigError, AdapterNotFoundError):
    """A composition block (``ak.Add``/``ak.Stack``/``ak.Split``) names an adapter that is not attached."""


class DuplicateAdapterError(AdapterError):
    """An adapter with this name is already attached to the model."""


class TargetError(AdapterError):
    """``target_modules`` matched nothing, or matched a module the method cannot adapt."""


class FusionError(AdapterError):
    """A fuse, unfuse or switch request cannot be carried out."""


class NotFusableError(FusionError):
    """The adapter inserts modules and cannot be folded into base weights."""


class FusedStateError(FusionError):
    """The request conflicts with the adapters currently fused into the base weights."""


class ArtefactError(AdapterError):
    """A saved adapter directory or file cannot be used."""


class MissingFileError(ArtefactError, FileNotFoundError):
    """A required file of an adapter directory does not exist."""


class CorruptFileError(ArtefactError):
    """A file exists but is truncated, malformed or inconsistent."""


class UnsafeFileError(ArtefactError):
    """The file format could execute code when read (pickle); adapterkit never reads it."""


class NonFiniteWeightsError(ArtefactError):
    """A saved tensor contains NaN or Inf values."""


class BaseModelMismatchError(ArtefactError):
    """The adapter was made for a different base model (missing modules or other shapes)."""


class FingerprintMismatchError(BaseModelMismatchError):
    """The base weights differ from the ones the adapter was trained on.

    Pass ``ignore_fingerprint=True`` to load anyway.
    """


class DataNotFoundError(AdapterError, FileNotFoundError):
    """A dataset is not available locally; the message names the command that fetches it."""


class BudgetExceededError(AdapterError, RuntimeError):
    """A bounded loop (e.g. rejection sampling) used its whole budget without reaching its goal."""

