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
<num_frames>`` per line, after a header line) is read here too (:func:`read_manifest`). It looks
like a two-field list, where its frame counts would become labels: given as a list it is refused,
recognised by its first line (:data:`MANIFEST_HEADER`) or, for manifests written before that line
existed, by its file name.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

__all__ = ["VideoRecord", "ListFileError", "PathRules", "read_list_file", "load_class_list", "label_name_mismatches",
           "check_labels_match_names", "MANIFEST_NAME", "MANIFEST_HEADER", "PARTIAL_FLAG", "VIDEO_EXTENSIONS",
           "read_manifest", "parse_manifest_line", "format_manifest_line"]

# File extensions taken for videos (the data tools, PathRules.drop_extension).
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp",
                    ".ogv", ".ts")
# The first line of every manifest.txt that extract_frames.py writes; what follows it is one line
# '<frames folder> <num_frames>' per video, with ' rotation=<degrees>' and ' partial' where they apply.
MANIFEST_NAME = "manifest.txt"
MANIFEST_HEADER = "# manifest of extract_frames.py: <frames folder> <num_frames> [rotation=<degrees>] [partial]"
PARTIAL_FLAG = "partial"
_MANIFEST_MARK = MANIFEST_HEADER.split(":")[0]  # what a header line starts with (its wording after ':' may change)


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


@dataclass(frozen=True)
class PathRules:
    """How the paths written in a list file become paths on this machine (config ``data.paths``).

    Published split files name the authors' folders (``/cluster/.../hmdb/x.avi 79 8``); these rules let them be
    used unedited. Applied to each path in this order:

    1. ``prefix_map``: ``(old, new)`` pairs; the longest ``old`` that the path starts with is replaced by its
       ``new`` (``""`` makes the rest relative, so it is joined with the root).
    2. ``keep_last``: if > 0, only the last K components are kept (relative, so joined with the root).
    3. ``drop_extension``: a video extension of the last component is dropped (``x.avi`` -> ``x``), to meet the
       frame folders of ``extract_frames.py``, which are named without it.
    4. ``by_name``: the video is looked up by its last component among the folders listed in the frame
       extraction's ``<root>/manifest.txt`` (so ``x`` finds ``<class>/x``); a name found nowhere, or in two
       places, is an error naming the line.
    """

    prefix_map: tuple = ()
    keep_last: int = 0
    drop_extension: bool = False
    by_name: bool = False

    @classmethod
    def from_options(cls, prefix_map: Optional[dict] = None, keep_last: int = 0, drop_extension: bool = False,
                     by_name: bool = False) -> "PathRules":
        pairs = tuple(sorted(((str(k), "" if v is None else str(v)) for k, v in (prefix_map or {}).items()),
                             key=lambda kv: -len(kv[0])))
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        return cls(pairs, int(keep_last), bool(drop_extension), bool(by_name))

    @property
    def active(self) -> bool:
        return bool(self.prefix_map or self.keep_last or self.drop_extension or self.by_name)

    def rewrite(self, raw: str) -> str:
        """Steps 1-3 for one path as written in the list."""
        path = raw
        for old, new in self.prefix_map:
            if path.startswith(old):
                path = new + path[len(old):]
                break
        if self.keep_last:
            parts = [p for p in path.replace("\\", "/").split("/") if p]
            path = "/".join(parts[-self.keep_last:])
        if self.drop_extension:
            stem, ext = os.path.splitext(path.rstrip("/"))
            if ext.lower() in VIDEO_EXTENSIONS:
                path = stem
        return path


def _manifest_names(root: Optional[str]) -> Dict[str, List[str]]:
    """{last component of a folder: [folders relative to root]} from ``<root>/manifest.txt``."""
    manifest = os.path.join(os.fspath(root or "."), "manifest.txt")
    if not os.path.isfile(manifest):
        raise ListFileError(f"paths.by_name looks videos up in the frame extraction's manifest, but {manifest} does "
                            f"not exist (extract_frames.py writes it into its output folder: set the root to that)")
    names: Dict[str, List[str]] = {}
    for folder in read_manifest(manifest):
        folder = folder.rstrip("/")
        names.setdefault(folder.rsplit("/", 1)[-1], []).append(folder)
    return names


def parse_manifest_line(line: str) -> Tuple[str, int, Tuple[str, ...]]:
    """Split a manifest line ``<folder> <num_frames>[ rotation=<degrees>][ partial]``.

    The folder may contain spaces: the flags are taken off the right end, then the count.
    Raises ValueError for a line of another form.
    """
    text = line.rstrip("\n")
    flags: List[str] = []
    while True:
        head, _, last = text.rpartition(" ")
        if head and (last == PARTIAL_FLAG or re.fullmatch(r"rotation=\d+", last)):
            flags.insert(0, last)
            text = head
        else:
            break
    folder, _, count = text.rpartition(" ")
    if not folder or not count.isdigit():
        raise ValueError(f"expected '<folder> <num_frames>', got {line.rstrip(chr(10))!r}")
    return folder, int(count), tuple(flags)


def format_manifest_line(folder: str, num_frames: int, flags: Sequence[str] = ()) -> str:
    """One manifest line (without the newline); see :func:`parse_manifest_line`."""
    return " ".join([folder, str(num_frames), *flags])


def read_manifest(path, strict: bool = True) -> Dict[str, Tuple[int, Tuple[str, ...]]]:
    """Read a ``manifest.txt`` written by extract_frames.py into ``{folder: (num_frames, flags)}``.

    The header line (:data:`MANIFEST_HEADER`) is skipped; manifests written before it existed have
    none. A last line without a newline is what a killed writer leaves behind; it is ignored. With
    ``strict`` a malformed complete line raises :class:`ListFileError` (``<file>:<line>: ...``),
    otherwise it is skipped with a warning. A folder listed twice keeps its last entry.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path} (run extract_frames.py first)")
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    if lines[-1]:  # the part after the last newline is either "" or an unfinished line
        logger.warning("%s: ignoring an unfinished last line %r", path, lines[-1][:80])
    out: Dict[str, Tuple[int, Tuple[str, ...]]] = {}
    for line_no, line in enumerate(lines[:-1], start=1):
        if not line.strip() or (line_no == 1 and line.startswith(_MANIFEST_MARK)):
            continue
        try:
            folder, n, flags = parse_manifest_line(line)
        except ValueError as e:
            if strict:
                raise ListFileError(f"{path}:{line_no}: {e}") from None
            logger.warning("%s:%d: skipping malformed line %r", path, line_no, line[:80])
            continue
        out[folder] = (n, flags)
    return out


def _refuse_manifest(path: str, first_line: str) -> None:
    """A manifest read as a list would turn frame counts into labels: refuse it, saying what it is."""
    if first_line.startswith(_MANIFEST_MARK) or os.path.basename(path) == MANIFEST_NAME:
        raise ListFileError(
            f"{path} is the manifest that extract_frames.py writes ('<frames folder> <num_frames>' per line, "
            "no labels), not a list file: read as one, its frame counts would become labels. Make list files "
            "from it with Dataset_creation_scripts/build_lists.py (the 'folders' subcommand for class folders, "
            "or the official splits' subcommands)")


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


def read_list_file(path: str, root: Optional[str] = None, num_classes: Optional[int] = None,
                   paths: Optional[PathRules] = None, allow_outside_root: bool = False) -> List[VideoRecord]:
    """Read a list file into records.

    Args:
        path: the list file (format in the module docstring).
        root: folder that relative video paths are taken from; ``None`` keeps them as written
            (relative to the working directory). Absolute paths in the list are kept as they are.
        num_classes: when given, every label must lie in ``[0, num_classes)``.
        paths: :class:`PathRules` that turn the list's paths into paths on this machine first (published split
            files with the authors' absolute paths).
        allow_outside_root: with a ``root``, every relative path (after ``paths``) joined with the root must
            still lie inside it once ``..`` and symbolic links are resolved, so that a list cannot climb out of the
            root (``../..``, a link to ``/etc``); True lifts that check (data linked in from another disk).
            Absolute paths, and every path when there is no root, are taken as written.

    Returns:
        One :class:`VideoRecord` per video line, in file order.

    Raises:
        FileNotFoundError: the list file does not exist.
        ListFileError: a malformed line or a label out of range (message ``<file>:<line>: ...``),
            a path that leaves the root, a list without any video, or a manifest of extract_frames.py
            given as a list.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"list file not found: {path}")
    rules = paths or PathRules()
    inside = _InsideRoot(os.fspath(root)) if root is not None and not allow_outside_root else None
    by_name = _manifest_names(root) if rules.by_name else None
    records: List[VideoRecord] = []

    def exists(video: str) -> bool:
        """Whether a path as written in the list exists on this machine (only asked for ambiguous lines)."""
        video = os.path.expanduser(rules.rewrite(video) if rules.active else video)
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
            video = rules.rewrite(rec.path) if rules.active else rec.path
            if by_name is not None:
                name = video.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
                found = by_name.get(name, [])
                if len(found) != 1:
                    raise ListFileError(
                        f"{path}:{line_no}: paths.by_name: {name!r} is {'not among' if not found else 'twice among'} "
                        f"the folders of {os.path.join(os.fspath(root or '.'), 'manifest.txt')}"
                        f"{'' if not found else ': ' + ', '.join(found[:3])}")
                video = found[0]
            video = os.path.expanduser(video)
            joined = root is not None and not os.path.isabs(video)
            if joined:
                video = os.path.join(os.fspath(root), video)
            if inside is not None and joined:  # an absolute path names its place itself, and is kept
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


def _tokens(text: str) -> List[str]:
    return [t for t in re.split(r"[^0-9a-z]+", text.lower()) if t]


def label_name_mismatches(records: Sequence[VideoRecord], class_names: Sequence[str],
                          per_label: int = 20) -> List[dict]:
    """Labels whose videos are named after another class: the sign of a list written for another class order.

    Many datasets name videos (or their class folders) after the class: UCF-101 ``v_ApplyEyeMakeup_g08_c01``,
    HMDB-51 ``..._kick_ball_f_cm_np1_...``, class folders of Kinetics and of one's own data. For up to
    ``per_label`` videos of each label (the first ones in the list), the class whose name occurs in the path's last
    two components (as whole words, ignoring case and ``_``; the longest name wins) is compared with the label's
    class. A label is reported when at least 2 of its checked videos name a class and most of them name another
    one. Lists whose paths name no class (Something-Something ids, Kinetics files without class folders) pass.

    Returns one dict per mismatched label: ``label``, ``name`` (its class), ``named`` (the class its videos
    name), ``count``, ``checked``, ``example`` (a record).
    """
    by_tokens: Dict[tuple, List[int]] = {}
    for k, name in enumerate(class_names):
        toks = tuple(_tokens(name))
        if toks:
            by_tokens.setdefault(toks, []).append(k)
    longest = max((len(t) for t in by_tokens), default=0)
    seen: Dict[int, int] = {}
    votes: Dict[int, Dict[int, List[VideoRecord]]] = {}
    for rec in records:
        if rec.label is None or seen.get(rec.label, 0) >= per_label:
            continue
        seen[rec.label] = seen.get(rec.label, 0) + 1
        toks = _tokens(" ".join(rec.path.replace("\\", "/").rstrip("/").split("/")[-2:]))
        best, best_len, tie = None, 0, False
        for n in range(longest, 0, -1):
            for i in range(len(toks) - n + 1):
                ids = by_tokens.get(tuple(toks[i:i + n]))
                if ids:
                    if best is None:
                        best, best_len, tie = ids[0], n, len(ids) > 1
                    elif n == best_len and ids[0] != best:
                        tie = True
            if best is not None:
                break
        if best is not None and not tie:
            votes.setdefault(rec.label, {}).setdefault(best, []).append(rec)
    out = []
    for label, named in sorted(votes.items()):
        checked = sum(len(v) for v in named.values())
        other, recs = max(((k, v) for k, v in named.items() if k != label), key=lambda kv: len(kv[1]),
                          default=(None, []))
        if other is not None and checked >= 2 and len(recs) * 2 > checked:
            out.append({"label": label, "name": class_names[label], "named": class_names[other],
                        "named_id": other, "count": len(recs), "checked": checked, "example": recs[0]})
    return out


def check_labels_match_names(records: Sequence[VideoRecord], class_names: Sequence[str], list_path: str,
                             classes_source: str = "the class list") -> None:
    """Refuse a list whose labels point at classes its videos are not named after (see
    :func:`label_name_mismatches`), naming the labels, the file and an example line."""
    bad = label_name_mismatches(records, class_names)
    if not bad:
        return
    shown = "; ".join(f"label {b['label']} is {b['name']!r} in {classes_source}, but {b['count']} of its "
                      f"{b['checked']} checked videos are named like {b['named']!r} (id {b['named_id']}), e.g. line "
                      f"{b['example'].line}: {b['example'].path}" for b in bad[:5])
    more = f" (and {len(bad) - 5} more labels)" if len(bad) > 5 else ""
    raise ListFileError(
        f"{list_path}: its labels do not fit {classes_source}: {shown}{more}. The list was probably written for "
        f"another class order (the published T2L HMDB-51 label list swaps kick/kick_ball and sword/sword_exercise "
        f"against the alphabetical one: lists/published_order/ holds the published orders). Use the class list "
        f"the list was written for, or set data.check_labels: false if its paths name classes by coincidence")
