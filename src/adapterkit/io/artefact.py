"""Saving and loading adapters: adapterkit's own directory format and PEFT's.

adapterkit directory::

    adapter_config.json   method, adapterkit version, full config, base-model fingerprint,
                          sha256 of the stored tensors ("tensors_sha256")
    adapter.safetensors   tensors keyed "<module path>.<local key>", e.g. "encoder.layer.0.attention.self.query.lora_A"

Loading validates everything (files, JSON, tensor digest, tensors finite, modules present,
shapes, fingerprint) before the model is touched; any bad file raises an ``ak.AdapterError``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from ..core import quantization
from .._version import __version__
from ..core.activation import BLOCK_TYPES, check_block
from ..core.api import activate, adapters
from ..core.build import PreparedAdapter, check_adapter_name, commit, prepare
from ..core.api import fuse as fuse_adapters
from ..core.composition import COMPOSITION_FILE, Add, Block, block_from_dict
from ..errors import (
    AdapterError,
    DuplicateAdapterError,
    BaseModelMismatchError,
    ConfigError,
    CorruptFileError,
    FingerprintMismatchError,
    MissingFileError,
    NotFusableError,
    UnsupportedError,
)
from .fingerprint import base_fingerprint, weights_hash
from .guard import WorkBudget, load_budget
from .layout import WEIGHTS_FILE, remove_adapter_files, remove_members, remove_stack, stack_members
from .peft_format import CONFIG_FILE, WEIGHTS_FILE as PEFT_WEIGHTS_FILE, join_keys, split_keys
from ..core.registry import get_method, method_for, registered_methods
from .safefiles import check_finite, parse_json, read_json, read_metadata, read_tensors, write_json, write_tensors
from ..core.layers import AdapterLayer
from ..core.snapshot import rollback_on_error
from ..core.state import AdapterRecord, get_state
from ..core.targeting import is_module_to_save, logical_modules

FORMAT = "adapterkit"
FORMAT_VERSION = 1
DIGEST_FIELD = "tensors_sha256"  # adapter_config.json field (adapterkit format)
DIGEST_METADATA = "adapterkit_tensors_sha256"  # safetensors header entry (PEFT format, which PEFT ignores)
FORMATS = ("adapterkit", "peft")
VERIFY_MODES = ("sampled", "full", "none")


def save(model: nn.Module, directory: str | Path, name: str | Block = "default", format: str = "adapterkit") -> Path:
    """Write adapter ``name`` to ``directory`` (created if needed) and return the directory.

    ``format="peft"`` writes ``adapter_model.safetensors`` + a standard PEFT
    ``adapter_config.json`` that ``peft.PeftModel.from_pretrained`` loads. A composition block
    (:class:`Stack`, :class:`Add`, :class:`Split`, nested) writes each of its adapters to a
    sub-directory named after it, plus ``composition.json``; :func:`load` then restores and
    activates the whole block.

    Files an earlier save left in ``directory`` that would change what :func:`load` reads (a
    Stack's ``composition.json`` and member directories, the other format's weights file) are
    removed once the new files are written.
    """
    state = get_state(model)
    directory = Path(directory)
    if isinstance(name, BLOCK_TYPES):
        if format not in FORMATS:
            raise ConfigError(f"format must be one of {FORMATS}, got {format!r}")
        for member in name.names:
            check_adapter_name(member)
        check_block(state, name)  # all must exist and form the block before anything is written
        old = stack_members(directory)
        for member in name.names:
            save(model, directory / member, member, format)
        write_json(directory / COMPOSITION_FILE, name.to_dict())
        remove_members(directory, [m for m in old if m not in name.names])
        remove_adapter_files(directory)  # a single adapter saved here before
        return directory
    check_adapter_name(name)
    return write_adapter(model, directory, name, state.record(name), dict(state.layers(name)), format)


def _dequantized(layer: AdapterLayer, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """PEFT has no low-bit format: low-bit tensors (latent or packed) are written dequantised (what the forward uses)."""
    out = dict(tensors)
    for key in layer.quantizers:
        codes = out.pop(f"{key}.{quantization.CODES}", None)
        out.pop(f"{key}.{quantization.STATS}", None)
        if codes is not None or key in out:
            out[key] = layer.weight_of(key).detach()
    return out


def export(model: nn.Module, name: str, directory: str | Path, format: str = "peft", **options: Any) -> Path:
    """Write adapter ``name`` in its most portable form (default: PEFT format).

    Methods with a plainer equivalent write that: a DyLoRA adapter at ``rank=b`` (default: its
    current inference rank) becomes a plain rank-``b`` LoRA with the same outputs. Other
    adapters are written as :func:`save` writes them; they take no options.
    """
    state = get_state(model)
    record = state.record(name)
    bases = {path: state.wrappers[path].base_layer for path in record.targets}
    config, layers = record.method.portable(record.config, dict(state.layers(name)), bases, **options)
    plain = dataclasses.replace(record, config=config, method=method_for(config))
    return write_adapter(model, directory, name, plain, layers, format)


def write_adapter(model: nn.Module, directory: str | Path, name: str, record: AdapterRecord,
                  layers: Mapping[str, AdapterLayer], format: str = "adapterkit") -> Path:
    """Write an adapter given as its record and layers (by module path); ``model`` supplies the
    base fingerprint. :func:`save` for attached adapters; also for adapters derived on the fly
    (e.g. a DyLoRA adapter exported as a plain LoRA) without attaching them."""
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {format!r}")
    check_adapter_name(name)
    by_module = {path: layer.tensors() for path, layer in layers.items()}
    for path, tensors in by_module.items():
        check_finite(tensors, f"refusing to save adapter {name!r} at {path}")
    fingerprint = base_fingerprint(model, record.targets, record.copies)
    directory = Path(directory)
    metadata = {"format": "pt", "adapterkit_version": __version__, "adapterkit_method": record.method.name}
    if format == "peft":
        codec = record.method.peft
        if codec is None:
            raise UnsupportedError(f"method {record.method.name!r} has no PEFT file format; save with format='adapterkit'")
        tensors = join_keys(
            codec,
            {p: _dequantized(layers[p], codec.layer_tensors(layers[p])) for p in record.targets},
            {p: by_module[p] for p in record.copies},
        )
        config = {
            "peft_type": codec.peft_type,
            "task_type": None,
            "base_model_name_or_path": fingerprint["name_or_path"],
            "revision": None,
            "inference_mode": True,
            **codec.to_peft(record.config, list(record.targets)),
        }
        metadata["adapterkit_fingerprint"] = json.dumps(fingerprint)
        write_tensors(directory / PEFT_WEIGHTS_FILE, tensors, metadata, digest_key=DIGEST_METADATA)
        write_json(directory / CONFIG_FILE, config)
        _clear_stale(directory, PEFT_WEIGHTS_FILE)
        return directory
    packed = {path: quantization.encode(local, layers[path].quantizers) for path, local in by_module.items()}
    tensors = {f"{path}.{key}": t for path, local in packed.items() for key, t in local.items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapterkit_version": __version__,
        "method": record.method.name,
        "name": name,
        "config": record.config.to_dict(),
        "base_model": fingerprint,
    }
    config[DIGEST_FIELD] = write_tensors(directory / WEIGHTS_FILE, tensors, metadata)
    write_json(directory / CONFIG_FILE, config)
    _clear_stale(directory, WEIGHTS_FILE)
    return directory


def _clear_stale(directory: Path, weights: str) -> None:
    """After a single adapter was written: drop an earlier Stack and the other format's weights."""
    remove_stack(directory)
    remove_adapter_files(directory, keep=(CONFIG_FILE, weights))


def load(model: nn.Module, directory: str | Path, name: str | None = None, *,
         ignore_fingerprint: bool = False, verify: str = "sampled", fuse: bool = False, packed: bool = False) -> str:
    """Attach the adapter saved in ``directory`` (adapterkit or PEFT format); return its name.

    The name defaults to the saved one (``"default"`` for PEFT directories). A base model whose
    targeted weights differ from the ones the adapter was trained on raises
    :class:`FingerprintMismatchError` unless ``ignore_fingerprint=True``. ``verify="sampled"``
    (default) compares a hash of a fixed sample of each weight; ``verify="full"`` hashes every value.
    ``fuse=True`` folds the adapter into the base weights right away (replacing whatever is fused).
    ``packed=True`` holds a low-bit adapter packed for inference (:func:`adapterkit.pack`), read
    straight from the file's codes; full-precision adapters load as usual.
    Every bad file raises an :class:`AdapterError` and leaves the model as it was.
    """
    if verify not in VERIFY_MODES:
        raise ConfigError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    if name is not None:
        check_adapter_name(name)
    if Path(directory, COMPOSITION_FILE).is_file():  # written by save(model, directory, Stack/Add/Split(...))
        if name is not None:
            raise ConfigError(f"{directory} holds a composition of adapters under their own names; load it without a name")
        return _load_stack(model, Path(directory), ignore_fingerprint=ignore_fingerprint, verify=verify, fuse=fuse,
                           packed=packed)
    # full=True: hash every value; False: the fixed sample; None: no hash check (shapes still checked)
    full = None if ignore_fingerprint or verify == "none" else verify == "full"
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingFileError(f"adapter directory not found: {directory}")
    data = read_json(directory / CONFIG_FILE)
    if "peft_type" in data:
        prepared = _read_peft(model, directory, data, name or "default", full, packed)
    elif data.get("format") == FORMAT:
        prepared = _read_native(model, directory, data, name, full, packed)
    else:
        raise CorruptFileError(f"{directory / CONFIG_FILE}: neither an adapterkit nor a PEFT adapter config")
    if fuse and not prepared.record.fusable:
        raise NotFusableError(f"{directory}: adapter {prepared.record.name!r} ({prepared.record.method.name}) inserts "
                              "modules and cannot be loaded fused; load it with fuse=False")
    with rollback_on_error(model, values=False):  # a fuse refused after the commit undoes the commit
        commit(model, prepared)
        if fuse:
            state = get_state(model)  # replaces what is fused, like ak.switch: exact unless an inexact fuse is in place
            fuse_adapters(model, [prepared.record.name], exact=state.fused_exact if state.fused else True)
    return prepared.record.name


def _load_stack(model: nn.Module, directory: Path, **options: Any) -> str:
    """Load every adapter of a saved composition block, activate the block (``fuse=True``: fuse
    it, for a block of weight deltas) and return its first name; on any failure the adapters
    loaded so far are detached again."""
    where = directory / COMPOSITION_FILE
    block = _block_from(where, read_json(where))
    for member in block.names:  # members become directory names: never "..", "a/b"
        _config_from(where, check_adapter_name, member)
    fuse = options.pop("fuse")
    if fuse and not isinstance(block, Add):
        raise ConfigError(f"{where}: only an Add of weight deltas can be loaded fused; load it, then fuse the weight deltas")
    taken = set(adapters(model)) & set(block.names)
    if taken:
        raise DuplicateAdapterError(f"adapters {sorted(taken)} are already attached; detach them first")
    with rollback_on_error(model, values=False):  # loads write no existing tensor: structure suffices
        for member in block.names:
            load(model, directory / member, member, **options)
        if fuse:  # refused before it writes (inserted modules inside): the rollback detaches
            state = get_state(model)
            fuse_adapters(model, block, exact=state.fused_exact if state.fused else True)
        else:
            activate(model, block)
    return block.names[0]


def _block_from(where: Path, data: Any) -> Block:
    """A composition block from ``composition.json``; anything else is a CorruptFileError."""
    try:
        return block_from_dict(data)
    except (AdapterError, TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
        raise CorruptFileError(f"{where}: not a valid composition ({type(exc).__name__}: {exc})") from None


def _config_from(where: Path, build: Any, *args: Any) -> Any:
    try:
        return build(*args)
    except AdapterError as exc:
        raise type(exc)(f"{where}: {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, IndexError, RecursionError) as exc:
        raise CorruptFileError(f"{where}: invalid adapter config ({type(exc).__name__}: {exc})") from None


def _build(model: nn.Module, config: Any, name: str, targets: list[str], copies: list[str],
           stored: Mapping[str, Tensor], where: Path) -> PreparedAdapter:
    """:func:`prepare` the adapter's empty layers within a work budget set by the file, so a
    damaged size field cannot allocate terabytes or loop for hours."""
    modules = {"": model, **dict(logical_modules(model))}
    bases = [p for path in targets if path in modules for p in modules[path].parameters()]
    with WorkBudget(load_budget(stored.values(), bases)):
        return _config_from(where, prepare, model, config, name, targets, copies)


def _fill(prepared: PreparedAdapter, by_module: Mapping[str, Mapping[str, Tensor]], where: Path, packed: bool) -> None:
    extra = sorted(set(by_module) - set(prepared.layers))
    if extra:
        raise CorruptFileError(f"{where}: tensors for modules the adapter does not have: {extra[:5]}")
    for path, layer in prepared.layers.items():
        if packed and layer.quantizers:
            layer.load_packed(by_module.get(path, {}), f"{where} [{path}]")
            continue
        shapes = {k: layer.stored_shape(k, by_module.get(path, {})) for k in layer.quantizers}
        tensors, codes = quantization.decode(by_module.get(path, {}), layer.quantizers, shapes, f"{where} [{path}]")
        layer.load_tensors(tensors, f"{where} [{path}]")
        for key, q in codes.items():  # the forward reuses exactly these codes until training changes the weight
            layer.quantizers[key].remember(layer.get_parameter(key), q)


def _fingerprint(recorded: Any, where: Path) -> dict[str, Any]:
    """A recorded base-model fingerprint, checked to have the structure :func:`base_fingerprint` writes."""
    modules = recorded.get("modules") if isinstance(recorded, dict) else None
    copies = recorded.get("copied_modules", []) if isinstance(recorded, dict) else None
    if not isinstance(modules, dict) or not all(isinstance(v, dict) for v in modules.values()) \
            or not isinstance(copies, list) or not all(isinstance(p, str) for p in copies):
        raise CorruptFileError(f"{where}: base_model.modules must be an object of objects and copied_modules a list of names")
    return recorded


def _check_base(model: nn.Module, recorded: Mapping[str, Any], where: Path, full: bool | None) -> None:
    """Modules exist with the recorded shapes; then the weights hash (``full=None``: skip it)."""
    modules = {"": model, **dict(logical_modules(model))}  # "": model-level adapters
    for path, info in recorded.get("modules", {}).items():
        module = modules.get(path)
        if module is None:
            raise BaseModelMismatchError(f"{where}: the model has no module {path!r} (adapter made for {recorded.get('name_or_path')})")
        weight = getattr(module, "weight", None)
        if "shape" in info and (not isinstance(weight, Tensor) or list(weight.shape) != info["shape"]):
            shape = None if weight is None else list(weight.shape)
            raise BaseModelMismatchError(f"{where}: module {path!r} has weight shape {shape}, the adapter needs {info['shape']}")
    key = "weights_sha256" if full or "weights_sample_sha256" not in recorded else "weights_sample_sha256"
    if full is None or key not in recorded:
        return
    if weights_hash(model, list(recorded["modules"]), full=key == "weights_sha256") != recorded[key]:
        raise FingerprintMismatchError(
            f"{where}: the targeted base weights differ from the ones the adapter was trained on "
            f"({recorded.get('name_or_path')}); pass ignore_fingerprint=True to load anyway"
        )


def _read_native(model: nn.Module, directory: Path, data: dict[str, Any], name: str | None, full: bool | None,
                 packed: bool) -> PreparedAdapter:
    where = directory / CONFIG_FILE
    if not isinstance(data.get("format_version"), int) or data["format_version"] > FORMAT_VERSION:
        raise CorruptFileError(f"{where}: format_version {data.get('format_version')!r} is not supported by adapterkit {__version__}")
    for key, kind in (("method", str), ("name", str), ("config", dict), ("base_model", dict)):
        if not isinstance(data.get(key), kind):
            raise CorruptFileError(f"{where}: field {key!r} is missing or not a {kind.__name__}")
    recorded = _fingerprint(data["base_model"], where)
    method = _config_from(where, get_method, data["method"])
    config = _config_from(where, method.config_class.from_dict, data["config"])
    targets, copies = list(recorded["modules"]), list(recorded.get("copied_modules", []))
    weights = directory / WEIGHTS_FILE
    tensors = read_tensors(weights, data.get(DIGEST_FIELD), str(where))
    prepared = _build(model, config, name or data["name"], targets, copies, tensors, where)
    _check_base(model, recorded, where, full)
    by_module: dict[str, dict[str, Tensor]] = {}
    used = set()
    for path, layer in prepared.layers.items():
        keys = quantization.stored_keys(layer.accepted_keys(), layer.quantizers)
        by_module[path] = {k: tensors[f"{path}.{k}"] for k in keys if f"{path}.{k}" in tensors}
        used.update(f"{path}.{k}" for k in by_module[path])
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise CorruptFileError(f"{weights}: unexpected tensors {unexpected[:5]}")
    _fill(prepared, by_module, weights, packed)
    return prepared


def _read_peft(model: nn.Module, directory: Path, data: dict[str, Any], name: str, full: bool | None,
               packed: bool) -> PreparedAdapter:
    where = directory / CONFIG_FILE
    peft_type = data.get("peft_type")
    codec = next((m.peft for m in registered_methods() if m.peft is not None and m.peft.peft_type == peft_type), None)
    if codec is None:
        supported = sorted(m.peft.peft_type for m in registered_methods() if m.peft is not None)
        raise UnsupportedError(f"{where}: PEFT type {peft_type!r} is not supported (supported: {supported})")
    codec.check_fields(data, str(where))
    config = _config_from(where, codec.from_peft, data)
    weights = directory / PEFT_WEIGHTS_FILE
    metadata = read_metadata(weights)
    tensors = read_tensors(weights, metadata.get(DIGEST_METADATA), f"{weights} (header)")
    copy_paths = [p for p, _ in logical_modules(model) if _config_from(where, is_module_to_save, config, p)]
    groups = split_keys(tensors, codec, copy_paths, str(weights))
    prepared = _build(model, config, name, sorted(groups.targets), sorted(groups.copies), tensors, where)
    recorded = metadata.get("adapterkit_fingerprint")
    if recorded:
        _check_base(model, _fingerprint(parse_json(recorded, f"{weights} (header)"), weights), where, full)
    _fill(prepared, {**groups.targets, **groups.copies}, weights, packed)
    return prepared
