"""Which files an adapter directory holds, and clearing what an earlier save left behind.

:func:`adapterkit.load` decides what a directory is by the files in it (``composition.json``
first, then ``adapter_config.json``), so a save must not leave files of an earlier save that
would change that decision: a stale ``composition.json`` (and the sub-directories it names),
or the weights file of the other format. Only files adapterkit itself writes are removed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..core.build import check_adapter_name
from ..core.composition import COMPOSITION_FILE, block_from_dict
from ..errors import AdapterError, CorruptFileError
from .peft_format import CONFIG_FILE, WEIGHTS_FILE as PEFT_WEIGHTS_FILE
from .safefiles import read_json

WEIGHTS_FILE = "adapter.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, PEFT_WEIGHTS_FILE)
#: class names of a head trained on a user file, by class id (``{"label_names": [...]}``, written by ``adapterkit train``)
LABELS_FILE = "labels.json"


def stack_members(directory: Path) -> list[str]:
    """The member names of the composition (Stack, Add, Split) saved in ``directory`` (none if
    there is no readable one); only valid adapter names, so a hand-edited file can never point
    outside ``directory``."""
    if not (directory / COMPOSITION_FILE).is_file():
        return []
    try:
        names = block_from_dict(read_json(directory / COMPOSITION_FILE)).names
    except (AdapterError, RecursionError):
        return []
    valid = []
    for name in names:
        with contextlib.suppress(AdapterError):
            check_adapter_name(name)
            valid.append(name)
    return valid


def _unlink(path: Path) -> None:
    if path.is_file() and not path.is_symlink():
        path.unlink()


def remove_adapter_files(directory: Path, keep: tuple[str, ...] = ()) -> None:
    """Delete the adapter files adapterkit writes (except ``keep``) from ``directory``."""
    for name in ADAPTER_FILES:
        if name not in keep:
            _unlink(directory / name)


def remove_members(directory: Path, members: list[str]) -> None:
    """Delete the adapter files of the Stack members ``members`` saved under ``directory``; their
    sub-directories go too when nothing else is left in them."""
    for member in members:
        sub = directory / member
        if not sub.is_dir() or sub.is_symlink():
            continue
        remove_adapter_files(sub)
        with contextlib.suppress(OSError):
            sub.rmdir()  # only if empty: other files are not ours to delete


def remove_stack(directory: Path) -> None:
    """Delete a Stack saved in ``directory``: its members' files and ``composition.json``."""
    remove_members(directory, stack_members(directory))
    _unlink(directory / COMPOSITION_FILE)


def read_label_names(directory: Path) -> tuple[str, ...] | None:
    """The class names in ``directory``'s :data:`LABELS_FILE` (None without one); a file that is
    not ``{"label_names": [non-empty list of strings]}`` is a :class:`CorruptFileError`."""
    path = Path(directory) / LABELS_FILE
    if not path.is_file():
        return None
    names = read_json(path).get("label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CorruptFileError(f"{path}: label_names must be a non-empty list of strings")
    return tuple(names)
