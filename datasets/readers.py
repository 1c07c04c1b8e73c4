"""Read selected frames of one video: a folder of frame images or a video file.

Frame folders hold one image per frame named by a template (``img_{:05d}.jpg``, first index 1 by
default); images are decoded by Pillow (libjpeg-turbo). A folder whose numbering has a gap is an
error naming the first missing file, not a shorter video. Video files are decoded by decord, which
seeks to the keyframe before each requested frame and decodes only from there, so its cost grows
with the keyframe interval. Where decord is not importable (no wheel for the platform), or cannot
open or decode a particular file (decord 0.6 fails on some frame widths, 1x1 videos among them),
PyAV is used instead: it decodes from the start up to the last requested frame, slower but
everywhere. The reader in use is logged once. Frames come back as uint8 ``(K, 3, H, W)`` views of
channels-last memory, which the resize in ``datasets.transforms`` processes fastest.

Orientation: frames come back as decord shows them, whichever reader decodes. decord applies the
display rotation of MP4/MOV files (phone videos: 90, 180 or 270 degrees) and ignores it in other
containers (Matroska/WebM); :func:`quarter_turns` states that rule once, and the PyAV reader and
``Dataset_creation_scripts/extract_frames.py`` follow it, so a video and its extracted frames agree.

Every failure to read a sample (missing frame, corrupt image, unreadable, empty or non-video file)
raises :class:`SampleLoadError`, whose message names the file; the dataset decides whether to skip
it. The reasons are worded here once and shared by the extraction and list tools.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import string
import sys
import tempfile
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from .lists import VIDEO_EXTENSIONS  # noqa: F401  (exported for the data tools)

logger = logging.getLogger(__name__)

__all__ = ["SampleLoadError", "load_frames", "open_source", "FrameFolder", "VideoFile",
           "video_backend", "set_video_backend", "count_frame_files", "check_video_file", "open_pyav",
           "quarter_turns", "rotate_frame", "decoding_failed", "short_stream", "error_text", "VIDEO_EXTENSIONS"]

_BACKEND: Optional[str] = None  # "decord" or "pyav", chosen on first use



class SampleLoadError(RuntimeError):
    """A video (or one of its frames) could not be read. ``path`` names the offending file."""

    def __init__(self, path: str, reason: str = ""):
        # One-argument construction must work too: DataLoader workers and pickling rebuild
        # exceptions from their message alone.
        super().__init__(f"{path}: {reason}" if reason else path)
        self.path = path
        self.reason = reason


def set_video_backend(name: Optional[str]) -> None:
    """Force the video reader (``"decord"`` or ``"pyav"``); ``None`` chooses again on next use."""
    global _BACKEND
    if name not in (None, "decord", "pyav"):
        raise ValueError(f"video backend must be 'decord', 'pyav' or None, got {name!r}")
    if name == "decord":
        _import_decord()  # fail here, not in the middle of an epoch
    _BACKEND = name
    if name is not None:
        logger.info("video reader: %s (set explicitly)", name)


def _import_decord():
    import decord
    # ffmpeg's own messages about broken files would otherwise flood stderr; we raise our own. (decord's C++
    # lines are not covered by this level: see _native_stderr_to_log.)
    decord.logging.set_level(decord.logging.QUIET)
    return decord


_CAPTURE: Dict[str, int] = {}  # {"pid": ..., "fd": ...}: one capture file per process (DataLoader workers fork)


def _capture_fd() -> int:
    if _CAPTURE.get("pid") != os.getpid():
        f = tempfile.TemporaryFile()
        _CAPTURE.update(pid=os.getpid(), fd=os.dup(f.fileno()))
        f.close()
    return _CAPTURE["fd"]


@contextmanager
def _native_stderr_to_log() -> Iterator[None]:
    """Send what C/C++ code writes to file descriptor 2 meanwhile to this module's debug log.

    decord's own C++ log lines (``[12:00:00] .../video_reader.cc:83: ERROR opening: ...``) go straight to
    fd 2, whatever decord.logging's level, and would land in the terminal before our one clear message.
    While this is active, anything another thread writes to stderr is captured too (and logged at debug
    level, not lost); the windows are the length of one decord call.
    """
    try:
        sys.stderr.flush()
        fd = _capture_fd()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (embedded interpreters): nothing to hide
        yield
        return
    os.dup2(fd, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError:
            text = ""
        if text:
            logger.debug("decord's own messages: %s", text)


def video_backend() -> str:
    """The video reader in use: decord when importable, PyAV otherwise (logged on first call)."""
    global _BACKEND
    if _BACKEND is None:
        try:
            decord = _import_decord()
            _BACKEND = "decord"
            logger.info("video reader: decord %s", getattr(decord, "__version__", ""))
        except ImportError as e:
            _BACKEND = "pyav"
            logger.info("video reader: PyAV (decord is not importable: %s)", e)
    return _BACKEND


@functools.lru_cache(maxsize=None)
def _template_regex(image_tmpl: str) -> "re.Pattern[str]":
    """A regex matching the file names of ``image_tmpl`` (``img_{:05d}.jpg`` -> ``img_(\\d+)\\.jpg``)."""
    parts = []
    for literal, field, _spec, _conv in string.Formatter().parse(image_tmpl):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(r"(\d+)")
    return re.compile("".join(parts) + r"\Z")


@functools.lru_cache(maxsize=None)
def _plain_decimal(image_tmpl: str) -> bool:
    """Whether ``image_tmpl`` has one index field written as plain or zero-padded decimal digits (``{}``, ``{:d}``,
    ``{:05d}``): then each of its names matches :func:`_template_regex` and gives back its own index."""
    fields = [(f, spec, conv) for _lit, f, spec, conv in string.Formatter().parse(image_tmpl) if f is not None]
    return (len(fields) == 1 and fields[0][0] in ("", "0") and fields[0][2] is None
            and re.fullmatch(r"(0\d*)?d?", fields[0][1]) is not None)


def count_frame_files(folder: str, image_tmpl: str = "img_{:05d}.jpg", index_start: int = 1) -> int:
    """Number of frame files ``image_tmpl.format(index_start + k)``, k = 0, 1, ..., in ``folder``.

    Raises:
        SampleLoadError: the folder cannot be listed, or its numbering has a gap (a frame file is missing
            while later ones exist); the error names the first missing file.
    """
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise SampleLoadError(folder, f"cannot list the frames folder ({e.strerror or e})") from e
    # The usual folder holds its frame files and nothing else: then there is no gap, and the per-name scan below
    # (the dataset counts for every sample, ~1 us a name) would find exactly len(names).
    if index_start >= 0 and _plain_decimal(image_tmpl) and \
            set(names) == set(map(image_tmpl.format, range(index_start, index_start + len(names)))):
        return len(names)
    pattern = _template_regex(image_tmpl)
    present = set()
    for name in names:
        m = pattern.match(name)
        if m and image_tmpl.format(int(m.group(1))) == name:
            present.add(int(m.group(1)))
    k = 0
    while index_start + k in present:
        k += 1
    later = sorted(i for i in present if i > index_start + k)
    if later:
        missing = image_tmpl.format(index_start + k)
        raise SampleLoadError(os.path.join(folder, missing),
                              f"missing frame file: the frames folder has a gap ({len(later)} frame file(s) "
                              f"follow it, up to {image_tmpl.format(later[-1])})")
    return k


class FrameFolder:
    """A video stored as one image file per frame."""

    def __init__(self, path: str, image_tmpl: str = "img_{:05d}.jpg", index_start: int = 1):
        self.path = path
        self.image_tmpl = image_tmpl
        self.index_start = index_start
        self._num_frames: Optional[int] = None

    @property
    def num_frames(self) -> int:
        """Frame files present, counted on first use (consecutive from ``index_start``; a gap is an error)."""
        if self._num_frames is None:
            self._num_frames = count_frame_files(self.path, self.image_tmpl, self.index_start)
        return self._num_frames

    def checked_count(self, listed: int) -> int:
        """The frames to sample from: a list file's count ``listed`` (0: the files present), checked against
        the folder, so that a gap or a missing tail is an error naming the first missing file."""
        present = self.num_frames
        if listed > present:
            missing = self.image_tmpl.format(self.index_start + present)
            raise SampleLoadError(os.path.join(self.path, missing),
                                  f"missing frame file: the list gives {listed} frames, the folder has {present}")
        return listed if listed > 0 else present

    def _read_one(self, index: int) -> np.ndarray:
        file = os.path.join(self.path, self.image_tmpl.format(self.index_start + index))
        try:
            with open(file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise SampleLoadError(file, f"cannot read frame {index} ({e.strerror or e})") from e
        if not data:
            raise SampleLoadError(file, "frame file is empty (0 bytes)")
        try:
            with Image.open(io.BytesIO(data)) as img:
                # (H, W, 3) uint8; convert() decodes fully, so truncated files fail here.
                return np.asarray(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for corrupt/truncated images
            raise SampleLoadError(file, f"cannot decode frame image ({e})") from e

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at 0-based ``indices`` -> uint8 ``(len(indices), 3, H, W)``; repeats decoded once."""
        unique = sorted(set(int(i) for i in indices))
        decoded: Dict[int, np.ndarray] = {i: self._read_one(i) for i in unique}
        shapes = {a.shape for a in decoded.values()}
        if len(shapes) > 1:
            raise SampleLoadError(self.path, f"frames have different sizes {sorted(shapes)}")
        import torch  # imported on first use: the data tools use this module without torch

        frames = torch.from_numpy(np.stack([decoded[int(i)] for i in indices]))  # (K, H, W, 3)
        # -> (K, 3, H, W) as a channels-last view, like the video reader
        return frames.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- video files
# Image formats by their first bytes: a JPEG renamed .mp4 must be a failure, not a 1-frame video (PyAV opens it).
_IMAGE_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
                (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
_IMAGE_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF"}  # ISO-BMFF stills (ftyp brand)


def _image_kind(head: bytes) -> Optional[str]:
    for magic, kind in _IMAGE_MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:2] == b"BM" and head[6:10] == b"\x00\x00\x00\x00":
        return "BMP"
    if head[4:8] == b"ftyp":
        return _IMAGE_BRANDS.get(head[8:12])
    return None


def check_video_file(path: str) -> None:
    """Checks before any decoder sees ``path``: it exists, is readable, is not empty and is not an image.

    Raises:
        SampleLoadError: with the reason every tool reports for that case.
    """
    if not os.path.isfile(path):
        raise SampleLoadError(path, "video file not found")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:  # permission denied, I/O error: not "cannot open video"
        raise SampleLoadError(path, f"cannot read the video file ({e.strerror or e})") from e
    if not head:
        raise SampleLoadError(path, "video file is empty (0 bytes)")
    kind = _image_kind(head)
    if kind is not None:
        raise SampleLoadError(path, f"not a video: the file holds a {kind} image")


def error_text(e: BaseException) -> str:
    """The useful part of a decoder error: first line, without decord's '[time] file.cc:line: '."""
    lines = str(e).strip().splitlines()
    text = re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", lines[0]) if lines else type(e).__name__
    return text[:300]



def decoding_failed(decoded: int, error: BaseException) -> str:
    """The reason for a stream that fails after ``decoded`` frames (0: fails at once)."""
    if decoded == 0:
        return f"cannot decode video ({error_text(error)})"
    return f"decoding failed after {decoded} frames (truncated or corrupt?): {error_text(error)}"


def short_stream(decoded: int, announced: int) -> Optional[str]:
    """The reason when a stream ends cleanly well before the frame count in its header, else None.

    A small overestimate in the header is common and harmless; a large gap means a truncated file.
    """
    if announced - decoded > max(2, announced // 50):
        return f"video ends after {decoded} of the {announced} frames its header announces (truncated?)"
    return None


def open_pyav(path: str):
    """``av.open(path)`` for a file that holds a video stream; raises SampleLoadError with the shared reasons."""
    import av
    try:
        container = av.open(path)
    except Exception as e:  # av raises av.error.* (OSError/ValueError subclasses)
        raise SampleLoadError(path, f"cannot open video ({error_text(e)})") from e
    fmt = container.format.name
    if fmt == "image2" or fmt.endswith("_pipe"):  # ffmpeg's still-image demuxers (jpeg_pipe, png_pipe, ...)
        container.close()
        raise SampleLoadError(path, f"not a video: the file holds a {fmt.replace('_pipe', '').upper()} image")
    if not container.streams.video:
        container.close()
        raise SampleLoadError(path, "no video stream in the file")
    return container


_WARNED_ROTATION: set = set()


def quarter_turns(container, frame) -> int:
    """Counter-clockwise quarter turns (0-3) that show ``frame`` of ``container`` (PyAV) as decord does.

    decord 0.6 rotates MP4/MOV frames by their display rotation when it is 90, 180 or 270 degrees (what
    players show for phone videos) and leaves every other container's frames as stored. The display
    rotation is PyAV's ``frame.rotation`` (counter-clockwise degrees), or the ``rotate`` tag (clockwise)
    that older ffmpeg versions set.
    """
    if not {"mov", "mp4"} & set(container.format.name.split(",")):
        return 0
    degrees = getattr(frame, "rotation", None)
    if degrees is None:
        try:
            degrees = -int(container.streams.video[0].metadata.get("rotate", 0))
        except (TypeError, ValueError):
            degrees = 0
    degrees = round(float(degrees)) % 360
    if degrees % 90:
        if container.name not in _WARNED_ROTATION:
            _WARNED_ROTATION.add(container.name)
            logger.warning("%s: display rotation of %d degrees is not a multiple of 90; frames are kept as "
                           "stored (as decord keeps them)", container.name, degrees)
        return 0
    return degrees // 90


def rotate_frame(image: np.ndarray, turns: int) -> np.ndarray:
    """(H, W, C) ``image`` turned ``turns`` quarter turns counter-clockwise (contiguous)."""
    return np.ascontiguousarray(np.rot90(image, turns)) if turns % 4 else image


class VideoFile:
    """A video container read by decord (PyAV where decord is missing or fails on this file)."""

    def __init__(self, path: str, backend: Optional[str] = None, num_threads: int = 1):
        """Open ``path``. ``num_threads`` decoder threads: 1 suits DataLoader workers (many processes)."""
        self.path = path
        self.backend = backend or video_backend()
        self.num_threads = num_threads
        self._vr = None
        self._num_frames: Optional[int] = None
        check_video_file(path)
        if self.backend == "decord":
            decord = _import_decord()
            try:
                with _native_stderr_to_log():
                    self._vr = decord.VideoReader(path, num_threads=num_threads)
                self._num_frames = len(self._vr)
            except Exception as e:  # decord raises its own DECORDError / RuntimeError for any failure
                self._fall_back(f"decord cannot open it ({error_text(e)})")

    def _fall_back(self, why: str) -> None:
        """Read this file with PyAV from now on; a file PyAV cannot open either fails with PyAV's reason."""
        self._vr = None
        self._num_frames = None
        self.backend = "pyav"
        self._pyav_open().close()  # raises SampleLoadError: the reason every tool gives for this file
        logger.debug("%s: %s; reading it with PyAV", self.path, why)

    @property
    def num_frames(self) -> int:
        """Frame count from the container (decord's index; PyAV's header count or a demux pass)."""
        if self._num_frames is None:
            self._num_frames = self._pyav_count()
        return self._num_frames

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at 0-based ``indices`` -> uint8 ``(len(indices), 3, H, W)``.

        Indices past the end are clamped to the last frame: list files and containers sometimes
        disagree by a frame or two about the length.
        """
        import torch

        n = self.num_frames
        if n <= 0:
            raise SampleLoadError(self.path, "video has no frames")
        idx = np.minimum(np.asarray(indices, dtype=np.int64), n - 1)
        frames = None
        if self.backend == "decord":
            unique, inverse = np.unique(idx, return_inverse=True)
            try:
                with _native_stderr_to_log():
                    batch = self._vr.get_batch(unique.tolist()).asnumpy()  # (K, H, W, 3)
                frames = torch.from_numpy(batch)[torch.from_numpy(inverse.reshape(-1))]
            except Exception as e:
                self._fall_back(f"decord cannot decode it ({error_text(e)})")
                n = self.num_frames
                idx = np.minimum(np.asarray(indices, dtype=np.int64), n - 1)
        if frames is None:
            frames = self._pyav_read(idx)
        # (K, H, W, 3) -> (K, 3, H, W); a view with channels-last memory, which resize handles fast.
        return frames.permute(0, 3, 1, 2)

    def _pyav_open(self):
        return open_pyav(self.path)

    def _pyav_count(self) -> int:
        container = self._pyav_open()
        try:
            stream = container.streams.video[0]
            if stream.frames and stream.frames > 0:
                return int(stream.frames)
            # Some containers (webm, some avi) carry no frame count: count the packets instead,
            # which demuxes without decoding.
            return sum(1 for p in container.demux(stream) if p.size > 0)
        except Exception as e:
            raise SampleLoadError(self.path, f"cannot read the video ({error_text(e)})") from e
        finally:
            container.close()

    def _pyav_read(self, idx: np.ndarray) -> torch.Tensor:
        wanted = set(idx.tolist())
        last = max(wanted)
        got: Dict[int, np.ndarray] = {}
        decoded = 0
        turns = 0
        error: Optional[Exception] = None
        container = self._pyav_open()
        try:
            stream = container.streams.video[0]
            stream.thread_count = self.num_threads
            # Decoding in order is the only frame-exact way without an index; stop at the last one.
            for k, frame in enumerate(container.decode(stream)):
                if k == 0:
                    turns = quarter_turns(container, frame)
                decoded = k + 1
                if k in wanted:
                    got[k] = rotate_frame(frame.to_ndarray(format="rgb24"), turns)
                if k >= last:
                    break
        except Exception as e:  # av.error.InvalidDataError etc.: a truncated or corrupt stream
            error = e
        finally:
            container.close()
        if last not in got:
            if error is not None:
                raise SampleLoadError(self.path, decoding_failed(decoded, error)) from error
            if not got:
                raise SampleLoadError(self.path, "video has no frames")
            # The stream ended cleanly before the count in its header.
            reason = short_stream(decoded, self.num_frames)
            if reason:
                raise SampleLoadError(self.path, reason)
            logger.debug("%s: %d frames decoded, header says %d", self.path, decoded, self.num_frames)
        import torch

        last_ok = max(got)
        frames = [got[k] if k in got else got[last_ok] for k in idx.tolist()]
        return torch.from_numpy(np.stack(frames))


def open_source(path: str, image_tmpl: str = "img_{:05d}.jpg", index_start: int = 1):
    """A :class:`FrameFolder` when ``path`` is a folder, else a :class:`VideoFile`."""
    if os.path.isdir(path):
        return FrameFolder(path, image_tmpl, index_start)
    if not os.path.exists(path):
        raise SampleLoadError(path, "no such frames folder or video file")
    return VideoFile(path)


def load_frames(path: str, indices: Sequence[int], image_tmpl: str = "img_{:05d}.jpg",
                index_start: int = 1) -> torch.Tensor:
    """Read the frames at 0-based ``indices`` of a frames folder or a video file.

    Args:
        path: a folder of frame images or a video file.
        indices: 0-based frame offsets; for folders the file read is
            ``image_tmpl.format(index_start + i)``.
        image_tmpl, index_start: frame file naming (ignored for video files).

    Returns:
        uint8 tensor ``(len(indices), 3, H, W)``, RGB.

    Raises:
        SampleLoadError: naming the missing or unreadable file.
    """
    return open_source(path, image_tmpl, index_start).read(indices)
