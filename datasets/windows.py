"""Fixed-length windows over a long video, each turned into test views, in one streaming pass.

A long video is cut into windows of ``window`` frames every ``stride`` frames (:func:`plan_windows`); every window
is treated as one short video and gets exactly the dataset's test views (``sample_test_views``: the configured
test-time frame sampling over the window's frames, the test transform), so a window is scored as test.py scores a
clip.

Video files are decoded once, front to back, by PyAV (:class:`WindowStream`). Only the frames that a window still
to be emitted will sample are kept (as decoded RGB arrays), and each is dropped as soon as the last window that
samples it has been emitted: memory is bounded by the frames of the windows that overlap the decoding position
(about ``ceil(window / stride) * views * T`` frames), whatever the length of the video. Frames that no window
samples are decoded (inter-frame codecs need them) but never converted to RGB. Frame folders are read window by
window, as they allow random access.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from .readers import (FrameFolder, SampleLoadError, VideoFile, decoding_failed, open_pyav, quarter_turns,
                      rotate_frame, short_stream)
from .sampling import sample_indices
from .video_dataset import sample_test_views

logger = logging.getLogger(__name__)

__all__ = ["Window", "parse_span", "plan_windows", "window_frames", "video_info", "WindowStream",
           "expected_cache_bound"]

_SPAN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|ms|f|frames?)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Window:
    """Frames ``[start, start + length)`` of a video (0-based); ``index`` is its place in the timeline."""

    index: int
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def centre(self) -> float:
        return self.start + self.length / 2


def parse_span(spec: str, fps: Optional[float], what: str = "--window") -> int:
    """A duration as given on the command line -> frames (>= 1).

    ``"2s"``, ``"1.5s"``, ``"500ms"``: seconds (needs ``fps``); ``"16f"``, ``"16frames"`` or a bare ``"16"``: frames.
    Raises ValueError naming ``what`` for anything else.
    """
    m = _SPAN.match(str(spec))
    if not m:
        raise ValueError(f"{what} {spec!r}: expected seconds ('2s', '1.5s', '500ms') or frames ('16', '16f')")
    value, unit = float(m.group(1)), (m.group(2) or "f").lower()
    if unit in ("s", "sec", "ms"):
        if not fps or fps <= 0:
            raise ValueError(f"{what} {spec!r} is in seconds, but the frame rate is unknown (a frames folder, or a "
                             f"video that does not state it): give --fps, or the span in frames ('16f')")
        frames = round(value * (1e-3 if unit == "ms" else 1.0) * fps)
    else:
        if value != int(value):
            raise ValueError(f"{what} {spec!r}: a number of frames must be whole")
        frames = int(value)
    if frames < 1:
        raise ValueError(f"{what} {spec!r} is shorter than one frame" + (f" at {fps:g} fps" if fps else ""))
    return frames


def plan_windows(num_frames: int, window: int, stride: int) -> list:
    """Windows of ``window`` frames starting every ``stride`` frames, covering frames ``0 .. num_frames - 1``.

    When the last regular window stops short of the end, one more window ends exactly at the last frame, so the
    end of the video is scored too; a video shorter than ``window`` is one window of all its frames.
    """
    if num_frames < 1:
        raise ValueError(f"cannot cut windows from a video with {num_frames} frames")
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1 frame, got {window} and {stride}")
    if num_frames <= window:
        return [Window(0, 0, num_frames)]
    starts = list(range(0, num_frames - window + 1, stride))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return [Window(i, s, window) for i, s in enumerate(starts)]


def window_frames(w: Window, num_frames: int, num_clips: int = 1, frame_rule: str = "published") -> np.ndarray:
    """The 0-based video frames that the test views of window ``w`` sample (sorted, unique)."""
    rel = sample_indices(w.length, num_frames, "test", num_clips=num_clips, rule=frame_rule)
    return np.unique(w.start + rel.reshape(-1))


def video_info(path: str, image_tmpl: str = "img_{:05d}.jpg", index_start: int = 1) -> tuple:
    """(number of frames, frames per second or None) of a video file or frames folder, without decoding it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        n = FrameFolder(path, image_tmpl, index_start).num_frames
        if n <= 0:
            raise SampleLoadError(path, f"no frame files in the folder (expected {image_tmpl.format(index_start)}, ...)")
        return n, None
    if not os.path.exists(path):
        raise SampleLoadError(path, "no such frames folder or video file")
    reader = VideoFile(path, backend="pyav")  # the header only: the frames are decoded by the stream, once
    container = open_pyav(path)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
    finally:
        container.close()
    n = reader.num_frames
    if n <= 0:
        raise SampleLoadError(path, "video has no frames (0 frames found)")
    return n, fps


class _Offset:
    """One window as a source for the dataset's test-view step: frame ``i`` of the window is ``read(start + i)``."""

    def __init__(self, read: Callable, start: int):
        self._read, self.start = read, start

    def read(self, indices) -> torch.Tensor:
        return self._read([self.start + int(i) for i in indices])


class WindowStream:
    """The test views of every window of one video, in order: ``for window, views in WindowStream(...)``.

    ``views`` is float32 ``(V, T, 3, S, S)``, exactly what ``datasets.load_video_clip`` gives for a video made of the
    window's frames, with ``transform`` and ``frame_rule`` of the same test rules (``datasets.TEST_RULES``).
    Attributes after (or during) the pass: ``decoded`` (frames decoded), ``max_cached`` (most RGB frames held at
    once: the memory bound), ``complete`` (every planned window was emitted), ``length`` (frames the video turned
    out to have: the header's count, or fewer when the stream ended before it).

    A decoding error, or a stream that ends well before the frame count its header announces, raises
    :class:`SampleLoadError` naming the file once the windows that could be read have been yielded.
    """

    def __init__(self, path: str, windows: Iterable[Window], num_frames: int, transform, num_clips: int = 1,
                 total_frames: Optional[int] = None, image_tmpl: str = "img_{:05d}.jpg", index_start: int = 1,
                 frame_rule: str = "published"):
        self.path = os.fspath(path)
        self.windows = list(windows)
        self.num_frames = int(num_frames)
        self.num_clips = int(num_clips)
        self.transform = transform
        self.frame_rule = frame_rule
        self.total_frames = total_frames
        self.image_tmpl, self.index_start = image_tmpl, index_start
        self.decoded = 0
        self.max_cached = 0
        self.complete = False
        self.length = total_frames

    def _views(self, w: Window, read: Callable) -> torch.Tensor:
        return sample_test_views(_Offset(read, w.start), w.length, self.num_frames, self.num_clips, self.transform,
                                 self.frame_rule)

    def __iter__(self) -> Iterator[tuple]:
        if os.path.isdir(self.path):  # frames folders allow random access: read window by window
            source = FrameFolder(self.path, self.image_tmpl, self.index_start)
            for w in self.windows:
                yield w, self._views(w, source.read)
                self.decoded = w.end
            self.complete = True
            return
        yield from self._stream_video()

    def _stream_video(self) -> Iterator[tuple]:
        total = self.total_frames or VideoFile(self.path, backend="pyav").num_frames
        self.length = total
        cache: dict = {}          # frame index -> (H, W, 3) uint8, only frames a pending window samples
        need: Counter = Counter()  # frame index -> pending windows that sample it
        pending: deque = deque()   # (window, its frames), in timeline order
        todo = iter(self.windows)
        upcoming = next(todo, None)

        def read(indices):
            return torch.from_numpy(np.stack([cache[i] for i in indices])).permute(0, 3, 1, 2)  # (K, 3, H, W)

        def emit(w: Window, frames: np.ndarray):
            views = self._views(w, read)
            for i in frames.tolist():
                need[i] -= 1
                if need[i] == 0:
                    del need[i]
                    cache.pop(i, None)
            return w, views

        error: Optional[Exception] = None
        last_frame = None  # the newest decoded frame (not converted): stands in for frames past a short stream
        container = open_pyav(self.path)  # the readers' checks and reasons (no video stream, an image, ...)
        turns = 0  # frames are turned as decord shows them (datasets.readers.quarter_turns), like the readers'
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame-parallel decoding where the codec allows it
            frames_iter = container.decode(stream)
            k = -1
            while upcoming is not None or pending:
                try:
                    frame = next(frames_iter)
                except StopIteration:
                    break
                except Exception as e:  # av.error.InvalidDataError etc.: truncated or corrupt from here on
                    error = e
                    break
                k += 1
                if k == 0:
                    turns = quarter_turns(container, frame)
                self.decoded = k + 1
                last_frame = frame
                while upcoming is not None and upcoming.start <= k:  # windows start in order
                    frames = window_frames(upcoming, self.num_frames, self.num_clips, self.frame_rule)
                    frames = np.minimum(frames, total - 1)
                    need.update(frames.tolist())
                    pending.append((upcoming, frames))
                    upcoming = next(todo, None)
                if k in need:
                    cache[k] = rotate_frame(frame.to_ndarray(format="rgb24"), turns)
                    self.max_cached = max(self.max_cached, len(cache))
                while pending and int(pending[0][1][-1]) <= k:
                    yield emit(*pending.popleft())
        finally:
            container.close()
        if upcoming is None and not pending:
            self.complete = True
            return
        # The stream ended (or broke) before the last frames that the remaining windows sample.
        short = short_stream(self.decoded, total)  # the readers' rule for a header that overestimates the length
        if error is None and last_frame is not None and short is None:
            # A header that overestimates the length a little: windows that start past the last frame are dropped,
            # and in the others the last frame stands in for the missing ones, as the reader does.
            logger.warning("%s: the stream ends after %d frames, its header says %d: the timeline stops there",
                           self.path, self.decoded, total)
            last = self.decoded - 1
            self.length = self.decoded
            cache.setdefault(last, rotate_frame(last_frame.to_ndarray(format="rgb24"), turns))
            rest = [w for w, _ in pending] + ([upcoming] if upcoming is not None else []) + list(todo)
            for w in rest:
                if w.start > last:
                    continue
                yield w, self._views(w, lambda idx: read([min(i, last) for i in idx]))
            self.complete = True
            return
        self.length = self.decoded
        if error is not None:
            raise SampleLoadError(self.path, decoding_failed(self.decoded, error)) from error
        # (a stream of a frame or two that decodes none is within the tolerance, yet nothing could stand in)
        raise SampleLoadError(self.path, short or f"video ends after {self.decoded} of the {total} frames its header "
                              f"announces (truncated?)")


def expected_cache_bound(window: int, stride: int, num_frames: int, num_views: int = 1) -> int:
    """An upper bound on the frames :class:`WindowStream` holds at once: the frames of the windows that overlap."""
    return (math.ceil(window / stride) + 1) * num_views * num_frames
