#!/usr/bin/env python
"""Decode every video under SRC into JPEG frame folders under OUT (resumable, atomic, parallel).

Contract (docs: ARCHITECTURE.md):
  * ``SRC/<dirs>/<name>.<ext>`` becomes ``OUT/<dirs>/<name>/img_00001.jpg, img_00002.jpg, ...``:
    exactly the decoded frames, in presentation order, 1-based.
  * ``OUT/manifest.txt``: one line ``<folder relative to OUT> <num_frames>`` per finished video,
    sorted at the end of a run (a rerun and a clean run give identical files).
  * ``OUT/failures.txt``: one line ``<video relative to SRC><TAB><reason>`` per video that could not be
    read in the latest run; rewritten on every run (failed videos are retried).

Safety: a video's frames go to a hidden sibling ``.tmp-<name>-<pid>`` that is renamed into place only
once complete; the manifest line is appended (flush + fsync) only after that rename; a rerun skips
videos that are in the manifest with their folder present, removes ``.tmp-*`` leftovers and drops
an unfinished last manifest line. A worker process that dies (killed, out of memory, a decoder
crash) does not hang the run: the videos it may have been working on are retried one at a time and
the one that kills its worker again is recorded as a failure.
"""

from __future__ import annotations

import argparse
import logging
import os
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
from _common import FAILURES_NAME, MANIFEST_NAME, ClassMatcher, read_classes_csv

logger = logging.getLogger("extract_frames")

VIDEO_EXTENSIONS = (
    ".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ogv", ".ts",
)
TMP_PREFIX = ".tmp-"
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
    """What a run left on disk: the manifest, the failures and how much work this run did."""

    manifest: Dict[str, int]
    failures: Dict[str, str]  # video rel path -> reason
    videos: List[Video]
    extracted: int = 0
    skipped: int = 0
    out: Path = field(default_factory=Path)


# --------------------------------------------------------------------------------------------
# Finding videos
# --------------------------------------------------------------------------------------------
def find_videos(src, extensions: Sequence[str] = VIDEO_EXTENSIONS, exclude=None) -> List[Video]:
    """Every video file under ``src`` (recursively, sorted), skipping hidden names and ``exclude``.

    Raises ValueError when two videos would share a frames folder (``a.mp4`` and ``a.avi``) or a
    frames folder would sit inside another one.
    """
    src = Path(src).resolve()
    if not src.is_dir():
        raise NotADirectoryError(f"SRC is not a folder: {src}")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    exclude = Path(exclude).resolve() if exclude is not None else None
    videos: List[Video] = []
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
            folder = rel[: len(rel) - len(ext)]
            videos.append(Video(path=str(full), rel=rel, folder=folder))
    videos.sort(key=lambda v: v.rel)
    _check_folders_distinct(videos)
    return videos


def _check_folders_distinct(videos: Sequence[Video]) -> None:
    by_folder: Dict[str, str] = {}
    for v in videos:
        if v.folder in by_folder:
            raise ValueError(
                f"{by_folder[v.folder]!r} and {v.rel!r} would both be extracted to {v.folder!r}; "
                "rename one of them or move it out of SRC"
            )
        by_folder[v.folder] = v.rel
    for v in videos:
        parts = v.folder.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in by_folder:
                raise ValueError(
                    f"the frames of {by_folder[parent]!r} would go to {parent!r}, which also holds the "
                    f"frames folder of {v.rel!r}; move one of the two videos"
                )


# --------------------------------------------------------------------------------------------
# Extracting one video (runs in a worker process)
# --------------------------------------------------------------------------------------------
class ExtractError(RuntimeError):
    """A video could not be read; the message is the reason written to failures.txt."""


def resized_size(width: int, height: int, short_side: int) -> Tuple[int, int]:
    """Output (width, height) with the short side equal to ``short_side`` (0 keeps the size)."""
    if short_side <= 0 or min(width, height) == short_side:
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


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


def extract_video(
    video_path: str,
    out_root: str,
    folder: str,
    short_side: int = 0,
    quality: int = 90,
    keep_partial: bool = False,
    fault: Optional[Tuple[str, int]] = None,
) -> int:
    """Decode ``video_path`` into ``out_root/folder/img_XXXXX.jpg``; returns the number of frames.

    The frames are written into a temporary sibling folder that replaces ``folder`` only when every
    frame is written. Raises :class:`ExtractError` (nothing left behind) when the video cannot be read.
    """
    import av  # imported here so that `--help` works without PyAV
    from av.video.reformatter import Interpolation

    final = Path(out_root) / folder
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    n = 0
    try:
        try:
            with av.open(video_path) as container:
                if not container.streams.video:
                    raise ExtractError("no video stream")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for frame in container.decode(stream):
                    w, h = resized_size(frame.width, frame.height, short_side)
                    if (w, h) == (frame.width, frame.height):
                        img = frame.to_image()
                    else:
                        # AREA averages when shrinking (no aliasing); BILINEAR when enlarging.
                        interp = Interpolation.AREA if w < frame.width else Interpolation.BILINEAR
                        img = frame.to_image(width=w, height=h, interpolation=interp)
                    n += 1
                    img.save(tmp / frame_name(n), format="JPEG", quality=quality)
                    if fault is not None and n == fault[1]:
                        _trigger_fault(fault[0])
        except ExtractError:
            raise
        except (av.FFmpegError, OSError, ValueError, RuntimeError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if n == 0:
                raise ExtractError(f"cannot decode: {reason}") from None
            if not keep_partial:
                raise ExtractError(f"decode error after {n} frames: {reason}") from None
            logger.warning("%s: decode error after %d frames, keeping them (--keep-partial): %s", video_path, n, reason)
        if n == 0:
            raise ExtractError("no frames could be decoded")
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return n


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``; an existing ``final`` (not in the manifest) is replaced."""
    if final.exists():
        # A complete folder not in the manifest (killed between rename and manifest write) or a
        # stale one: move it aside first so that `final` is never half old, half new.
        old = final.parent / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
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


def _job(video: Video, out_root: str, short_side: int, quality: int, keep_partial: bool):
    """Worker entry point: ("ok", n) or ("fail", reason); unexpected errors become failures too."""
    try:
        n = extract_video(video.path, out_root, video.folder, short_side, quality, keep_partial, _parse_fault(video.rel))
        return "ok", n
    except ExtractError as exc:
        return "fail", str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad video must never stop the run
        return "fail", f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
@contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Refuse a second concurrent run on the same OUT (it would delete the first one's temporaries)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another extract_frames.py run is using {out} (lock {out / LOCK_NAME})") from None
        yield
    finally:
        os.close(fd)


def folder_is_complete(folder: Path, num_frames: int) -> bool:
    """True when ``folder`` holds frames 1..num_frames (checks the last one and that no extra follows)."""
    return num_frames > 0 and (folder / frame_name(num_frames)).is_file() and not (folder / frame_name(num_frames + 1)).exists()


def _remove_leftovers(out: Path, videos: Sequence[Video]) -> int:
    """Delete ``.tmp-*`` entries next to any frames folder (leftovers of a killed run)."""
    parents = {out} | {(out / v.folder).parent for v in videos}
    removed = 0
    for parent in sorted(parents):
        if not parent.is_dir():
            continue
        with os.scandir(parent) as it:
            for entry in it:
                if entry.name.startswith(TMP_PREFIX):
                    path = Path(entry.path)
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                    removed += 1
    return removed


def _manifest_text(manifest: Dict[str, int]) -> str:
    return "".join(f"{folder} {n}\n" for folder, n in sorted(manifest.items()))


def _failures_text(failures: Dict[str, str]) -> str:
    return "".join(f"{rel}\t{' '.join(reason.split())}\n" for rel, reason in sorted(failures.items()))


class _ManifestAppender:
    """Append one line per finished video; flush + fsync so that a kill loses at most a partial line."""

    def __init__(self, path: Path):
        self._f = open(path, "a", encoding="utf-8", newline="\n")

    def add(self, folder: str, n: int) -> None:
        self._f.write(f"{folder} {n}\n")
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
) -> ExtractResult:
    """Extract every video under ``src`` into ``out``; resumable, see the module docstring.

    Returns the manifest (all finished videos in ``out``), the failures of this run and counts.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {quality}")
    if short_side < 0:
        raise ValueError(f"--short-side must be >= 0, got {short_side}")
    src = Path(src).resolve()
    out = Path(out).resolve()
    if videos is None:
        videos = find_videos(src, extensions, exclude=out)
    if workers is None:
        workers = _common.default_workers()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_NAME
    with _lock(out):
        removed = _remove_leftovers(out, videos)
        if removed:
            logger.info("removed %d unfinished temporary folder(s) of an earlier run", removed)
        manifest: Dict[str, int] = {}
        if manifest_path.exists():
            previous = _common.read_manifest(manifest_path, strict=False)
            manifest = {f: n for f, n in previous.items() if folder_is_complete(out / f, n)}
            if len(manifest) != len(previous):
                logger.info("%d manifest entries had no complete folder and will be redone", len(previous) - len(manifest))
        known = {v.folder for v in videos}
        stale = [f for f in manifest if f not in known]
        if stale:
            logger.warning("%d manifest entries have no video under %s (kept), e.g. %s", len(stale), src, stale[0])
        # Rewriting drops a partial last line: appending after it would glue two lines together.
        _common.atomic_write_text(manifest_path, _manifest_text(manifest))

        todo = [v for v in videos if v.folder not in manifest]
        skipped = len(videos) - len(todo)
        if skipped:
            logger.info("%d of %d videos already extracted; %d to do", skipped, len(videos), len(todo))
        failures: Dict[str, str] = {}
        extracted = 0
        appender = _ManifestAppender(manifest_path)
        bar = tqdm(total=len(todo), desc="extracting", unit="video", disable=not progress, dynamic_ncols=True)

        def on_done(v: Video, status: str, value) -> None:
            nonlocal extracted
            if status == "ok":
                appender.add(v.folder, int(value))
                manifest[v.folder] = int(value)
                failures.pop(v.rel, None)
                extracted += 1
            else:
                failures[v.rel] = str(value)
                logger.warning("failed: %s: %s", v.rel, value)
            bar.update(1)
            bar.set_postfix(failed=len(failures), refresh=False)

        try:
            with logging_redirect_tqdm():
                _run_jobs(todo, workers, (str(out), short_side, quality, keep_partial), on_done)
        finally:
            bar.close()
            appender.close()
        _common.atomic_write_text(manifest_path, _manifest_text(manifest))
        _common.atomic_write_text(out / FAILURES_NAME, _failures_text(failures))
    logger.info(
        "done: %d extracted, %d skipped, %d failed (see %s)", extracted, skipped, len(failures), out / FAILURES_NAME
    )
    return ExtractResult(manifest=manifest, failures=failures, videos=list(videos), extracted=extracted, skipped=skipped, out=out)


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
    return _common.write_lines_atomic(list_out, lines)


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

outputs:
  OUT/<path relative to SRC without extension>/img_00001.jpg ...   the decoded frames, 1-based
  OUT/manifest.txt    "<frames folder> <num_frames>" per finished video (sorted)
  OUT/failures.txt    "<video relative to SRC><TAB><reason>" per video that could not be read
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
                   help="resize so the shorter side has this many pixels, keeping the aspect ratio (0 = keep size)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    p.add_argument("--ext", nargs="+", default=list(VIDEO_EXTENSIONS), metavar="EXT",
                   help="video file extensions to look for (default: %(default)s)")
    p.add_argument("--keep-partial", action="store_true",
                   help="keep the frames decoded before a mid-stream decode error instead of failing the video")
    p.add_argument("--classes", metavar="CSV", help="class list 'id,name'; labels come from each video's parent folder")
    p.add_argument("--list-out", metavar="FILE", help="with --classes: write '<folder> <num_frames> <label>' here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status (1 when some videos failed)."""
    args = build_parser().parse_args(argv)
    _common.setup_logging(args.verbose)
    if bool(args.classes) != bool(args.list_out):
        raise ValueError("--classes and --list-out go together")
    out = Path(args.out)
    videos = find_videos(args.src, args.ext, exclude=out)
    if not videos:
        raise ValueError(f"no videos with extensions {' '.join(args.ext)} under {args.src}")
    labels = None
    if args.classes:
        # Checked before any decoding: an unknown class folder should not cost hours of work first.
        labels = labels_from_class_folders(videos, read_classes_csv(args.classes), args.classes)
    result = run_extraction(
        args.src, out, workers=args.workers, short_side=args.short_side, quality=args.quality,
        keep_partial=args.keep_partial, progress=not args.no_progress, videos=videos,
    )
    if labels is not None:
        n = write_label_list(result, labels, args.list_out)
        logger.info("wrote %d lines to %s", n, args.list_out)
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(_common.run_cli(main))
