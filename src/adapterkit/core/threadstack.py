"""Per-object, per-thread stacks: what a ``with`` block pushes is seen only by its own thread.

:class:`~adapterkit.core.routing.Routing` (a Split's token masks) and
:class:`~adapterkit.core.rows.RowSlot` (``ak.per_row`` assignments) keep their state this way, so
several threads may run one model with different masks or rows, and nothing is process-global.
"""

from __future__ import annotations

import threading
from typing import Any


class ThreadStacks:
    """Named stacks of values, one set per thread. Copies of the owner (``copy.deepcopy``,
    pickling) get a fresh, empty set: a block entered on the original does not extend to a copy."""

    def __init__(self) -> None:
        self._local = threading.local()

    def stack(self, kind: str) -> list[Any]:
        """The calling thread's stack ``kind`` (created empty on first use)."""
        return self._local.__dict__.setdefault(kind, [])

    def top(self, kind: str) -> Any:
        """The last value on the calling thread's stack ``kind``; ``None`` when it is empty."""
        stack = self._local.__dict__.get(kind)
        return stack[-1] if stack else None

    def __deepcopy__(self, memo: dict[int, Any]) -> "ThreadStacks":
        return type(self)()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
