"""Read the tensors of a TorchScript archive (OpenAI's released ``.pt`` files) without running its code.

``torch.jit.load`` would compile and run the archive's ``code/`` and unpickle arbitrary objects; a weight file
from the internet must not be able to do that. The archive is a zip::

    <name>/data.pkl        the module tree, pickled: ``__torch__.*`` objects whose state dicts hold attributes
    <name>/data/<key>      one raw little-endian storage per tensor, referenced from data.pkl by persistent id
    <name>/constants.pkl, <name>/code/...   the compiled program (never read here)

``data.pkl`` is unpickled by an Unpickler that knows only the tensor rebuild functions and storage types; the
``__torch__`` module objects become inert namespaces; any other global (``os.system``, ``builtins.eval``...)
stops the read. Tensors are then collected by their attribute path (``visual.conv1.weight``...), which for a
module tree is exactly its state-dict key.
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Dict, Union

import torch

from .errors import CLIPLoadError, short_reason

logger = logging.getLogger(__name__)

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def is_torchscript_archive(path: Union[str, os.PathLike]) -> bool:
    """True if ``path`` is a zip holding a TorchScript program (``constants.pkl`` or ``code/`` beside data.pkl)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


class _Namespace:
    """An inert stand-in for a pickled ``__torch__`` object: it only stores the state it is given."""

    qualified_name = "?"

    def __init__(self, *args, **kwargs):  # called by the REDUCE opcode; ignore the arguments
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"__state__": state}

    def __repr__(self) -> str:
        return f"<{self.qualified_name}>"


class _StorageRef:
    """A storage read from the archive, as a flat tensor of its dtype."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    """Stand-in for ``torch._utils._rebuild_tensor(_v2)``: a view of the storage with the stored geometry."""
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("a tensor refers to something other than a storage of the archive")
    flat = storage.flat
    size, stride = tuple(size), tuple(stride)
    needed = storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else 0
    if needed > flat.numel():
        raise pickle.UnpicklingError(f"a tensor of size {size} reaches past the end of its storage "
                                     f"({flat.numel()} elements)")
    return flat.as_strided(size, stride, storage_offset)


def _rebuild_parameter(data, requires_grad, backward_hooks, *rest):
    """Stand-in for ``torch._utils._rebuild_parameter``: the plain tensor is all we need."""
    return data


def _ordered_dict(*args):
    """Stand-in for ``collections.OrderedDict`` (tensor hooks are pickled as an empty one)."""
    return dict(*args)


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles data.pkl allowing only tensors, storages and inert ``__torch__`` namespaces."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): _ordered_dict,
    }

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(file)
        self._zf = zf
        self._prefix = prefix
        self._path = path
        self._classes: Dict[str, type] = {}
        self._storages: Dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            key = f"{module}.{name}"
            if key not in self._classes:
                # A fresh subclass per name only so error messages and reprs can say what the object was.
                self._classes[key] = type(name, (_Namespace,), {"qualified_name": key})
            return self._classes[key]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', <dtype from find_class>, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or not isinstance(key, str):
            raise pickle.UnpicklingError(f"malformed storage reference {pid!r}")
        if key not in self._storages:
            self._storages[key] = _StorageRef(self._read_storage(key, dtype, numel))
        return self._storages[key]

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        member = f"{self._prefix}data/{key}"
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        try:
            info = self._zf.getinfo(member)
        except KeyError:
            raise pickle.UnpicklingError(f"storage {member} is missing from the archive") from None
        if info.file_size != nbytes:
            raise pickle.UnpicklingError(f"storage {member} holds {info.file_size} bytes, expected {nbytes} "
                                         f"({numel} x {dtype})")
        buf = bytearray(nbytes)
        with self._zf.open(member) as f:
            view, filled = memoryview(buf), 0
            while filled < nbytes:
                n = f.readinto(view[filled:])
                if not n:
                    raise pickle.UnpicklingError(f"storage {member} ends after {filled} of {nbytes} bytes")
                filled += n
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype)


def _collect(obj, prefix: str, out: Dict[str, torch.Tensor], seen: set) -> None:
    """Walk the namespace tree; every tensor attribute becomes ``out[dotted.path]``."""
    if id(obj) in seen:  # a crafted pickle can make the tree cyclic
        return
    seen.add(id(obj))
    for name, value in obj.state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + str(name)] = value
        elif isinstance(value, _Namespace):
            _collect(value, f"{prefix}{name}.", out, seen)


def read_torchscript_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """All tensors of a TorchScript archive by attribute path (parameters, buffers and tensor attributes).

    Never executes code from the file. Raises ``CLIPLoadError`` if the archive is damaged or its pickle asks
    for anything but tensors and module namespaces.
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise CLIPLoadError(f"{path} is not a readable TorchScript archive ({short_reason(err)}); the file may "
                            f"be truncated. Expected a zip holding <name>/data.pkl and <name>/data/<n>.") from err
    with zf:
        pickles = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CLIPLoadError(f"{path} looks like a TorchScript archive but holds {len(pickles)} top-level "
                                f"data.pkl files; expected exactly one (<name>/data.pkl).")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in zf.namelist() and zf.read(byteorder).strip() not in (b"little", b""):
            raise CLIPLoadError(f"{path} stores big-endian tensors; only little-endian archives are supported.")
        try:
            with zf.open(pickles[0]) as f:
                root = _ArchiveUnpickler(f, zf, prefix, path).load()
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError,
                IndexError, KeyError, OSError, RuntimeError) as err:
            raise CLIPLoadError(
                f"refusing to read {path}: its module pickle ({pickles[0]}) could not be read safely "
                f"({short_reason(err)}). "
                f"Expected an OpenAI CLIP TorchScript archive holding only tensors and module objects; the file "
                f"is damaged or contains code.") from err
    if not isinstance(root, _Namespace):
        raise CLIPLoadError(f"{path}: the archive's data.pkl holds a {type(root).__name__}, expected a "
                            f"TorchScript module.")
    tensors: Dict[str, torch.Tensor] = {}
    _collect(root, "", tensors, set())
    logger.debug("read %d tensors from TorchScript archive %s", len(tensors), path)
    return tensors
