"""Reads PyTorch's ``torch.save`` files without PyTorch, and without running their code.

A ``.pth`` file is a zip archive of one pickle (``<name>/data.pkl``) and the raw bytes of
every tensor storage (``<name>/data/<key>``); files of PyTorch < 1.6 (or saved with
``_use_new_zipfile_serialization=False``) are one stream of pickles followed by the
storages. The unpickler here builds NumPy arrays from the storages and reads every other
object it meets (a pickled ``nn.Module``, an ``argparse.Namespace``, a hook) as a
``Record``: the name of its class, its constructor arguments and its state. It never
imports a module or calls a function that the file names, so a hostile file cannot run
code; only data containers (``OrderedDict``, ``set``...) and its own tensor builders are
ever called.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import tarfile
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# torch storage class name -> NumPy dtype.
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}


class TorchFileError(ValueError):
    """A file that is not a readable ``torch.save`` file, or holds inconsistent data."""


class Record:
    """An object of a class the file names, kept as data: ``name`` (``module.Class``),
    ``args`` (constructor arguments), ``state`` (what ``__setstate__`` would get),
    ``items`` and ``values`` (entries set or appended while unpickling)."""
    name = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        self.items, self.values = {}, []
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.values.append(value)

    def extend(self, values):
        self.values.extend(values)

    @property
    def attributes(self) -> dict:
        """The instance dictionary in ``state`` (``{}`` when there is none)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:   # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        return state if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"Record({self.name})"


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])


def _tensor(storage: np.ndarray, offset: int, size, stride, *_) -> np.ndarray:
    """``torch._utils._rebuild_tensor(_v2)``: a strided view of ``storage``, copied."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise TorchFileError(f"a tensor refers to {type(storage).__name__}, not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
        raise TorchFileError(f"bad tensor layout: size {size}, stride {stride}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise TorchFileError(f"a tensor of size {size} reaches element {last} of a "
                                 f"storage of {storage.size}")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:] if storage.size else storage,
                                           size, tuple(s * item for s in stride))
    return np.array(view)


def _parameter(data, *_):
    return data


def _from_type(func, new_type, args, state):
    return func(*args)


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise TorchFileError(f"refusing to decode bytes with codec {encoding!r}")
    return text.encode("latin-1")


SAFE = {
    ("torch._utils", "_rebuild_tensor"): _tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _from_type,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1,
    **{(b, n): getattr(__builtins__, n, None) or __builtins__[n]
       for b in ("builtins", "__builtin__")
       for n in ("set", "frozenset", "bytearray", "complex")},
}


TENSOR_BUILDERS = {key for key, fn in SAFE.items() if fn in (_tensor, _parameter, _from_type)}


class _Unpickler(pickle.Unpickler):
    """``find_class`` returns a safe builder or a ``Record`` class, never an import;
    ``persistent_load`` asks ``storage(pid)`` for the array of a storage id. With
    ``tensors=False`` tensors are read as ``None`` (a first pass over a legacy file)."""

    def __init__(self, file, storage, tensors: bool = True):
        super().__init__(file)
        self._storage, self._tensors = storage, tensors
        self._records: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in SAFE:
            if not self._tensors and (module, name) in TENSOR_BUILDERS:
                return lambda *args: None
            return SAFE[(module, name)]
        if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
            return _StorageType(name)
        key = f"{module}.{name}"
        if key not in self._records:
            self._records[key] = type(name, (Record,), {"name": key})
        return self._records[key]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise TorchFileError(f"unknown persistent id {pid!r:.100}")
        return self._storage(pid)


def load(file: str | os.PathLike | io.IOBase) -> Any:
    """The object a ``torch.save`` file holds, tensors as NumPy arrays, other objects as
    ``Record``. ``file``: a path or a binary file object."""
    if not hasattr(file, "read"):
        with open(file, "rb") as f:
            return load(f)
    data = file.read()
    if zipfile.is_zipfile(io.BytesIO(data)):
        return _load_zip(zipfile.ZipFile(io.BytesIO(data)))
    try:
        is_tar = tarfile.is_tarfile(io.BytesIO(data))
    except Exception:      # noqa: BLE001 - any failure means "not a tar archive"
        is_tar = False
    if is_tar:
        raise TorchFileError("this is a tar-format torch file (PyTorch < 0.4), which is not "
                             "supported: re-save it with a newer PyTorch")
    return _load_legacy(io.BytesIO(data))


def _unpickle(file, storage, tensors: bool = True) -> Any:
    try:
        return _Unpickler(file, storage, tensors).load()
    except TorchFileError:
        raise
    except Exception as e:     # noqa: BLE001 - a malformed pickle, whatever the error
        raise TorchFileError(f"cannot read the pickle: {type(e).__name__}: {e}") from e


def _array(raw: bytes, kind: _StorageType, little: bool, key) -> np.ndarray:
    dtype = kind.dtype.newbyteorder("<" if little else ">")
    if len(raw) % dtype.itemsize:
        raise TorchFileError(f"storage {key!r} has {len(raw)} bytes, not a multiple of "
                             f"{dtype.itemsize}")
    return np.frombuffer(raw, dtype).astype(kind.dtype)


def _load_zip(archive: zipfile.ZipFile) -> Any:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise TorchFileError("not a torch.save zip archive (no <name>/data.pkl)")
    root = pickles[0][:-len("data.pkl")]
    names = set(archive.namelist())
    little = (root + "byteorder" not in names
              or archive.read(root + "byteorder").decode().strip() == "little")
    cache: dict[str, np.ndarray] = {}

    def storage(pid) -> np.ndarray:
        key = pid[2]
        if key not in cache:
            if f"{root}data/{key}" not in names:
                raise TorchFileError(f"the archive has no storage {key!r}")
            cache[key] = _array(archive.read(f"{root}data/{key}"), pid[1], little, key)
        return cache[key]

    return _unpickle(io.BytesIO(archive.read(pickles[0])), storage)


def _no_storage(pid):
    raise TorchFileError("a header pickle refers to a storage")


def _load_legacy(file: io.BytesIO) -> Any:
    """Magic number, protocol version and system info, the object's pickle, the list of
    storage keys, then per storage its element count (int64) and bytes. A first pass over
    the object's pickle finds the storages; the second builds the tensors from them."""
    try:
        magic = _Unpickler(file, _no_storage).load()
    except Exception as e:     # noqa: BLE001
        raise TorchFileError(f"not a torch.save file: {type(e).__name__}: {e}") from e
    if magic != LEGACY_MAGIC:
        raise TorchFileError("not a torch.save file (no zip archive, no legacy magic number)")
    _unpickle(file, _no_storage)                           # protocol version
    info = _unpickle(file, _no_storage)
    little = not isinstance(info, dict) or bool(info.get("little_endian", True))
    start, declared = file.tell(), {}

    def declare(pid):
        declared[pid[2]] = pid
        return None

    _unpickle(file, declare, tensors=False)
    keys = _unpickle(file, _no_storage)
    if not isinstance(keys, list) or set(keys) != set(declared):
        raise TorchFileError("the storage list does not match the storages the pickle uses")
    arrays = {}
    for key in keys:
        kind = declared[key][1]
        header = file.read(8)
        if len(header) < 8:
            raise TorchFileError(f"the file ends before storage {key!r}")
        (count,) = struct.unpack("<q" if little else ">q", header)
        raw = file.read(count * kind.dtype.itemsize) if count >= 0 else b""
        if count < 0 or len(raw) != count * kind.dtype.itemsize:
            raise TorchFileError(f"storage {key!r} is truncated")
        arrays[key] = _array(raw, kind, little, key)

    def storage(pid) -> np.ndarray:
        key, view = pid[2], pid[5] if len(pid) > 5 else None
        if key not in arrays:
            raise TorchFileError(f"storage {key!r} is not in the file")
        if view is None:
            return arrays[key]
        _, offset, size = view
        return arrays[key][int(offset):int(offset) + int(size)]

    file.seek(start)
    return _unpickle(file, storage)


def is_module(obj) -> bool:
    """Whether ``obj`` is a pickled ``torch.nn.Module`` (a ``Record`` with ``_modules``)."""
    return isinstance(obj, Record) and "_modules" in obj.attributes


CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net")


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()))


def find_model(obj) -> Any:
    """The model in a loaded file: a state dict or a module, itself or under one of
    ``CHECKPOINT_KEYS`` of a checkpoint dictionary; a ``DataParallel`` wrapper removed."""
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in CHECKPOINT_KEYS:
            if key in obj:
                return find_model(obj[key])
        raise TorchFileError(f"found no model in the file: a dictionary with keys "
                             f"{sorted(map(str, obj))[:10]}, none of {CHECKPOINT_KEYS}")
    if is_module(obj) and obj.name.endswith("DataParallel"):
        return find_model(obj.attributes["_modules"].get("module"))
    if _is_state_dict(obj) or is_module(obj):
        return obj
    raise TorchFileError(f"found no model in the file, but {obj!r:.80}")


def state_dict(obj) -> dict[str, np.ndarray]:
    """``model.state_dict()`` of the model in a loaded file (``find_model``): every
    parameter and persistent buffer by its dotted name, ``module.`` prefixes removed."""
    model = find_model(obj)
    if is_module(model):
        out: dict[str, np.ndarray] = {}
        _collect(model, "", out)
        return out
    keys = list(model)
    if all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in model.items()}
    return dict(model)


def _collect(module: Record, prefix: str, out: dict) -> None:
    attrs = module.attributes
    skip = attrs.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (attrs.get(group) or {}).items():
            if value is not None and name not in skip:
                if not isinstance(value, np.ndarray):
                    raise TorchFileError(f"{prefix}{name} is not a tensor: {value!r:.80}")
                out[prefix + name] = value
    for name, child in (attrs.get("_modules") or {}).items():
        if child is not None:
            if not is_module(child):
                raise TorchFileError(f"{prefix}{name} is not a module: {child!r:.80}")
            _collect(child, f"{prefix}{name}.", out)
