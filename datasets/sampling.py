"""Which frames of a video make a clip: TSN segment sampling, with multi-clip testing.

The n frames are split into T equal segments, segment i covering ``[i*n/T, (i+1)*n/T)``.
Training takes one random frame in each segment; testing takes the middle of each segment. A video
with n <= T frames cannot fill T segments: testing takes ``floor(i*n/T)`` and training takes every
frame once plus random repeats, sorted so that time still runs forward.

Multi-clip testing with C clips places clip c at the fraction ``(c + 0.5) / C`` of every segment, so
the C clips are evenly spaced in time and C=1 is exactly the single-clip middle sampling.

Indices are 0-based offsets into the video; frame-file readers add their ``index_start``.
"""

from __future__ import annotations

from typing import Union

import numpy as np

__all__ = ["sample_indices"]

RngLike = Union[None, int, np.random.Generator]


def sample_indices(num_frames: int, T: int, mode: str, rng: RngLike = None,
                   num_clips: int = 1) -> np.ndarray:
    """Sample frame indices for one video.

    Args:
        num_frames: n, the number of frames in the video (>= 1).
        T: frames per clip (>= 1).
        mode: ``"train"`` (random frame per segment) or ``"test"`` (segment middles).
        rng: a ``numpy.random.Generator`` (or an int seed) for training. ``None`` draws fresh OS
            entropy: fine for a one-off, but datasets should pass a generator derived from their
            seed so that workers and resumed runs are reproducible.
        num_clips: testing only: C evenly spaced clips.

    Returns:
        int64 array, ``(T,)`` in training and ``(num_clips, T)`` in testing; values in ``[0, n)``,
        non-decreasing within a clip.
    """
    if num_frames < 1:
        raise ValueError(f"cannot sample from a video with {num_frames} frames")
    if T < 1:
        raise ValueError(f"T (frames per clip) must be >= 1, got {T}")
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    n = int(num_frames)
    if mode == "train":
        if num_clips != 1:
            raise ValueError("num_clips > 1 is for testing; training samples one clip per video")
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        if n <= T:
            # Every frame once, the rest random repeats; sorted so frames stay in time order.
            extra = gen.integers(0, n, size=T - n)
            return np.sort(np.concatenate([np.arange(n), extra])).astype(np.int64)
        # Integer segment bounds floor(i*n/T): every segment is non-empty because n > T, and the
        # segments tile [0, n) exactly (no frames dropped at the end when T does not divide n).
        bounds = (np.arange(T + 1) * n) // T
        starts, lengths = bounds[:-1], np.diff(bounds)
        return (starts + gen.integers(0, lengths)).astype(np.int64)
    if mode == "test":
        if n <= T:
            clip = (np.arange(T) * n) // T
            # Nothing else to choose from in a short video: every clip is the same.
            return np.tile(clip, (num_clips, 1)).astype(np.int64)
        seg = n / T
        # (C, 1) clip offsets within a segment + (1, T) segment starts -> (C, T)
        frac = (np.arange(num_clips) + 0.5) / num_clips
        pos = np.arange(T)[None, :] * seg + frac[:, None] * seg
        return np.minimum(np.floor(pos), n - 1).astype(np.int64)
    raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
