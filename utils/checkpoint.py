"""Checkpoint files: atomic saves and safe reads.

A checkpoint is written with :func:`utils.io.atomic_write` (a temporary file in the same folder, fsynced, renamed
over the final name), so a crash (or a full disk) mid-write leaves the previous file intact and a partial file is
never picked up. Reads use ``torch.load(weights_only=True)``, which runs no code from the file; a file that needs full
unpickling is refused unless the caller says it trusts it.
"""
from __future__ import annotations

import io
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from utils.io import atomic_write

logger = logging.getLogger(__name__)


class UnsafeCheckpointError(RuntimeError):
    """The file needs full unpickling (it could run code); refused unless trusted explicitly."""


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples) moved to the CPU; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (:func:`atomic_write`), every tensor on the CPU.

    Tensors are saved on the CPU so that a checkpoint written on a GPU loads anywhere, with or without
    ``map_location`` (AdamW's state is moved back to the parameters' device by ``load_state_dict``). On failure
    (e.g. no space left) any previous ``path`` is untouched and the error says which file could not be written.
    """
    obj = to_cpu(obj)
    try:
        atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint")
    except OSError:
        raise  # already names the file
    except Exception as e:  # torch's own writer errors (e.g. a RuntimeError from its zip writer on a full disk)
        raise OSError(f"could not write checkpoint {path}: {e}; the previous file (if any) is unchanged") from e


def safe_load(path: str | Path, trust: bool = False, map_location: str = "cpu", mmap: bool = False) -> Any:
    """Read a torch file with ``weights_only=True``; clear errors for missing, empty, truncated or unsafe files.

    The one ``torch.load`` of the project (checkpoints, CLIP state dicts, the model factory's look at a file), so
    every reader has the same error policy: ``FileNotFoundError`` / ``IsADirectoryError``, ``ValueError`` for an
    empty, truncated or non-torch file, ``UnsafeCheckpointError`` for a file that needs full unpickling.
    ``trust=True`` allows full unpickling, which can execute code from the file: only for files you made.
    ``mmap=True`` maps the tensors of a zip-format file instead of reading them (the legacy format is read whole).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected a checkpoint file, got a folder: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): an interrupted copy or download?")
    if not is_torch_file(path):
        # Checked first: torch.load reports random bytes as an unsafe pickle, and trusting them would not help.
        raise ValueError(f"checkpoint {path} could not be read: it is truncated or not a PyTorch file (neither a "
                         f"torch.save zip archive nor the legacy torch.save format)")
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if not trust:
            # torch's message is long; the line naming the refused global is the one that says what the file holds.
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            why = next((line for line in lines if "global" in line.lower()), lines[0] if lines else "")
            raise UnsafeCheckpointError(
                f"{path} is not a plain weights file: loading it needs full unpickling, which can run arbitrary "
                f"code ({why[:200]}). If you made this file yourself or trust its source, pass "
                f"--trust-checkpoint (trust=True); otherwise re-save it as a state dict or safetensors.") from e
        logger.warning("loading %s with full unpickling because it was marked as trusted", path)
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, ValueError) as e:
        raise ValueError(f"checkpoint {path} could not be read: it is truncated or not a PyTorch file "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from e


# torch.save's legacy (non-zip) format starts with the pickled magic number 0x1950a86a20f9469cfc6c (protocol 2).
_LEGACY_TORCH_HEAD = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def is_torch_file(path: str | Path) -> bool:
    """Whether ``path`` is laid out as ``torch.save`` writes: a zip with a ``data.pkl``, or the legacy format."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                return any(name == "data.pkl" or name.endswith("/data.pkl") for name in zf.namelist())
        with open(path, "rb") as f:
            return f.read(len(_LEGACY_TORCH_HEAD)) == _LEGACY_TORCH_HEAD
    except (OSError, zipfile.BadZipFile):
        return False


def rng_state() -> dict:
    """Every RNG the training loop uses, as tensors and plain Python values (``weights_only``-loadable)."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype("int64")), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    import random

    import numpy as np

    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


def bytes_of(obj: Any) -> bytes:
    """Serialise ``obj`` with ``torch.save`` into memory (used to compare checkpoints in tests)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
