"""Exchange adapters with the ``peft`` package's on-disk layout.

A PEFT directory holds ``adapter_config.json`` (with ``peft_type``) and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module path>.<suffix>`` with
the adapter name removed, e.g. ``base_model.model.encoder.layer.0.attention.self.query.lora_A.weight``.
``modules_to_save`` copies are stored as ``base_model.model.<module path>.<parameter>``.

Each method that can be exchanged provides a :class:`PeftCodec`; adapterkit metadata goes into
the safetensors header, which PEFT ignores, so the JSON holds standard PEFT fields only.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Mapping

from torch import Tensor

from ..core.config import AdapterConfig
from ..errors import CorruptFileError, UnsupportedError

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Fields every PEFT config carries that say nothing about the adapter's weights.
COMMON_FIELDS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version",
    # inert unless their feature is switched on (megatron_config, use_qalora), which is refused
    "megatron_core", "qalora_group_size",
}
# Tensor names of PEFT features every tuner may add, and what they are.
COMMON_FEATURE_KEYS = {"trainable_tokens_delta": "trainable tokens (trainable_token_indices)",
                       "trainable_tokens_original": "trainable tokens (trainable_token_indices)"}


class PeftCodec:
    """How one method's config and tensor names map to PEFT's."""

    peft_type: ClassVar[str]
    key_suffixes: ClassVar[Mapping[str, str]]  # local tensor key -> PEFT key suffix
    honoured: ClassVar[set[str]] = set()  # PEFT fields the codec reads
    must_be_default: ClassVar[Mapping[str, Any]] = {}  # fields adapterkit cannot honour unless default
    key_prefix: ClassVar[str] = ""  # every PEFT tensor name of this tuner starts so, e.g. "lora_"
    feature_keys: ClassVar[Mapping[str, str]] = {}  # tensor names of features adapterkit lacks -> feature

    def unsupported_key(self, rest: str) -> str | None:
        """The PEFT feature a tensor name (``<module path>.<name>...``) belongs to, when it is one
        of this tuner's (or PEFT's) tensors that adapterkit does not read; else ``None``."""
        parts = rest.split(".")
        for i, part in enumerate(parts):
            tail = ".".join(parts[i:])
            feature = {**COMMON_FEATURE_KEYS, **self.feature_keys}
            found = next((f for k, f in feature.items() if tail == k or tail.startswith(k + ".")), None)
            if found is not None:
                return f"{found} ({tail})"
            if self.key_prefix and part.startswith(self.key_prefix):
                return f"an unknown {self.peft_type} feature ({tail})"
        return None

    def layer_tensors(self, layer: Any) -> dict[str, Tensor]:
        """The layer's tensors by local key, in the form PEFT stores (default: its saved tensors)."""
        return layer.tensors()

    def to_peft(self, config: AdapterConfig, targets: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def from_peft(self, data: Mapping[str, Any]) -> AdapterConfig:
        raise NotImplementedError

    def check_fields(self, data: Mapping[str, Any], where: str) -> None:
        for key, default in self.must_be_default.items():
            if key in data and data[key] not in (default, None):
                raise UnsupportedError(f"{where}: PEFT option {key}={data[key]!r} is not supported")
        ignored = sorted(
            k for k, v in data.items()
            if k not in self.honoured and k not in COMMON_FIELDS and k not in self.must_be_default and v not in (None, False, {}, [], "")
        )
        if ignored:
            warnings.warn(f"{where}: ignoring PEFT options {ignored}", stacklevel=3)


@dataclasses.dataclass
class PeftTensors:
    """A PEFT file's tensors regrouped by module: adapter layers and modules_to_save copies."""

    targets: dict[str, dict[str, Tensor]]
    copies: dict[str, dict[str, Tensor]]


def split_keys(tensors: Mapping[str, Tensor], codec: PeftCodec, copy_paths: list[str], where: str) -> PeftTensors:
    """Group ``base_model.model.<path>.<suffix>`` keys by module path.

    ``copy_paths`` are the model's modules that the config's ``modules_to_save`` selects.
    """
    suffix_to_local = {suffix: local for local, suffix in codec.key_suffixes.items()}
    by_length = sorted(copy_paths, key=len, reverse=True)
    targets: dict[str, dict[str, Tensor]] = {}
    copies: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise CorruptFileError(f"{where}: key {key!r} does not start with {PREFIX!r}")
        rest = key[len(PREFIX):]
        suffix = next((s for s in suffix_to_local if rest.endswith("." + s)), None)
        if suffix is not None:
            targets.setdefault(rest[: -len(suffix) - 1], {})[suffix_to_local[suffix]] = tensor
            continue
        owner = next((p for p in by_length if rest.startswith(p + ".")), None)
        feature = codec.unsupported_key(rest) if owner is None else None
        if feature is not None:
            raise UnsupportedError(f"{where}: tensor {key!r} belongs to {feature}, which adapterkit does not support")
        if owner is None:
            raise CorruptFileError(f"{where}: key {key!r} belongs to no adapter layer or module to save of this model")
        copies.setdefault(owner, {})[rest[len(owner) + 1:]] = tensor
    return PeftTensors(targets, copies)


def join_keys(codec: PeftCodec, layer_tensors: Mapping[str, Mapping[str, Tensor]], copy_tensors: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The inverse of :func:`split_keys`."""
    out: dict[str, Tensor] = {}
    for path, tensors in layer_tensors.items():
        for local, tensor in tensors.items():
            out[f"{PREFIX}{path}.{codec.key_suffixes[local]}"] = tensor
    for path, tensors in copy_tensors.items():
        for local, tensor in tensors.items():
            out[f"{PREFIX}{path}.{local}"] = tensor
    return out
