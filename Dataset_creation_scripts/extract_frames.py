#!/usr/bin/env python
"""Decode every video under SRC into JPEG frame folders under OUT (resumable, atomic, parallel).

Contract (docs: ARCHITECTURE.md):
  * ``SRC/<dirs>/<name>.<ext>`` becomes ``OUT/<dirs>/<name>/img_00001.jpg, img_00002.jpg, ...``:
    exactly the decoded frames, in presentation order, 1-based, turned as decord shows the video
    (the display rotation of MP4/MOV files, see ``datasets.readers.quarter_turns``). Folder names lose
    leading and trailing whitespace (list readers split on it); two videos that would share a folder
    are all reported before any work, or kept apart by their extensions with ``--keep-extension``.
  * ``OUT/manifest.txt``: a header line (``datasets.lists.MANIFEST_HEADER``, which makes list readers
    refuse the file), then one line ``<folder relative to OUT> <num_frames>`` per finished video, with
    `` rotation=<degrees>`` when the frames were turned (counter-clockwise from the stored picture) and
    `` partial`` when ``--keep-partial`` kept the frames before a decode error; sorted at the end of a
    run (a rerun and a clean run give identical files).
  * ``OUT/failures.txt``: one line ``<video relative to SRC><TAB><reason>`` per video that could not be
    read in the latest run, and per partial video (reason ``partial, kept N frames: ...``); rewritten on
    every run (failed videos are retried, partial ones are kept). The reasons are the video readers'
    (``datasets/readers.py``), so training, testing and extraction name a broken file alike.

Several machines: ``--shard I/N`` extracts the videos whose path hashes to shard I of N; N such processes share
one SRC and one OUT, each appends to its own ``OUT/.shards/manifest-I-of-N.txt`` and merges it into
``manifest.txt`` and ``failures.txt`` under a lock when it starts and ends (see :class:`ShardRecords`): no line is
lost or doubled whatever order they finish in, and a killed shard is resumed by running it again.

Safety: a video's frames go to a hidden sibling ``.tmp-<name>-<pid>`` that is renamed into place only
once complete; the manifest line is appended (flush + fsync) only after that rename; a rerun skips
videos that are in the manifest with their folder present, removes ``.tmp-*`` leftovers and drops
an unfinished last manifest line. A worker process that dies (killed, out of memory, a decoder
crash) does not hang the run: the videos it may have been working on are retried one at a time and
the one that kills its worker again is recorded as a failure.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import re
import shutil
import signal
import sys
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import _common
from _common import FAILURES_NAME, MANIFEST_HEADER, MANIFEST_NAME, PARTIAL_FLAG, ClassMatcher, read_classes_csv

from datasets.readers import VIDEO_EXTENSIONS  # noqa: E402  (the repository root is on sys.path via _common)
from utils.io import read_failures  # noqa: E402

logger = logging.getLogger("extract_frames")

TMP_PREFIX = ".tmp-"
_TMP_NAME = re.compile(r"^\.tmp-(.+)-\d+(?:\.old)?$")  # a video's temporary frames folder (or the one it replaces)
LOCK_NAME = ".extract_frames.lock"
# Test-only fault injection: "<exit|killgroup>:<k>:<video path relative to SRC>" makes the worker
# that extracts that video os._exit() (exit) or SIGKILL its whole process group (killgroup) right
# after writing frame k. It lets tests reproduce a crashed worker and a killed run deterministically.
FAULT_ENV = "T2L_EXTRACT_FAULT"


def frame_name(index: int) -> str:
    """File name of the 1-based frame ``index``: ``img_00001.jpg``."""
    return f"img_{index:05d}.jpg"


@dataclass(frozen=True)
class Video:
    """One source video: its path and where its frames go (both as POSIX paths)."""

    path: str  # absolute path of the video file
    rel: str  # path relative to SRC, e.g. "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"
    folder: str  # frames folder relative to OUT, e.g. "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01"


@dataclass
class ExtractResult:
    """What a run left on disk: the manifest, the failures and partial videos, and how much work this run did."""

    manifest: Dict[str, int]
    failures: Dict[str, str]  # video rel path -> reason
    videos: List[Video]
    extracted: int = 0
    skipped: int = 0
    out: Path = field(default_factory=Path)
    flags: Dict[str, Tuple[str, ...]] = field(default_factory=dict)  # frames folder -> manifest flags
    partial: Dict[str, str] = field(default_factory=dict)  # video rel path -> reason (kept with --keep-partial)


# --------------------------------------------------------------------------------------------
# Finding videos
# --------------------------------------------------------------------------------------------
def frames_folder(rel: str, ext: str, keep_extension: bool = False) -> str:
    """The frames folder (relative to OUT) of the video ``rel`` (relative to SRC) with extension ``ext``.

    Every path component loses its leading and trailing whitespace: list files are read by splitting on
    whitespace, so ``" lead.mp4"`` must not become the folder ``" lead"``.
    """
    stem = rel if keep_extension else rel[: len(rel) - len(ext)]
    return "/".join(part.strip() for part in stem.split("/"))


def find_videos(src, extensions: Sequence[str] = VIDEO_EXTENSIONS, exclude=None,
                keep_extension: bool = False) -> List[Video]:
    """Every video file under ``src`` (recursively, sorted), skipping hidden names and ``exclude``.

    Raises ValueError listing every pair of videos that would share a frames folder (``a.mp4`` and
    ``a.avi``) or put one frames folder inside another; with ``keep_extension`` those videos' folders
    keep the extension (``a.mp4/``, ``a.avi/``) instead.
    """
    src = Path(src).resolve()
    if not src.is_dir():
        raise NotADirectoryError(f"SRC is not a folder: {src}")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    exclude = Path(exclude).resolve() if exclude is not None else None
    found: List[Tuple[Path, str, str]] = []  # (file, path relative to SRC, extension)
    seen_dirs = {src}  # real folders already walked: a symlink loop is entered once, not once per level
    for root, dirs, files in os.walk(src, followlinks=True):
        rootp = Path(root)
        # Hidden folders hold our own temporary frames (when OUT is inside SRC) or OS metadata.
        keep = []
        for d in sorted(dirs):
            real = (rootp / d).resolve()
            if d.startswith(".") or (exclude is not None and real == exclude):
                continue
            if real in seen_dirs:
                logger.warning("skipping %s: it leads to folder %s, which is already searched (a symlink loop or "
                               "a second link to it)", rootp / d, real)
                continue
            seen_dirs.add(real)
            keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            if name.startswith("."):
                continue
            stem, ext = os.path.splitext(name)
            if ext.lower() not in exts:
                continue
            full = rootp / name
            rel = full.relative_to(src).as_posix()
            if "\n" in rel or "\r" in rel:
                logger.warning("skipping %r: a newline in a path cannot be written to the manifest", rel)
                continue
            found.append((full, rel, ext))
    found.sort(key=lambda f: f[1])
    videos = [Video(path=str(full), rel=rel, folder=frames_folder(rel, ext)) for full, rel, ext in found]
    clashes = _folder_clashes(videos)
    if clashes and keep_extension:
        clashing = {rel for pair in clashes for rel in pair[:2]}
        videos = [Video(v.path, v.rel, frames_folder(v.rel, "", keep_extension=True)) if v.rel in clashing else v
                  for v in videos]
        logger.info("%d video(s) share a frames folder with another; their folders keep the extension (e.g. %s)",
                    len(clashing), next(v.folder for v in videos if v.rel in clashing))
        clashes = _folder_clashes(videos)
    if clashes:
        shown = "; ".join(why for _, _, why in clashes[:20])
        more = f"; and {len(clashes) - 20} more" if len(clashes) > 20 else ""
        raise ValueError(f"{len(clashes)} frames folder clash(es) under {src}: {shown}{more}. Rename or move those "
                         "videos, or pass --keep-extension to name their frames folders with the extension "
                         "(a.mkv/, a.mov/)")
    return videos


def _folder_clashes(videos: Sequence[Video]) -> List[Tuple[str, str, str]]:
    """Every (video, other video, explanation) whose frames folders collide or nest; empty when none do."""
    by_folder: Dict[str, str] = {}
    clashes = []
    for v in videos:
        if v.folder in by_folder:
            clashes.append((by_folder[v.folder], v.rel, f"{by_folder[v.folder]!r} and {v.rel!r} would both be "
                            f"extracted to {v.folder!r}"))
        else:
            by_folder[v.folder] = v.rel
    for v in videos:
        parts = v.folder.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in by_folder:
                clashes.append((by_folder[parent], v.rel, f"the frames of {by_folder[parent]!r} would go to "
                                f"{parent!r}, which also holds the frames folder of {v.rel!r}"))
    return clashes


# --------------------------------------------------------------------------------------------
# Extracting one video (runs in a worker process)
# --------------------------------------------------------------------------------------------
class ExtractError(RuntimeError):
    """A video could not be read; the message is the reason written to failures.txt."""


def resized_size(width: int, height: int, short_side: int, max_long_side: int = 0) -> Tuple[int, int]:
    """Output (width, height), aspect ratio kept: the short side brought down to ``short_side`` (never
    enlarged; 0 keeps it), then the long side bounded by ``max_long_side`` (0: no bound).

    Frames are never enlarged: the data pipeline resizes anyway, and reading a small video from its file
    and from its frames then gives the same pixels.
    """
    scale = 1.0
    if 0 < short_side < min(width, height):
        scale = short_side / min(width, height)
    if 0 < max_long_side < max(width, height) * scale:
        scale = max_long_side / max(width, height)
    if scale == 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def default_max_long_side(short_side: int) -> int:
    """``--max-long-side`` when not given: 4 x ``--short-side`` (1024 for 256), no bound without a short side."""
    return 4 * short_side if short_side > 0 else 0


def _parse_fault(rel: str) -> Optional[Tuple[str, int]]:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    mode, k, target = spec.split(":", 2)
    return (mode, int(k)) if target == rel else None


def _trigger_fault(mode: str) -> None:
    if mode == "exit":
        os._exit(3)
    if mode == "killgroup":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    raise ValueError(f"{FAULT_ENV}: unknown mode {mode!r}")


@dataclass(frozen=True)
class Extracted:
    """What extracting one video gave: the frame count, the manifest flags and, for a partial video, why."""

    num_frames: int
    flags: Tuple[str, ...] = ()
    partial: str = ""  # the decode problem whose frames --keep-partial kept; "" for a complete video


def extract_video(
    video_path: str,
    out_root: str,
    folder: str,
    short_side: int = 0,
    quality: int = 90,
    keep_partial: bool = False,
    fault: Optional[Tuple[str, int]] = None,
    max_long_side: int = 0,
) -> Extracted:
    """Decode ``video_path`` into ``out_root/folder/img_XXXXX.jpg``.

    The frames are turned as decord shows the video and written into a temporary sibling folder that
    replaces ``folder`` only when every frame is written. Raises :class:`ExtractError` (nothing left
    behind) when the video cannot be read, with the reason the video readers give; a stream that fails
    or ends early after some frames is an error too, unless ``keep_partial`` (then it is marked partial).
    """
    import av  # imported here so that `--help` works without PyAV
    import numpy as np
    from av.video.reformatter import Interpolation
    from PIL import Image

    from datasets.readers import (SampleLoadError, check_video_file, decoding_failed, open_pyav, quarter_turns,
                                  rotate_frame, short_stream)

    try:
        check_video_file(video_path)
        container = open_pyav(video_path)
    except SampleLoadError as exc:
        raise ExtractError(exc.reason) from None
    final = Path(out_root) / folder
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    n = 0
    turns = 0
    problem = ""
    try:
        with container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            announced = int(stream.frames or 0)
            try:
                for frame in container.decode(stream):
                    if n == 0:
                        turns = quarter_turns(container, frame)
                    # The size is chosen for the picture as shown; the resize runs before the turn.
                    shown = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
                    w, h = resized_size(*shown, short_side, max_long_side)
                    if turns % 2:
                        w, h = h, w
                    if (w, h) == (frame.width, frame.height):
                        img = frame.to_image()
                    else:
                        # AREA averages when shrinking (no aliasing); frames are never enlarged.
                        img = frame.to_image(width=w, height=h, interpolation=Interpolation.AREA)
                    if turns:
                        img = Image.fromarray(rotate_frame(np.asarray(img), turns))
                    n += 1
                    img.save(tmp / frame_name(n), format="JPEG", quality=quality)
                    if fault is not None and n == fault[1]:
                        _trigger_fault(fault[0])
                problem = (short_stream(n, announced) or "") if announced else ""
            except (av.FFmpegError, ValueError, RuntimeError) as exc:
                problem = decoding_failed(n, exc)
        if n == 0:
            raise ExtractError(problem or "video has no frames")
        if problem and not keep_partial:
            raise ExtractError(problem)
        if problem:
            logger.warning("%s: %s; keeping the %d frames decoded (--keep-partial)", video_path, problem, n)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    flags = ((f"rotation={90 * turns}",) if turns else ()) + ((PARTIAL_FLAG,) if problem else ())
    return Extracted(n, flags, f"partial, kept {n} frames: {problem}" if problem else "")


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``; an existing ``final`` (not in the manifest) is replaced."""
    if final.exists():
        # A complete folder not in the manifest (killed between rename and manifest write) or a
        # stale one: move it aside first so that `final` is never half old, half new.
        old = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}.old"  # named for its video, as tmp is
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _worker_init() -> None:
    """Per-worker set-up: die with the parent, leave Ctrl-C to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            parent = os.getppid()
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a killed run leaves no orphan writers
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
        except (OSError, AttributeError):
            pass


def _job(video: Video, out_root: str, short_side: int, quality: int, keep_partial: bool, max_long_side: int = 0):
    """Worker entry point: ("ok", Extracted) or ("fail", reason); unexpected errors become failures too."""
    try:
        return "ok", extract_video(video.path, out_root, video.folder, short_side, quality, keep_partial,
                                   _parse_fault(video.rel), max_long_side)
    except ExtractError as exc:
        return "fail", str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad video must never stop the run
        return "fail", f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
@contextmanager
def _lock(path: Path, busy: str = "", shared: bool = False, wait: bool = False) -> Iterator[bool]:
    """Hold ``flock`` on ``path`` for the block; yields whether the file system gave the lock.

    Exclusive, or ``shared`` (several holders, none exclusive). Without ``wait`` a held lock raises RuntimeError
    with ``busy`` at once. On a file system without locks (some network mounts) the block runs unlocked with a
    warning, and the callers keep everything that would need the lock to be removed safely.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield False
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise RuntimeError(busy or f"{path} is locked by another extract_frames.py run") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            logger.warning("cannot lock %s (%s): runs that share this folder are not kept apart", path, e.strerror)
            yield False
            return
        yield True
    finally:
        os.close(fd)


def folder_is_complete(folder: Path, num_frames: int) -> bool:
    """True when ``folder`` holds frames 1..num_frames (checks the last one and that no extra follows)."""
    return num_frames > 0 and (folder / frame_name(num_frames)).is_file() and not (folder / frame_name(num_frames + 1)).exists()


def _remove_leftovers(out: Path, videos: Sequence[Video], only_theirs: bool = False) -> int:
    """Delete ``.tmp-*`` entries next to any frames folder (leftovers of a killed run).

    ``only_theirs`` (a ``--shard`` run, while other shards may be writing): only the temporary folders of
    ``videos`` themselves, ``.tmp-<folder name>-<pid>[.old]``, which no other shard ever makes.
    """
    names: Dict[Path, set] = {}
    for v in videos:
        names.setdefault((out / v.folder).parent, set()).add(Path(v.folder).name)
    parents = set(names) if only_theirs else {out} | set(names)
    removed = 0
    for parent in sorted(parents):
        if not parent.is_dir():
            continue
        with os.scandir(parent) as it:
            for entry in it:
                mine = entry.name.startswith(TMP_PREFIX)
                if mine and only_theirs:
                    m = _TMP_NAME.match(entry.name)
                    mine = bool(m) and m.group(1) in names[parent]
                if mine:
                    path = Path(entry.path)
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                    removed += 1
    return removed


def _manifest_text(manifest: Dict[str, int], flags: Dict[str, Tuple[str, ...]]) -> str:
    lines = [_common.format_manifest_line(folder, n, flags.get(folder, ())) for folder, n in sorted(manifest.items())]
    return "".join(line + "\n" for line in [MANIFEST_HEADER, *lines])


def _failures_text(failures: Dict[str, str]) -> str:
    return "".join(f"{rel}\t{' '.join(reason.split())}\n" for rel, reason in sorted(failures.items()))


class _ManifestAppender:
    """Append one line per finished video; flush + fsync so that a kill loses at most a partial line."""

    def __init__(self, path: Path):
        self._f = open(path, "a", encoding="utf-8", newline="\n")

    def add(self, folder: str, n: int, flags: Sequence[str] = ()) -> None:
        self._f.write(_common.format_manifest_line(folder, n, flags) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _run_jobs(
    todo: Sequence[Video],
    workers: int,
    job_args: Tuple,
    on_done: Callable[[Video, str, object], None],
) -> None:
    """Run ``_job`` over ``todo`` with ``workers`` processes (0: in this process), calling ``on_done``.

    When a worker dies the pool breaks and every unfinished future fails; those videos become
    suspects and are retried one per fresh single-worker pool, so that only the video that kills
    its worker again is recorded as failed ("worker died").
    """
    if workers <= 0:
        for v in todo:
            status, value = _job(v, *job_args)
            on_done(v, status, value)
        return

    pending = deque(todo)
    suspects: deque = deque()
    while pending or suspects:
        if suspects:
            v = suspects.popleft()
            with ProcessPoolExecutor(max_workers=1, initializer=_worker_init) as pool:
                try:
                    status, value = pool.submit(_job, v, *job_args).result()
                except BrokenProcessPool:
                    status, value = "fail", "the worker process died while extracting this video (killed, out of memory or a decoder crash)"
            on_done(v, status, value)
            continue
        broken = False
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init)
        try:
            inflight: Dict = {}
            while pending or inflight:
                # A bounded window keeps the number of suspects small when the pool breaks.
                while pending and not broken and len(inflight) < 2 * workers:
                    v = pending.popleft()
                    try:
                        inflight[pool.submit(_job, v, *job_args)] = v
                    except BrokenProcessPool:
                        pending.appendleft(v)
                        broken = True
                if not inflight:
                    break
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fut in done:
                    v = inflight.pop(fut)
                    try:
                        status, value = fut.result()
                    except BrokenProcessPool:
                        suspects.append(v)
                        broken = True
                        continue
                    on_done(v, status, value)
                if broken and not inflight:
                    break
            if broken:
                logger.warning("a worker process died; retrying %d video(s) one at a time", len(suspects))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


def run_extraction(
    src,
    out,
    workers: Optional[int] = None,
    short_side: int = 0,
    quality: int = 90,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
    keep_partial: bool = False,
    progress: bool = True,
    videos: Optional[Sequence[Video]] = None,
    max_long_side: Optional[int] = None,
    shard: Optional[Tuple[int, int]] = None,
) -> ExtractResult:
    """Extract every video under ``src`` into ``out``; resumable, see the module docstring.

    ``max_long_side`` None: :func:`default_max_long_side` of ``short_side``. ``shard`` (i, n), 1 <= i <= n: only
    the videos of shard i of n (:func:`shard_of`), beside the other shards' processes, see :class:`ShardRecords`.
    Returns the manifest (all finished videos in ``out``), the failures of this run, the partial videos and counts.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {quality}")
    if short_side < 0:
        raise ValueError(f"--short-side must be >= 0, got {short_side}")
    if max_long_side is None:
        max_long_side = default_max_long_side(short_side)
    if max_long_side < 0 or 0 < max_long_side < short_side:
        raise ValueError(f"--max-long-side must be 0 (no bound) or at least --short-side ({short_side}), "
                         f"got {max_long_side}")
    src = Path(src).resolve()
    out = Path(out).resolve()
    if videos is None:
        videos = find_videos(src, extensions, exclude=out)
    if workers is None:
        workers = _common.default_workers()
    out.mkdir(parents=True, exist_ok=True)
    job_args = (str(out), short_side, quality, keep_partial, max_long_side)
    if shard is None:
        with _lock(out / LOCK_NAME, f"another extract_frames.py run is using {out} (lock {out / LOCK_NAME})"):
            return _extract(out, src, list(videos), PlainRecords(out), workers, job_args, progress)
    index, count = shard
    mine = [v for v in videos if shard_of(v.rel, count) == index - 1]
    logger.info("shard %d/%d: %d of the %d videos under %s (chosen by a hash of their path)", index, count,
                len(mine), len(videos), src)
    with _lock(out / LOCK_NAME, f"a run without --shard is using {out} (lock {out / LOCK_NAME}); run the shards "
                                f"once it is done", shared=True):
        records = ShardRecords(out, index, count, mine)
        with _lock(records.lock, f"shard {index}/{count} of {out} is being extracted by another process (lock "
                                 f"{records.lock})"):
            return _extract(out, src, mine, records, workers, job_args, progress)


def _extract(out: Path, src: Path, videos: List[Video], records, workers: int, job_args: Tuple,
             progress: bool) -> ExtractResult:
    """Extract the ``videos`` not yet done into ``out``; ``records`` keeps the manifest and failures."""
    removed = _remove_leftovers(out, videos, only_theirs=isinstance(records, ShardRecords))
    if removed:
        logger.info("removed %d unfinished temporary folder(s) of an earlier run", removed)
    manifest, flags, earlier = records.start(videos)
    known = {v.folder for v in videos}
    stale = [f for f in manifest if f not in known and isinstance(records, PlainRecords)]
    if stale:
        logger.warning("%d manifest entries have no video under %s (kept), e.g. %s", len(stale), src, stale[0])
    todo = [v for v in videos if v.folder not in manifest]
    skipped = len(videos) - len(todo)
    if skipped:
        logger.info("%d of %d videos already extracted; %d to do", skipped, len(videos), len(todo))
    # Partial videos kept by an earlier run stay recorded as such.
    partial = {v.rel: earlier.get(v.rel, "partial, kept with --keep-partial by an earlier run")
               for v in videos if PARTIAL_FLAG in flags.get(v.folder, ())}
    failures: Dict[str, str] = {}
    extracted = 0
    appender = _ManifestAppender(records.appended)
    bar = tqdm(total=len(todo), desc="extracting", unit="video", disable=not progress, dynamic_ncols=True)

    def on_done(v: Video, status: str, value) -> None:
        nonlocal extracted
        if status == "ok":
            appender.add(v.folder, value.num_frames, value.flags)
            manifest[v.folder], flags[v.folder] = value.num_frames, value.flags
            failures.pop(v.rel, None)
            if value.partial:
                partial[v.rel] = value.partial
            extracted += 1
        else:
            failures[v.rel] = str(value)
            logger.warning("failed: %s: %s", v.rel, value)
        bar.update(1)
        bar.set_postfix(failed=len(failures), refresh=False)

    try:
        with logging_redirect_tqdm():
            _run_jobs(todo, workers, job_args, on_done)
    finally:
        bar.close()
        appender.close()
    manifest, flags = records.finish(manifest, flags, {**partial, **failures})
    logger.info("done: %d extracted, %d skipped, %d failed, %d partial (see %s)", extracted, skipped, len(failures),
                len(partial), out / FAILURES_NAME)
    return ExtractResult(manifest=manifest, failures=failures, videos=list(videos), extracted=extracted,
                         skipped=skipped, out=out, flags=flags, partial=partial)


# --------------------------------------------------------------------------------------------
# The manifest and failures of one run, or of one shard among several
# --------------------------------------------------------------------------------------------
SHARDS_DIR = ".shards"  # OUT/.shards/: each --shard run's own records and locks
_SHARD_FILE = re.compile(r"^(manifest|failures)-(\d+)-of-(\d+)\.txt$")


def shard_of(rel: str, count: int) -> int:
    """The shard (0-based, of ``count``) of the video ``rel`` (relative to SRC): a hash of the path, so every
    process on every machine computes the same disjoint subsets, also when SRC gains videos."""
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") % count


def parse_shard(spec: str) -> Tuple[int, int]:
    """``"I/N"`` -> (I, N), 1 <= I <= N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec or "")
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"--shard takes I/N with 1 <= I <= N (shard I of N, counted from 1), got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def _shard_files(out: Path) -> List[Tuple[str, int, int, Path]]:
    """(kind, index, count, path) of every shard record file under ``out/.shards``."""
    folder = out / SHARDS_DIR
    if not folder.is_dir():
        return []
    found = []
    for p in sorted(folder.iterdir()):
        m = _SHARD_FILE.match(p.name)
        if m:
            found.append((m.group(1), int(m.group(2)), int(m.group(3)), p))
    return found


def _read_manifest_if_any(path: Path) -> Dict[str, Tuple[int, Tuple[str, ...]]]:
    return _common.read_manifest_entries(path, strict=False) if path.is_file() else {}


def _write_manifest(path: Path, entries: Dict[str, Tuple[int, Tuple[str, ...]]]) -> None:
    _common.atomic_write_text(path, _manifest_text({f: n for f, (n, _) in entries.items()},
                                                   {f: fl for f, (_, fl) in entries.items()}))


class PlainRecords:
    """A run over all videos, alone in OUT: OUT/manifest.txt is appended to and rewritten sorted at the end; it
    takes in what ``--shard`` runs left in OUT/.shards (their manifests and failures), so it is also the way to
    merge the shards' records where the file system has no locks."""

    def __init__(self, out: Path):
        self.out = out
        self.appended = out / MANIFEST_NAME

    def start(self, videos: Sequence[Video]):
        """(manifest, flags, earlier failures) with only complete folders; manifest.txt rewritten that way."""
        previous = _read_manifest_if_any(self.appended)
        earlier = read_failures(self.out / FAILURES_NAME)
        shard_files = _shard_files(self.out)
        for kind, _, _, path in shard_files:
            if kind == "manifest":
                previous.update(_read_manifest_if_any(path))
            else:
                earlier.update(read_failures(path))
        manifest: Dict[str, int] = {}
        flags: Dict[str, Tuple[str, ...]] = {}
        for f, (n, fl) in previous.items():
            if folder_is_complete(self.out / f, n):
                manifest[f], flags[f] = n, fl
        if len(manifest) != len(previous):
            logger.info("%d manifest entries had no complete folder and will be redone", len(previous) - len(manifest))
        # Rewriting drops a partial last line: appending after it would glue two lines together.
        _common.atomic_write_text(self.appended, _manifest_text(manifest, flags))
        for kind, _, _, path in shard_files:
            if kind == "manifest":  # in manifest.txt now; the failures are kept until this run's are written
                path.unlink()
        self._earlier_shard_failures = [path for kind, _, _, path in shard_files if kind == "failures"]
        return manifest, flags, earlier

    def finish(self, manifest, flags, failures: Dict[str, str]):
        _common.atomic_write_text(self.appended, _manifest_text(manifest, flags))
        _common.atomic_write_text(self.out / FAILURES_NAME, _failures_text(failures))
        for path in self._earlier_shard_failures:
            path.unlink(missing_ok=True)
        if (self.out / SHARDS_DIR).is_dir() and not _shard_files(self.out):  # only the shards' lock files are left
            shutil.rmtree(self.out / SHARDS_DIR, ignore_errors=True)
        return manifest, flags


class ShardRecords:
    """Shard I of N, with the other shards' processes (other machines) writing into the same OUT.

    The shard appends its manifest lines to its own file, OUT/.shards/manifest-I-of-N.txt, and writes its failures
    to OUT/.shards/failures-I-of-N.txt. Merges into OUT/manifest.txt and OUT/failures.txt run under an exclusive
    lock (OUT/.shards/merge.lock), at the shard's start and end: manifest.txt becomes the union of itself and every
    shard's file, where the shard's own videos have exactly the entries it checked (complete folders) or made;
    failures.txt holds each shard's latest records. Only then, and only under a working lock, does the shard empty
    its own files. So a line is never lost (it is in manifest.txt or in its shard's file, which the next merge
    reads), never doubled (the union is by frames folder), whatever order the shards finish in, and a killed shard
    is resumed by running it again. Without working locks nothing is ever removed; a run without ``--shard``
    afterwards (or any shard's later merge) gives the complete files.
    """

    def __init__(self, out: Path, index: int, count: int, videos: Sequence[Video]):
        self.out, self.index, self.count = out, index, count
        folder = out / SHARDS_DIR
        folder.mkdir(exist_ok=True)  # under the shared lock: a run without --shard, which removes it, is not running
        self.appended = folder / f"manifest-{index}-of-{count}.txt"
        self.failures = folder / f"failures-{index}-of-{count}.txt"
        self.lock = folder / f"shard-{index}-of-{count}.lock"
        self.merge_lock = folder / "merge.lock"
        self.folders = {v.folder for v in videos}
        self.rels = {v.rel for v in videos}
        others = sorted({c for _, _, c, _ in _shard_files(out) if c != count})
        if others:
            raise RuntimeError(f"{out} holds the records of --shard runs over {others[0]} shards, not {count}: finish "
                               f"those (rerun them with --shard I/{others[0]}), or merge them with one run without "
                               f"--shard, before sharding the work another way")

    def _merge(self, mine: Dict[str, Tuple[int, Tuple[str, ...]]], done: bool) -> Dict:
        """Merge under the lock; then, if the lock is real, empty this shard's own files (``done``: remove them).

        Returns the merged manifest.
        """
        with _lock(self.merge_lock, wait=True) as locked:
            if locked:  # temporary files of a merge that was killed (every merge holds this lock)
                for p in self.out.glob(f"{TMP_PREFIX}*"):
                    if p.is_file() and p.name.startswith((f"{TMP_PREFIX}{MANIFEST_NAME}-",
                                                          f"{TMP_PREFIX}{FAILURES_NAME}-")):
                        p.unlink(missing_ok=True)
            merged = _read_manifest_if_any(self.out / MANIFEST_NAME)
            for kind, _, _, path in _shard_files(self.out):
                if kind == "manifest":
                    merged.update(_read_manifest_if_any(path))
            merged = {f: e for f, e in merged.items() if f not in self.folders}
            merged.update(mine)
            _write_manifest(self.out / MANIFEST_NAME, merged)
            failures = read_failures(self.out / FAILURES_NAME)
            owners = set()
            shard_failures: Dict[str, str] = {}
            for kind, index, _, path in _shard_files(self.out):
                if kind == "failures":
                    owners.add(index - 1)
                    shard_failures.update(read_failures(path))
            failures = {r: why for r, why in failures.items() if shard_of(r, self.count) not in owners}
            failures.update(shard_failures)
            _common.atomic_write_text(self.out / FAILURES_NAME, _failures_text(failures))
            if locked and done:  # both files are in the merged ones now
                self.appended.unlink(missing_ok=True)
                self.failures.unlink(missing_ok=True)
            elif locked:  # this shard's lines are in manifest.txt now: its own file restarts empty
                _common.atomic_write_text(self.appended, "")
            elif done:
                logger.warning("%s: no file locks here, so this shard's records stay in %s; once every shard is "
                               "done, run once without --shard to merge them for certain", self.out,
                               self.appended.parent)
            return merged

    def start(self, videos: Sequence[Video]):
        for p in self.appended.parent.glob(f"{TMP_PREFIX}*-{self.index}-of-{self.count}.txt-*"):
            p.unlink(missing_ok=True)  # this shard's own files' temporaries (it holds the shard lock)
        every = _read_manifest_if_any(self.out / MANIFEST_NAME)
        every.update(_read_manifest_if_any(self.appended))
        mine = {f: e for f, e in every.items() if f in self.folders and folder_is_complete(self.out / f, e[0])}
        if len(mine) != len([f for f in every if f in self.folders]):
            logger.info("%d manifest entries had no complete folder and will be redone",
                        len([f for f in every if f in self.folders]) - len(mine))
        self._merge(mine, done=False)
        earlier = {**read_failures(self.out / FAILURES_NAME), **read_failures(self.failures)}
        return {f: n for f, (n, _) in mine.items()}, {f: fl for f, (_, fl) in mine.items()}, earlier

    def finish(self, manifest, flags, failures: Dict[str, str]):
        _common.atomic_write_text(self.failures, _failures_text({r: w for r, w in failures.items() if r in self.rels}))
        mine = {f: (n, flags.get(f, ())) for f, n in manifest.items() if f in self.folders}
        merged = self._merge(mine, done=True)
        return {f: n for f, (n, _) in merged.items()}, {f: fl for f, (_, fl) in merged.items()}


# --------------------------------------------------------------------------------------------
# Labels from class folders
# --------------------------------------------------------------------------------------------
def labels_from_class_folders(videos: Sequence[Video], class_names: Sequence[str], source: str) -> Dict[str, int]:
    """Map each video's frames folder to the id of its parent folder's class.

    Raises ValueError naming every class folder that is not in the class list and every video that
    is not inside a class folder.
    """
    loose = [v.rel for v in videos if "/" not in v.rel]
    if loose:
        raise ValueError(
            f"{len(loose)} video(s) are not inside a class folder, e.g. {loose[0]!r}; "
            "--classes expects SRC/<class>/<video>"
        )
    parent = {v.folder: v.rel.split("/")[-2] for v in videos}
    ids = ClassMatcher(class_names, source).resolve(sorted(set(parent.values())), "class folder(s)")
    return {folder: ids[name] for folder, name in parent.items()}


def write_label_list(result: ExtractResult, labels: Dict[str, int], list_out) -> int:
    """Write ``<folder> <num_frames> <label>`` for every extracted video of ``labels``; returns the count."""
    lines = []
    missing = 0
    for folder in sorted(labels):
        if folder in result.manifest:
            lines.append(_common.format_list_line(folder, result.manifest[folder], labels[folder]))
        else:
            missing += 1
    if missing:
        logger.warning("%d video(s) failed and are not in %s", missing, list_out)
    _common.warn_comment_like(lines, list_out)
    return _common.write_list_file(list_out, lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
EPILOG = """\
examples:
  # UCF-101 at the original size, 8 worker processes
  python Dataset_creation_scripts/extract_frames.py data/UCF-101 data/ucf101_frames --workers 8

  # Kinetics-400, short side 256, JPEG quality 90; rerun the same command after a crash to resume
  python Dataset_creation_scripts/extract_frames.py data/k400/videos data/k400/frames --short-side 256

  # class-folder layout: also write a list file with labels from lists/ucf101_classes.csv
  python Dataset_creation_scripts/extract_frames.py data/UCF-101 data/ucf101_frames \\
      --classes lists/ucf101_classes.csv --list-out data/ucf101_all.txt

  # Kinetics-400 over 3 machines sharing SRC and OUT: one command each (I = 1, 2, 3), in any order
  python Dataset_creation_scripts/extract_frames.py data/k400/videos data/k400/frames --short-side 256 --shard 2/3

  # your own videos in class folders (SRC/<class>/<video>): frames, then lists and a config
  python Dataset_creation_scripts/extract_frames.py data/my_videos data/my_frames --short-side 256
  python Dataset_creation_scripts/build_lists.py folders data/my_frames --out-dir data/my_lists

outputs:
  OUT/<path relative to SRC without extension>/img_00001.jpg ...   the decoded frames, 1-based,
                      turned as decord shows the video (MP4/MOV display rotation)
  OUT/manifest.txt    a header line, then "<frames folder> <num_frames>" per finished video (sorted),
                      plus " rotation=<degrees>" if the frames were turned and " partial" (--keep-partial)
  OUT/failures.txt    "<video relative to SRC><TAB><reason>" per video that could not be read, and per
                      partial video ("partial, kept N frames: ...")
The manifest is not a list file (no labels): build_lists.py makes list files from it.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        description="Decode every video under SRC (recursively) into JPEG frame folders under OUT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="folder searched recursively for videos")
    p.add_argument("out", metavar="OUT", help="output folder for frames, manifest.txt and failures.txt")
    p.add_argument("--workers", type=int, default=_common.default_workers(),
                   help="worker processes (default: the CPUs this process may use; 0 decodes in this process)")
    p.add_argument("--short-side", type=int, default=0,
                   help="shrink so the shorter side has at most this many pixels, keeping the aspect ratio; smaller "
                        "videos are never enlarged (default 0: keep the size)")
    p.add_argument("--max-long-side", type=int, default=None,
                   help="then shrink further so the longer side has at most this many pixels, e.g. for a 4000x16 "
                        "video (default: 4 x --short-side; 0 = no bound)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    p.add_argument("--ext", nargs="+", default=list(VIDEO_EXTENSIONS), metavar="EXT",
                   help="video file extensions to look for (default: %(default)s)")
    p.add_argument("--keep-partial", action="store_true",
                   help="keep the frames decoded before a mid-stream decode error instead of failing the video "
                        "(marked 'partial' in manifest.txt and failures.txt)")
    p.add_argument("--keep-extension", action="store_true",
                   help="videos that would share a frames folder (a.mkv and a.mov) get folders named with the "
                        "extension (a.mkv/, a.mov/) instead of stopping the run")
    p.add_argument("--shard", metavar="I/N",
                   help="extract only shard I of N (1 <= I <= N; a stable subset chosen by a hash of each video's "
                        "path): N processes, on N machines, over one shared SRC and OUT; each merges its records "
                        "into OUT's manifest and failures, and a killed one is resumed by running it again")
    p.add_argument("--classes", metavar="CSV", help="class list 'id,name'; labels come from each video's parent folder")
    p.add_argument("--list-out", metavar="FILE", help="with --classes: write '<folder> <num_frames> <label>' here")
    _common.add_output_arguments(p)
    return p


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status (1 when failures.txt is not empty)."""
    args = build_parser().parse_args(argv)
    _common.setup_logging(args.verbose)
    if bool(args.classes) != bool(args.list_out):
        raise ValueError("--classes and --list-out go together")
    shard = parse_shard(args.shard) if args.shard else None
    if shard and args.list_out:
        raise ValueError("--list-out lists every video, which one shard does not have: run it once the shards are "
                         "done, without --shard (it extracts nothing again)")
    out = Path(args.out)
    videos = find_videos(args.src, args.ext, exclude=out, keep_extension=args.keep_extension)
    if not videos:
        raise ValueError(f"no videos with extensions {' '.join(args.ext)} under {args.src}")
    labels = None
    if args.classes:
        # Checked before any decoding: an unknown class folder should not cost hours of work first.
        labels = labels_from_class_folders(videos, read_classes_csv(args.classes), args.classes)
    result = run_extraction(
        args.src, out, workers=args.workers, short_side=args.short_side, quality=args.quality,
        keep_partial=args.keep_partial, progress=not args.no_progress, videos=videos, max_long_side=args.max_long_side,
        shard=shard,
    )
    if labels is not None:
        n = write_label_list(result, labels, args.list_out)
        logger.info("wrote %d lines to %s", n, args.list_out)
    return 1 if result.failures or result.partial else 0


if __name__ == "__main__":
    sys.exit(_common.run_cli(main))
