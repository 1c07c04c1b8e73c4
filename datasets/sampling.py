"""Which frames of a video make a clip: TSN segment sampling, with multi-clip testing.

The n frames are split into T equal segments, segment i covering ``[i*n/T, (i+1)*n/T)``.
Training takes one random frame in each segment; testing takes one frame near the middle of each
segment, by one of two rules (``rule``):

- ``"published"`` (the default): ``floor((i + 0.5) * n / T - 0.5)``, what the published T2L test
  code takes (its ``int(i * n / T + (n / T - 1) / 2)``, computed here in integers, which gives the same
  numbers). It sits half a frame before the segment's centre: n = 37 gives 2, 7, 12, 16, 21, 25, 30,
  35 (1-based files).
- ``"centre"``: ``floor((i + 0.5) * n / T)``, the segment's centre (mmaction2's and ViFi-CLIP's test
  sampling): n = 37 gives 3, 7, 12, 17, 21, 26, 31, 35.

A video with n <= T frames cannot fill T segments: testing takes ``floor(i*n/T)`` under both rules,
and training takes every frame once plus random repeats, sorted so that time still runs forward.

Multi-clip testing with C clips places clip c at the fraction ``(c + 0.5) / C`` of every segment
(minus half a frame under the published rule), so the C clips are evenly spaced in time and C=1 is
exactly the single-clip sampling of the rule.

Indices are 0-based offsets into the video; frame-file readers add their ``index_start``.
"""

from __future__ import annotations

from typing import Union

import numpy as np

__all__ = ["sample_indices"]

RngLike = Union[None, int, np.random.Generator]

TEST_FRAME_RULES = ("published", "centre")


def sample_indices(num_frames: int, T: int, mode: str, rng: RngLike = None,
                   num_clips: int = 1, rule: str = "published") -> np.ndarray:
    """Sample frame indices for one video.

    Args:
        num_frames: n, the number of frames in the video (>= 1).
        T: frames per clip (>= 1).
        mode: ``"train"`` (random frame per segment) or ``"test"`` (segment middles).
        rng: a ``numpy.random.Generator`` (or an int seed) for training. ``None`` draws fresh OS
            entropy: fine for a one-off, but datasets should pass a generator derived from their
            seed so that workers and resumed runs are reproducible.
        num_clips: testing only: C evenly spaced clips.
        rule: testing only: ``"published"`` or ``"centre"`` (see the module docstring).

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
        if rule not in TEST_FRAME_RULES:
            raise ValueError(f"test frame rule must be one of {TEST_FRAME_RULES}, got {rule!r}")
        if n <= T:
            clip = (np.arange(T) * n) // T
            # Nothing else to choose from in a short video: every clip is the same.
            return np.tile(clip, (num_clips, 1)).astype(np.int64)
        i = np.arange(T, dtype=np.int64)[None, :]  # (1, T)
        c = np.arange(num_clips, dtype=np.int64)[:, None]  # (C, 1)
        # Position of clip c in segment i, in units of 1 / (2 * C * T) frames, kept in integers so that no
        # float rounding moves a frame: (i + (c + 0.5) / C) * n / T = ((2C i + 2c + 1) * n) / (2 C T).
        num = (2 * num_clips * i + 2 * c + 1) * n  # (C, T)
        den = 2 * num_clips * T
        if rule == "published":
            num = num - num_clips * T  # half a frame earlier: - 0.5 = - (C T) / (2 C T)
        return np.clip(num // den, 0, n - 1).astype(np.int64)
    raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
