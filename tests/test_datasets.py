"""datasets/: list files, class lists, readers (frames, decord, PyAV), transforms, VideoDataset.

All data is written by the tests into tmp_path. Frame k of every test video shows k as 6 vertical
black/white stripes (a binary code), which survives JPEG and video compression, so reading tests can
tell exactly which frame came back.
"""

import logging
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import datasets
from datasets import (CLIP_MEAN, CLIP_STD, ListFileError, SampleLoadError, VideoDataset,
                      VideoRecord, build_transform, load_class_list, load_frames, load_video_clip,
                      read_list_file, sample_indices)
from datasets import readers
from datasets.readers import VideoFile

av = pytest.importorskip("av")

W, H, BITS, NFRAMES = 96, 48, 6, 40
STRIPE = W // BITS


# ----------------------------------------------------------------------------- test data

def frame_image(k: int) -> np.ndarray:
    """(H, W, 3) uint8 image whose stripe j is white when bit j of k is set."""
    img = np.full((H, W, 3), 16, np.uint8)
    for j in range(BITS):
        if (k >> j) & 1:
            img[:, j * STRIPE:(j + 1) * STRIPE] = 235
    return img


def decode_codes(frames: torch.Tensor) -> list:
    """Recover k from uint8 (K, 3, H, W) frames: the mean of each stripe's inner part."""
    assert frames.dtype == torch.uint8 and frames.dim() == 4 and frames.shape[1] == 3
    codes = []
    for f in frames.float():
        k = 0
        for j in range(BITS):
            inner = f[:, 4:-4, j * STRIPE + 4:(j + 1) * STRIPE - 4]
            if inner.mean() > 128:
                k |= 1 << j
        codes.append(k)
    return codes


def write_frames(folder, n=NFRAMES, tmpl="img_{:05d}.jpg", start=1):
    os.makedirs(folder, exist_ok=True)
    for k in range(n):
        Image.fromarray(frame_image(k)).save(os.path.join(folder, tmpl.format(start + k)), quality=90)
    return str(folder)


def write_video(path, n=NFRAMES, codec="libx264", faststart=False):
    """Frames 0..n-1 as a video; ``faststart`` puts the index first (as streamable mp4s have it)."""
    container = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {})
    stream = container.add_stream(codec, rate=25)
    stream.width, stream.height = W, H
    stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    stream.bit_rate = 2_000_000
    if n == 0:
        container.start_encoding()  # a container with a video stream but no frames
    for k in range(n):
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame_image(k), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return str(path)


def write_list(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(params=["decord", "pyav"])
def backend(request):
    """Run a test once with each video reader."""
    if request.param == "decord":
        pytest.importorskip("decord")
    readers.set_video_backend(request.param)
    yield request.param
    readers.set_video_backend(None)


# ----------------------------------------------------------------------------- list files

def test_read_list_file_forms_and_root(tmp_path):
    lst = write_list(tmp_path / "l.txt", [
        "#437_How_To_Ride_A_Bike_ride_bike_f_cm_np1_ba_med_0 91 7", "",
        "a/v1.mp4 300 3",
        "abs_dir_video 0 1".replace("abs_dir_video", str(tmp_path / "abs")),
        "b/v2.avi 7",            # num_frames left out
        "c/v3.webm",             # no label
        "air drumming/x y.mp4 120 2",  # spaces in the path
        "d/v4.mp4 10 -1",        # unknown label
    ])
    recs = read_list_file(lst, root="ROOT", allow_outside_root=True)  # the absolute path lies outside ROOT
    assert len(recs) == 7
    assert recs[0].path.endswith("#437_How_To_Ride_A_Bike_ride_bike_f_cm_np1_ba_med_0"), "'#' is no comment"
    recs = recs[1:]
    assert recs[0] == VideoRecord(os.path.join("ROOT", "a/v1.mp4"), 300, 3, 3)
    assert recs[1] == VideoRecord(str(tmp_path / "abs"), 0, 1, 4), "absolute paths ignore the root"
    assert (recs[2].num_frames, recs[2].label) == (0, 7)
    assert (recs[3].num_frames, recs[3].label) == (0, None)
    assert recs[4].path == os.path.join("ROOT", "air drumming/x y.mp4") and recs[4].label == 2
    assert recs[5].label is None and recs[5].line == 8
    assert read_list_file(lst)[1].path == "a/v1.mp4"


def test_list_paths_that_leave_the_root_are_refused_unless_allowed(tmp_path):
    root, outside = tmp_path / "frames", tmp_path / "elsewhere"
    (root / "a" / "v1").mkdir(parents=True)
    (outside / "secret").mkdir(parents=True)
    os.symlink(outside / "secret", root / "a" / "linked_out")      # a link leading out of the root
    os.symlink(root / "a" / "v1", root / "a" / "linked_in")         # a link that stays inside: fine
    os.symlink(outside, root / "disk2")                             # a linked-in folder of another disk
    good = ["a/v1 8 0", "a/linked_in 8 1", "a/../a/v1 8 0"]
    assert len(read_list_file(write_list(tmp_path / "ok.txt", good), root=str(root))) == 3
    for n, bad in enumerate(["../elsewhere/secret 8 0", "a/linked_out 8 1", "disk2/secret 8 1", "a/v1/../../.. 8 0"]):
        lst = write_list(tmp_path / f"bad{n}.txt", good + [bad])
        with pytest.raises(ListFileError, match=rf"bad{n}.txt:4: '{re.escape(bad.split()[0])}' leads outside the "
                                                rf"data root {re.escape(str(root))} .*data.allow_outside_root"):
            read_list_file(lst, root=str(root))
        assert read_list_file(lst, root=str(root), allow_outside_root=True)[3].line == 4
    # An absolute path names its place itself and is kept, with or without a root, as it always was.
    absolute = write_list(tmp_path / "abs.txt", [f"{outside}/secret 8 0"])
    assert read_list_file(absolute)[0].path == read_list_file(absolute, root=str(root))[0].path == f"{outside}/secret"
    # The option reaches the dataset (and, through data.allow_outside_root, train.py and test.py).
    with pytest.raises(ListFileError, match="leads outside"):
        VideoDataset(str(tmp_path / "bad1.txt"), root=str(root), mode="test")
    assert len(VideoDataset(str(tmp_path / "bad1.txt"), root=str(root), mode="test", allow_outside_root=True)) == 4


@pytest.mark.parametrize("bad", ["v.mp4 many 3", "v.mp4 30 x", "v.mp4 -4 1", "v.mp4 x", "v.mp4 3 -2"])
def test_malformed_list_line_names_file_and_line(tmp_path, bad):
    lst = write_list(tmp_path / "train.txt", ["ok.mp4 10 1", "ok2.mp4 10 0", bad])
    with pytest.raises(ListFileError, match=r"train\.txt:3: "):
        read_list_file(lst)


def test_label_outside_class_list_fails_at_construction(tmp_path):
    lst = write_list(tmp_path / "val.txt", ["a.mp4 10 1", "b.mp4 10 5", "c.mp4 10 0"])
    assert len(read_list_file(lst, num_classes=6)) == 3
    with pytest.raises(ListFileError, match=r"val\.txt:2: label 5 .*\[0, 5\)"):
        read_list_file(lst, num_classes=5)
    with pytest.raises(ListFileError, match=r"val\.txt:2"):
        VideoDataset(lst, num_classes=5)  # before any video is opened


def test_empty_or_missing_list(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_list_file(tmp_path / "nope.txt")
    with pytest.raises(ListFileError, match="no video lines"):
        read_list_file(write_list(tmp_path / "e.txt", ["", "  "]))


def test_load_class_list(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text('id,name\n0,abseiling\n1,air drumming\n2,"pushing, then pulling"\n')
    assert load_class_list(p) == ["abseiling", "air drumming", "pushing, then pulling"]
    for text, msg in [("name,id\n0,a\n", r"c\.csv:1: expected the header"),
                      ("id,name\n0,a\n2,b\n", r"c\.csv:3: ids must be 0..K-1 in order; expected 1, got 2"),
                      ("id,name\n0,a\n1,a\n", r"c\.csv:3: class name 'a' repeats"),
                      ("id,name\nzero,a\n", r"c\.csv:2: id must be an integer"),
                      ("id,name\n0,a,b\n", r"c\.csv:2: expected 2 fields"),
                      ("id,name\n", "no classes")]:
        p.write_text(text)
        with pytest.raises(ListFileError, match=msg):
            load_class_list(p)


def test_repository_class_lists_load():
    root = os.path.join(os.path.dirname(__file__), "..", "lists")
    sizes = {"ucf101_classes.csv": 101, "hmdb51_classes.csv": 51, "kinetics_400_classes.csv": 400,
             "ssv2_classes.csv": 174}
    for name, k in sizes.items():
        path = os.path.join(root, name)
        if os.path.exists(path):
            assert len(load_class_list(path)) == k, name


# ----------------------------------------------------------------------------- readers

def test_frame_folder_returns_written_frames(tmp_path):
    folder = write_frames(tmp_path / "v")
    idx = [0, 7, 3, 3, 39]
    frames = load_frames(folder, idx)
    assert frames.shape == (5, 3, H, W) and frames.dtype == torch.uint8
    assert decode_codes(frames) == idx
    # other naming: 0-based, another template
    folder0 = write_frames(tmp_path / "w", n=10, tmpl="{:06d}.jpg", start=0)
    assert decode_codes(load_frames(folder0, [0, 9, 5], image_tmpl="{:06d}.jpg", index_start=0)) == [0, 9, 5]
    assert readers.count_frame_files(folder, "img_{:05d}.jpg", 1) == NFRAMES


@pytest.mark.parametrize("tmpl,start", [("img_{:05d}.jpg", 1), ("{}.jpg", 0), ("{:06d}.png", 0)])
def test_frame_count_is_the_same_with_or_without_other_files(tmp_path, tmpl, start):
    """A folder of only frame files is counted without the per-name scan; other files must not change the count,
    and a gap stays an error either way."""
    for extra in ((), ("notes.txt", tmpl.format(start + 20) + ".bak")):
        folder = tmp_path / f"v{len(extra)}"
        folder.mkdir()
        for k in range(5):
            (folder / tmpl.format(start + k)).write_bytes(b"")
        for name in extra:
            (folder / name).write_bytes(b"")
        assert readers.count_frame_files(str(folder), tmpl, start) == 5
        (folder / tmpl.format(start + 7)).write_bytes(b"")
        with pytest.raises(SampleLoadError, match="gap"):
            readers.count_frame_files(str(folder), tmpl, start)


@pytest.mark.parametrize("name,codec", [("v.mp4", "libx264"), ("v.mp4", "mpeg4"), ("v.avi", "mpeg4"),
                                        ("v.avi", "mjpeg")])
def test_video_file_returns_written_frames(tmp_path, backend, name, codec):
    path = write_video(tmp_path / name, codec=codec)
    video = VideoFile(path)
    assert video.backend == backend
    assert video.num_frames == NFRAMES, "frame count from the container"
    idx = [0, 5, 17, 17, 39, 2]
    frames = load_frames(path, idx)
    assert frames.shape == (len(idx), 3, H, W) and frames.dtype == torch.uint8
    assert decode_codes(frames) == idx


def test_list_count_zero_uses_container_count(tmp_path, backend):
    video = write_video(tmp_path / "v.mp4")
    folder = write_frames(tmp_path / "f")
    lst = write_list(tmp_path / "l.txt", [f"{video} 0 0", f"{video} {NFRAMES} 0", f"{video} 20 0",
                                          f"{folder} 0 1", f"{folder} {NFRAMES} 1", f"{video} 1"])
    ds = VideoDataset(lst, num_frames=4, mode="test", input_size=32)
    v = [ds[i]["video"] for i in range(len(ds))]
    assert torch.equal(v[0], v[1]), "count 0 must read the 40 frames the container has"
    assert not torch.equal(v[0], v[2]), "a listed count is used when given"
    assert torch.equal(v[3], v[4]), "count 0 for a frame folder counts its files"
    assert torch.equal(v[5], v[0]), "'<path> <label>' leaves the count to the container"


def test_pyav_fallback_when_decord_is_missing(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    monkeypatch.setattr(readers, "_BACKEND", None)
    with caplog.at_level(logging.INFO, logger="datasets.readers"):
        assert datasets.video_backend() == "pyav"
    assert "PyAV" in caplog.text and "decord" in caplog.text
    path = write_video(tmp_path / "v.mp4")
    assert decode_codes(load_frames(path, [1, 38])) == [1, 38]
    monkeypatch.setattr(readers, "_BACKEND", None)


# ----------------------------------------------------------------------------- transforms

def _noise_clip(t=4, h=60, w=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    frame = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=g)
    return frame.expand(t, -1, -1, -1).contiguous()


def test_transform_shapes_and_dtype():
    clip = torch.randint(0, 256, (8, 3, 60, 80), dtype=torch.uint8)
    out = build_transform("train", 32)(clip, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    out = build_transform("test", 32)(clip)
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    out = build_transform("test", 32, num_crops=3)(clip)
    assert out.shape == (3, 8, 3, 32, 32)
    with pytest.raises(ValueError, match="uint8 clip"):
        build_transform("test", 32)(clip.float())


def test_train_transform_same_augmentation_for_every_frame():
    clip = _noise_clip()
    tf = build_transform("train", 32)
    outs = []
    for seed in range(30):
        out = tf(clip, torch.Generator().manual_seed(seed))
        assert all(torch.equal(out[0], out[t]) for t in range(1, out.shape[0])), f"seed {seed}"
        outs.append(out[0])
    # ... while different clips do get different augmentations
    assert len({o.sum().item() for o in outs}) > 20
    # and a given generator state reproduces the clip exactly
    assert torch.equal(tf(clip, torch.Generator().manual_seed(3)), tf(clip, torch.Generator().manual_seed(3)))


def test_flip_off_never_mirrors():
    # Grey levels rising from right to left (grey: colour jitter cannot reorder them; a ramp:
    # every crop contains a slope, and jitter keeps the brightest column below saturation).
    ramp = torch.linspace(150, 20, 64).round().to(torch.uint8)
    clip = ramp.view(1, 1, 1, 64).expand(2, 3, 48, 64).contiguous()

    def left_brighter(out):
        return (out[..., :4].mean() > out[..., -4:].mean()).item()
    on, off = build_transform("train", 32, flip=True), build_transform("train", 32, flip=False)
    flipped = [not left_brighter(on(clip, torch.Generator().manual_seed(s))) for s in range(40)]
    assert 5 < sum(flipped) < 35, "flip=True must flip about half of the clips"
    assert all(left_brighter(off(clip, torch.Generator().manual_seed(s))) for s in range(40))


def test_normalisation_constants():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    clip = torch.full((2, 3, 50, 70), 128, dtype=torch.uint8)
    out = build_transform("test", 32)(clip)
    for c in range(3):
        expected = (128 / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        assert torch.allclose(out[:, c], torch.full_like(out[:, c], expected), atol=1e-5)


def test_test_transform_resize_and_centre_crop_geometry():
    # a 60x80 frame whose columns encode their x position: after resizing the short side to
    # int(32*256/224)=36 (-> 36x48) and a centre 32 crop, the left edge is column 8 of 48.
    x = torch.arange(80, dtype=torch.float32).mul(3).to(torch.uint8)
    clip = x.view(1, 1, 1, 80).expand(1, 3, 60, 80).contiguous()
    out = build_transform("test", 32)(clip)
    raw = out[0, 0] * CLIP_STD[0] + CLIP_MEAN[0]  # back to [0, 1]
    col_left = raw[0, 0].item() * 255 / 3 * 48 / 80
    assert abs(col_left - 8.5) < 1.0, col_left
    # three crops: short side -> 32 (32x42), crops at x = 0, 5, 10
    three = build_transform("test", 32, num_crops=3)(clip)
    lefts = [(three[k, 0, 0, 0, 0] * CLIP_STD[0] + CLIP_MEAN[0]).item() * 255 / 3 * 42 / 80 for k in range(3)]
    assert lefts[0] < lefts[1] < lefts[2] and abs(lefts[2] - lefts[0] - 10) < 1.5, lefts


def test_fast_hue_matches_torchvision():
    F = pytest.importorskip("torchvision.transforms.v2.functional")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[0, :, :3, :3] = 0.5  # grey pixels have no hue
    for h in (-0.1, -0.02, 0.07, 0.1, 0.5):
        assert torch.allclose(datasets.transforms.adjust_hue(x, h), F.adjust_hue(x, h), atol=1e-5)


# ----------------------------------------------------------------------------- VideoDataset

def _good_and_bad(tmp_path, kind):
    """A list whose 2nd line is broken in the way `kind` says; returns (list, bad file)."""
    good = write_frames(tmp_path / "good")
    bad = tmp_path / "bad"
    line = f"{bad} {NFRAMES} 1"
    if kind == "missing_frame":
        write_frames(bad)
        bad_file = bad / "img_00018.jpg"  # frame 17: a test-mode middle for T=8, n=40
        os.remove(bad_file)
    elif kind == "corrupt_jpeg":
        write_frames(bad)
        bad_file = bad / "img_00018.jpg"
        data = bad_file.read_bytes()
        bad_file.write_bytes(data[: len(data) // 2])
    elif kind == "missing_video":
        bad_file = tmp_path / "nope.mp4"
        line = f"{bad_file} 0 1"
    else:
        bad_file = tmp_path / "bad.mp4"
        line = f"{bad_file} 0 1"
        if kind == "zero_byte_video":
            bad_file.write_bytes(b"")
        elif kind == "truncated_video":  # index at the end: lost
            data = open(write_video(tmp_path / "full.mp4"), "rb").read()
            bad_file.write_bytes(data[: len(data) // 2])
        elif kind == "truncated_streamable_video":  # index kept, the last frames' data lost
            data = open(write_video(tmp_path / "full.mp4", faststart=True), "rb").read()
            bad_file.write_bytes(data[: len(data) * 17 // 20])
        elif kind == "no_frames_video":
            bad_file = tmp_path / "bad.avi"
            line = f"{bad_file} 0 1"
            write_video(bad_file, n=0, codec="mpeg4")
    lst = write_list(tmp_path / "l.txt", [f"{good} 0 0", line, f"{good} 0 2"])
    return lst, str(bad_file)


BAD_KINDS = ["missing_frame", "corrupt_jpeg", "missing_video", "zero_byte_video", "truncated_video",
             "truncated_streamable_video", "no_frames_video"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_on_error_skip_replaces_and_counts(tmp_path, backend, kind, caplog):
    lst, bad_file = _good_and_bad(tmp_path, kind)
    ds = VideoDataset(lst, num_frames=8, mode="test", input_size=32, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="datasets.video_dataset"):
        sample = ds[1]
    assert sample["index"] == 2 and sample["label"] == 2 and sample["failed"] == 1
    assert sample["video"].shape == (1, 8, 3, 32, 32)
    assert ds[0]["failed"] == 0
    summary = ds.failure_summary()
    assert summary["count"] == 1 and list(summary["files"]) == [bad_file]
    assert bad_file in caplog.text and "l.txt line 2" in caplog.text


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_on_error_raise_names_the_file(tmp_path, backend, kind):
    lst, bad_file = _good_and_bad(tmp_path, kind)
    ds = VideoDataset(lst, num_frames=8, mode="test", input_size=32, on_error="raise")
    with pytest.raises(SampleLoadError) as info:
        ds[1]
    assert bad_file in str(info.value) and info.value.path == bad_file


def test_skip_wraps_around_and_gives_up_when_everything_fails(tmp_path):
    good = write_frames(tmp_path / "good", n=10)
    lst = write_list(tmp_path / "l.txt", [f"{good} 0 4", f"{tmp_path}/x.mp4 0 1", f"{tmp_path}/y.mp4 0 1"])
    ds = VideoDataset(lst, num_frames=4, mode="train", input_size=32)
    s = ds[2]
    assert (s["index"], s["failed"], s["label"]) == (0, 1, 4), "replacement wraps to index 0"
    all_bad = write_list(tmp_path / "b.txt", [f"{tmp_path}/x.mp4 0 1", f"{tmp_path}/y.mp4 0 1"])
    with pytest.raises(RuntimeError, match="2 samples in a row failed"):
        VideoDataset(all_bad, num_frames=4, input_size=32)[0]


def test_dataset_train_sample_and_reproducibility(tmp_path):
    folder = write_frames(tmp_path / "f")
    lst = write_list(tmp_path / "l.txt", [f"{folder} {NFRAMES} 3"] * 4)
    ds = VideoDataset(lst, num_frames=8, mode="train", input_size=32, seed=1, num_classes=4)
    s = ds[0]
    assert s["video"].shape == (8, 3, 32, 32) and s["video"].dtype == torch.float32
    assert (s["label"], s["index"], s["failed"]) == (3, 0, 0)
    assert torch.equal(ds[0]["video"], s["video"]), "same (seed, epoch, index) -> same clip"
    assert not torch.equal(ds[1]["video"], s["video"]), "another index -> another clip"
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["video"], s["video"]), "another epoch -> another clip"
    ds.set_epoch(0)
    assert torch.equal(ds[0]["video"], s["video"]), "resuming at an epoch reproduces it"
    other = VideoDataset(lst, num_frames=8, mode="train", input_size=32, seed=2)
    assert not torch.equal(other[0]["video"], s["video"]), "another seed -> another clip"


def test_load_video_clip_is_the_test_pipeline(tmp_path, backend):
    video = write_video(tmp_path / "v.mp4")
    views = load_video_clip(video, num_frames=4, input_size=32, num_clips=2, num_crops=3)
    assert views.shape == (6, 4, 3, 32, 32) and views.dtype == torch.float32
    lst = write_list(tmp_path / "l.txt", [f"{video} 0 0"])
    ds = VideoDataset(lst, num_frames=4, mode="test", input_size=32, num_clips=2, num_crops=3)
    assert torch.equal(ds[0]["video"], views)
    assert torch.equal(load_video_clip(video, 4, 32, 2, 3, listed_frames=NFRAMES), views)
    assert not torch.equal(load_video_clip(video, 4, 32, 2, 3, listed_frames=20), views)
    # clip-major order: views 0..2 are clip 0's three crops, built from clip 0's frames
    idx = sample_indices(NFRAMES, 4, "test", num_clips=2)
    crops0 = build_transform("test", 32, num_crops=3)(load_frames(video, idx[0]))
    crops1 = build_transform("test", 32, num_crops=3)(load_frames(video, idx[1]))
    assert torch.equal(views[:3], crops0) and torch.equal(views[3:], crops1)
    assert not torch.equal(crops0, crops1)


def test_dataloader_with_two_workers(tmp_path):
    folder = write_frames(tmp_path / "f")
    video = write_video(tmp_path / "v.mp4")
    lines = [f"{folder} {NFRAMES} {i % 3}" if i % 2 else f"{video} 0 {i % 3}" for i in range(8)]
    lines[5] = f"{tmp_path}/missing.mp4 0 1"
    lst = write_list(tmp_path / "l.txt", lines)
    ds = VideoDataset(lst, num_frames=4, mode="train", input_size=32, seed=7)

    def run(workers, persistent=False, epochs=(0,)):
        loader = DataLoader(ds, batch_size=2, num_workers=workers, persistent_workers=persistent)
        out = []
        for e in epochs:
            ds.set_epoch(e)
            batches = list(loader)
            out.append((torch.cat([b["video"] for b in batches]), torch.cat([b["index"] for b in batches]),
                        int(sum(b["failed"].sum() for b in batches))))
        return out

    (v2, idx2, failed2), (v2e1, _, _) = run(2, persistent=True, epochs=(0, 1))
    (v0, idx0, failed0), = run(0)
    assert v2.shape == (8, 4, 3, 32, 32)
    assert idx2.tolist() == [0, 1, 2, 3, 4, 6, 6, 7], "index 5 is missing and replaced by 6"
    assert failed2 == failed0 == 1, "the trainer sees every failure by summing batch['failed']"
    # every sample is a different clip (workers do not repeat each other's random draws) ...
    flat = v2.flatten(1)
    distinct = {tuple(flat[i, :64].tolist()) for i in range(8) if i != 5}
    assert len(distinct) == 7
    # ... and the clips do not depend on the number of workers
    assert torch.equal(v2, v0) and torch.equal(idx2, idx0)
    # persistent workers still see set_epoch
    ds.set_epoch(1)
    assert torch.equal(v2e1[0], ds[0]["video"]) and not torch.equal(v2e1[0], v2[0])


def test_raise_in_a_worker_still_names_the_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    lst = write_list(tmp_path / "l.txt", [f"{bad} 0 0"])
    ds = VideoDataset(lst, num_frames=4, mode="test", input_size=32, on_error="raise")
    with pytest.raises(SampleLoadError, match="broken.mp4"):
        next(iter(DataLoader(ds, batch_size=1, num_workers=1)))


def test_wrong_frame_template_is_reported(tmp_path):
    folder = write_frames(tmp_path / "f", n=5)
    lst = write_list(tmp_path / "l.txt", [f"{folder} 0 0"])
    ds = VideoDataset(lst, num_frames=4, mode="test", input_size=32, on_error="raise",
                      image_tmpl="frame_{:04d}.png")
    with pytest.raises(SampleLoadError, match=r"no frame files .*frame_0001\.png"):
        ds[0]
    with pytest.raises(ValueError, match="image_tmpl"):
        VideoDataset(lst, image_tmpl="img.jpg")


def test_bilinear_test_transform_matches_a_pil_reference():
    # Reference: Pillow resize of the short side to int(S*256/224) + centre crop, per frame.
    T_ = pytest.importorskip("torchvision.transforms")
    g = torch.Generator().manual_seed(0)
    small = torch.randint(0, 256, (2, 3, 15, 20), dtype=torch.uint8, generator=g)
    clip = torch.nn.functional.interpolate(small.float(), size=(60, 80), mode="bilinear").round().to(torch.uint8)
    ours = build_transform("test", 32, resize="bilinear")(clip)
    ref_tf = T_.Compose([T_.Resize(36, interpolation=T_.InterpolationMode.BILINEAR), T_.CenterCrop(32),
                         T_.ToTensor(), T_.Normalize(CLIP_MEAN, CLIP_STD)])
    ref = torch.stack([ref_tf(Image.fromarray(f.permute(1, 2, 0).numpy())) for f in clip])
    diff = ((ours - ref) * torch.tensor(CLIP_STD).view(3, 1, 1)).abs()  # back in [0, 1] units
    # identical in practice; a 1-pixel shift of the crop would give a mean difference of ~29/255
    assert diff.mean() < 0.5 / 255 and diff.max() < 2.0 / 255, (diff.mean(), diff.max())


def _published_test_view(frame_hw3: np.ndarray, size: int) -> torch.Tensor:
    """The published test view of one frame, written out from its rules: PIL bicubic resize of the short side to
    size * 256 // 224 (long side truncated; no resize when it already has that size), the centre crop at
    round((h - size) / 2), /255 in float32, minus mean, divided by std."""
    img = Image.fromarray(frame_hw3)
    w, h = img.size
    short = size * 256 // 224
    if min(w, h) != short:
        nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize((nw, nh), Image.BICUBIC)
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)
    return x.sub_(torch.tensor(CLIP_MEAN)[:, None, None]).div_(torch.tensor(CLIP_STD)[:, None, None])


@pytest.mark.parametrize("hw", [(240, 320), (256, 340), (320, 240), (90, 160)])
def test_published_test_view_is_pil_bicubic_exactly(hw):
    g = torch.Generator().manual_seed(hw[0])
    small = torch.randint(0, 256, (3, 3, hw[0] // 10, hw[1] // 10), dtype=torch.uint8, generator=g)
    clip = torch.nn.functional.interpolate(small.float(), size=hw, mode="bicubic").clamp(0, 255).round().to(torch.uint8)
    size = 224 if min(hw) >= 224 else 64
    ours = build_transform("test", size)(clip)  # the default resize is the published one
    ref = torch.stack([_published_test_view(f.permute(1, 2, 0).contiguous().numpy(), size) for f in clip])
    assert torch.equal(ours, ref)
    other = build_transform("test", size, resize="bilinear")(clip)
    if min(hw) == size * 256 // 224:
        # Already at the target size: neither resize touches it, the view is the centre crop of the frame.
        assert torch.equal(other, ref)
    else:
        # The bilinear alternative is a different image (about a grey level apart), so the switch matters.
        assert not torch.equal(other, ref)
    with pytest.raises(ValueError, match="pil_bicubic"):
        build_transform("test", size, resize="nearest")


def test_multiscale_crop_boxes():
    tf = datasets.TrainTransform(224)
    sizes = [240, 210, 180, 158]  # int(240 * s) for s in (1, .875, .75, .66)
    expected = {(sizes[i], sizes[j]) for i in range(4) for j in range(4) if abs(i - j) <= 1}
    seen = set()
    for seed in range(400):
        top, left, ch, cw = tf.sample_crop(240, 320, torch.Generator().manual_seed(seed))
        assert (ch, cw) in expected
        assert 0 <= top <= 240 - ch and 0 <= left <= 320 - cw
        # one of the 13 fixed positions: multiples of a quarter of the free space
        assert left % ((320 - cw) // 4 or 1) == 0 and top % ((240 - ch) // 4 or 1) == 0
        seen.add((ch, cw))
    assert seen == expected


def test_train_transform_without_jitter_is_crop_then_resize():
    T_ = pytest.importorskip("torchvision.transforms")
    g = torch.Generator().manual_seed(1)
    small = torch.randint(0, 256, (2, 3, 12, 16), dtype=torch.uint8, generator=g)
    clip = torch.nn.functional.interpolate(small.float(), size=(48, 64), mode="bilinear").round().to(torch.uint8)
    tf = datasets.TrainTransform(32, flip=False, jitter_p=0.0, grayscale_p=0.0)
    for seed in range(5):
        top, left, ch, cw = tf.sample_crop(48, 64, torch.Generator().manual_seed(seed))
        out = tf(clip, torch.Generator().manual_seed(seed))
        ref_tf = T_.Compose([T_.Resize((32, 32)), T_.ToTensor(), T_.Normalize(CLIP_MEAN, CLIP_STD)])
        ref = torch.stack([ref_tf(Image.fromarray(f[:, top:top + ch, left:left + cw].permute(1, 2, 0).numpy()))
                           for f in clip])
        diff = ((out - ref) * torch.tensor(CLIP_STD).view(3, 1, 1)).abs()
        assert diff.max() < 2.0 / 255, (seed, diff.max())


# ----------------------------------------------------------------------------- the loader only decodes
def test_deferred_transform_gives_exactly_the_loaders_clips_on_the_cpu(tmp_path):
    """data.transform_on: device: the workers decode and draw the augmentation, the batch is transformed where the
    model runs. On the CPU that must be exactly the clips the loader makes itself, in training (with jitter, flips,
    greyscale, clips of other sizes in one batch) and in testing under the centre rules (three clips, three crops)."""
    big, small = write_frames(tmp_path / "big"), write_frames(tmp_path / "small")
    # another frame size in the same batch
    from PIL import Image as _Image
    for f in sorted(os.listdir(small)):
        _Image.open(os.path.join(small, f)).resize((40, 30)).save(os.path.join(small, f))
    lst = write_list(tmp_path / "l.txt", [f"{big} {NFRAMES} 1", f"{small} {NFRAMES} 2"] * 6)
    for mode, extra in (("train", {}), ("test", {"num_clips": 3, "num_crops": 3, "test_rules": "centre"})):
        plain = VideoDataset(lst, num_frames=8, mode=mode, input_size=32, seed=4, **extra)
        deferred = VideoDataset(lst, num_frames=8, mode=mode, input_size=32, seed=4, deferred=True, **extra)
        for epoch in (0, 3):
            plain.set_epoch(epoch)
            deferred.set_epoch(epoch)
            a = next(iter(DataLoader(plain, batch_size=12, num_workers=0)))
            b = next(iter(DataLoader(deferred, batch_size=12, num_workers=2, collate_fn=deferred.collate)))
            assert b["video"][0].dtype == torch.uint8 and {v.shape[-1] for v in b["video"]} == {W, 40}
            assert torch.equal(plain.finish(a, torch.device("cpu")), deferred.finish(b, torch.device("cpu"))), mode
            assert torch.equal(a["label"], b["label"]) and torch.equal(a["index"], b["index"])
    with pytest.raises(ValueError, match="Pillow, on the CPU"):
        VideoDataset(lst, num_frames=8, mode="test", input_size=32, deferred=True)  # the published test view
