"""List files (one video per line) and class lists (CSV ``id,name``).

A list file names one video per line, space separated::

    <frames folder or video path> <num_frames> <label id>

``num_frames`` may be 0 (count the frames when the video is read) or left out altogether
(``<path> <label id>``), and a line with the path alone has no label (``label=None``, e.g. for
unlabelled prediction lists). A label of -1 also means "unknown". Paths may contain spaces in the
three-field form because the last two fields are taken from the right. Blank lines are ignored.
There are no comment lines: HMDB-51 has videos named ``#437_How_To_Ride_A_Bike...``, so a line that
starts with ``#`` is a video like any other.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from typing import List, Optional

logger = logging.getLogger(__name__)

__all__ = ["VideoRecord", "ListFileError", "read_list_file", "load_class_list"]


class ListFileError(ValueError):
    """A list file or class list that cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class VideoRecord:
    """One line of a list file.

    Attributes:
        path: the frames folder or video file, joined with the list's ``root`` when it was relative.
        num_frames: the frame count given by the list; 0 means "count it when the video is read".
        label: the class id, or ``None`` when the list gives none (or gives -1).
        line: the 1-based line number in the list file, for error messages.
    """

    path: str
    num_frames: int
    label: Optional[int]
    line: int


def _parse_int(text: str, what: str, list_path: str, line_no: int, raw: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ListFileError(
            f"{list_path}:{line_no}: {what} must be an integer, got {text!r} in line {raw!r}; "
            "expected '<path> <num_frames> <label>'") from None


def _parse_line(raw: str, list_path: str, line_no: int) -> VideoRecord:
    """Turn one non-empty list line into a record (path not yet joined with the root)."""
    fields = raw.split()
    if len(fields) == 1:
        return VideoRecord(fields[0], 0, None, line_no)
    if len(fields) == 2:
        # The frame count is the optional field: '<path> <label>'.
        label = _parse_int(fields[1], "label", list_path, line_no, raw)
        return VideoRecord(fields[0], 0, label, line_no)
    # Three or more fields: the last two are numbers, everything before them is the path (which
    # therefore may contain spaces, as Kinetics class folders do).
    path, n_text, label_text = raw.strip().rsplit(None, 2)
    num_frames = _parse_int(n_text, "num_frames", list_path, line_no, raw)
    label = _parse_int(label_text, "label", list_path, line_no, raw)
    if num_frames < 0:
        raise ListFileError(f"{list_path}:{line_no}: num_frames must be >= 0, got {num_frames} "
                            f"in line {raw!r}")
    return VideoRecord(path, num_frames, label, line_no)


class _InsideRoot:
    """Whether paths stay inside a root folder once ``..`` and symbolic links are resolved.

    The real path of each distinct parent folder is computed once, and each folder is listed once to learn which of
    its entries are links, so a list of 240,000 videos costs a few hundred system calls, not one per line.
    """

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self._real_dirs: dict = {}
        self._links: dict = {}

    def _links_in(self, folder: str) -> set:
        if folder not in self._links:
            try:
                with os.scandir(folder) as it:
                    self._links[folder] = {e.name for e in it if e.is_symlink()}
            except OSError:  # a missing folder: its videos are reported as unreadable when they are read
                self._links[folder] = set()
        return self._links[folder]

    def real(self, path: str) -> str:
        """``os.path.realpath(path)``, cached per parent folder."""
        trimmed = path.rstrip(os.sep) or os.sep
        head, name = os.path.split(trimmed)
        if name in ("", ".", ".."):
            return os.path.realpath(trimmed)
        if head not in self._real_dirs:
            self._real_dirs[head] = os.path.realpath(head or os.curdir)
        real_head = self._real_dirs[head]
        if name in self._links_in(real_head):
            return os.path.realpath(os.path.join(real_head, name))
        return os.path.join(real_head, name)

    def contains(self, path: str) -> tuple[bool, str]:
        real = self.real(path)
        return (self.root == os.sep or real == self.root or real.startswith(self.root + os.sep)), real


def read_list_file(path: str, root: Optional[str] = None,
                   num_classes: Optional[int] = None, allow_outside_root: bool = False) -> List[VideoRecord]:
    """Read a list file into records.

    Args:
        path: the list file (format in the module docstring).
        root: folder that relative video paths are taken from; ``None`` keeps them as written
            (relative to the working directory). Absolute paths in the list are kept as they are.
        num_classes: when given, every label must lie in ``[0, num_classes)``.
        allow_outside_root: with a ``root``, every video's final path (joined with the root, ``..`` and symbolic
            links resolved) must lie inside it, so that a list cannot make a run read files elsewhere (``../..``,
            a link to ``/etc``); True lifts that check (data linked in from another disk). Without a root there
            is nothing to check.

    Returns:
        One :class:`VideoRecord` per video line, in file order.

    Raises:
        FileNotFoundError: the list file does not exist.
        ListFileError: a malformed line or a label out of range (message ``<file>:<line>: ...``),
            a path that leaves the root, or a list without any video.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"list file not found: {path}")
    inside = _InsideRoot(os.fspath(root)) if root is not None and not allow_outside_root else None
    records: List[VideoRecord] = []
    with open(path, "r", encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            text = raw.strip()
            if not text:
                continue
            rec = _parse_line(text, path, line_no)
            label = rec.label
            if label is not None and label < 0:
                if label != -1:
                    raise ListFileError(f"{path}:{line_no}: label must be >= 0 (or -1 for unknown), "
                                        f"got {label} in line {text!r}")
                label = None
            if label is not None and num_classes is not None and label >= num_classes:
                raise ListFileError(f"{path}:{line_no}: label {label} is outside the class list "
                                    f"[0, {num_classes}) in line {text!r}")
            video = os.path.expanduser(rec.path)
            if root is not None and not os.path.isabs(video):
                video = os.path.join(os.fspath(root), video)
            if inside is not None:
                ok, real = inside.contains(video)
                if not ok:
                    raise ListFileError(
                        f"{path}:{line_no}: {rec.path!r} leads outside the data root {root} (to {real}); list paths "
                        f"must stay inside their root. If the data is meant to be there (a link to another disk), "
                        f"set data.allow_outside_root: true")
            records.append(VideoRecord(video, rec.num_frames, label, line_no))
    if not records:
        raise ListFileError(f"{path}: the list file has no video lines; expected "
                            "'<path> <num_frames> <label>' per line")
    logger.debug("read %d videos from %s", len(records), path)
    return records


def load_class_list(path: str) -> List[str]:
    """Read a class list: CSV with the header ``id,name`` and ids 0..K-1 in order.

    Names may contain spaces and, when quoted, commas. Duplicate or empty names are errors because
    class texts are matched to classes by name.

    Returns:
        The class names, index = class id.

    Raises:
        FileNotFoundError: no such file.
        ListFileError: wrong header, a row without two fields, a non-integer or out-of-order id,
            an empty or duplicate name (message ``<file>:<line>: ...``), or no classes at all.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class list not found: {path}")
    names: List[str] = []
    seen = {}
    # utf-8-sig drops a byte-order mark that spreadsheet programs like to write.
    with open(path, "r", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header] != ["id", "name"]:
            raise ListFileError(f"{path}:1: expected the header 'id,name', got {header!r}")
        for row in reader:
            line_no = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2:
                raise ListFileError(f"{path}:{line_no}: expected 2 fields 'id,name' (quote names that "
                                    f"contain commas), got {len(row)}: {row!r}")
            id_text, name = row[0].strip(), row[1].strip()
            try:
                class_id = int(id_text)
            except ValueError:
                raise ListFileError(f"{path}:{line_no}: id must be an integer, got {id_text!r}") from None
            if class_id != len(names):
                raise ListFileError(f"{path}:{line_no}: ids must be 0..K-1 in order; expected "
                                    f"{len(names)}, got {class_id}")
            if not name:
                raise ListFileError(f"{path}:{line_no}: empty class name for id {class_id}")
            if name in seen:
                raise ListFileError(f"{path}:{line_no}: class name {name!r} repeats id {seen[name]}")
            seen[name] = class_id
            names.append(name)
    if not names:
        raise ListFileError(f"{path}: the class list has no classes")
    return names
