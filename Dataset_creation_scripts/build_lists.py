#!/usr/bin/env python
"""Build list files ``<frames folder> <num_frames> <label id>`` from the official split files, or from class folders.

``folders SRC``: your own dataset, ``SRC/<class>/<video file or frames folder>``. Writes into
``--out-dir`` the class list (the folder names, sorted: ``classes.csv``), stratified seeded
``train.txt``/``val.txt`` (and ``test.txt`` with ``--test``), ``failures.txt`` (what could not be
read, and why) and ``config.yaml`` (plus ``test.yaml`` for the test split), which extends the base
recipe and is ready for train.py. Every video is checked first by reading its first and last frame.

The other subcommands each read one dataset's official split format, maps its class names onto a class list
``id,name`` (normally ``lists/<dataset>_classes.csv``) and joins the videos with the manifest written
by extract_frames.py. Videos without extracted frames are reported (count and a sample) and left
out; ``--strict`` makes that an error. Folders in the output are relative to the manifest's folder
(the frames root), exactly as in the manifest.

Class names are matched exactly first, then ignoring case, spaces, underscores and hyphens (that is
what UCF-101's ``HandstandPushups``/``HandStandPushups`` and HMDB-51's ``brush_hair``/``brush hair``
need); anything else is reported with suggestions, never guessed.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from tqdm import tqdm

import _common
from _common import ClassMatcher, InputFormatError, ManifestIndex, format_list_line, read_classes_csv

logger = logging.getLogger("build_lists")

# One entry of an official split: the video's file stem (join key), the folders expected above it
# (only to break ties), the class name as the official file spells it, and where it came from.
Entry = Tuple[str, Tuple[str, ...], str, str]


def _stem(path: str) -> str:
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def _read_lines(path: Path) -> Iterable[Tuple[int, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if line:
                yield lineno, line


def join_entries(
    entries: Sequence[Entry],
    class_ids: Dict[str, int],
    index: ManifestIndex,
    what: str,
    strict: bool = False,
    kinetics_fallback: bool = False,
) -> List[str]:
    """Turn split entries into list lines via the manifest; missing videos are reported, not listed.

    With ``kinetics_fallback`` a clip ``<id>_<start>_<end>`` that is not in the manifest is looked
    up as ``<id>`` too.
    """
    lines: List[str] = []
    missing: List[str] = []
    seen = set()
    for stem, parents, cls, origin in tqdm(entries, desc=f"joining {what}", unit="video", leave=False, disable=len(entries) < 5000):
        if stem in seen:
            logger.warning("%s: %s listed twice; keeping the first", origin, stem)
            continue
        seen.add(stem)
        folder = index.find(stem, parents)
        if folder is None and kinetics_fallback:
            # Some Kinetics mirrors name clips by YouTube id alone.
            folder = index.find(stem[: -len("_000000_000000")], parents)
        if folder is None:
            missing.append(stem)
            continue
        lines.append(format_list_line(folder, index.manifest[folder], class_ids[cls]))
    _common.report_missing(missing, f"videos of {what}", strict)
    logger.info("%s: %d videos listed, %d missing", what, len(lines), len(missing))
    return lines


def _load(args) -> Tuple[ClassMatcher, ManifestIndex]:
    matcher = ClassMatcher(read_classes_csv(args.classes), args.classes)
    manifest = _common.read_manifest(args.manifest)
    if not manifest:
        raise ValueError(f"{args.manifest} lists no videos")
    return matcher, ManifestIndex(manifest, args.manifest)


def _write(path: Path, lines: List[str]) -> None:
    _common.warn_comment_like(lines, path)
    _common.write_list_file(path, lines)
    logger.info("wrote %s (%d lines)", path, len(lines))


# --------------------------------------------------------------------------------------------
# UCF-101
# --------------------------------------------------------------------------------------------
def read_ucf_class_ind(path) -> Dict[int, str]:
    """Parse ``classInd.txt`` (``<1-based id> <Class>``) into ``{id: name}``; ids must be 1..K."""
    path = Path(path)
    out: Dict[int, str] = {}
    for lineno, line in _read_lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise InputFormatError(path, lineno, f"expected '<1-based id> <ClassName>', got {line!r}")
        cid = int(parts[0])
        if cid in out:
            raise InputFormatError(path, lineno, f"class id {cid} appears twice")
        out[cid] = parts[1]
    if sorted(out) != list(range(1, len(out) + 1)):
        raise InputFormatError(path, None, f"class ids must be 1..{len(out)}")
    return out


def read_ucf_split(path, class_ind: Dict[int, str], has_label: bool) -> List[Entry]:
    """Parse ``trainlist0N.txt`` (``Class/v_x.avi <label>``) or ``testlist0N.txt`` (``Class/v_x.avi``).

    The class folder in each path must be a class of ``classInd.txt``; in train lists it must also
    agree with the 1-based label (compared ignoring case, which covers HandstandPushups vs
    HandStandPushups).
    """
    path = Path(path)
    by_key = {_common.normalize_class_name(n): n for n in class_ind.values()}
    expected = "'<Class>/<video>.avi <1-based label>'" if has_label else "'<Class>/<video>.avi'"
    entries: List[Entry] = []
    for lineno, line in _read_lines(path):
        parts = line.split()
        if len(parts) != (2 if has_label else 1) or "/" not in parts[0]:
            raise InputFormatError(path, lineno, f"expected {expected}, got {line!r}")
        video = parts[0]
        folder_cls = video.split("/")[-2]
        cls = by_key.get(_common.normalize_class_name(folder_cls))
        if cls is None:
            raise InputFormatError(path, lineno, f"class folder {folder_cls!r} is not in classInd.txt")
        if has_label:
            if not parts[1].isdigit() or int(parts[1]) not in class_ind:
                raise InputFormatError(path, lineno, f"label {parts[1]!r} is not a classInd.txt id 1..{len(class_ind)}")
            if class_ind[int(parts[1])] != cls:
                raise InputFormatError(
                    path, lineno, f"label {parts[1]} is {class_ind[int(parts[1])]!r} but the video is in folder {folder_cls!r}"
                )
        entries.append((_stem(video), (folder_cls,), cls, f"{path}:{lineno}"))
    return entries


def build_ucf101(args) -> None:
    """Subcommand ``ucf101``: train/test lists for each official split."""
    sd = Path(args.splits_dir)
    class_ind = read_ucf_class_ind(sd / "classInd.txt")
    matcher, index = _load(args)
    ids = matcher.resolve(class_ind.values(), "UCF-101 classes of classInd.txt")
    if len(class_ind) != len(matcher.names):
        logger.warning("classInd.txt has %d classes, %s has %d", len(class_ind), args.classes, len(matcher.names))
    out = Path(args.out_dir)
    for s in args.splits:
        for kind, fname, has_label in (("train", f"trainlist0{s}.txt", True), ("test", f"testlist0{s}.txt", False)):
            entries = read_ucf_split(sd / fname, class_ind, has_label)
            lines = join_entries(entries, ids, index, f"UCF-101 {kind} split {s}", args.strict)
            _write(out / f"ucf101_{kind}_split{s}.txt", lines)


# --------------------------------------------------------------------------------------------
# HMDB-51
# --------------------------------------------------------------------------------------------
HMDB_SPLIT_RE = re.compile(r"^(?P<cls>.+)_test_split(?P<split>\d+)\.txt$")


def read_hmdb_splits(splits_dir, split: int) -> Dict[str, List[Tuple[str, int, str]]]:
    """Parse every ``<class>_test_split<split>.txt`` into ``{class: [(video, 0|1|2, origin), ...]}``."""
    sd = Path(splits_dir)
    if not sd.is_dir():
        raise NotADirectoryError(f"HMDB-51 splits folder not found: {sd}")
    out: Dict[str, List[Tuple[str, int, str]]] = {}
    for path in sorted(sd.iterdir()):
        m = HMDB_SPLIT_RE.match(path.name)
        if not m or int(m.group("split")) != split:
            continue
        rows = []
        for lineno, line in _read_lines(path):
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise InputFormatError(path, lineno, f"expected '<video>.avi <0|1|2>', got {line!r}")
            rows.append((parts[0], int(parts[1]), f"{path}:{lineno}"))
        out[m.group("cls")] = rows
    if not out:
        raise FileNotFoundError(f"no '<class>_test_split{split}.txt' files in {sd}")
    return out


def build_hmdb51(args) -> None:
    """Subcommand ``hmdb51``: train (id 1) and test (id 2) lists for each official split."""
    matcher, index = _load(args)
    out = Path(args.out_dir)
    classes_seen = None
    for s in args.splits:
        per_class = read_hmdb_splits(args.splits_dir, s)
        if classes_seen is not None and set(per_class) != classes_seen:
            diff = sorted(set(per_class) ^ classes_seen)
            raise ValueError(f"{args.splits_dir}: split {s} has a different set of classes than split {args.splits[0]}: {diff[:10]}")
        classes_seen = set(per_class)
        ids = matcher.resolve(sorted(per_class), f"HMDB-51 classes (from split file names in {args.splits_dir})")
        unused = set(range(len(matcher.names))) - set(ids.values())
        if unused:
            logger.warning("%d classes of %s have no split file, e.g. %r", len(unused), args.classes, matcher.names[min(unused)])
        for kind, code in (("train", 1), ("test", 2)):
            entries: List[Entry] = [
                (_stem(video), (cls,), cls, origin)
                for cls in sorted(per_class)
                for video, c, origin in per_class[cls]
                if c == code
            ]
            lines = join_entries(entries, ids, index, f"HMDB-51 {kind} split {s}", args.strict)
            _write(out / f"hmdb51_{kind}_split{s}.txt", lines)


# --------------------------------------------------------------------------------------------
# Kinetics-400 / 600
# --------------------------------------------------------------------------------------------
KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


def kinetics_clip_stem(youtube_id: str, start: int, end: int) -> str:
    """The official clip file stem ``<youtube_id>_<start:06d>_<end:06d>`` (clips named ``<youtube_id>``
    alone are found too, see :func:`join_entries`)."""
    return f"{youtube_id}_{start:06d}_{end:06d}"


def _as_seconds(value: str) -> int:
    x = float(value)
    if x != int(x) or x < 0:
        raise ValueError(value)
    return int(x)


def read_kinetics_csv(path) -> List[Entry]:
    """Parse a Kinetics CSV (``label,youtube_id,time_start,time_end,split``) into entries."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Kinetics CSV not found: {path}")
    entries: List[Entry] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in KINETICS_COLUMNS if c not in header]
        if missing:
            raise InputFormatError(path, 1, f"missing column(s) {missing}; expected a header 'label,youtube_id,time_start,time_end,split'")
        reader.fieldnames = header
        for row in reader:
            lineno = reader.line_num
            if None in row or any(row.get(c) is None for c in KINETICS_COLUMNS):
                raise InputFormatError(path, lineno, f"expected {len(header)} fields ({','.join(header)})")
            label = row["label"].strip()
            yid = row["youtube_id"].strip()
            if not label:
                raise InputFormatError(path, lineno, "empty label (an unlabelled test CSV cannot give a list file)")
            try:
                start, end = _as_seconds(row["time_start"]), _as_seconds(row["time_end"])
            except ValueError:
                raise InputFormatError(path, lineno, f"time_start/time_end must be whole seconds, got {row['time_start']!r}, {row['time_end']!r}") from None
            if not yid:
                raise InputFormatError(path, lineno, "empty youtube_id")
            entries.append((kinetics_clip_stem(yid, start, end), (label,), label, f"{path}:{lineno}"))
    return entries


def build_kinetics(args) -> None:
    """Subcommand ``kinetics``: one list file from one official CSV."""
    entries = read_kinetics_csv(args.csv)
    matcher, index = _load(args)
    labels = sorted({e[2] for e in entries})
    if args.skip_unknown_classes:
        known = {n for n in labels if matcher.lookup(n) is not None}
        dropped = len(entries)
        entries = [e for e in entries if e[2] in known]
        dropped -= len(entries)
        logger.info("kept %d rows of %d classes in %s; skipped %d rows of %d other classes",
                    len(entries), len(known), args.classes, dropped, len(labels) - len(known))
        labels = sorted(known)
    ids = matcher.resolve(labels, f"Kinetics labels of {args.csv}")
    lines = join_entries(entries, ids, index, f"Kinetics {Path(args.csv).name}", args.strict, kinetics_fallback=True)
    _write(Path(args.out), lines)


# --------------------------------------------------------------------------------------------
# Something-Something v2
# --------------------------------------------------------------------------------------------
_BRACKETS = re.compile(r"\[([^\]]*)\]")


def ssv2_template_to_class(template: str) -> str:
    """``"Putting [something] onto [something]"`` -> ``"Putting something onto something"``."""
    return _BRACKETS.sub(r"\1", template).strip()


def _load_json(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSON file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise InputFormatError(path, exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None


def read_ssv2_labels(path) -> Dict[str, int]:
    """Parse the label map ``{"name": "id"}``."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise InputFormatError(path, None, 'expected a JSON object {"class name": "id", ...}')
    out = {}
    for name, cid in data.items():
        try:
            out[name] = int(cid)
        except (TypeError, ValueError):
            raise InputFormatError(path, None, f"class {name!r}: id {cid!r} is not an integer") from None
    return out


def read_ssv2_split(path) -> List[Entry]:
    """Parse a split JSON list of ``{"id", "template", ...}``; the template gives the class name."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise InputFormatError(path, None, 'expected a JSON list [{"id": ..., "template": ...}, ...]')
    entries: List[Entry] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "id" not in item:
            raise InputFormatError(path, None, f"entry #{i}: expected an object with 'id' and 'template', got {str(item)[:80]!r}")
        if "template" not in item:
            raise InputFormatError(path, None, f"entry #{i} (id {item['id']}): no 'template' (the test JSON has no labels)")
        vid = str(item["id"]).strip()
        entries.append((vid, (), ssv2_template_to_class(str(item["template"])), f"{path} entry #{i}"))
    return entries


def build_ssv2(args) -> None:
    """Subcommand ``ssv2``: one list file from one official split JSON."""
    label_map = read_ssv2_labels(args.labels)
    entries = read_ssv2_split(args.split_json)
    label_keys = {_common.normalize_class_name(n) for n in label_map}
    strays = sorted({e[2] for e in entries if _common.normalize_class_name(e[2]) not in label_keys})
    if strays:
        raise ValueError(f"{args.split_json}: {len(strays)} template(s) are not classes of {args.labels}: {strays[:5]}")
    matcher, index = _load(args)
    ids = matcher.resolve(sorted({e[2] for e in entries}), f"SSv2 classes of {args.split_json}")
    differ = [n for n, i in label_map.items() if matcher.lookup(n) is not None and matcher.lookup(n) != i]
    if differ:
        logger.info("%d classes have other ids in %s than in %s; the list uses %s", len(differ), args.labels, args.classes, args.classes)
    lines = join_entries(entries, ids, index, f"SSv2 {Path(args.split_json).name}", args.strict)
    _write(Path(args.out), lines)


# --------------------------------------------------------------------------------------------
# Your own dataset: SRC/<class>/<video file or frames folder>
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FolderEntry:
    """One video of a class-folder dataset: its path relative to SRC and its class folder."""

    rel: str  # "<class>/<video file or frames folder>"
    cls: str


def find_class_folder_entries(src: Path, extensions: Sequence[str]) -> Tuple[List[str], List[FolderEntry], List[str]]:
    """The class folders of ``src`` (sorted), their entries (video files and frames folders) and the ignored files.

    Raises ValueError when there are no class folders, or when a class folder's name starts or ends with
    whitespace (list files cannot hold that path, and class lists strip names).
    """
    if not src.is_dir():
        raise NotADirectoryError(f"SRC is not a folder: {src}")
    exts = {e.lower() for e in extensions}
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{src} has no class folders; expected SRC/<class>/<video file or frames folder>")
    bad = [c for c in classes if c != c.strip()]
    if bad:
        raise ValueError(f"class folder name(s) {bad!r} start or end with whitespace, which list files and class lists "
                         "cannot hold; rename them")
    entries: List[FolderEntry] = []
    ignored: List[str] = []
    for cls in classes:
        for item in sorted(os.scandir(src / cls), key=lambda e: e.name):
            if item.name.startswith("."):
                continue
            if item.is_dir() or os.path.splitext(item.name)[1].lower() in exts:
                entries.append(FolderEntry(f"{cls}/{item.name}", cls))
            else:
                ignored.append(f"{cls}/{item.name}")
    return classes, entries, ignored


def probe_entry(path: str, image_tmpl: str, index_start: int) -> Tuple[int, str]:
    """(frame count, "") for a readable video file or frames folder, else (0, reason).

    Reads the first and the last frame with the library's readers, so that the reasons are the ones training
    and testing give, and a file that opens but does not decode is caught here, not in the middle of an epoch.
    """
    from datasets.readers import SampleLoadError, open_source
    from datasets.video_dataset import frame_count

    if path != path.rstrip() or "\n" in path:
        return 0, "the name ends with whitespace, which a list file cannot hold; rename it"
    try:
        source = open_source(path, image_tmpl, index_start)
        n = frame_count(source, 0)
        source.read([0, n - 1])
        return n, ""
    except SampleLoadError as exc:
        return 0, exc.reason or str(exc)


def _probe_job(args):
    return probe_entry(*args)


def split_counts(n: int, val: float, test: float) -> Tuple[int, int, int]:
    """(train, val, test) sizes for a class of ``n`` videos: the fractions rounded, at least one video in each
    asked-for split when the class has enough (3 for all three), and always at least one for training."""
    n_test = round(n * test)
    n_val = round(n * val)
    if test > 0 and n_test == 0 and n >= 3:
        n_test = 1
    if val > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    while n_val + n_test >= n and n_val + n_test > 0:
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test


def stratified_split(videos: Dict[str, List[str]], val: float, test: float, seed: int) -> Dict[str, List[str]]:
    """``{class: [rel, ...]}`` -> ``{"train"|"val"|"test": [rel, ...]}``, per class, seeded.

    Within a class the videos are ranked by :func:`_common.rank_key` (the same on every machine): the first go to
    test, the next to validation, the rest to training. Adding videos later moves only the split boundaries.
    """
    out: Dict[str, List[str]] = {"train": [], "val": [], "test": []}
    for cls in sorted(videos):
        ranked = sorted(videos[cls], key=lambda rel: (_common.rank_key(seed, rel), rel))
        n_train, n_val, n_test = split_counts(len(ranked), val, test)
        out["test"] += ranked[:n_test]
        out["val"] += ranked[n_test:n_test + n_val]
        out["train"] += ranked[n_test + n_val:]
    return {k: sorted(v) for k, v in out.items()}


def _config_path(path: Path) -> str:
    """A path as configs give it: relative to the repository root (the scripts run from there) when inside it."""
    path = path.resolve()
    try:
        return path.relative_to(_common.REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def _set_name(text: str) -> str:
    """An eval set / output name from a folder name: letters, digits, '_', '-' and '.' only."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")
    return name or "custom"


def write_folder_configs(out: Path, src: Path, name: str, extends: Path, counts: Dict[str, int],
                         num_classes: int, seed: int, command: str, image_tmpl: str = "img_{:05d}.jpg",
                         index_start: int = 1, descriptions: Optional[Path] = None) -> List[Path]:
    """``config.yaml`` (train on train.txt, evaluate val.txt) and, with a test split, ``test.yaml``.

    The class texts are the prompt templates on the class names, or ``descriptions`` (a CSV
    ``SNo,Class Name,Description``) when given.
    """
    import yaml

    from utils.config import load_config

    parent = load_config(extends)
    texts = {"descriptions": _config_path(descriptions) if descriptions else None}
    data = {"train_list": _config_path(out / "train.txt"), "root": _config_path(src),
            "classes": _config_path(out / "classes.csv"), **texts,
            "text_mode": "descriptions" if descriptions else "templates"}
    if (image_tmpl, index_start) != (parent.data.image_tmpl, parent.data.index_start):
        data.update(image_tmpl=image_tmpl, index_start=index_start)
    notes = []
    if counts["train"] < parent.data.batch_size:
        batch = 1 << max(0, (counts["train"] // 2).bit_length() - 1)  # a power of two, two steps per epoch at least
        data["batch_size"] = batch
        notes.append(f"data.batch_size lowered from {parent.data.batch_size} to {batch}: only {counts['train']} "
                     "training videos")
    val_set = {"name": f"{name}_val", "lists": [_config_path(out / "val.txt")], "root": data["root"],
               "classes": data["classes"], **texts, "select_best": True}  # best_<name>_val.pt: chosen on validation
    inside = _config_path(out) != str(out.resolve())  # the lists' folder is inside the repository
    config = {"extends": os.path.relpath(extends.resolve(), out.resolve()) if inside else str(extends.resolve()),
              "output_dir": f"output/{name}",
              "data": data, "eval": {"sets": [val_set] if counts["val"] else []}}
    if not counts["val"]:
        config["eval"]["every"] = 0
        notes.append("no validation split (--val 0): no evaluation during training")
    header = [f"# Written by: {command}",
              f"# Your own dataset: {num_classes} classes (the folder names of {data['root']}), "
              f"{counts['train']} training / {counts['val']} validation / {counts['test']} test videos "
              f"(stratified, seed {seed}). Class texts: "
              + (f"the descriptions in {texts['descriptions']}." if descriptions else
                 "the 16 prompt templates on the class names."),
              f"# Everything else comes from {config['extends']}. Rerunning the command rewrites this file.",
              *[f"# Note: {n}" for n in notes]]
    written = [out / "config.yaml"]
    _common.atomic_write_text(written[0], "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False))
    if counts["test"]:
        test_set = {"name": f"{name}_test", "lists": [_config_path(out / "test.txt")], "root": data["root"],
                    "classes": data["classes"], **texts}
        test_cfg = {"extends": "config.yaml", "output_dir": f"output/{name}_test", "eval": {"sets": [test_set]}}
        written.append(out / "test.yaml")
        _common.atomic_write_text(written[1], f"# Written by: {command}\n# The held-out test split of config.yaml; "
                                  "evaluate with test.py --config <this file> --weights <checkpoint>.\n"
                                  + yaml.safe_dump(test_cfg, sort_keys=False))
    for path in written:
        load_config(path)  # what we write must validate
    return written


def build_folders(args) -> None:
    """Subcommand ``folders``: class list, stratified train/val(/test) lists and a config from SRC/<class>/<video>."""
    from datasets.lists import read_list_file as read_records
    from datasets.readers import VIDEO_EXTENSIONS

    for flag in ("val", "test"):
        if not 0 <= getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be a fraction in [0, 1), got {getattr(args, flag)}")
    if args.val + args.test >= 1:
        raise ValueError(f"--val + --test must leave videos for training, got {args.val} + {args.test}")
    src, out = Path(args.src), Path(args.out_dir)
    extends = Path(args.extends)
    if not extends.is_file():
        raise FileNotFoundError(f"--extends config not found: {extends}")
    descriptions = Path(args.descriptions) if args.descriptions else None
    if descriptions is not None and not descriptions.is_file():
        raise FileNotFoundError(f"--descriptions file not found: {descriptions}")
    classes, entries, ignored = find_class_folder_entries(src, VIDEO_EXTENSIONS)
    if ignored:
        logger.warning("%d file(s) are neither videos (%s ...) nor frames folders and were ignored, e.g. %s",
                       len(ignored), " ".join(VIDEO_EXTENSIONS[:5]), ignored[0])
    if not entries:
        raise ValueError(f"no videos or frames folders in the class folders of {src}")
    jobs = [(str(src / e.rel), args.image_tmpl, args.index_start) for e in entries]
    bar = dict(desc="checking videos", unit="video", disable=args.no_progress, dynamic_ncols=True)
    if args.workers > 0 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            probed = list(tqdm(pool.map(_probe_job, jobs, chunksize=8), total=len(jobs), **bar))
    else:
        probed = [_probe_job(j) for j in tqdm(jobs, **bar)]
    counts = {e.rel: n for e, (n, _) in zip(entries, probed) if n > 0}
    failures = {e.rel: reason for e, (n, reason) in zip(entries, probed) if n <= 0}
    out.mkdir(parents=True, exist_ok=True)
    _common.atomic_write_text(out / _common.FAILURES_NAME, "".join(f"{rel}\t{' '.join(r.split())}\n"
                                                                   for rel, r in sorted(failures.items())))
    if failures:
        logger.warning("%d of %d videos cannot be read and are left out (reasons in %s), e.g. %s: %s", len(failures),
                       len(entries), out / _common.FAILURES_NAME, *next(iter(sorted(failures.items()))))
    by_class: Dict[str, List[str]] = {c: [] for c in classes}
    for e in entries:
        if e.rel in counts:
            by_class[e.cls].append(e.rel)
    empty = [c for c in classes if not by_class[c]]
    if empty:
        logger.warning("%d class folder(s) have no readable video and no training example: %s", len(empty), empty[:10])
    splits = stratified_split(by_class, args.val, args.test, args.seed)
    label = {c: i for i, c in enumerate(classes)}
    _common.write_classes_csv(out / "classes.csv", classes)
    sizes = {}
    for split in ("train", "val", "test"):
        path = out / f"{split}.txt"
        if split == "test" and not splits["test"]:
            path.unlink(missing_ok=True)  # an earlier run's test split would no longer match
            sizes[split] = 0
            continue
        lines = [format_list_line(rel, counts[rel], label[rel.split("/", 1)[0]]) for rel in splits[split]]
        _write(path, lines)
        sizes[split] = len(lines)
        if lines:  # what we wrote must read back, with the paths pointing at what we probed
            records = read_records(str(path), root=str(src), num_classes=len(classes))
            if [r.path for r in records] != [str(src / rel) for rel in splits[split]]:
                raise RuntimeError(f"{path} does not read back as written (a bug: please report it)")
    few = [c for c in classes if by_class[c] and len(by_class[c]) < 3 and (args.val or args.test)]
    if few:
        logger.warning("%d class(es) have fewer than 3 videos, so not every split has one of them: %s", len(few), few[:10])
    name = args.name or _set_name(src.resolve().name)
    command = "python Dataset_creation_scripts/build_lists.py " + shlex.join(args.argv)
    configs = write_folder_configs(out, src, name, extends, sizes, len(classes), args.seed, command,
                                   args.image_tmpl, args.index_start, descriptions)
    logger.info("%d classes, %d train / %d val / %d test videos; wrote %s", len(classes), sizes["train"], sizes["val"],
                sizes["test"], ", ".join(str(p) for p in [out / "classes.csv", *configs]))
    best = f"output/{name}/best_{name}_val.pt" if sizes["val"] else f"output/{name}/last.pt"
    logger.info("next:\n  python train.py --config %s\n%s  python predict.py %s --model %s --classes %s%s", configs[0],
                f"  python test.py --config {configs[1]} --weights {best}\n" if len(configs) > 1 else "",
                src / (splits["test"] or splits["val"] or splits["train"])[0], best, out / "classes.csv",
                f" --descriptions {descriptions}" if descriptions else "")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
EPILOG = """\
examples:
  python Dataset_creation_scripts/build_lists.py ucf101 --splits-dir data/ucfTrainTestlist \\
      --manifest data/ucf101_frames/manifest.txt --classes lists/ucf101_classes.csv --out-dir data/lists
      -> ucf101_{train,test}_split{1,2,3}.txt

  python Dataset_creation_scripts/build_lists.py hmdb51 --splits-dir data/testTrainMulti_7030_splits \\
      --manifest data/hmdb51_frames/manifest.txt --classes lists/hmdb51_classes.csv --out-dir data/lists
      -> hmdb51_{train,test}_split{1,2,3}.txt (split code 1 = train, 2 = test, 0 = unused)

  python Dataset_creation_scripts/build_lists.py kinetics --csv data/kinetics400/annotations/val.csv \\
      --manifest data/k400_frames/manifest.txt --classes lists/kinetics_400_classes.csv --out data/lists/k400_val.txt

  # K-600 zero-shot: keep only the 220 classes that are new in K-600
  python Dataset_creation_scripts/build_lists.py kinetics --csv data/kinetics600/annotations/val.csv \\
      --manifest data/k600_frames/manifest.txt --classes lists/kinetics_600_new_220_classes.csv \\
      --skip-unknown-classes --out data/lists/k600_new220_val.txt

  python Dataset_creation_scripts/build_lists.py ssv2 --labels data/ssv2/something-something-v2-labels.json \\
      --split-json data/ssv2/something-something-v2-validation.json \\
      --manifest data/ssv2_frames/manifest.txt --classes lists/ssv2_classes.csv --out data/lists/ssv2_val.txt

  # your own dataset, SRC/<class>/<video>: class list, train/val/test lists and a config (see 'folders --help')
  python Dataset_creation_scripts/build_lists.py folders data/my_videos --out-dir data/my_lists --test 0.1

Output lines are '<frames folder> <num_frames> <label id>' with the folder exactly as in the manifest
(relative to the manifest's folder) and the label an id of --classes. The folder may contain spaces
(Kinetics class folders do): read lines by splitting off the last two fields.
"""


FOLDERS_EPILOG = """\
example:
  python Dataset_creation_scripts/build_lists.py folders data/my_videos --out-dir data/my_lists --val 0.2 --test 0.1
  -> data/my_lists/{classes.csv, train.txt, val.txt, test.txt, failures.txt, config.yaml, test.yaml}
  python train.py --config data/my_lists/config.yaml
  python test.py --config data/my_lists/test.yaml --weights output/my_videos/best_my_videos_val.pt

SRC/<class>/ holds video files (.mp4, .avi, .webm, .mkv, .mov, ...) or frames folders (img_00001.jpg, ...: what
extract_frames.py writes, so 'folders data/my_frames' works on its output too). Class ids follow the sorted folder
names. List lines are '<class>/<video> <num_frames> <label>', relative to SRC (the config's data.root).
"""


def _common_args(p: argparse.ArgumentParser, single_out: bool) -> None:
    p.add_argument("--manifest", required=True, help="manifest.txt written by extract_frames.py")
    p.add_argument("--classes", required=True, help="class list CSV 'id,name' whose ids the labels use")
    if single_out:
        p.add_argument("--out", required=True, help="list file to write")
    else:
        p.add_argument("--out-dir", required=True, help="folder for the list files")
        p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3], help="official splits (default: 1 2 3)")
    p.add_argument("--strict", action="store_true", help="fail when a video of the split has no extracted frames")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (one subcommand per dataset)."""
    p = argparse.ArgumentParser(
        description="Build list files '<frames folder> <num_frames> <label id>' from official split files, or "
                    "from class folders of your own videos ('folders').",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="dataset", required=True)
    u = sub.add_parser("ucf101", help="UCF-101: classInd.txt, trainlist0N.txt, testlist0N.txt",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    u.add_argument("--splits-dir", required=True, help="folder with classInd.txt, trainlist0{1,2,3}.txt, testlist0{1,2,3}.txt")
    _common_args(u, single_out=False)
    u.set_defaults(func=build_ucf101)
    h = sub.add_parser("hmdb51", help="HMDB-51: <class>_test_split{1,2,3}.txt",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    h.add_argument("--splits-dir", required=True, help="folder with the <class>_test_split{1,2,3}.txt files")
    _common_args(h, single_out=False)
    h.set_defaults(func=build_hmdb51)
    k = sub.add_parser("kinetics", help="Kinetics-400/600: label,youtube_id,time_start,time_end,split CSV",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    k.add_argument("--csv", required=True, help="official annotation CSV (train.csv, val.csv, test.csv with labels)")
    k.add_argument("--skip-unknown-classes", action="store_true",
                   help="drop rows whose label is not in --classes (e.g. K-600 rows of K-400 classes) instead of failing")
    _common_args(k, single_out=True)
    k.set_defaults(func=build_kinetics)
    s = sub.add_parser("ssv2", help="Something-Something v2: labels JSON + train/validation JSON",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    s.add_argument("--labels", required=True, help="something-something-v2-labels.json ({'name': 'id'})")
    s.add_argument("--split-json", required=True, help="something-something-v2-{train,validation}.json")
    _common_args(s, single_out=True)
    s.set_defaults(func=build_ssv2)
    f = sub.add_parser("folders", help="your own dataset: SRC/<class>/<video or frames folder> -> lists and a config",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=FOLDERS_EPILOG,
                       description="Class list, stratified seeded train/val(/test) lists and a ready config from "
                                   "class folders of videos or frames folders.")
    f.add_argument("src", metavar="SRC", help="folder with one subfolder per class, holding video files or frames folders")
    f.add_argument("--out-dir", required=True, help="folder for classes.csv, the lists, failures.txt and the config(s)")
    f.add_argument("--val", type=float, default=0.2, help="fraction of each class for validation (default 0.2)")
    f.add_argument("--test", type=float, default=0.0, help="fraction of each class held out for testing (default 0)")
    f.add_argument("--seed", type=int, default=0, help="split seed (default 0); the same on every machine")
    f.add_argument("--name", help="name of the eval sets and of output/<name> (default: SRC's folder name)")
    f.add_argument("--extends", default=str(_common.REPO_ROOT / "configs" / "base.yaml"),
                   help="the recipe the config extends (default configs/base.yaml; e.g. configs/demo/demo_train.yaml "
                        "for the tiny random CLIP that needs no weights)")
    f.add_argument("--descriptions", metavar="CSV",
                   help="class descriptions 'SNo,Class Name,Description' to use as class texts (default: the 16 "
                        "prompt templates on the folder names)")
    f.add_argument("--image-tmpl", default="img_{:05d}.jpg", help="frame file names in frames folders")
    f.add_argument("--index-start", type=int, default=1, help="number of the first frame file (default 1)")
    f.add_argument("--workers", type=int, default=_common.default_workers(),
                   help="processes that check the videos (default: the CPUs; 0 = this process)")
    _common.add_output_arguments(f)
    f.set_defaults(func=build_folders)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _common.setup_logging(args.verbose)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(_common.run_cli(main))
