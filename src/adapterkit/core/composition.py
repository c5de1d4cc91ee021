"""Declarative composition blocks: how several active adapters combine.

``ak.activate(model, ak.Stack("lang", "task"))`` runs inserted modules one after another at every
module they share (the output of ``lang``'s module feeds ``task``'s); weight deltas simply add.
A block is a plain value: ``to_dict``/``from_dict`` for JSON, and ``ak.save(model, dir,
ak.Stack(...))`` writes each adapter plus ``composition.json`` so that ``ak.load`` restores the
whole stack, activated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ConfigError

COMPOSITION_FILE = "composition.json"


@dataclasses.dataclass(frozen=True, init=False)
class Stack:
    """Adapters applied in sequence: ``Stack("a", "b")`` feeds a's output into b."""

    names: tuple[str, ...]

    def __init__(self, *names: str) -> None:
        if len(names) < 2 or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"Stack needs two or more distinct adapter names, got {list(names)}")
        object.__setattr__(self, "names", tuple(names))

    def to_dict(self) -> dict[str, Any]:
        return {"stack": list(self.names)}

    @classmethod
    def from_dict(cls, data: Any) -> "Stack":
        if not isinstance(data, dict) or not isinstance(data.get("stack"), list):
            raise ConfigError(f"not a Stack composition: {data!r}")
        return cls(*data["stack"])
