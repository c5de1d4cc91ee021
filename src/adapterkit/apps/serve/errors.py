"""The server's own errors and the one table that maps every :class:`~adapterkit.AdapterError` to an
HTTP status.

The table is ordered: the first class an error is an instance of decides its status, so the more
specific classes come first (an :class:`~adapterkit.errors.UnknownMemberError` is a ConfigError *and*
an AdapterNotFoundError; it is a 404).
"""

from __future__ import annotations

from ...errors import (
    AdapterError,
    AdapterNotFoundError,
    ArtefactError,
    ConfigError,
    DuplicateAdapterError,
    FusionError,
    UnsupportedError,
)


class ServeError(AdapterError):
    """Base class of the errors only the server raises."""


class OverloadedError(ServeError, RuntimeError):
    """The request queue is full; try again later (HTTP 429)."""


class ShuttingDownError(ServeError, RuntimeError):
    """The server is shutting down and accepts no new work (HTTP 503)."""


class PathOutsideRootError(ServeError, PermissionError):
    """An adapter directory lies outside the configured root, after resolving symlinks (HTTP 403)."""


class UnreadablePathError(ServeError, PermissionError):
    """The server may not read an adapter directory or one of its files (HTTP 403)."""


class CapacityError(ServeError):
    """Loading one more adapter would exceed the server's ``max_adapters`` or ``max_adapter_bytes``
    (HTTP 507 Insufficient Storage: the request is valid, the server has no room for it; unload an
    adapter first). Not 409, which this server keeps for conflicts with a named adapter's state."""


class InferenceError(ServeError, RuntimeError):
    """The server failed while answering a request, for a reason that is not the request's
    (HTTP 500): the model's forward raised (an AdapterError inside it too), or the worker did.

    The worker keeps running; the message names the original exception."""


#: (error class, HTTP status), most specific first; anything else is 500
STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (OverloadedError, 429),
    (ShuttingDownError, 503),
    (PathOutsideRootError, 403),
    (UnreadablePathError, 403),
    (CapacityError, 507),
    (InferenceError, 500),
    (AdapterNotFoundError, 404),  # an unknown adapter name (also a Block naming one)
    (DuplicateAdapterError, 409),
    (ArtefactError, 400),  # corrupt, missing, unsafe, non-finite files, other base model: nothing is loaded
    (UnsupportedError, 400),  # e.g. /generate on a classifier, a composition directory
    (FusionError, 409),  # the adapter is fused: the request conflicts with the model's state
    (ConfigError, 422),  # a bad value the schema could not see (adapter name, too many tokens)
    (AdapterError, 400),
)


def status_of(error: BaseException) -> int:
    """The HTTP status of ``error`` (see :data:`STATUS`)."""
    return next((status for kind, status in STATUS if isinstance(error, kind)), 500)
