"""Convert a composable-sft ``pytorch_diff.bin`` (a ``torch.save`` pickle) into the safetensors + JSON
pair that :func:`adapterkit.sft.read_composable_sft` reads, so the library itself never unpickles.

    python tools/composable_sft.py DIR_OR_FILE      # writes composable_sft.safetensors + .json beside it

The pickle is read through a restricted unpickler (:class:`OnlyTensorsAndNumbers`) that resolves
tensors, containers and NumPy integers only (the first index step of a composable-sft file is a NumPy
integer) and nothing that could run code. Run it once on a file you obtained; keep the output.
"""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path
from typing import Any

import torch

from adapterkit.errors import CorruptFileError, MissingFileError, UnsafeFileError
from adapterkit.methods.sft.compat import FILE_NAME, write_converted


class OnlyTensorsAndNumbers(pickle.Unpickler):
    """Resolves torch's tensor rebuilders, ``torch.Size``, ``OrderedDict`` and NumPy integer scalars
    with their dtypes; refuses every other global. Local to each call (no process-wide allow-list)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED or (module in ("numpy.dtypes", "numpy") and name in NUMPY_DTYPES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


ALLOWED = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"), ("torch", "Size"),
           ("collections", "OrderedDict"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
           ("numpy", "dtype"), ("_codecs", "encode")}  # _codecs.encode: a NumPy scalar's raw bytes, as a str
NUMPY_DTYPES = {f"{kind}{bits}DType" for kind in ("Int", "UInt") for bits in (8, 16, 32, 64)} | {
    "ByteDType", "ShortDType", "IntDType", "LongDType", "LongLongDType", "UByteDType", "UShortDType", "UIntDType",
    "ULongDType", "ULongLongDType"}
RESTRICTED_PICKLE = types.SimpleNamespace(Unpickler=OnlyTensorsAndNumbers, __name__="restricted_pickle",
                                          load=lambda f, **kw: OnlyTensorsAndNumbers(f, **kw).load())


def load_pickle(path: Path) -> Any:
    """The file's content, or :class:`UnsafeFileError` / :class:`CorruptFileError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=RESTRICTED_PICKLE)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(f"{path}: holds objects other than tensors and numbers; refusing to unpickle it "
                              f"({str(exc).splitlines()[-1][:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise CorruptFileError(f"{path}: not a readable torch.save file ({type(exc).__name__}: {exc})") from None


def convert(source: str | Path) -> Path:
    """Convert ``pytorch_diff.bin`` (or the directory holding it); return the directory written to."""
    path = Path(source)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise MissingFileError(f"composable-sft file not found: {path}")
    return write_converted(load_pickle(path), path.parent, str(path))


if __name__ == "__main__":
    for argument in sys.argv[1:] or ["."]:
        print(convert(argument))
