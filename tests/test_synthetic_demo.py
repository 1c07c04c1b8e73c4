"""Tests of Dataset_creation_scripts/make_synthetic_demo.py: classes, real motion in the encoded
videos, exact time-reversal pairs, and the generate -> extract -> list files command."""

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

SCRIPTS = Path(__file__).resolve().parents[1] / "Dataset_creation_scripts"
sys.path.insert(0, str(SCRIPTS))

import make_synthetic_demo as demo  # noqa: E402
from _common import read_list_file  # noqa: E402


def decode(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def object_stats(frames, background):
    """Per frame: centroid x, centroid y, area and second-moment orientation of the object mask."""
    diff = np.abs(frames.astype(int) - background.astype(int)[None]).max(axis=-1)  # (T, H, W)
    ys, xs = np.mgrid[0:frames.shape[1], 0:frames.shape[2]]
    out = []
    for m in diff > 40:
        w = m.sum()
        assert w > 10, "object not visible"
        cx, cy = (xs * m).sum() / w, (ys * m).sum() / w
        mu20 = (((xs - cx) ** 2) * m).sum() / w
        mu02 = (((ys - cy) ** 2) * m).sum() / w
        mu11 = (((xs - cx) * (ys - cy)) * m).sum() / w
        out.append((cx, cy, w, 0.5 * math.atan2(2 * mu11, mu20 - mu02)))
    cx, cy, area, theta = map(np.array, zip(*out))
    return cx, cy, area, np.unwrap(2 * theta) / 2  # orientation is defined modulo pi


def motion_signature(frames, background, size):
    """(dx, dy, area ratio, turn) from first to last frame; y and the turn are in screen terms."""
    cx, cy, area, theta = object_stats(frames, background)
    return cx[-1] - cx[0], cy[-1] - cy[0], area[-1] / area[0], theta[-1] - theta[0]


def expected_ok(label, sig, size):
    dx, dy, ratio, turn = sig
    far = 0.2 * size
    return {
        0: dx < -far, 1: dx > far,  # left / right
        2: dy < -far, 3: dy > far,  # up (y decreases on screen) / down
        4: ratio > 2.5, 5: ratio < 1 / 2.5,  # growing / shrinking
        6: turn > math.radians(60), 7: turn < -math.radians(60),  # clockwise: angle grows with y pointing down
    }[label]


@pytest.mark.parametrize("label", range(8))
def test_encoded_videos_show_their_class_motion(tmp_path, label):
    size = 64
    for i in range(3):
        p = demo.sample_params(label, np.random.default_rng([11, label, i]), size=size, frames=16)
        path = tmp_path / f"{label}_{i}.mp4"
        demo.write_video(path, demo.render(p))
        frames = decode(path)
        assert frames.shape == (16, size, size, 3)
        sig = motion_signature(frames, demo.render_background(p), size)
        assert expected_ok(label, sig, size), (demo.CLASSES[label][0], p.shape, sig)
        # Played backwards, the same video is a video of the paired class.
        assert expected_ok(demo.REVERSE_OF[label], motion_signature(frames[::-1], demo.render_background(p), size), size)


@pytest.mark.parametrize("label", [6, 7])
def test_rotations_are_clock_hands_sweeping_from_twelve(label):
    # The hand turns about its inner end, so its centroid circles the frame centre; the clockwise sweep starts
    # near twelve o'clock (the anticlockwise one ends there), which is what the class descriptions say.
    size = 64
    for i in range(4):
        p = demo.sample_params(label, np.random.default_rng([5, label, i]), size=size, frames=16)
        cx, cy, _, _ = object_stats(demo.render(p), demo.render_background(p))
        around = np.unwrap(np.arctan2(cy - size / 2, cx - size / 2))  # screen angle about the centre; grows clockwise
        twelve = around[0] if label == 6 else around[-1]
        assert abs(math.remainder(twelve + math.pi / 2, 2 * math.pi)) < math.radians(80), (i, math.degrees(twelve))
        turn = around[-1] - around[0]
        assert (turn > math.radians(60)) if label == 6 else (turn < -math.radians(60)), (i, math.degrees(turn))
        assert np.hypot(cx - size / 2, cy - size / 2).min() > 0.08 * size  # off centre all the way round


@pytest.mark.parametrize("label", [0, 2, 4, 6])
def test_pairs_are_exact_time_reversals(label):
    # Same random draws -> the paired class renders the same clip with time reversed, so a single
    # frame carries no information about which of the two classes a video belongs to.
    for i in range(4):
        a = demo.render(demo.sample_params(label, np.random.default_rng(i), 48, 12))
        b = demo.render(demo.sample_params(demo.REVERSE_OF[label], np.random.default_rng(i), 48, 12))
        assert np.abs(a.astype(int) - b[::-1].astype(int)).max() <= 1
        assert np.abs(a.astype(int) - b.astype(int)).max() > 50  # and they are not the same clip


def test_prepare_command_writes_classes_frames_and_lists(tmp_path):
    out = tmp_path / "demo"
    assert demo.main([str(out), "--train-per-class", "2", "--val-per-class", "1", "--size", "32", "--frames", "8",
                      "--workers", "2", "--no-progress"]) == 0
    with open(out / "classes.csv", newline="") as f:
        classes = list(csv.reader(f))
    assert classes[0] == ["id", "name"] and len(classes) - 1 >= 8
    names = [row[1] for row in classes[1:]]
    assert {"moving left", "moving right", "growing", "shrinking", "rotating clockwise", "rotating anticlockwise"} <= set(names)
    with open(out / "descriptions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["SNo", "Class Name", "Description"] and [r[1] for r in rows[1:]] == names
    assert all(len(r[2].split()) >= 8 for r in rows[1:])
    for split, per_class in (("train", 2), ("val", 1)):
        entries = read_list_file(out / f"{split}.txt")
        assert sorted(lab for _, _, lab in entries) == sorted(list(range(len(names))) * per_class)
        for folder, n, label in entries:
            files = sorted(p.name for p in (out / "frames" / folder).iterdir())
            assert n == 8 and files == [f"img_{k:05d}.jpg" for k in range(1, 9)]
            assert folder.startswith(f"{split}/{demo.CLASSES[label][1]}/")
        videos = read_list_file(out / f"{split}_videos.txt")
        assert [(Path(v).with_suffix("").as_posix(), n, lab) for v, n, lab in videos] == entries
        assert all((out / "videos" / v).is_file() for v, _, _ in videos)
    # Same seed, same videos: a second run (in one process this time) regenerates identical files.
    before = (out / "videos" / "val" / "growing" / "growing_000.mp4").read_bytes()
    assert demo.main([str(out), "--train-per-class", "2", "--val-per-class", "1", "--size", "32", "--frames", "8",
                      "--workers", "1", "--no-progress"]) == 0
    assert (out / "videos" / "val" / "growing" / "growing_000.mp4").read_bytes() == before
