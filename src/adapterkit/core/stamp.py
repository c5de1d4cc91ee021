"""Recognising "the same tensor contents" for caches, without ``id()``.

``id(tensor)`` and ``tensor._version`` alone go stale: ``param.data = new`` keeps both the
object and its version counter, ``module.to()`` / ``.double()`` / ``.cuda()`` swap the data the
same way, and a freed storage's address (or a dead tensor's ``id``) is reused by the next
allocation. A :class:`TensorStamp` matches only while the tensor still views the very same
storage object (held by a weak reference, so a freed and reallocated storage can never match
and the cache keeps no memory alive) with the same layout, dtype, device and version.

Writes that bypass the version counter (in-place ops on ``tensor.data`` or on another tensor
assigned with ``param.data = other``) are invisible to it, as they are to autograd.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor


class TensorStamp:
    """A weakly held fingerprint of which memory a tensor views and how often it was written."""

    __slots__ = ("_storage", "_fields")

    def __init__(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        self._storage = weakref.ref(storage)  # torch keeps one Python object per live storage
        self._fields = _fields(tensor, storage)

    def matches(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` views the same, unwritten memory as the stamped tensor did."""
        storage = tensor.untyped_storage()
        fields = _fields(tensor, storage)
        return fields is not None and self._storage() is storage and fields == self._fields

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None  # a copy's tensors are other tensors: nothing can match

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _no_stamp, ()  # weak references cannot be pickled; an unpickled cache starts empty


def _no_stamp() -> None:
    return None


def _fields(tensor: Tensor, storage: Any) -> tuple[Any, ...] | None:
    try:
        version = tensor._version
    except RuntimeError:  # inference tensors have no version counter: never treated as unchanged
        return None
    return (storage.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype,
            tensor.device, version)


def stamp_matches(stamp: TensorStamp | None, tensor: Tensor) -> bool:
    """``stamp.matches(tensor)``, false for a missing stamp (e.g. after copying or unpickling)."""
    return stamp is not None and stamp.matches(tensor)
