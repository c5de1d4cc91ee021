"""Confining adapter directories to the server's root.

:func:`resolve_under` checks a requested path: symlinks resolved, the directory and every entry of
it under the root. A check by path alone leaves a window (a file swapped for a symlink after the
check, before the load reads it), so :func:`copy_confined` then reads the directory's files
through descriptors: every component of each file's resolved path is opened with ``O_NOFOLLOW``
from the root's descriptor, so a symlink that appeared since the check is refused (it cannot lead
outside the root), and the bytes are copied into a private directory the load reads instead.
Adapter files are small; the copy is what makes the check and the read refer to the same bytes.

Not covered: a hard link inside the root to a file elsewhere (as with any path-based confinement,
whoever can write the root decides what it holds). POSIX only (``O_NOFOLLOW``, ``dir_fd``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Iterator

from ...errors import ConfigError, CorruptFileError, MissingFileError
from .errors import PathOutsideRootError, UnreadablePathError

# O_NONBLOCK: opening a FIFO someone left in the directory must not wait for a writer
_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


@contextlib.contextmanager
def _os_errors(path: Any) -> Iterator[None]:
    """OS errors while checking or reading ``path`` as clear adapter errors (never a bare 500)."""
    try:
        yield
    except PathOutsideRootError:
        raise
    except PermissionError as exc:
        raise UnreadablePathError(f"{path}: the server may not read it ({exc.strerror or exc})") from None
    except RuntimeError as exc:  # Python < 3.13: a symlink loop while resolving
        raise CorruptFileError(f"{path}: {exc}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptFileError(f"{path}: a symlink loop") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise MissingFileError(f"{path}: not found") from None
        raise CorruptFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def resolve_under(root: Path, path: Any) -> Path:
    """``path`` (relative paths are taken from ``root``) with symlinks resolved; a directory outside
    the root, or holding an entry that resolves outside it, raises :class:`PathOutsideRootError`."""
    if not isinstance(path, (str, Path)) or not str(path) or "\x00" in str(path):
        raise ConfigError(f"an adapter path must be a non-empty string, got {path!r}")
    with _os_errors(path):
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if not resolved.is_relative_to(root):
            raise PathOutsideRootError(f"{path}: adapters load only from directories under the server's root")
        if resolved.is_dir():
            for entry in resolved.iterdir():
                if not entry.resolve().is_relative_to(root):
                    raise PathOutsideRootError(f"{path}: {entry.name} links outside the server's root")
    return resolved


def _open_along(root_fd: int, parts: tuple[str, ...], shown: Any, directory: bool = False) -> int:
    """A descriptor of ``root/parts`` opened one component at a time without following symlinks:
    the path was resolved, so a symlink on it now is a swap made after the check."""
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            flags = _NOFOLLOW | (os.O_DIRECTORY if directory or i < len(parts) - 1 else 0)
            try:
                following = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise PathOutsideRootError(f"{shown}: changed into a symlink after it was checked; "
                                               "refused") from None
                raise
            os.close(fd)
            fd = following
        return fd
    except BaseException:
        os.close(fd)
        raise


def copy_confined(root: Path, directory: Path, into: Path) -> None:
    """Copy the regular files of ``directory`` (resolved, under ``root``) into ``into``, each read
    through a descriptor opened along its resolved path without following symlinks (see the
    module docstring); sub-directories are left out. Errors name paths relative to the root."""
    shown = directory.relative_to(root)
    with _os_errors(shown):
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            dir_fd = _open_along(root_fd, shown.parts, shown, directory=True)
            try:
                names = os.listdir(dir_fd)
            finally:
                os.close(dir_fd)
            for name in names:
                target = Path(os.path.realpath(directory / name))
                if not target.is_relative_to(root):
                    raise PathOutsideRootError(f"{shown / name}: links outside the server's root")
                fd = _open_along(root_fd, target.relative_to(root).parts, shown / name)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)  # a directory (or a link to one), a FIFO...: adapters are read from files only
                    continue
                with os.fdopen(fd, "rb") as source, open(into / name, "wb") as copy:
                    shutil.copyfileobj(source, copy)
        finally:
            os.close(root_fd)
