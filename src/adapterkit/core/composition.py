"""Declarative composition blocks: how several active adapters combine.

Three blocks, nestable and plain values (``to_dict``/``from_dict`` for JSON):

* ``Add(*children, weights=None)``: weight deltas summed, ``θ = θ₀ + Σ αᵢ Δᵢ``. Children are
  adapter names or nested ``Add`` blocks (weights multiply). Fusable: ``ak.fuse(model, Add(...))``
  folds the sum into the base weights.
* ``Stack(*children)``: inserted modules run in sequence at every module they share (the output
  of the first feeds the second); weight deltas among the children add at their module (they
  are part of its weights, so they act before any inserted module). Children: names, ``Add``,
  ``Split`` (or a nested ``Stack``, which is the same as its children in place).
* ``Split(a, b, by=...)``: tokens routed by a per-example (batch, tokens) boolean mask: where it
  is True the tokens go through ``b``, elsewhere through ``a`` (names, ``Stack`` or ``Add``).
  ``by="token_type_ids"`` derives the mask from that call argument (the document starts at the
  first 1 of each row); ``by="mask"`` takes it from ``with ak.routing(model, mask): ...``.
  A Split inside a Split is refused: one routing mask per forward. Several Splits in sequence
  (``Stack(Split(a, b), Split(c, d))``) share that mask and so must share ``by``.

A list given to ``ak.activate`` keeps its meaning: the deltas of its names add and their
inserted modules run in list order (a Stack for modules, an Add for deltas).

``ak.save(model, dir, block)`` writes each adapter to a sub-directory named after it plus
``composition.json`` (``block.to_dict()``); ``ak.load(model, dir)`` restores and activates the
block. A Stack of names keeps the original file layout ``{"stack": ["a", "b"]}``.

Everything here is about the blocks as values; checking a block against a model's adapters is
:mod:`adapterkit.core.activation`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Union

from ..errors import ConfigError

COMPOSITION_FILE = "composition.json"
SPLIT_SOURCES = ("token_type_ids", "mask")

Weighted = tuple[tuple[str, float], ...]


def _names_of(child: "Child") -> tuple[str, ...]:
    return (child,) if isinstance(child, str) else child.names


def _check_children(kind: str, children: tuple[Any, ...], allowed: tuple[type, ...]) -> None:
    for child in children:
        if isinstance(child, str):
            if not child:
                raise ConfigError(f"{kind}: adapter names must be non-empty strings")
        elif not isinstance(child, allowed):
            what = type(child).__name__
            raise ConfigError(f"{kind} cannot contain {what} (allowed: adapter names, "
                              f"{', '.join(t.__name__ for t in allowed)})")
    names = [n for child in children for n in _names_of(child)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{kind}: adapter(s) {repeated} appear more than once in the composition")


@dataclasses.dataclass(frozen=True, init=False)
class Add:
    """Weight deltas summed: ``Add("lang", "task", weights=[1.0, 0.5])`` is ``θ₀ + Δ_lang + 0.5 Δ_task``.

    Children are adapter names or nested ``Add`` blocks (a nested block's weight multiplies the
    weights inside it). Only weight-delta adapters (LoRA, DyLoRA, SHiRA, sparse diffs, low-bit
    LoRA) can be added; inserted modules are refused when the block is activated.
    """

    children: tuple[Union[str, "Add"], ...]
    weights: tuple[float, ...]

    def __init__(self, *children: Union[str, "Add"], weights: Any = None) -> None:
        if not children:
            raise ConfigError("Add needs at least one adapter")
        _check_children("Add", children, (Add,))
        try:
            weights = [1.0] * len(children) if weights is None else list(weights)
        except TypeError:
            raise ConfigError(f"Add weights must be a sequence of numbers, got {weights!r}") from None
        if len(weights) != len(children):
            raise ConfigError(f"Add has {len(children)} children but {len(weights)} weights")
        if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
            raise ConfigError(f"Add weights must be finite numbers, got {weights}")
        object.__setattr__(self, "children", tuple(children))
        object.__setattr__(self, "weights", tuple(float(w) for w in weights))

    @property
    def names(self) -> tuple[str, ...]:
        """Every adapter in the block, in order."""
        return tuple(n for child in self.children for n in _names_of(child))

    def to_dict(self) -> dict[str, Any]:
        return {"add": [_child_dict(c) for c in self.children], "weights": list(self.weights)}

    @classmethod
    def from_dict(cls, data: Any) -> "Add":
        _expect(data, "add", {"weights"})
        return cls(*[_child_from(c) for c in data["add"]], weights=data.get("weights"))


@dataclasses.dataclass(frozen=True, init=False)
class Stack:
    """Adapters applied in sequence: ``Stack("a", "b")`` feeds a's inserted modules' output into
    b's. Weight deltas among the children add at their module. Children: names, :class:`Add`,
    :class:`Split` or a nested Stack."""

    children: tuple[Union[str, "Add", "Stack", "Split"], ...]

    def __init__(self, *children: Union[str, "Add", "Stack", "Split"]) -> None:
        if len(children) < 2:
            raise ConfigError(f"Stack needs two or more distinct adapter names or blocks, got {list(children)}")
        _check_children("Stack", children, (Add, Stack, Split))
        sources = {s.by for c in children for s in splits(c)}
        if len(sources) > 1:
            raise ConfigError(f"the Splits of one composition share one routing mask, so one `by`; got {sorted(sources)}")
        object.__setattr__(self, "children", tuple(children))

    @property
    def names(self) -> tuple[str, ...]:
        """Every adapter in the block, in order."""
        return tuple(n for child in self.children for n in _names_of(child))

    def to_dict(self) -> dict[str, Any]:
        return {"stack": [_child_dict(c) for c in self.children]}

    @classmethod
    def from_dict(cls, data: Any) -> "Stack":
        _expect(data, "stack", set())
        return cls(*[_child_from(c) for c in data["stack"]])


@dataclasses.dataclass(frozen=True, init=False)
class Split:
    """Tokens routed by a (batch, tokens) boolean mask: True positions through ``b``, the others
    through ``a`` (each a name, :class:`Stack` or :class:`Add`).

    ``by="token_type_ids"``: the mask is derived from the model call's ``token_type_ids``: a row's
    document starts at its first 1 and everything after it (padding included) goes through ``b``;
    a row without a 1 goes through ``a``. ``by="mask"`` (default): the caller gives the mask with
    ``with ak.routing(model, mask): model(...)`` (e.g. a decoder without token types).
    An explicit :func:`~adapterkit.routing` mask also overrides ``token_type_ids``.
    """

    a: Union[str, "Stack", "Add"]
    b: Union[str, "Stack", "Add"]
    by: str

    def __init__(self, *children: Union[str, "Stack", "Add"], by: str = "mask") -> None:
        if len(children) != 2:
            raise ConfigError(f"Split routes between exactly two children, got {len(children)}")
        if by not in SPLIT_SOURCES:
            raise ConfigError(f"Split by={by!r} is unknown; use one of {SPLIT_SOURCES}")
        _check_children("Split", children, (Stack, Add))
        if any(_has_split(c) for c in children):
            raise ConfigError("a Split inside a Split is refused: one routing mask serves a forward")
        object.__setattr__(self, "a", children[0])
        object.__setattr__(self, "b", children[1])
        object.__setattr__(self, "by", by)

    @property
    def names(self) -> tuple[str, ...]:
        return _names_of(self.a) + _names_of(self.b)

    def to_dict(self) -> dict[str, Any]:
        return {"split": [_child_dict(self.a), _child_dict(self.b)], "by": self.by}

    @classmethod
    def from_dict(cls, data: Any) -> "Split":
        _expect(data, "split", {"by"})
        return cls(*[_child_from(c) for c in data["split"]], by=data.get("by", "mask"))


Block = Union[Add, Stack, Split]
Child = Union[str, Add, Stack, Split]
BLOCKS = {"add": Add, "stack": Stack, "split": Split}


def _expect(data: Any, key: str, optional: set[str]) -> None:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ConfigError(f"not a {key!r} composition: {data!r}")
    unknown = sorted(set(data) - {key} - optional)
    if unknown:
        raise ConfigError(f"{key!r} composition has unknown fields {unknown}")


def _child_dict(child: Child) -> Any:
    return child if isinstance(child, str) else child.to_dict()


def _child_from(data: Any) -> Child:
    return data if isinstance(data, str) else block_from_dict(data)


def block_from_dict(data: Any) -> Block:
    """The block ``to_dict`` wrote (``{"stack": ...}``, ``{"add": ...}`` or ``{"split": ...}``)."""
    kinds = [key for key in BLOCKS if isinstance(data, dict) and key in data]
    if len(kinds) != 1:
        raise ConfigError(f"not a composition block (one of {sorted(BLOCKS)} expected): {data!r}")
    return BLOCKS[kinds[0]].from_dict(data)


def _has_split(child: Child) -> bool:
    if isinstance(child, Split):
        return True
    return isinstance(child, Stack) and any(_has_split(c) for c in child.children)


def walk(block: Child) -> list[Block]:
    """``block`` and every block nested in it."""
    if isinstance(block, str):
        return []
    children = (block.a, block.b) if isinstance(block, Split) else block.children
    return [block, *(b for c in children for b in walk(c))]


def splits(block: Child) -> list[Split]:
    """The Splits in ``block`` (none nested in one another)."""
    if isinstance(block, Split):
        return [block]
    if isinstance(block, Stack):
        return [s for c in block.children for s in splits(c)]
    return []


def flatten(block: Child, branch: int | None = None, scale: float = 1.0) -> Weighted:
    """``(name, weight)`` for every adapter in ``block`` in order (Add weights multiplied).

    ``branch=0``/``1``: the path of the tokens routed to every Split's ``a``/``b`` child only.
    """
    if isinstance(block, str):
        return ((block, scale),)
    if isinstance(block, Add):
        return tuple(p for c, w in zip(block.children, block.weights) for p in flatten(c, branch, scale * w))
    if isinstance(block, Split):
        chosen = (block.a, block.b) if branch is None else ((block.a, block.b)[branch],)
        return tuple(p for c in chosen for p in flatten(c, branch, scale))
    return tuple(p for c in block.children for p in flatten(c, branch, scale))


@dataclasses.dataclass(frozen=True)
class Branch:
    """A point in a module's sequence of inserted modules where the tokens part: ``a`` runs on
    the unmasked tokens, ``b`` on the masked ones."""

    a: Weighted
    b: Weighted


@dataclasses.dataclass(frozen=True)
class RoutedSpec:
    """An active composition with a Split, compiled for the hosts: the two token paths (every
    Split replaced by its ``a`` or ``b`` child) and the order of inserted modules."""

    by: str
    paths: tuple[Weighted, Weighted]
    steps: tuple[tuple[str, float] | Branch, ...]
    routed: frozenset[str]  # the adapters inside a Split


def _steps(block: Child, scale: float = 1.0) -> tuple[tuple[str, float] | Branch, ...]:
    if isinstance(block, Split):
        return (Branch(flatten(block.a), flatten(block.b)),)
    if isinstance(block, Stack):
        return tuple(s for c in block.children for s in _steps(c))
    return flatten(block, None, scale)


def routed_spec(block: Child | None) -> RoutedSpec | None:
    """The compiled form of ``block`` when it holds a Split (else None: a plain list suffices)."""
    found = [] if block is None else splits(block)
    if not found:
        return None
    routed = frozenset(n for s in found for n in s.names)
    return RoutedSpec(found[0].by, (flatten(block, 0), flatten(block, 1)), _steps(block), routed)
