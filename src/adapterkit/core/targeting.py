"""Which modules of a model an adapter config selects (PEFT's matching rules).

* ``exclude_modules`` wins; modules named in ``modules_to_save`` (and their children) are never targets.
* a string is a regex that must match the whole module name;
* a list matches an exact module name or a ``.name`` suffix;
* ``"all-linear"`` is every ``nn.Linear`` (and GPT-2 ``Conv1D``) except the output heads: the
  output embedding (``get_output_embeddings()``, or a module named ``lm_head``) and, in
  ``*ForSequenceClassification`` / ``*ForTokenClassification`` models, the task head — a module
  named ``classifier`` or ``score`` and everything inside it (as PEFT for ``SEQ_CLS``). A fresh head
  is trained in full: name it in ``modules_to_save``, or target it by name;
* ``layers_to_transform`` / ``layers_pattern`` keep only modules in the listed layer indices.

Names are the model's own module paths; modules already wrapped by adapterkit count under their
original name.
"""

from __future__ import annotations

import re
from typing import Iterator

from torch import nn

from .config import AdapterConfig
from ..errors import TargetError
from .host import AdaptedModule, ModelHost

ALL_LINEAR = "all-linear"


def logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` pairs of the model as the user sees it: wrapped modules appear once,
    under their original name, as their base module; adapter internals are hidden."""

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, ModelHost):
                continue  # model-level adapters are not part of the model the user targets
            if isinstance(child, AdaptedModule):
                yield name, child.base_layer
                yield from walk(name, child.base_layer)
            else:
                yield name, child
                yield from walk(name, child)

    yield from walk("", model)


def physical_path(model: nn.Module, path: str) -> str:
    """The real attribute path of logical module ``path``: inside a wrapped ancestor the walk
    goes through its ``base_layer``."""
    parts, module = [], model
    names = path.split(".")
    for i, name in enumerate(names):
        module = getattr(module, name)
        parts.append(name)
        if isinstance(module, AdaptedModule) and i < len(names) - 1:
            module = module.base_layer
            parts.append("base_layer")
    return ".".join(parts)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer with its weight stored ``in × out``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _matches(spec: str | tuple[str, ...], name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in spec)


def _layer_index(name: str, patterns: tuple[str, ...] | str | None) -> int | None:
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        return int(match.group("idx")) if match else None
    for pattern in (patterns,) if isinstance(patterns, str) else patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if match:
            return int(match.group("idx"))
    return None


CLASSIFIER_MODELS = ("ForSequenceClassification", "ForTokenClassification")
CLASSIFIER_HEADS = ("classifier", "score")


def _output_head_names(model: nn.Module) -> set[str]:
    """Modules ``"all-linear"`` leaves alone: output embeddings and classification heads."""
    names = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    classifier = type(model).__name__.endswith(CLASSIFIER_MODELS)
    for name, module in logical_modules(model):
        if module is head or name.split(".")[-1] == "lm_head":
            names.add(name)
        elif classifier and name.split(".")[-1] in CLASSIFIER_HEADS:
            names.update(f"{name}.{inner}" for inner, _ in logical_modules(module))  # a head block: all of it
            names.add(name)
    return names


def is_module_to_save(config: AdapterConfig, name: str) -> bool:
    """Whether ``name`` is one of the config's ``modules_to_save`` (exact name or suffix)."""
    return bool(config.modules_to_save) and _matches(tuple(config.modules_to_save), name)


def select_modules(model: nn.Module, config: AdapterConfig) -> tuple[list[str], list[str]]:
    """Names of the modules to adapt and of the modules to copy (``modules_to_save``)."""
    modules = list(logical_modules(model))
    matched = [name for name, _ in modules if is_module_to_save(config, name)]
    copies = [c for c in matched if not any(c.startswith(f"{outer}.") for outer in matched)]  # outer copy holds it
    if config.modules_to_save and not copies:
        raise TargetError(f"modules_to_save {list(config.modules_to_save)} matched no module of the model")
    copied_prefixes = tuple(f"{c}." for c in copies)

    spec = config.target_modules
    if spec is None:
        return [], copies
    heads = _output_head_names(model) if spec == ALL_LINEAR else set()
    targets = []
    for name, module in modules:
        if name in copies or name.startswith(copied_prefixes):
            continue
        if config.exclude_modules is not None and _matches(config.exclude_modules, name):
            continue
        if spec == ALL_LINEAR:
            if not _is_linear(module) or name in heads:
                continue
        elif not _matches(spec, name):
            continue
        if config.layers_to_transform is not None:
            if _layer_index(name, config.layers_pattern) not in config.layers_to_transform:
                continue
        targets.append(name)
    if not targets:
        sample = ", ".join(name for name, _ in modules[:8])
        raise TargetError(
            f"target_modules={spec!r} matched no module of {type(model).__name__} (module names look like: {sample}, ...)"
        )
    return targets, copies
