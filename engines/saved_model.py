"""Read what a torch-saved model file holds without torch: its class and its elements.

``torch.save`` writes a zip archive whose ``data.pkl`` pickles the model and whose
``data/<key>`` entries hold the raw bytes of its tensors. :func:`read_saved_model` reads the
pickle with an unpickler that builds inert stand-ins for every class it names (no code from
the file runs, torch is not imported), then takes the model's class and its
``atomic_numbers`` buffer from them. It lets the flow process refuse a file that is not a
MACE model, or a structure with elements the model does not cover, before any runner starts.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from functools import cache
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from atomforge.engines.errors import InputError

STORAGE_DTYPES = {"LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2"}
"""numpy dtypes of the integer torch storages an ``atomic_numbers`` buffer may use."""


@dataclass(frozen=True)
class SavedModel:
    """A torch-saved model: the module and name of its class, and the elements it covers."""

    module: str
    name: str
    atomic_numbers: tuple[int, ...]


class _StandIn:
    """An inert object standing in for an instance of a class the pickle names."""

    module = ""
    qualname = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> _StandIn:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        """Take a mapping item (pickle's SETITEMS): not kept, only the state is read."""

    def append(self, value: Any) -> None:
        """Take a list item (pickle's APPEND): not kept, only the state is read."""

    def extend(self, values: Any) -> None:
        """Take list items (pickle's APPENDS): not kept, only the state is read."""


@dataclass(frozen=True)
class _Storage:
    """A tensor storage: the class that names its type, and its entry under ``data/``."""

    kind: str
    key: str


@dataclass(frozen=True)
class _Tensor:
    """A tensor: its storage, offset (in elements) and shape."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]


def _rebuild_tensor(storage: _Storage, offset: int, shape: tuple[int, ...], *rest: Any) -> _Tensor:
    """Return the stand-in of torch's ``_rebuild_tensor_v2``: where the tensor's data is."""
    return _Tensor(storage, offset, tuple(shape))


class _InertUnpickler(pickle.Unpickler):
    """An unpickler that resolves every class to a stand-in and every tensor to a _Tensor."""

    def find_class(self, module: str, name: str) -> Any:
        """Return a stand-in type for ``module.name`` (plain dicts for ordered ones)."""
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        return _stand_in_type(module, name)

    def persistent_load(self, pid: Any) -> _Storage:
        """Return where a storage's bytes are (torch's id: 'storage', type, key, ...)."""
        return _Storage(getattr(pid[1], "qualname", ""), str(pid[2]))


@cache
def _stand_in_type(module: str, name: str) -> type[_StandIn]:
    """Return the stand-in type of class ``module.name`` (one per name, so it compares)."""
    return type(name, (_StandIn,), {"module": module, "qualname": name})


def _buffer(root: _StandIn, name: str) -> _Tensor | None:
    """Return the buffer ``name`` of the pickled module ``root``, or None."""
    state = root.state if isinstance(root.state, dict) else {}
    buffers = state.get("_buffers")
    tensor = buffers.get(name) if isinstance(buffers, dict) else None
    return tensor if isinstance(tensor, _Tensor) else None


def _integers(archive: zipfile.ZipFile, prefix: str, tensor: _Tensor) -> tuple[int, ...]:
    """Return the values of integer tensor ``tensor`` read from the archive's data entries."""
    dtype = np.dtype(STORAGE_DTYPES[tensor.storage.kind])
    raw = archive.read(f"{prefix}data/{tensor.storage.key}")
    start = tensor.offset * dtype.itemsize
    values = np.frombuffer(raw, dtype=dtype, count=prod(tensor.shape), offset=start)
    return tuple(int(value) for value in values)


@cache
def _read(path: str, mtime_ns: int) -> SavedModel:
    """Return what the file at ``path`` holds (cached while its mtime stays the same)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise InputError(f"{path}: not a torch-saved model (no data.pkl)")
            prefix = pickles[0].removesuffix("data.pkl")
            root = _InertUnpickler(archive.open(pickles[0])).load()
            if not isinstance(root, _StandIn):
                raise InputError(f"{path}: holds no model object (a state dict?)")
            tensor = _buffer(root, "atomic_numbers")
            numbers = () if tensor is None else _integers(archive, prefix, tensor)
            return SavedModel(type(root).module, type(root).qualname, numbers)
    except InputError:
        raise
    except (
        zipfile.BadZipFile,
        pickle.UnpicklingError,
        EOFError,
        LookupError,
        ValueError,
        TypeError,
        AttributeError,
    ) as exc:
        raise InputError(f"{path}: not a torch-saved model ({type(exc).__name__})") from None


def read_saved_model(path: Path) -> SavedModel:
    """Return the class and elements of the torch-saved model at ``path``.

    Raises InputError (one line) for a file that is missing or not a torch-saved model.
    """
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    return _read(str(path), path.stat().st_mtime_ns)
