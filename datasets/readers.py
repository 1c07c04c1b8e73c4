"""Read selected frames of one video: a folder of frame images or a video file.

Frame folders hold one image per frame named by a template (``img_{:05d}.jpg``, first index 1 by
default); images are decoded by Pillow (libjpeg-turbo). Video files are decoded by decord, which
seeks to the keyframe before each requested frame and decodes only from there, so its cost grows
with the keyframe interval. Where decord is not importable (no wheel for the platform) PyAV is used
instead: it decodes from the start up to the last requested frame, slower but everywhere. The reader
in use is logged once. Frames come back as uint8 ``(K, 3, H, W)`` views of channels-last memory,
which the resize in ``datasets.transforms`` processes fastest.

Every failure to read a sample (missing frame, corrupt image, unreadable or empty video) raises
:class:`SampleLoadError`, whose message names the file; the dataset decides whether to skip it.
"""

from __future__ import annotations

import io
import logging
import os
import re
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["SampleLoadError", "load_frames", "open_source", "FrameFolder", "VideoFile",
           "video_backend", "set_video_backend", "count_frame_files"]

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
    # ffmpeg's own messages about broken files would otherwise flood stderr; we raise our own.
    decord.logging.set_level(decord.logging.QUIET)
    return decord


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


def count_frame_files(folder: str, image_tmpl: str = "img_{:05d}.jpg", index_start: int = 1) -> int:
    """Number of consecutive frame files ``image_tmpl.format(index_start + k)`` in ``folder``."""
    try:
        names = set(os.listdir(folder))
    except OSError as e:
        raise SampleLoadError(folder, f"cannot list the frames folder ({e.strerror or e})") from e
    k = 0
    while image_tmpl.format(index_start + k) in names:
        k += 1
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
        """Frame files present, counted on first use (consecutive from ``index_start``)."""
        if self._num_frames is None:
            self._num_frames = count_frame_files(self.path, self.image_tmpl, self.index_start)
        return self._num_frames

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
        frames = torch.from_numpy(np.stack([decoded[int(i)] for i in indices]))  # (K, H, W, 3)
        # -> (K, 3, H, W) as a channels-last view, like the video reader
        return frames.permute(0, 3, 1, 2)


class VideoFile:
    """A video container read by decord (or PyAV when decord is missing)."""

    def __init__(self, path: str, backend: Optional[str] = None, num_threads: int = 1):
        """Open ``path``. ``num_threads`` decoder threads: 1 suits DataLoader workers (many processes)."""
        self.path = path
        self.backend = backend or video_backend()
        self.num_threads = num_threads
        self._vr = None
        self._num_frames: Optional[int] = None
        if not os.path.isfile(path):
            raise SampleLoadError(path, "video file not found")
        if os.path.getsize(path) == 0:
            raise SampleLoadError(path, "video file is empty (0 bytes)")
        if self.backend == "decord":
            decord = _import_decord()
            try:
                self._vr = decord.VideoReader(path, num_threads=num_threads)
            except Exception as e:  # decord raises its own DECORDError / RuntimeError for any failure
                raise SampleLoadError(path, f"cannot open video ({_short(e)})") from e
            self._num_frames = len(self._vr)

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
        n = self.num_frames
        if n <= 0:
            raise SampleLoadError(self.path, "video has no decodable frames")
        idx = np.minimum(np.asarray(indices, dtype=np.int64), n - 1)
        if self.backend == "decord":
            unique, inverse = np.unique(idx, return_inverse=True)
            try:
                frames = self._vr.get_batch(unique.tolist()).asnumpy()  # (K, H, W, 3)
            except Exception as e:
                raise SampleLoadError(self.path, f"cannot decode frames ({_short(e)})") from e
            frames = torch.from_numpy(frames)[torch.from_numpy(inverse.reshape(-1))]
        else:
            frames = self._pyav_read(idx)
        # (K, H, W, 3) -> (K, 3, H, W); a view with channels-last memory, which resize handles fast.
        return frames.permute(0, 3, 1, 2)

    def _pyav_open(self):
        import av
        try:
            container = av.open(self.path)
        except Exception as e:  # av raises av.error.* (OSError/ValueError subclasses)
            raise SampleLoadError(self.path, f"cannot open video ({_short(e)})") from e
        if not container.streams.video:
            container.close()
            raise SampleLoadError(self.path, "no video stream in the file")
        return container

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
            raise SampleLoadError(self.path, f"cannot read the video ({_short(e)})") from e
        finally:
            container.close()

    def _pyav_read(self, idx: np.ndarray) -> torch.Tensor:
        wanted = set(idx.tolist())
        last = max(wanted)
        got: Dict[int, np.ndarray] = {}
        decoded = 0
        error: Optional[Exception] = None
        container = self._pyav_open()
        try:
            stream = container.streams.video[0]
            stream.thread_count = self.num_threads
            # Decoding in order is the only frame-exact way without an index; stop at the last one.
            for k, frame in enumerate(container.decode(stream)):
                decoded = k + 1
                if k in wanted:
                    got[k] = frame.to_ndarray(format="rgb24")
                if k >= last:
                    break
        except Exception as e:  # av.error.InvalidDataError etc.: a truncated or corrupt stream
            error = e
        finally:
            container.close()
        if last not in got:
            if error is not None:
                raise SampleLoadError(self.path, f"decoding failed after {decoded} frames, frame {last} "
                                      f"requested (truncated or corrupt?): {_short(error)}") from error
            if not got:
                raise SampleLoadError(self.path, "video has no decodable frames")
            # The stream ended cleanly before the count in its header: a small overestimate is
            # common and harmless (use the last frame), a large gap means a truncated file.
            if self.num_frames - decoded > max(2, self.num_frames // 50):
                raise SampleLoadError(self.path, f"video ends after {decoded} of the {self.num_frames} "
                                      "frames its header announces (truncated?)")
            logger.debug("%s: %d frames decoded, header says %d", self.path, decoded, self.num_frames)
        last_ok = max(got)
        frames = [got[k] if k in got else got[last_ok] for k in idx.tolist()]
        return torch.from_numpy(np.stack(frames))


def _short(e: Exception) -> str:
    """The useful part of a decoder error: first line, without decord's '[time] file.cc:line: '."""
    lines = str(e).strip().splitlines()
    text = re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", lines[0]) if lines else type(e).__name__
    return text[:300]


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
