"""The seed prompt: a numbered list of the kept examples that a language model continues."""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from ...errors import ConfigError

_ITEM = re.compile(r"^\s*(\d+)\s*[.)]\s?(.*)$")


def dedup_key(text: str) -> str:
    """Two candidates are the same when they differ only in whitespace."""
    return " ".join(text.split())


@dataclasses.dataclass(frozen=True)
class SeedPrompt:
    """``"Here are 10 examples:"``, the seeds numbered ``1.`` … ``k.``, then ``k+1.`` left open.

    :meth:`parse` reads the items a model wrote after the open number: lines ``N. text`` with
    ``k < N <= n_total`` in increasing order. Lines without a number (a model's commentary) are
    skipped, a number at or below the previous one ends the list (the model began a new list),
    a gap in the numbers is tolerated, and repeated items are kept once. Items are single lines.
    """

    seeds: tuple[str, ...]
    n_total: int = 10
    header: str = "Here are {n} examples:"

    def __post_init__(self) -> None:
        seeds = tuple(self.seeds)
        object.__setattr__(self, "seeds", seeds)
        if not seeds or not all(isinstance(s, str) and s.strip() for s in seeds):
            raise ConfigError("the seed prompt needs at least one non-empty seed text")
        if any("\n" in s for s in seeds):
            raise ConfigError("seed texts must be single lines (items of a numbered list)")
        if not isinstance(self.header, str):
            raise ConfigError(f"the seed prompt header must be a string, got {self.header!r}")
        if not isinstance(self.n_total, int) or self.n_total <= len(seeds):
            raise ConfigError(f"n_total must exceed the {len(seeds)} seeds, got {self.n_total!r}")

    def build(self, order: Sequence[int] | None = None) -> str:
        """The prompt, with the seeds in ``order`` (default: as given)."""
        order = list(range(len(self.seeds))) if order is None else list(order)
        if sorted(order) != list(range(len(self.seeds))):
            raise ConfigError(f"order must be a permutation of 0..{len(self.seeds) - 1}, got {order}")
        lines = [self.header.format(n=self.n_total)]
        lines += [f"{i}. {self.seeds[j].strip()}" for i, j in enumerate(order, 1)]
        lines.append(f"{len(self.seeds) + 1}.")
        return "\n".join(lines)

    def parse(self, continuation: str) -> list[str]:
        """The new items in a model's continuation of :meth:`build`'s prompt."""
        text = f"{len(self.seeds) + 1}." + continuation
        items: list[str] = []
        seen: set[str] = set()
        last = len(self.seeds)
        for line in text.splitlines():
            match = _ITEM.match(line)
            if match is None:
                continue
            number, item = int(match.group(1)), match.group(2).strip()
            if number <= last or number > self.n_total:
                break
            last = number
            key = dedup_key(item)
            if key and key not in seen:
                seen.add(key)
                items.append(item)
        return items
