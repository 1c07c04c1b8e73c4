"""Tests of the long-video timeline (datasets/windows.py, timeline.py, predict.py --window).

Every window must be exactly a clip as test.py sees it: its views equal ``load_video_clip`` of a frames folder
holding only the window's frames, and its probabilities equal predict.py's for that folder, in any batch size;
the streaming reader must hold a few windows' frames, never the video.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Dataset_creation_scripts"))

import predict  # noqa: E402
import timeline  # noqa: E402
from datasets import TEST_RULES, SampleLoadError, build_transform, load_video_clip  # noqa: E402
from datasets.readers import VideoFile  # noqa: E402
from datasets.windows import (Window, WindowStream, expected_cache_bound, parse_span,  # noqa: E402
                              plan_windows, window_frames)
from conftest import save_tiny_t2l  # noqa: E402
FPS = 10
CLASSES = "moving left,moving right,growing,shrinking"


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_t2l(tmp_path_factory.mktemp("ckpt") / "tiny.pt", perturb_seed=3)


def moving_square_frames(n: int, size: int = 40) -> np.ndarray:
    """(n, size, size, 3) uint8: a square that moves, with a background that changes every frame (no two alike)."""
    frames = np.zeros((n, size, size, 3), np.uint8)
    for k in range(n):
        frames[k] = (10 + (k * 7) % 120, 30, 60 + (k * 3) % 90)
        x = (k * 3) % (size - 10)
        frames[k, 12:22, x:x + 10] = (240, 220, 40)
    return frames


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """A 13.1-second video (131 frames, 10 fps, 40x40 px) and its frames as PyAV decodes them."""
    import make_synthetic_demo

    path = tmp_path_factory.mktemp("video") / "long.mp4"
    make_synthetic_demo.write_video(path, moving_square_frames(131), fps=FPS)
    decoded = VideoFile(str(path), backend="pyav")
    frames = decoded.read(range(decoded.num_frames))  # (N, 3, H, W)
    assert frames.shape[0] == 131
    return path, frames


def frames_folder(frames: torch.Tensor, folder: Path) -> Path:
    """Frames (n, 3, H, W) uint8 as lossless PNG files img_00001.png ... (a frames folder test.py can read)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f.permute(1, 2, 0).numpy()).save(folder / f"img_{i + 1:05d}.png")
    return folder


def test_spans_and_window_plan():
    assert parse_span("2s", 8) == 16 and parse_span("1.5s", 10) == 15 and parse_span("500ms", 30) == 15
    assert parse_span("16", None) == 16 and parse_span("16f", None) == 16 and parse_span("7frames", 25) == 7
    for bad, match in [("2x", "expected seconds"), ("0s", "shorter than one frame"), ("1.5f", "whole"),
                       ("-2s", "expected seconds")]:
        with pytest.raises(ValueError, match=match):
            parse_span(bad, 10)
    with pytest.raises(ValueError, match="frame rate is unknown.*--fps"):
        parse_span("2s", None)
    # windows every stride, plus one that ends at the last frame; every frame covered
    ws = plan_windows(131, 20, 7)
    assert [w.start for w in ws[:3]] == [0, 7, 14] and ws[-1].end == 131 and ws[-2].end < 131
    covered = np.zeros(131, bool)
    for w in ws:
        assert w.length == 20
        covered[w.start:w.end] = True
    assert covered.all() and [w.index for w in ws] == list(range(len(ws)))
    assert plan_windows(100, 20, 20)[-1] == Window(4, 80, 20)  # ends exactly at the end: no extra window
    assert plan_windows(5, 20, 7) == [Window(0, 0, 5)]  # shorter than a window: one window of everything


@pytest.mark.parametrize("rules", sorted(TEST_RULES))
def test_streamed_windows_are_the_clips_test_py_sees(long_video, tmp_path, rules):
    """Each window's views equal load_video_clip of a frames folder holding only that window's frames, under either
    test rules, while the stream keeps a few windows' frames at most."""
    path, frames = long_video
    windows = plan_windows(frames.shape[0], 20, 7)
    transform = build_transform("test", 32, resize=TEST_RULES[rules]["resize"])
    stream = WindowStream(str(path), windows, num_frames=8, transform=transform, num_clips=2,
                          frame_rule=TEST_RULES[rules]["frames"])
    seen = []
    for w, views in stream:
        ref = load_video_clip(str(frames_folder(frames[w.start:w.end], tmp_path / f"w{w.index}")), num_frames=8,
                              input_size=32, num_clips=2, image_tmpl="img_{:05d}.png", test_rules=rules)
        assert torch.equal(views, ref), f"window {w.index} (frames {w.start}-{w.end}) differs from its clip"
        seen.append(w.index)
    assert seen == [w.index for w in windows] and stream.complete
    assert 0 < stream.max_cached <= expected_cache_bound(20, 7, 8, num_views=2) < frames.shape[0]


def test_a_header_that_overstates_the_length(long_video, tmp_path):
    """A container that announces 2 frames more than it holds: the last frame stands in for the missing ones (as the
    reader does), windows that would start past the end are dropped; announcing far more is an error, raised after
    the windows that could be read."""
    path, frames = long_video
    transform = build_transform("test", 32)
    stream = WindowStream(str(path), plan_windows(133, 20, 7), 8, transform, total_frames=133)
    got = list(stream)
    assert stream.complete and stream.length == 131 and got[-1][0].end == 133
    w, views = got[-1]
    padded = torch.cat([frames[w.start:], frames[-1:].expand(2, -1, -1, -1)])  # frames 113..130, then 130 twice
    assert torch.equal(views, load_video_clip(str(frames_folder(padded, tmp_path / "tail")), num_frames=8,
                                              input_size=32, image_tmpl="img_{:05d}.png"))
    stream = WindowStream(str(path), plan_windows(200, 20, 7), 8, transform, total_frames=200)
    seen = []
    with pytest.raises(SampleLoadError, match="ends after 131 of the 200 frames"):
        for w, _ in stream:
            seen.append(w)
    # the windows whose sampled frames all exist came out, in order, and the next one did not
    readable = [w for w in plan_windows(200, 20, 7) if window_frames(w, 8).max() < 131]
    assert seen == readable and not stream.complete


def run_predict(capsys, *args):
    rc = predict.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_window_probabilities_equal_predict_on_the_window_clip(long_video, ckpt, tmp_path, capsys):
    """predict.py --window: every window scored exactly as predict.py (test.py's rule) scores a clip of its frames,
    with windows batched (3 per pass, the last batch short); the files hold what the JSON says."""
    path, frames = long_video
    out = tmp_path / "tl"
    rc, stdout, err = run_predict(capsys, path, "--model", ckpt, "--classes", CLASSES, "--window", "2s",
                                  "--stride", "0.7s", "--batch-size", "3", "--out", out, "-k", "4", "--json",
                                  "--rules", "centre")
    assert rc == 0, err
    doc = json.loads(stdout)
    assert doc == json.loads((out / "timeline.json").read_text())
    assert doc["window"]["frames"] == 20 and doc["stride"]["frames"] == 7 and doc["fps"] == FPS
    assert doc["complete"] and doc["num_frames"] == 131 and doc["num_windows"] == len(plan_windows(131, 20, 7))
    probs = np.load(out / "probabilities.npy")
    assert probs.shape == (doc["num_windows"], 4)
    for i in (0, 5, doc["num_windows"] - 1):  # first, a middle one, the tail window ending at the last frame
        w = doc["windows"][i]
        clip = frames_folder(frames[w["start_frame"]:w["end_frame"]], tmp_path / f"clip{i}")
        rc, single, err = run_predict(capsys, clip, "--model", ckpt, "--classes", CLASSES, "--image-tmpl",
                                      "img_{:05d}.png", "--json", "-k", "4", "--rules", "centre")
        assert rc == 0, err
        ref = np.zeros(4, np.float32)
        for t in json.loads(single)["top"]:
            ref[t["class_id"]] = t["probability"]
        np.testing.assert_allclose(probs[i], ref, atol=1e-5, rtol=0)
        assert w["top"][0]["class_id"] == int(ref.argmax())
        assert w["start_s"] == w["start_frame"] / FPS and w["end_s"] == w["end_frame"] / FPS
    rows = (out / "windows.csv").read_text().splitlines()
    assert len(rows) == 1 + doc["num_windows"] and rows[0].startswith("window,start_frame,end_frame,start_s,end_s")
    segs = (out / "segments.csv").read_text().splitlines()
    assert len(segs) == 1 + len(doc["segments"])
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # segments tile the video, and each segment's class is its windows' top class
    assert doc["segments"][0]["start_frame"] == 0 and doc["segments"][-1]["end_frame"] == 131
    for a, b in zip(doc["segments"], doc["segments"][1:]):
        assert a["end_frame"] == b["start_frame"] and a["class_id"] != b["class_id"]
    for s in doc["segments"]:
        tops = {int(probs[i].argmax()) for i in range(s["first_window"], s["last_window"] + 1)}
        assert tops == {s["class_id"]}


def _timeline(probs, starts, length, num_frames, fps=10.0):
    windows = [Window(i, s, length) for i, s in enumerate(starts)]
    return timeline.Timeline(video="v", fps=fps, num_frames=num_frames, window_frames=length, stride_frames=0,
                             windows=windows, probs=np.asarray(probs, np.float32), names=["a", "b", "c"])


def test_segments_threshold_and_minimum_length():
    # 6 windows of 20 frames every 10 (centres 10, 20, ... 60): boundaries at the midpoints 15, 25, ...
    p = [[.8, .1, .1], [.7, .2, .1], [.2, .7, .1], [.45, .4, .15], [.1, .1, .8], [.1, .2, .7]]
    tl = _timeline(p, [0, 10, 20, 30, 40, 50], 20, 70)
    segs = timeline.find_segments(tl)
    assert [(s.start, s.end, s.label) for s in segs] == [(0, 25, 0), (25, 35, 1), (35, 45, 0), (45, 70, 2)]
    assert segs[0].score == pytest.approx(0.75) and segs[0].first_window == 0 and segs[0].last_window == 1
    # threshold: window 3 (top 0.45) has no class
    segs = timeline.find_segments(tl, threshold=0.5)
    assert [s.label for s in segs] == [0, 1, -1, 2]
    labels = timeline.frame_labels(segs, 70)
    assert labels.shape == (70,) and (labels[35:45] == -1).all() and (labels[:25] == 0).all()
    # minimum length 1.5 s = 15 frames: the 10-frame segments go, shortest (then earliest) first: b's neighbours
    # are both a, and then the second a joins the first
    segs = timeline.find_segments(tl, min_segment=1.5)
    assert [(s.start, s.end, s.label) for s in segs] == [(0, 45, 0), (45, 70, 2)]
    # a short segment between two classes goes to the one its windows score higher
    for middle, expected in (([.1, .5, .4], [(0, 25, 0), (25, 60, 2)]), ([.4, .5, .1], [(0, 35, 0), (35, 60, 2)])):
        p2 = [[.8, .1, .1], [.8, .1, .1], middle, [.1, .1, .8], [.1, .1, .8]]
        segs = timeline.find_segments(_timeline(p2, [0, 10, 20, 30, 40], 20, 60), min_segment=1.5)
        assert [(s.start, s.end, s.label) for s in segs] == expected
    with pytest.raises(ValueError, match="threshold"):
        timeline.find_segments(tl, threshold=1.5)


def test_frames_folder_needs_fps_for_seconds_and_bad_spans_are_errors(long_video, ckpt, tmp_path, capsys):
    path, frames = long_video
    folder = frames_folder(frames[:40], tmp_path / "frames")
    common = ["--model", ckpt, "--classes", CLASSES, "--image-tmpl", "img_{:05d}.png", "--no-plot"]
    rc, out, err = run_predict(capsys, folder, *common, "--window", "2s", "--out", tmp_path / "a")
    assert rc == 2 and "frame rate is unknown" in err and "--fps" in err and "Traceback" not in err
    rc, out, err = run_predict(capsys, folder, *common, "--window", "2s", "--fps", "10", "--out", tmp_path / "b",
                               "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["window"]["frames"] == 20 and doc["stride"]["frames"] == 10 and doc["num_windows"] == 3
    rc, out, err = run_predict(capsys, folder, *common, "--window", "16", "--stride", "8", "--out", tmp_path / "c")
    assert rc == 0, err and "3 windows" not in out
    rc, out, err = run_predict(capsys, path, *common, "--window", "2 seconds", "--out", tmp_path / "d")
    assert rc == 2 and "--window '2 seconds'" in err


@pytest.mark.parametrize("stop", ["error", "ctrl-c"])
def test_a_video_that_breaks_off_keeps_the_windows_read_before(long_video, ckpt, tmp_path, capsys, monkeypatch, stop):
    """A decoding error (or Ctrl-C) at frame 70: the windows that end before it are written; exit status 1 (130)."""
    import av

    path, _ = long_video
    real_open = av.open

    class Broken:
        def __init__(self, container):
            self._c = container
            self.streams = container.streams

        def decode(self, stream):
            for k, frame in enumerate(self._c.decode(stream)):
                if k == 70 and stop == "ctrl-c":
                    raise KeyboardInterrupt
                if k == 70:
                    raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
                yield frame

        def close(self):
            self._c.close()

        def __getattr__(self, name):  # the rest (format, name) as the real container's
            return getattr(self._c, name)

    monkeypatch.setattr(av, "open", lambda *a, **k: Broken(real_open(*a, **k)))
    out = tmp_path / "tl"
    rc, stdout, err = run_predict(capsys, path, "--model", ckpt, "--classes", CLASSES, "--window", "2s", "--stride",
                                  "1s", "--out", out, "--no-plot", "--json")
    expected_rc, said = (1, "broke off") if stop == "error" else (130, "interrupted")
    assert rc == expected_rc and said in err
    doc = json.loads((out / "timeline.json").read_text())
    assert not doc["complete"]
    assert ("decoding failed after 70" if stop == "error" else "interrupted") in doc["error"]
    assert doc["segments"][-1]["end_frame"] == doc["num_frames"] <= 71
    # every window whose sampled frames all come before frame 70 was scored (those starting at 0, 10, ..., 50),
    # and none after
    expected = [w.index for w in plan_windows(131, 20, 10) if window_frames(w, 8).max() < 70]
    assert [w["window"] for w in doc["windows"]] == expected == list(range(6))


def test_unreadable_video_is_a_clear_error(ckpt, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    rc, out, err = run_predict(capsys, bad, "--model", ckpt, "--classes", CLASSES, "--window", "2s",
                               "--out", tmp_path / "o")
    assert rc == 2 and "broken.mp4" in err and "Traceback" not in err
    with pytest.raises(SampleLoadError):
        list(WindowStream(str(bad), [Window(0, 0, 4)], 8, build_transform("test", 32)))
