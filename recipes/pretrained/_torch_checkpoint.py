"""A NumPy-only reader of PyTorch checkpoints, without torch and without running code.

`torch.save` writes one of two layouts:
- the zip format (torch >= 1.6): `<prefix>/data.pkl` holds the pickled object and
  `<prefix>/data/<key>` the raw bytes of each storage;
- the legacy format: five pickles in a row (magic number, protocol version, system
  info, the object, the list of storage keys), then each storage as an int64 element
  count followed by its raw bytes.

In both, tensors are pickled as `torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, ...)` over storages named by persistent ids. The unpickler here resolves
only those names, `collections.OrderedDict` and storage types; any other global
(`os.system`, a pickled `nn.Module` class, ...) is refused before it is looked up, so
reading a checkpoint never imports or runs anything it names.
"""

import collections
import io
import os
import pickle
import tarfile
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _numpy_dtype(name: str) -> np.dtype:
    dtype = _STORAGE_DTYPES[name]
    if dtype == "bfloat16":
        import ml_dtypes  # ships with jax; only bfloat16 checkpoints need it

        dtype = ml_dtypes.bfloat16
    return np.dtype(dtype).newbyteorder("<")


class _Refused(pickle.UnpicklingError):
    """A global or persistent id outside what a checkpoint may hold."""


class _FormatError(ValueError):
    """A file that is not a well-formed torch checkpoint, with the file named."""


class _StorageType:
    """What the pickle's `torch.FloatStorage` (etc.) global resolves to."""

    def __init__(self, name: str):
        self.dtype = _numpy_dtype(name)


class _Storage:
    """A storage named by a persistent id; its bytes arrive before or after the pickle."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None


class _Tensor:
    """A strided view of a storage, materialized once every storage has been read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored):
    # Trailing arguments (requires_grad, backward hooks, metadata) do not change values.
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 got something other than a storage")
    if not (
        isinstance(storage_offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
    ):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 got a malformed offset, size or stride")
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_ignored):
    # nn.Parameter(data, requires_grad): the values are the tensor's.
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError("_rebuild_parameter got something other than a tensor")
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, path: str, persistent_load: Callable[[Any], Any] | None):
        super().__init__(file)
        self._path = path
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str):
        if (module, name) in _GLOBALS:
            return _GLOBALS[module, name]
        raise _Refused(
            f"{self._path}: refusing to load `{module}.{name}`: a checkpoint may only hold "
            "tensors, dicts/OrderedDicts and plain values. If this file is a whole pickled "
            "model, re-save its `model.state_dict()` instead; never load a file like this "
            "with plain pickle or torch.load(weights_only=False) unless you trust it."
        )

    def persistent_load(self, pid):
        if self._persistent_load is None:
            raise _Refused(f"{self._path}: unexpected persistent id {pid!r:.100}")
        return self._persistent_load(pid)


def _unpickle(file: BinaryIO, path: str, persistent_load=None) -> Any:
    try:
        return _RestrictedUnpickler(file, path, persistent_load).load()
    except (_Refused, _FormatError):
        raise
    except Exception as e:  # truncated files, malformed opcodes, wrong argument types
        raise _FormatError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})."
        ) from e


def _storage_from_pid(pid, path: str) -> tuple[Any, _StorageType, int]:
    """(key, storage type, element count) from ('storage', type, key, location, numel[, view])."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
        raise _Refused(
            f"{path}: unsupported persistent id {pid!r:.100}; only tensor storages are read."
        )
    _, storage_type, key, _location, numel, *view = pid
    if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
        raise _FormatError(f"{path}: malformed storage record {pid!r:.100}")
    if view and view[0] is not None:
        raise _FormatError(
            f"{path}: uses storage views, a format of torch before 1.0; re-save it with a "
            "current torch.save."
        )
    return key, storage_type, numel


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise _FormatError(
                f"{path}: a zip file without exactly one <prefix>/data.pkl, so not a torch.save "
                "checkpoint."
            )
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in archive.namelist():
            order = archive.read(f"{prefix}byteorder").decode().strip()
            if order != "little":
                raise _FormatError(f"{path}: stored {order}-endian; only little-endian is read.")
        storages: dict[Any, _Storage] = {}

        def load(pid):
            key, storage_type, numel = _storage_from_pid(pid, path)
            if key not in storages:
                storage = _Storage(storage_type.dtype, numel)
                try:
                    raw = archive.read(f"{prefix}data/{key}")
                except KeyError:
                    raise _FormatError(f"{path}: storage {prefix}data/{key} is missing.") from None
                storage.data = _storage_array(raw, storage, path, key)
                storages[key] = storage
            return storages[key]

        return _unpickle(io.BytesIO(archive.read(pickles[0])), path, load)


def _storage_array(raw: bytes, storage: _Storage, path: str, key) -> np.ndarray:
    need = storage.numel * storage.dtype.itemsize
    if len(raw) < need:
        raise _FormatError(
            f"{path}: storage {key} has {len(raw)} bytes, {need} expected (truncated file?)."
        )
    return np.frombuffer(raw, storage.dtype, count=storage.numel)


def _read_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        magic = _unpickle(f, path)
        if magic != _LEGACY_MAGIC:
            raise _FormatError(f"{path}: not a torch checkpoint (no torch.save magic number).")
        protocol = _unpickle(f, path)
        if protocol != _LEGACY_PROTOCOL:
            raise _FormatError(f"{path}: unsupported legacy torch protocol {protocol!r}.")
        info = _unpickle(f, path)
        if not (isinstance(info, dict) and info.get("little_endian", False)):
            raise _FormatError(
                f"{path}: written on a big-endian machine; only little-endian is read."
            )
        storages: dict[Any, _Storage] = {}

        def load(pid):
            key, storage_type, numel = _storage_from_pid(pid, path)
            storages.setdefault(key, _Storage(storage_type.dtype, numel))
            return storages[key]

        obj = _unpickle(f, path, load)
        keys = _unpickle(f, path)
        if not isinstance(keys, list):
            raise _FormatError(f"{path}: malformed storage key list.")
        for key in keys:
            if key not in storages:
                raise _FormatError(f"{path}: storage {key} is listed but no tensor uses it.")
            storage = storages[key]
            header = f.read(8)
            if len(header) < 8:
                raise _FormatError(f"{path}: truncated before storage {key}.")
            storage.numel = int(np.frombuffer(header, "<i8")[0])
            storage.data = _storage_array(
                f.read(storage.numel * storage.dtype.itemsize), storage, path, key
            )
        return obj


def _materialize(tensor: _Tensor, path: str, name: str) -> np.ndarray:
    storage = tensor.storage
    if storage.data is None:
        raise _FormatError(f"{path}: the data of tensor {name!r} is missing (truncated file?).")
    itemsize = storage.dtype.itemsize
    try:
        view = np.ndarray(
            tensor.size,
            storage.dtype,
            buffer=storage.data,
            offset=tensor.offset * itemsize,
            strides=tuple(s * itemsize for s in tensor.stride),
        )
    except (TypeError, ValueError) as e:
        raise _FormatError(f"{path}: tensor {name!r} does not fit in its storage ({e}).") from e
    return np.array(view, order="C")  # a contiguous, writable copy that owns its memory


def _flatten(obj: Any, prefix: str, path: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(obj, _Tensor):
        out[prefix] = _materialize(obj, path, prefix)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), path, out)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _flatten(value, f"{prefix}.{i}" if prefix else str(i), path, out)


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a `torch.save` file (legacy or zip format), without torch.

    Only tensors, parameters, dicts, OrderedDicts and plain values are read; any other
    pickled object is refused with an error naming the file, before anything it names
    is imported.

    Args:
        path: the .pth/.pt file.

    Returns:
        {name: array} for every tensor, in file order. A state dict gives its own keys;
        nested dicts and lists give dotted names (`{"state_dict": {"fc.weight": ...}}`
        gives "state_dict.fc.weight"). Values that are not tensors (epoch counters,
        strings) are left out.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file.")
    if zipfile.is_zipfile(path):
        obj = _read_zip(path)
    elif tarfile.is_tarfile(path):
        raise _FormatError(
            f"{path}: torch's pre-1.0 tar checkpoint format is not supported; load it once "
            "with an old torch and re-save it with torch.save."
        )
    else:
        obj = _read_legacy(path)
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", path, out)
    return out
