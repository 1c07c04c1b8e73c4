#!/usr/bin/env python
"""Generate the synthetic motion demo set: real .mp4 videos whose class is a motion.

Eight classes in four time-reversal pairs: moving left / right, moving up / down, growing /
shrinking, rotating clockwise / anticlockwise (as seen on screen). A single frame cannot tell the
two classes of a pair apart (positions, sizes and angles have the same distribution in both), so
the set checks that a model uses time. Colours, shapes, sizes, speeds, positions and backgrounds
(solid, gradients, blocky texture) vary per video and are drawn from a seeded generator; the same
seed gives the same videos.

Layout written under OUT:
  videos/{train,val}/<class_folder>/<class_folder>_<NNN>.mp4   the videos (H.264, or MPEG-4 Part 2)
  classes.csv            id,name
  descriptions.csv       SNo,Class Name,Description
  frames/...             extracted JPEG frames (extract_frames.py, unless --no-extract)
  frames/manifest.txt, frames/failures.txt
  train.txt, val.txt     '<folder relative to OUT/frames> <num_frames> <label>'
  train_videos.txt, val_videos.txt   '<video relative to OUT/videos> <num_frames> <label>'
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

import _common
from utils.io import atomic_path  # noqa: E402  (the repository root is on sys.path via _common)

logger = logging.getLogger("make_synthetic_demo")

# (name, folder, description). Order = label id. Pairs (0,1), (2,3), (4,5), (6,7) are time reversals.
CLASSES: Tuple[Tuple[str, str, str], ...] = (
    ("moving left", "moving_left",
     "A single shape slides steadily from the right side of the frame to the left side. "
     "Its size and orientation stay the same while its horizontal position decreases."),
    ("moving right", "moving_right",
     "A single shape slides steadily from the left side of the frame to the right side. "
     "Its size and orientation stay the same while its horizontal position increases."),
    ("moving up", "moving_up",
     "A single shape rises steadily from the bottom of the frame towards the top. "
     "Its size and orientation stay the same while it moves upwards."),
    ("moving down", "moving_down",
     "A single shape falls steadily from the top of the frame towards the bottom. "
     "Its size and orientation stay the same while it moves downwards."),
    ("growing", "growing",
     "A single shape stays in place and grows steadily bigger. "
     "It starts small and ends several times larger."),
    ("shrinking", "shrinking",
     "A single shape stays in place and shrinks steadily. "
     "It starts large and ends several times smaller."),
    ("rotating clockwise", "rotating_clockwise",
     "An elongated shape turns clockwise about one of its ends, like the hand of a clock. "
     "Its free end sweeps from the top of the frame round to the right side and downwards."),
    ("rotating anticlockwise", "rotating_anticlockwise",
     "An elongated shape turns anticlockwise about one of its ends, against the direction of a clock's hand. "
     "Its free end sweeps up from the lower right side of the frame towards the top."),
)
REVERSE_OF = {0: 1, 1: 0, 2: 3, 3: 2, 4: 5, 5: 4, 6: 7, 7: 6}
SHAPES_ANY = ("circle", "square", "triangle", "diamond", "bar", "ellipse")
SHAPES_ELONGATED = ("bar", "ellipse", "triangle")  # orientation visible; used for rotation classes
BACKGROUNDS = ("solid", "hgrad", "vgrad", "blocks")
FPS = 8


@dataclass
class ClipParams:
    """Everything needed to render one clip; distances are in pixels, angles in radians."""

    label: int
    size: int
    frames: int
    shape: str
    color: Tuple[int, int, int]
    bg_kind: str
    bg_colors: Tuple[Tuple[int, int, int], Tuple[int, int, int]]
    bg_seed: int
    cx: np.ndarray  # (T,) centre x per frame
    cy: np.ndarray  # (T,) centre y per frame (image rows: y grows downwards)
    radius: np.ndarray  # (T,) shape radius per frame
    angle: np.ndarray  # (T,) orientation per frame; increasing = clockwise on screen


def _luma(c) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _pick_colors(rng: np.random.Generator):
    """Background colour pair and an object colour: a dark background (any hue) and an object at least 110
    luma brighter than both of its colours (any hue).

    Bright objects on dark backgrounds, rather than contrast of either sign: with the demo's frozen, randomly
    initialised CLIP the object's features then differ from the background's the same way in every video, which
    T2L can learn from with the demo's few hundred videos. Measured with an earlier demo model (OpenAI's positional
    initialisation, 24 training videos per class): 34-45% validation top-1 with this rule, 9-16% with contrast of
    either sign.
    """
    for _ in range(1000):
        base = rng.integers(0, 90, 3)
        other = np.clip(base + rng.integers(-30, 31, 3), 0, 255)
        obj = rng.integers(0, 256, 3)
        if min(_luma(obj) - _luma(base), _luma(obj) - _luma(other)) >= 110:
            return (tuple(int(x) for x in base), tuple(int(x) for x in other)), tuple(int(x) for x in obj)
    raise RuntimeError("could not find contrasting colours")  # practically unreachable


def sample_params(label: int, rng: np.random.Generator, size: int = 64, frames: int = 16) -> ClipParams:
    """Draw the parameters of one clip of class ``label``.

    The motion classes of a pair share one parameter distribution and differ only in the
    direction of time, so a clip of one class played backwards is a typical clip of the other.
    """
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label must be in 0..{len(CLASSES) - 1}, got {label}")
    S, T = float(size), frames
    t = np.linspace(0.0, 1.0, T)  # (T,) normalised time
    forward = label in (1, 3, 4, 6)  # right, down, growing, clockwise run "forwards"
    prog = t if forward else 1.0 - t
    bg_colors, color = _pick_colors(rng)
    bg_kind = str(rng.choice(BACKGROUNDS))
    bg_seed = int(rng.integers(0, 2**31 - 1))
    angle0 = float(rng.uniform(0, 2 * math.pi))
    if label in (0, 1, 2, 3):
        shape = str(rng.choice(SHAPES_ANY))
        r = np.full(T, rng.uniform(0.12, 0.19) * S)
        travel = rng.uniform(0.35, 0.55) * S  # speed = travel / clip length
        centre = S / 2 + rng.uniform(-0.07, 0.07) * S
        along = centre - travel / 2 + travel * prog  # (T,)
        across = np.full(T, S / 2 + rng.uniform(-0.15, 0.15) * S)
        cx, cy = (along, across) if label in (0, 1) else (across, along)
        angle = np.full(T, angle0)
    elif label in (4, 5):
        shape = str(rng.choice(SHAPES_ANY))
        r_small, r_big = rng.uniform(0.06, 0.1) * S, rng.uniform(0.26, 0.34) * S
        r = r_small + (r_big - r_small) * prog
        cx = np.full(T, S / 2 + rng.uniform(-0.08, 0.08) * S)
        cy = np.full(T, S / 2 + rng.uniform(-0.08, 0.08) * S)
        angle = np.full(T, angle0)
    else:
        # A clock hand: an elongated shape turning about its inner end (the pivot, near the centre), so that its
        # centre travels on an arc. The clockwise sweep starts within 60 degrees of twelve o'clock and turns
        # 100-200 degrees; the anticlockwise class is the same sweep run backwards.
        shape = str(rng.choice(SHAPES_ELONGATED))
        r = np.full(T, rng.uniform(0.14, 0.2) * S)
        turn = math.radians(rng.uniform(100, 200))  # < 90 degrees per sampled frame step
        angle = -math.pi / 2 + math.radians(rng.uniform(-60, 60)) + turn * prog  # -pi/2: pointing up
        px = S / 2 + rng.uniform(-0.06, 0.06) * S
        py = S / 2 + rng.uniform(-0.06, 0.06) * S
        cx, cy = px + r * np.cos(angle), py + r * np.sin(angle)
    return ClipParams(label, size, frames, shape, color, bg_kind, bg_colors, bg_seed,
                      np.asarray(cx, float), np.asarray(cy, float), np.asarray(r, float), np.asarray(angle, float))


def render_background(p: ClipParams) -> np.ndarray:
    """The static background of a clip, (H, W, 3) uint8."""
    S = p.size
    c0 = np.array(p.bg_colors[0], float)
    c1 = np.array(p.bg_colors[1], float)
    if p.bg_kind == "solid":
        w = np.zeros((S, S))
    elif p.bg_kind == "hgrad":
        w = np.tile(np.linspace(0, 1, S), (S, 1))
    elif p.bg_kind == "vgrad":
        w = np.tile(np.linspace(0, 1, S)[:, None], (1, S))
    else:  # blocks: a coarse random texture, low contrast so the object stays the salient thing
        cells = np.random.default_rng(p.bg_seed).random((8, 8))
        w = np.kron(cells, np.ones((math.ceil(S / 8), math.ceil(S / 8))))[:S, :S]
    bg = c0[None, None, :] * (1 - w[..., None]) + c1[None, None, :] * w[..., None]  # (S, S, 3)
    return np.clip(np.round(bg), 0, 255).astype(np.uint8)


def _signed_distance(shape: str, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Approximate signed distance (pixels, < 0 inside) in the shape's own frame (u along its axis)."""
    if shape == "circle":
        return np.sqrt(u * u + v * v) - r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8 * r
    if shape == "diamond":
        return (np.abs(u) + np.abs(v) - 1.1 * r) / math.sqrt(2)
    if shape == "bar":
        return np.maximum(np.abs(u) - r, np.abs(v) - 0.3 * r)
    if shape == "ellipse":
        a, b = r, 0.45 * r
        return (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1) * b
    if shape == "triangle":  # isosceles, apex at u = r, base at u = -0.6 r with half-width 0.6 r
        m = 0.6 / 1.6
        side = (np.abs(v) - m * (r - u)) / math.sqrt(1 + m * m)
        return np.maximum(-u - 0.6 * r, side)
    raise ValueError(f"unknown shape {shape!r}")


def render(p: ClipParams) -> np.ndarray:
    """Render the clip, (T, H, W, 3) uint8, with anti-aliased edges."""
    S = p.size
    ys, xs = np.mgrid[0:S, 0:S].astype(float) + 0.5  # pixel centres, (S, S) each
    dx = xs[None] - p.cx[:, None, None]  # (T, S, S)
    dy = ys[None] - p.cy[:, None, None]
    cos, sin = np.cos(p.angle)[:, None, None], np.sin(p.angle)[:, None, None]
    # Rotating the offsets by -angle puts them in the shape's frame; with y pointing down an
    # increasing angle turns the shape clockwise on screen.
    u = dx * cos + dy * sin
    v = -dx * sin + dy * cos
    alpha = np.clip(0.5 - _signed_distance(p.shape, u, v, p.radius[:, None, None]), 0.0, 1.0)[..., None]  # (T, S, S, 1)
    bg = render_background(p).astype(float)[None]  # (1, S, S, 3)
    obj = np.array(p.color, float)[None, None, None, :]
    frames = bg * (1 - alpha) + obj * alpha
    return np.clip(np.round(frames), 0, 255).astype(np.uint8)


def pick_codec() -> str:
    """libx264 if the bundled FFmpeg has it, else mpeg4."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(path, frames: np.ndarray, fps: int = FPS, codec: Optional[str] = None) -> None:
    """Encode (T, H, W, 3) uint8 frames to ``path`` with PyAV; every frame is kept (no B-frame drops)."""
    import av

    codec = codec or pick_codec()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    T, H, W, _ = frames.shape
    # A killed run never leaves a truncated .mp4 under the final name.
    with atomic_path(path, what="video") as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = W, H
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "15", "preset": "ultrafast", "tune": "zerolatency"}
        else:
            stream.options = {"qscale": "2"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _csv_text(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _forget_other_settings(out: Path, settings: Dict) -> None:
    """Remove videos/ and frames/ made with other settings: extraction would otherwise keep stale frames."""
    import json
    import shutil

    record = out / "settings.json"
    if record.is_file():
        try:
            old = json.loads(record.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if old != settings:
            logger.info("%s holds a demo set made with other settings; replacing it", out)
            for sub in ("videos", "frames"):
                shutil.rmtree(out / sub, ignore_errors=True)
    elif (out / "videos").exists():
        logger.info("%s/videos exists without settings.json; replacing it", out)
        shutil.rmtree(out / "videos", ignore_errors=True)
        shutil.rmtree(out / "frames", ignore_errors=True)
    _common.atomic_write_text(record, json.dumps(settings, sort_keys=True) + "\n")


def _make_one(task) -> str:
    """Render and write one video (a worker task); returns its path relative to OUT/videos."""
    videos, split, label, i, seed, size, frames, codec = task
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, label, i])
    folder = CLASSES[label][1]
    rel = f"{split}/{folder}/{folder}_{i:03d}.mp4"
    write_video(Path(videos) / rel, render(sample_params(label, rng, size, frames)), codec=codec)
    return rel


def generate(out, train_per_class: int = 64, val_per_class: int = 32, seed: int = 0, size: int = 64,
             frames: int = 16, progress: bool = True, workers: int = 1) -> Dict[str, List[Tuple[str, int]]]:
    """Write the videos and the class/description CSVs; returns ``{split: [(video rel path, label)]}``.

    Each video's generator is seeded by (seed, split, class, index), so a video does not change
    when the number of videos per class does.
    """
    if size < 16 or size % 2:
        raise ValueError(f"--size must be even and >= 16, got {size}")
    if frames < 2:
        raise ValueError(f"--frames must be >= 2, got {frames}")
    out = Path(out)
    _forget_other_settings(out, dict(train_per_class=train_per_class, val_per_class=val_per_class,
                                     seed=seed, size=size, frames=frames))
    codec = pick_codec()
    jobs = [(split, label, i) for split, n in (("train", train_per_class), ("val", val_per_class))
            for label in range(len(CLASSES)) for i in range(n)]
    made: Dict[str, List[Tuple[str, int]]] = {"train": [], "val": []}
    tasks = [(str(out / "videos"), split, label, i, seed, size, frames, codec) for split, label, i in jobs]
    bar = tqdm(total=len(tasks), desc="generating", unit="video", disable=not progress, dynamic_ncols=True)
    if workers <= 1:
        results = map(_make_one, tasks)
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_make_one, tasks, chunksize=8)
    try:
        for (_, split, label, _, _, _, _, _), rel in zip(tasks, results):
            made[split].append((rel, label))
            bar.update(1)
    finally:
        bar.close()
        if workers > 1:
            pool.shutdown()
    _common.atomic_write_text(out / "classes.csv", _csv_text([(i, c[0]) for i, c in enumerate(CLASSES)], ["id", "name"]))
    _common.atomic_write_text(out / "descriptions.csv",
                              _csv_text([(i + 1, c[0], c[2]) for i, c in enumerate(CLASSES)], ["SNo", "Class Name", "Description"]))
    logger.info("wrote %d videos with %s under %s", len(jobs), codec, out / "videos")
    return made


def extract_and_list(out, workers: int = 2, progress: bool = True) -> Dict[str, int]:
    """Run extract_frames.py's extraction over OUT/videos and write the list files; returns line counts."""
    import extract_frames

    out = Path(out)
    result = extract_frames.run_extraction(out / "videos", out / "frames", workers=workers, progress=progress)
    if result.failures:
        raise RuntimeError(f"{len(result.failures)} demo videos failed to extract; see {out / 'frames' / _common.FAILURES_NAME}")
    names = _common.read_classes_csv(out / "classes.csv")
    labels = extract_frames.labels_from_class_folders(result.videos, names, str(out / "classes.csv"))
    counts = {}
    video_of = {v.folder: v.rel for v in result.videos}
    for split in ("train", "val"):
        folders = sorted(f for f in labels if f.startswith(split + "/"))
        lines = [_common.format_list_line(f, result.manifest[f], labels[f]) for f in folders]
        _common.write_list_file(out / f"{split}.txt", lines)
        _common.write_list_file(out / f"{split}_videos.txt",
                                [_common.format_list_line(video_of[f], result.manifest[f], labels[f]) for f in folders])
        counts[split] = len(lines)
    return counts


EPILOG = """\
examples:
  # the demo set: 8 classes x (64 train + 32 val) videos, 64x64, 16 frames, extracted and listed
  python Dataset_creation_scripts/make_synthetic_demo.py demo_data

  # bigger and sharper, another seed, videos only
  python Dataset_creation_scripts/make_synthetic_demo.py demo_data_big --train-per-class 100 \\
      --val-per-class 25 --size 112 --frames 32 --seed 7 --no-extract

Then point a config at demo_data/frames (root), demo_data/train.txt, demo_data/val.txt,
demo_data/classes.csv and demo_data/descriptions.csv.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        description="Generate the synthetic motion demo set (videos, class/description CSVs, frames, lists).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("--train-per-class", type=int, default=64, help="training videos per class (default 64)")
    p.add_argument("--val-per-class", type=int, default=32,
                   help="validation videos per class (default 32: 64 per reversed pair, so a pair's accuracy has a "
                        "standard error of about 6 points)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=64, help="frame width = height in pixels, even (default 64)")
    p.add_argument("--frames", type=int, default=16, help="frames per video (default 16)")
    p.add_argument("--no-extract", action="store_true", help="only write videos and CSVs (no frames, no lists)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for generation and extraction (default 2)")
    _common.add_output_arguments(p)
    return p


def main(argv=None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    _common.setup_logging(args.verbose)
    t0 = time.perf_counter()
    generate(args.out, args.train_per_class, args.val_per_class, args.seed, args.size, args.frames,
             not args.no_progress, args.workers)
    t1 = time.perf_counter()
    logger.info("generation took %.1f s", t1 - t0)
    if not args.no_extract:
        counts = extract_and_list(args.out, args.workers, not args.no_progress)
        logger.info("extraction and lists took %.1f s; train.txt %d lines, val.txt %d lines",
                    time.perf_counter() - t1, counts["train"], counts["val"])
    return 0


if __name__ == "__main__":
    sys.exit(_common.run_cli(main))
