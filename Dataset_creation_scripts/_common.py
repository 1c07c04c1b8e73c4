"""Small helpers shared by the scripts in Dataset_creation_scripts/.

The scripts are run as ``python Dataset_creation_scripts/<script>.py``; Python then puts this
folder first on ``sys.path``, so ``import _common`` works without any package set-up. Importing
this module also puts the repository root right after it, so that the tools read videos, frame
folders and list files with the library's own readers (``datasets/``): what a tool writes, the
library reads, and a broken video gets the same reason everywhere. Library code (clip/, modules/,
datasets/, utils/) must never import from this folder.

What lives here: class-list reading and class-name matching, the manifest written by
extract_frames.py, list files (``<frames folder> <num_frames> <label id>``), atomic text writes and
the error type that names a file and a line.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(1, str(REPO_ROOT))  # before site-packages: our datasets/, not a package of that name

# The manifest's format is the library's (datasets/lists.py), so that its readers and these tools agree on it.
from datasets.lists import (MANIFEST_HEADER, MANIFEST_NAME, PARTIAL_FLAG, format_manifest_line,  # noqa: E402,F401
                            parse_manifest_line)
from datasets.lists import read_manifest as read_manifest_entries  # noqa: E402
from utils.io import atomic_path, atomic_write_text  # noqa: E402,F401

logger = logging.getLogger(__name__)

FAILURES_NAME = "failures.txt"


class InputFormatError(ValueError):
    """A user-supplied file is not in the expected format; the message names the file and line."""

    def __init__(self, path, lineno: Optional[int], message: str):
        where = f"{path}:{lineno}" if lineno is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.lineno = lineno


def add_output_arguments(parser) -> None:
    """--no-progress and -v/--verbose, as every tool with a progress bar takes them (see :func:`setup_logging`)."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def setup_logging(verbose: bool = False) -> None:
    """Configure console logging for a command-line script (never called by library code)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_cli(main_fn, argv=None) -> int:
    """Run ``main_fn(argv)`` and turn the expected user errors into one clear message and exit code 2."""
    try:
        return int(main_fn(argv) or 0)
    except (InputFormatError, OSError, ValueError, RuntimeError) as exc:  # OSError: a file it could not read or write
        logging.getLogger("main").error("%s", exc)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("main").error("interrupted; running the same command again resumes where it stopped")
        return 130


# --------------------------------------------------------------------------------------------
# Atomic writes (utils.io's, as every writer of the project)
# --------------------------------------------------------------------------------------------
def write_list_file(path, lines: Iterable[str]) -> int:
    """Write list-file lines (:func:`format_list_line`) atomically; returns the number written.

    Checked before it replaces ``path``: the file is read back with ``datasets.lists.read_list_file``, the reader of
    train.py and test.py, and a line it would read otherwise (a folder name with leading or trailing spaces or a
    line break) is refused, naming the file and line; the previous file is then kept.
    """
    lines = list(lines)
    with atomic_path(path, what="list file") as tmp:
        tmp.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
        if lines:
            _check_list_reads_back(tmp, path, lines)
    return len(lines)


def _check_list_reads_back(tmp: Path, path, lines: Sequence[str]) -> None:
    from datasets.lists import ListFileError, read_list_file

    try:
        records = read_list_file(str(tmp))
    except ListFileError as e:
        raise ListFileError(str(e).replace(str(tmp), str(path))) from None
    for line_no, line in enumerate(lines, start=1):
        folder, num_frames, label = line.rsplit(" ", 2)
        rec = records[line_no - 1] if line_no <= len(records) else None
        if rec is None or (rec.line, rec.path, rec.num_frames, rec.label) != (line_no, folder, int(num_frames),
                                                                               int(label)):
            read = f"{rec.path!r} (line {rec.line})" if rec is not None else "nothing"
            raise InputFormatError(path, line_no, f"the entry {folder!r} would be read back by train.py and test.py "
                                                  f"(datasets.lists) as {read}: rename it without leading or trailing "
                                                  f"spaces and line breaks")


def _check_classes_read_back(tmp: Path, path, names: Sequence[str]) -> None:
    from datasets.lists import ListFileError, load_class_list

    try:
        back = load_class_list(str(tmp))
    except ListFileError as e:
        raise ListFileError(str(e).replace(str(tmp), str(path))) from None
    for i, name in enumerate(names):
        if i >= len(back) or back[i] != name:
            raise InputFormatError(path, i + 2, f"class {i} {name!r} would be read back by train.py and test.py "
                                                f"(datasets.lists) as {back[i] if i < len(back) else None!r}: give "
                                                f"it a name without leading or trailing spaces")


# --------------------------------------------------------------------------------------------
# Class lists and name matching
# --------------------------------------------------------------------------------------------
def read_classes_csv(path) -> List[str]:
    """The names (index = class id) of an ``id,name`` class list, read as train.py and test.py read it.

    ``datasets.lists.load_class_list`` is the one reader of the format, so a class list these tools accept is one
    the training accepts too; its errors name the file and line.
    """
    from datasets.lists import load_class_list

    return load_class_list(os.fspath(path))


def write_classes_csv(path, names: Sequence[str]) -> None:
    """Write an ``id,name`` class list (ids 0..K-1 in the given order), quoting where CSV needs it; checked before
    it replaces ``path`` by reading it back with the reader of train.py and test.py (``load_class_list``)."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "name"])
    for i, n in enumerate(names):
        w.writerow([i, n])
    with atomic_path(path, what="class list") as tmp:
        tmp.write_bytes(buf.getvalue().encode("utf-8"))
        _check_classes_read_back(tmp, path, names)


_NORM_DROP = re.compile(r"[\s_\-]+")


def normalize_class_name(name: str) -> str:
    """The key used for tolerant class-name matching: case-folded, spaces/underscores/hyphens removed.

    This is what makes the documented variants meet: UCF-101's ``HandstandPushups`` (classInd.txt)
    and ``HandStandPushups`` (file names), CamelCase ``ApplyEyeMakeup`` and spaced ``Apply Eye Makeup``,
    HMDB-51's ``brush_hair`` (split file names) and ``brush hair``, and Kinetics folders written with
    underscores. Nothing else is assumed: other differences are reported, never guessed.
    """
    return _NORM_DROP.sub("", name.casefold())


class ClassMatcher:
    """Map class names from official files onto the ids of a class list.

    Exact names match first, then the :func:`normalize_class_name` key; a key shared by two
    classes of the list is an error at construction.
    """

    def __init__(self, names: Sequence[str], source: str = "class list"):
        self.names = list(names)
        self.source = source
        self._exact = {n: i for i, n in enumerate(self.names)}
        self._norm: Dict[str, int] = {}
        for i, n in enumerate(self.names):
            key = normalize_class_name(n)
            if key in self._norm:
                raise ValueError(
                    f"{source}: classes {self.names[self._norm[key]]!r} and {n!r} are the same name "
                    "once case, spaces, underscores and hyphens are ignored; rename one"
                )
            self._norm[key] = i

    def lookup(self, name: str) -> Optional[int]:
        """The id of ``name`` or None."""
        if name in self._exact:
            return self._exact[name]
        return self._norm.get(normalize_class_name(name))

    def suggest(self, name: str, n: int = 3) -> List[str]:
        """Up to ``n`` class names of the list that look like ``name`` (for error messages)."""
        keys = list(self._norm)
        close = difflib.get_close_matches(normalize_class_name(name), keys, n=n, cutoff=0.6)
        return [self.names[self._norm[k]] for k in close]

    def resolve(self, names: Iterable[str], what: str) -> Dict[str, int]:
        """Map every name to an id, or raise one error listing every unknown name with suggestions."""
        out: Dict[str, int] = {}
        unknown: List[str] = []
        for n in names:
            if n in out:
                continue
            cid = self.lookup(n)
            if cid is None:
                unknown.append(n)
            else:
                out[n] = cid
                if n != self.names[cid]:
                    logger.debug("class %r matched %r of %s", n, self.names[cid], self.source)
        if unknown:
            parts = []
            for n in unknown[:20]:
                sug = self.suggest(n)
                parts.append(f"{n!r}" + (f" (did you mean {', '.join(map(repr, sug))}?)" if sug else ""))
            more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
            raise ValueError(
                f"{len(unknown)} {what} not found in {self.source} "
                f"(compared ignoring case, spaces, underscores and hyphens): {'; '.join(parts)}{more}"
            )
        return out


# --------------------------------------------------------------------------------------------
# Manifest and list files
# --------------------------------------------------------------------------------------------
def read_manifest(path, strict: bool = True) -> Dict[str, int]:
    """``{folder: num_frames}`` of a manifest written by extract_frames.py (``datasets.lists.read_manifest``)."""
    return {folder: n for folder, (n, _) in read_manifest_entries(path, strict).items()}


def format_list_line(folder: str, num_frames: int, label: int) -> str:
    """One list-file line ``<frames folder> <num_frames> <label id>``."""
    return f"{folder} {num_frames} {label}"


def warn_comment_like(lines: Sequence[str], path) -> None:
    """Warn when list lines start with ``#``: list readers may take them for comments.

    HMDB-51 has videos named ``#437_How_To_Ride_A_Bike_...``; inside a class folder they are safe,
    extracted flat their list lines would begin with ``#``.
    """
    bad = [line for line in lines if line.startswith("#")]
    if bad:
        logger.warning(
            "%s: %d line(s) start with '#' (e.g. %r), which list readers may skip as comments; "
            "extract such datasets into class folders", path, len(bad), bad[0][:60])


def rank_key(seed: int, name: str) -> str:
    """The sampling order of ``name`` under ``seed``: SHA-256 of ``"<seed>:<name>"``, the same on every machine
    and Python version (sorting by it is a seeded shuffle)."""
    return hashlib.sha256(f"{seed}:{name}".encode("utf-8")).hexdigest()


def default_workers() -> int:
    """CPUs this process may use (the affinity mask, which containers restrict), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def read_list_file(path) -> List[Tuple[str, int, int]]:
    """Read a labelled list file ``<folder> <num_frames> <label>`` with the library's reader.

    ``datasets.read_list_file`` is the one parser of the format (paths with spaces, a manifest given
    by mistake); the tools need a label on every line.
    """
    from datasets.lists import read_list_file as read_records

    records = read_records(str(path))
    for r in records:
        if r.label is None:
            raise InputFormatError(path, r.line, "no label (or label -1); these tools need '<folder> <num_frames> <label id>'")
    return [(r.path, r.num_frames, r.label) for r in records]


class ManifestIndex:
    """Find the extracted frames folder of a video named in an official split file.

    Official split files name videos in several ways (``Class/v_x.avi``, ``x.avi``, a YouTube id
    plus times, a numeric id), and users extract from the dataset root or from a folder above it,
    flat or in class folders. The join key is therefore the video's file stem (the last path
    component without extension); when several folders share a stem, the expected parent
    folder(s) decide, and a tie that remains is an error rather than a guess.
    """

    def __init__(self, manifest: Dict[str, int], manifest_path: str = "manifest"):
        self.manifest = manifest
        self.manifest_path = manifest_path
        self._by_stem: Dict[str, List[str]] = {}
        for folder in manifest:
            stem = folder.rsplit("/", 1)[-1]
            self._by_stem.setdefault(stem, []).append(folder)

    def find(self, stem: str, parents: Sequence[str] = ()) -> Optional[str]:
        """The manifest folder of the video with file stem ``stem``, or None if not extracted.

        ``parents`` are folder names expected above the video, nearest last (e.g. ``["ApplyEyeMakeup"]``);
        they only break ties, compared with :func:`normalize_class_name`.
        """
        cands = self._by_stem.get(stem)
        if not cands:
            return None
        if len(cands) == 1:
            return cands[0]
        want = [normalize_class_name(p) for p in parents if p]
        if want:
            narrowed = []
            for c in cands:
                comps = [normalize_class_name(x) for x in c.split("/")[:-1]]
                if comps[-len(want):] == want:
                    narrowed.append(c)
            if len(narrowed) == 1:
                return narrowed[0]
            if narrowed:
                cands = narrowed
        raise ValueError(
            f"{self.manifest_path}: video {stem!r} was extracted more than once "
            f"({', '.join(sorted(cands)[:5])}); extract only the dataset you are building lists for"
        )


def report_missing(missing: Sequence[str], what: str, strict: bool, sample: int = 5) -> None:
    """Log (or, with ``strict``, raise) the videos of a split that have no extracted frames."""
    if not missing:
        return
    msg = (
        f"{len(missing)} {what} have no frames in the manifest and are left out; "
        f"first {min(sample, len(missing))}: {', '.join(missing[:sample])}"
    )
    if strict:
        raise ValueError(msg + " (--strict makes this an error)")
    logger.warning("%s", msg)
