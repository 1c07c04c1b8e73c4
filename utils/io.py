"""Atomic file writes: the one way this project writes a file that someone may read while, or after, it is written.

A file is written to a temporary file in the same folder (``.<name>.<8 random characters>.tmp``, with the mode an
ordinary ``open()`` would give it), flushed and fsynced, renamed over its final name, and the folder is fsynced so
that the rename itself survives a power loss. A crash (or a full disk) mid-write leaves the previous file intact
and a partial file is never picked up under the final name. No torch here: the dataset tools and the downloader
use it too.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

logger = logging.getLogger(__name__)

# What the writers below name their temporary files: ".<final name>.<8 random chars>.tmp".
_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], what: str = "") -> None:
    """``write(file)`` into a temporary file next to ``path``, fsync, rename over ``path``, fsync the folder.

    Readers see the old file or the complete new one, never a partial one; on failure the temporary file is
    removed. An ``OSError`` (a full disk, a read-only folder) is raised again with the file's name (``what`` says
    what it is: "checkpoint", "results file" ...) and the assurance that the previous file is unchanged; other
    errors propagate as they are.
    """
    with _replacing(path, what, name_errors=True) as (fd, _):
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "") -> None:
    """:func:`atomic_write` of a UTF-8 text (written as is: no newline translation)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data), what)


@contextmanager
def atomic_path(path: str | os.PathLike, what: str = "", name_errors: bool = True) -> Iterator[Path]:
    """A temporary path next to ``path`` for a writer that takes a file name (a video muxer, a faiss index) or
    streams into a file of its own; when the block ends without an error the file is fsynced and renamed over
    ``path`` and the folder fsynced, else it is removed. ``name_errors``: as :func:`atomic_write` (False: every
    error propagates as it is, e.g. a download's network error)."""
    with _replacing(path, what, name_errors) as (fd, tmp):
        os.close(fd)
        yield Path(tmp)
        _fsync_file(tmp)


@contextmanager
def _replacing(path: str | os.PathLike, what: str, name_errors: bool) -> Iterator[tuple[int, str]]:
    """(an open descriptor, the name) of a new temporary file next to ``path``, renamed over it after the block."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        # mkstemp creates the file 0600; give it the mode an ordinary open() would (an existing file's, if any).
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if name_errors and isinstance(e, OSError):
            reason = f"[Errno {e.errno}] {e.strerror}" if e.errno and e.strerror else str(e)
            error = OSError(f"could not write {what + ' ' if what else ''}{path}: {reason}; the previous file (if "
                            f"any) is unchanged")
            error.errno = e.errno  # kept, so that callers can still tell a full disk (ENOSPC) from other errors
            raise error from e
        raise
    fsync_dir(path.parent)


def remove_stale_tmp(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files that killed writers left in ``folder``; returns their names.

    Only names of the form ``.<name>.<8 characters>.tmp`` (the writers above) directly in ``folder`` are removed;
    they are never read, so this only frees the space. Call it when no other process is writing into ``folder``.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in os.scandir(folder):
        if _TMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except FileNotFoundError:
                pass
    if removed:
        logger.info("removed %d unfinished temporary file(s) of an interrupted run in %s: %s", len(removed), folder,
                    ", ".join(sorted(removed)))
    return sorted(removed)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder (a rename in it is then on disk); silently skipped where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_failures(path: str | os.PathLike) -> dict[str, str]:
    """A ``failures.txt`` (``<video><TAB><reason>`` per line, as extract_frames.py and extract_features.py write it)
    as ``{video: reason}``; empty when the file does not exist. Lines without a tab are passed over."""
    path = Path(path)
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        video, sep, reason = line.partition("\t")
        if sep:
            out[video] = reason
    return out
