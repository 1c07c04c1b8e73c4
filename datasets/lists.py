"""List files (one video per line) and class lists (CSV ``id,name``).

A list file names one video per line, space separated::

    <frames folder or video path> <num_frames> <label id>

``num_frames`` may be 0 (count the frames when the video is read) or left out altogether
(``<path> <label id>``), and a line with the path alone has no label (``label=None``, e.g. for
unlabelled prediction lists). A label of -1 also means "unknown". Paths may contain spaces in the
three-field form because the last two fields are taken from the right. Blank lines are ignored.
A path with spaces in the two-field form (``air drumming/x.mp4 3``, as many tools write Kinetics
lists) is read as such when that file or folder exists; otherwise the line is an error that names
both readings. There are no comment lines: HMDB-51 has videos named ``#437_How_To_Ride_A_Bike...``,
so a line that starts with ``#`` is a video like any other.

The manifest that ``Dataset_creation_scripts/extract_frames.py`` writes (``<frames folder>
<num_frames>`` per line) looks like a two-field list, where its frame counts would become labels:
it is refused, recognised by its first line (:data:`MANIFEST_HEADER`) or, for manifests written
before that line existed, by its file name.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from typing import Callable, List, Optional

logger = logging.getLogger(__name__)

__all__ = ["VideoRecord", "ListFileError", "read_list_file", "load_class_list", "MANIFEST_HEADER", "MANIFEST_NAME"]

# The first line of every manifest.txt that extract_frames.py writes; what follows it is one line
# '<frames folder> <num_frames>' per video, with ' rotation=<degrees>' and ' partial' where they apply.
MANIFEST_NAME = "manifest.txt"
MANIFEST_HEADER = "# manifest of extract_frames.py: <frames folder> <num_frames> [rotation=<degrees>] [partial]"


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


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _parse_line(raw: str, list_path: str, line_no: int, exists: Callable[[str], bool]) -> VideoRecord:
    """Turn one non-empty list line into a record (path not yet joined with the root).

    ``exists(path)`` tells whether a path as written in the list exists; it decides only lines that a
    path with spaces makes ambiguous.
    """
    fields = raw.split()
    if len(fields) == 1:
        return VideoRecord(fields[0], 0, None, line_no)
    if not _is_int(fields[-1]) and exists(raw):
        return VideoRecord(raw, 0, None, line_no)  # an unlabelled path with spaces
    label = _parse_int(fields[-1], "label", list_path, line_no, raw)
    if len(fields) == 2:
        # The frame count is the optional field: '<path> <label>'.
        return VideoRecord(fields[0], 0, label, line_no)
    # Three or more fields: '<path> <num_frames> <label>', everything before the two numbers being the
    # path (which may contain spaces, as Kinetics class folders do) ...
    path, n_text, _ = raw.rsplit(None, 2)
    if not _is_int(n_text):
        # ... or '<path with spaces> <label>'.
        spaced = raw.rsplit(None, 1)[0]
        if exists(spaced):
            return VideoRecord(spaced, 0, label, line_no)
        raise ListFileError(
            f"{list_path}:{line_no}: num_frames must be an integer, got {n_text!r} in line {raw!r}; read as "
            f"'<path> <label>' instead, the path {spaced!r} does not exist. Expected '<path> <num_frames> <label>' "
            "(num_frames 0: count the frames when the video is read)")
    num_frames = int(n_text)
    if num_frames < 0:
        raise ListFileError(f"{list_path}:{line_no}: num_frames must be >= 0, got {num_frames} "
                            f"in line {raw!r}")
    return VideoRecord(path, num_frames, label, line_no)


def _refuse_manifest(path: str, first_line: str) -> None:
    """A manifest read as a list would turn frame counts into labels: refuse it, saying what it is."""
    if first_line.startswith(MANIFEST_HEADER.split(":")[0]) or os.path.basename(path) == MANIFEST_NAME:
        raise ListFileError(
            f"{path} is the manifest that extract_frames.py writes ('<frames folder> <num_frames>' per line, "
            "no labels), not a list file: read as one, its frame counts would become labels. Make list files "
            "from it with Dataset_creation_scripts/build_lists.py (the 'folders' subcommand for class folders, "
            "or the official splits' subcommands)")


def read_list_file(path: str, root: Optional[str] = None,
                   num_classes: Optional[int] = None) -> List[VideoRecord]:
    """Read a list file into records.

    Args:
        path: the list file (format in the module docstring).
        root: folder that relative video paths are taken from; ``None`` keeps them as written
            (relative to the working directory). Absolute paths in the list are kept as they are.
        num_classes: when given, every label must lie in ``[0, num_classes)``.

    Returns:
        One :class:`VideoRecord` per video line, in file order.

    Raises:
        FileNotFoundError: the list file does not exist.
        ListFileError: a malformed line or a label out of range (message ``<file>:<line>: ...``),
            a list without any video, or a manifest of extract_frames.py given as a list.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"list file not found: {path}")
    records: List[VideoRecord] = []

    def exists(video: str) -> bool:
        video = os.path.expanduser(video)
        return os.path.exists(video if root is None or os.path.isabs(video) else os.path.join(os.fspath(root), video))

    with open(path, "r", encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            text = raw.strip()
            if not text:
                continue
            if not records:
                _refuse_manifest(path, text)
            rec = _parse_line(text, path, line_no, exists)
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
