"""The data path, nothing lost or wrong silently (issue 18): rotation, gaps, partial and non-video files, manifest
versus list, names the readers must read back, folder clashes, sizes, the PyAV fallback, decord's own log lines, the
same reasons in every tool, your own dataset in one command, and the --help examples. Every video and folder is
written by the test itself into tmp_path.
"""
import contextlib
import io
import json
import logging
import os
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

av = pytest.importorskip("av")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "Dataset_creation_scripts"
sys.path.insert(0, str(SCRIPTS))

import build_lists  # noqa: E402
import extract_frames  # noqa: E402
import predict  # noqa: E402
from datasets import ListFileError, SampleLoadError, VideoDataset, load_video_clip, read_list_file  # noqa: E402
from datasets import readers  # noqa: E402
from datasets.lists import MANIFEST_HEADER, PathRules  # noqa: E402
from test_predict import ckpt  # noqa: E402,F401  (fixture: a tiny random T2L checkpoint)
from utils.config import check_paths, load_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------- test data

def scene(k: int, w: int = 64, h: int = 32) -> np.ndarray:
    """Frame k: gradients (red across, blue down) and a white block moving right; no two orientations alike."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (xx * 255 // max(1, w - 1))
    img[..., 2] = (yy * 255 // max(1, h - 1))
    x0 = min(w - 6, 2 + 3 * k)
    img[h // 8:h // 8 + max(1, h // 3), x0:x0 + 6] = 255
    return img


def write_video(path, n=8, size=(64, 32), rotation=None, codec="libx264", faststart=False):
    """An n-frame video of :func:`scene`; ``rotation``: display rotation in degrees counter-clockwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    c = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {})
    s = c.add_stream(codec, rate=8)
    s.width, s.height = size
    s.pix_fmt = "yuv420p"
    s.options = {"crf": "12", "preset": "ultrafast"} if codec == "libx264" else {"qscale": "2"}
    if rotation:
        s.set_display_rotation(rotation)
    for k in range(n):
        for pkt in s.encode(av.VideoFrame.from_ndarray(scene(k, *size), format="rgb24")):
            c.mux(pkt)
    for pkt in s.encode():
        c.mux(pkt)
    c.close()
    return path


def write_frames(folder, n=8, skip=()):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(1, n + 1):
        if k not in skip:
            Image.fromarray(scene(k)).save(folder / f"img_{k:05d}.jpg", quality=95)
    return folder


def manifest_entries(out):
    lines = (Path(out) / "manifest.txt").read_text().splitlines()
    assert lines[0] == MANIFEST_HEADER
    return lines[1:]


def failures(path):
    return dict(line.split("\t", 1) for line in Path(path).read_text().splitlines())


@pytest.fixture
def decord_backend():
    pytest.importorskip("decord")
    readers.set_video_backend("decord")
    yield
    readers.set_video_backend(None)


def decord_frames(path):
    import decord
    return decord.VideoReader(str(path)).get_batch(list(range(4))).asnumpy()  # (4, H, W, 3)


def folder_frames(folder, n=4):
    return np.stack([np.asarray(Image.open(Path(folder) / f"img_{k:05d}.jpg").convert("RGB")) for k in range(1, n + 1)])


# ----------------------------------------------------------------------------- rotation

@pytest.mark.parametrize("container,rotation,turned", [("mp4", 90, True), ("mov", 180, True), ("mp4", 270, True),
                                                       ("mkv", 90, False)])
def test_rotated_video_frames_are_extracted_as_decord_shows_them(tmp_path, decord_backend, container, rotation, turned):
    src, out = tmp_path / "src", tmp_path / "out"
    video = write_video(src / "phone" / f"clip.{container}", rotation=rotation)
    result = extract_frames.run_extraction(src, out, workers=0, progress=False)
    assert result.failures == {}
    # decord turns MP4/MOV frames by their display rotation and leaves Matroska frames as stored
    shown = decord_frames(video)
    stored = np.stack([scene(k) for k in range(4)])
    expect = np.stack([np.rot90(f, rotation // 90) for f in stored]) if turned else stored
    assert shown.shape == expect.shape and np.abs(shown.astype(int) - expect).mean() < 8
    extracted = folder_frames(out / "phone" / "clip")
    assert extracted.shape == shown.shape, "the frames have decord's orientation"
    assert np.abs(extracted.astype(int) - shown).mean() < 4  # JPEG rounding only
    assert manifest_entries(out) == [f"phone/clip 8 rotation={rotation}" if turned else "phone/clip 8"]
    # the PyAV reader (used where decord is missing or fails) turns them the same way
    via_pyav = readers.VideoFile(str(video), backend="pyav").read([0, 1, 2, 3]).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(via_pyav, shown)


def test_a_rotated_video_predicts_the_same_from_its_file_and_its_frames(tmp_path, ckpt, decord_backend):
    src, out = tmp_path / "src", tmp_path / "out"
    video = write_video(src / "phone.mp4", n=16, rotation=90)
    extract_frames.run_extraction(src, out, workers=0, progress=False)
    sideways = tmp_path / "sideways"  # what extraction wrote before: the stored, unturned pictures
    sideways.mkdir()
    with av.open(str(video)) as c:
        for k, frame in enumerate(c.decode(video=0)):
            frame.to_image().save(sideways / f"img_{k + 1:05d}.jpg", quality=90)

    def probabilities(path):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert predict.main([str(path), "--model", str(ckpt), "--classes",
                                 "moving left,moving right,moving up,moving down,growing", "--json"]) == 0
        return np.array([t["probability"] for t in sorted(json.loads(buf.getvalue())["top"],
                                                          key=lambda t: t["class_id"])])

    from_file, from_frames, from_sideways = (probabilities(p) for p in (video, out / "phone", sideways))
    gap = np.abs(from_file - from_frames).max()
    assert gap < 0.02, (from_file, from_frames)
    # the measure tells the orientations apart (0.030 measured for the sideways frames, against 0.002)
    assert np.abs(from_file - from_sideways).max() > 5 * gap


def test_timeline_windows_of_a_rotated_video_are_turned_like_the_readers_frames(tmp_path, decord_backend):
    """predict.py --window streams a video through datasets/windows.py with PyAV: the same orientation as decord."""
    from datasets import build_transform
    from datasets.windows import Window, WindowStream
    video = write_video(tmp_path / "phone.mp4", n=8, rotation=90)
    tf = build_transform("test", 32)
    (_, views), = list(WindowStream(str(video), [Window(0, 0, 8)], num_frames=4, transform=tf))
    assert torch.equal(views, load_video_clip(str(video), num_frames=4, input_size=32))


# ----------------------------------------------------------------------------- frames folders with gaps

def test_a_gap_in_a_frames_folder_is_an_error_naming_the_first_missing_file(tmp_path, caplog, capsys, ckpt):
    folder = write_frames(tmp_path / "v", n=25, skip=(10,))
    missing = str(folder / "img_00010.jpg")
    with pytest.raises(SampleLoadError) as info:
        readers.count_frame_files(str(folder))
    assert info.value.path == missing and "gap (15 frame file(s) follow it, up to img_00025.jpg)" in str(info.value)
    with pytest.raises(SampleLoadError, match="img_00010.jpg"):
        load_video_clip(str(folder), num_frames=8, input_size=32)
    good = write_frames(tmp_path / "good", n=25)
    lst = tmp_path / "l.txt"
    # listed with its count (the gap is not among the sampled frames) or without: an error either way
    lst.write_text(f"{good} 25 0\n{folder} 25 1\n{folder} 0 1\n{good} 30 0\n{good} 0 2\n")
    ds = VideoDataset(str(lst), num_frames=2, mode="test", input_size=32, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="datasets.video_dataset"):
        samples = [ds[i] for i in range(4)]
    assert [s["failed"] for s in samples] == [0, 3, 2, 1], "counted under on_error: skip"
    summary = ds.failure_summary()["files"]
    assert summary[missing].startswith("missing frame file: the frames folder has a gap")
    assert summary[str(good / "img_00026.jpg")] == "missing frame file: the list gives 30 frames, the folder has 25"
    assert caplog.text.count("img_00010.jpg") == 3
    assert predict.main([str(folder), "--model", str(ckpt), "--classes", "a,b"]) == 2
    assert "img_00010.jpg: missing frame file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- partial and non-video files

def test_keep_partial_videos_are_recorded_as_partial(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    full = write_video(tmp_path / "full.mp4", n=40, faststart=True)
    data = full.read_bytes()
    (src / "cls").mkdir(parents=True)
    (src / "cls" / "cut.mp4").write_bytes(data[: len(data) * 17 // 20])  # the index kept, the last frames lost
    write_video(src / "cls" / "fine.mp4", n=5)
    args = [str(src), str(out), "--workers", "0", "--no-progress"]
    assert extract_frames.main(args) == 1
    cut = r"(decoding failed after \d+ frames \(truncated or corrupt\?\): .+|video ends after (\d+) of the 40 frames " \
          r"its header announces \(truncated\?\))"  # the stream fails, or ends early without an error
    assert re.fullmatch(cut, failures(out / "failures.txt")["cls/cut.mp4"])
    assert manifest_entries(out) == ["cls/fine 5"]
    assert extract_frames.main(args + ["--keep-partial"]) == 1, "a partial video is not a success"
    kept = [line for line in manifest_entries(out) if line.startswith("cls/cut ")]
    assert len(kept) == 1 and kept[0].endswith(" partial")
    n = int(kept[0].split()[1])
    assert 0 < n < 40 and len(list((out / "cls" / "cut").iterdir())) == n
    reason = failures(out / "failures.txt")["cls/cut.mp4"]
    assert re.fullmatch(f"partial, kept {n} frames: {cut}", reason)
    # a rerun skips it, and the record stays
    assert extract_frames.main(args) == 1
    assert failures(out / "failures.txt")["cls/cut.mp4"] == reason
    assert f"cls/cut {n} partial" in manifest_entries(out)


def _broken_files(folder: Path, monkeypatch) -> dict:
    """Broken inputs -> the reason every tool must give. The permission case is simulated when running as root."""
    folder.mkdir(parents=True)
    (folder / "empty.mp4").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(scene(0)).save(buf, format="JPEG")
    (folder / "photo.mp4").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(scene(0)).save(buf, format="PNG")
    (folder / "picture.avi").write_bytes(buf.getvalue())
    (folder / "noise.mkv").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    locked = write_video(folder / "locked.mp4", n=3)
    if os.geteuid() == 0:
        real_open = open

        def fake_open(file, *a, **k):
            if os.fspath(file) == str(locked):
                raise PermissionError(13, "Permission denied", str(locked))
            return real_open(file, *a, **k)
        monkeypatch.setattr(readers, "open", fake_open, raising=False)
    else:
        locked.chmod(0)
    return {"empty.mp4": "video file is empty (0 bytes)",
            "photo.mp4": "not a video: the file holds a JPEG image",
            "picture.avi": "not a video: the file holds a PNG image",
            "noise.mkv": re.compile(r"cannot open video \(.*Invalid data found when processing input.*\)"),
            "locked.mp4": "cannot read the video file (Permission denied)"}


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_broken_and_non_video_files_get_the_same_reason_in_every_tool(tmp_path, monkeypatch, backend):
    if backend == "decord":
        pytest.importorskip("decord")
    src = (tmp_path / "src").resolve()
    expected = _broken_files(src / "cls", monkeypatch)
    write_video(src / "cls" / "good.mp4", n=3)
    extract_frames.run_extraction(src, tmp_path / "frames", workers=0, progress=False)
    from_extraction = {rel.split("/")[-1]: r for rel, r in failures(tmp_path / "frames" / "failures.txt").items()}
    assert build_lists.main(["folders", str(src), "--out-dir", str(tmp_path / "lists"), "--workers", "0",
                             "--no-progress", "--val", "0"]) == 0
    from_builder = {rel.split("/")[-1]: r for rel, r in failures(tmp_path / "lists" / "failures.txt").items()}
    import extract_features
    from types import SimpleNamespace
    encoder = SimpleNamespace(num_frames=2, num_clips=1, num_crops=1, image_tmpl="img_{:05d}.jpg", index_start=1,
                              input_size=32, test_rules="published")
    readers.set_video_backend(backend)
    try:
        from_readers = {}
        for name in expected:
            with pytest.raises(SampleLoadError) as info:
                load_video_clip(str(src / "cls" / name), num_frames=2, input_size=32)
            from_readers[name] = info.value.reason
        exported = extract_features.ExportVideos([(str(src / "cls" / name), 0) for name in expected], encoder)
        from_export = {name: exported[i]["error"] for i, name in enumerate(expected)}
    finally:
        readers.set_video_backend(None)
    assert set(from_extraction) == set(from_builder) == set(expected)
    for name, want in expected.items():
        assert from_extraction[name] == from_builder[name] == from_readers[name] == from_export[name], name
        assert want.fullmatch(from_readers[name]) if isinstance(want, re.Pattern) else from_readers[name] == want


# ----------------------------------------------------------------------------- manifest versus list

def test_a_manifest_given_as_a_list_is_refused_saying_what_it_is(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_video(src / "a" / "v.mp4", n=3)
    extract_frames.run_extraction(src, out, workers=0, progress=False)
    renamed = tmp_path / "train.txt"
    renamed.write_text((out / "manifest.txt").read_text())
    old_style = tmp_path / "old" / "manifest.txt"  # written before the header line existed
    old_style.parent.mkdir()
    old_style.write_text("a/v 3\n")
    for path in (out / "manifest.txt", renamed, old_style):
        with pytest.raises(ListFileError, match=r"is the manifest that extract_frames.py writes .*frame counts would "
                                                r"become labels.*build_lists.py"):
            read_list_file(str(path))
        with pytest.raises(ListFileError, match="manifest"):
            VideoDataset(str(path))
    # the tools still read it as a manifest, flags and all; so does paths.by_name, which looks names up in it
    import _common
    assert _common.read_manifest_entries(out / "manifest.txt") == {"a/v": (3, ())}
    with open(out / "manifest.txt", "a") as f:
        f.write("b/turned clip 5 rotation=90\nc/cut 2 partial\n")
    published = tmp_path / "split.txt"
    published.write_text("/authors/disk/v.avi 0 1\n/authors/disk/turned clip.avi 0 0\n/authors/disk/cut.avi 0 0\n")
    recs = read_list_file(str(published), root=str(out), paths=PathRules.from_options(by_name=True, drop_extension=True))
    assert [r.path for r in recs] == [str(out / "a/v"), str(out / "b/turned clip"), str(out / "c/cut")]
    assert _common.parse_manifest_line("my clip 12 rotation=90 partial") == ("my clip", 12, ("rotation=90", "partial"))
    assert _common.parse_manifest_line("a partial 7") == ("a partial", 7, ())


# ----------------------------------------------------------------------------- what the tools write, the readers read

def test_what_the_tools_write_the_readers_read(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    names = [" lead.mp4", "trail .mp4", "#437_hash.mp4", "two  spaces.avi", "ünïcode.mp4"]
    for name in names:
        write_video(src / "cls" / name, n=3, codec="mpeg4" if name.endswith(".avi") else "libx264")
    write_frames(src / "cls2" / "ends in space ", n=2)  # a frames folder whose name a list line cannot end with
    classes = tmp_path / "classes.csv"
    classes.write_text("id,name\n0,cls\n1,cls2\n")
    listing = tmp_path / "all.txt"
    assert extract_frames.main([str(src), str(out), "--workers", "0", "--no-progress", "--classes", str(classes),
                                "--list-out", str(listing)]) == 0
    folders = {line.rsplit(" ", 1)[0] for line in manifest_entries(out)}
    assert {"cls/lead", "cls/trail", "cls/#437_hash", "cls/two  spaces"} <= folders, "no edge whitespace"
    records = read_list_file(str(listing), root=str(out), num_classes=2)
    assert len(records) == len(names)
    for r in records:
        assert readers.count_frame_files(r.path) == r.num_frames == 3, r.path
    flat = tmp_path / "flat"
    write_video(flat / " lead.mp4", n=2)  # not in a class folder: its frames folder must not start with a space
    extract_frames.run_extraction(flat, tmp_path / "flat_out", workers=0, progress=False)
    assert manifest_entries(tmp_path / "flat_out") == ["lead 2"]
    # the builder on the extracted frames and on the videos themselves (it checks the read-back too)
    for root, name in ((out, "frames"), (src, "videos")):
        assert build_lists.main(["folders", str(root), "--out-dir", str(tmp_path / name), "--workers", "0",
                                 "--no-progress", "--val", "0"]) == 0
        recs = read_list_file(str(tmp_path / name / "train.txt"), root=str(root))
        assert len(recs) == len(names) and all(os.path.exists(r.path) for r in recs)
    assert failures(tmp_path / "videos" / "failures.txt") == {
        "cls2/ends in space ": "the name ends with whitespace, which a list file cannot hold; rename it"}
    # two-field lines whose path has spaces: read when the file exists, else an error saying both readings
    two = tmp_path / "two.txt"
    two.write_text("cls/two  spaces.avi 0\n")
    rec, = read_list_file(str(two), root=str(src))
    assert (rec.path, rec.num_frames, rec.label) == (str(src / "cls/two  spaces.avi"), 0, 0)
    two.write_text("cls/no such.mp4 0\n")
    with pytest.raises(ListFileError, match=r"two.txt:1: num_frames must be an integer, got 'such.mp4'.*the path "
                                            r"'cls/no such.mp4' does not exist"):
        read_list_file(str(two), root=str(src))


# ----------------------------------------------------------------------------- clashes and sizes

def test_frames_folder_clashes_are_reported_at_once_or_kept_apart_by_extension(tmp_path):
    src = tmp_path / "src"
    for rel in ("a.mkv", "a.mov", "b.mp4", "b.avi", "c.mp4", "c/d.mp4", "e.mp4"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"x")
    with pytest.raises(ValueError) as info:
        extract_frames.find_videos(src)
    msg = str(info.value)
    assert msg.startswith("3 frames folder clash(es)") and "--keep-extension" in msg
    for part in ("'a.mkv' and 'a.mov'", "'b.avi' and 'b.mp4'", "'c.mp4' would go to 'c'"):
        assert part in msg
    videos = extract_frames.find_videos(src, keep_extension=True)
    assert {v.rel: v.folder for v in videos} == {"a.mkv": "a.mkv", "a.mov": "a.mov", "b.avi": "b.avi",
                                                 "b.mp4": "b.mp4", "c.mp4": "c.mp4", "c/d.mp4": "c/d.mp4", "e.mp4": "e"}


def test_short_side_never_enlarges_and_the_long_side_is_bounded(tmp_path):
    size, bound = extract_frames.resized_size, extract_frames.default_max_long_side(256)
    assert bound == 1024
    assert size(4000, 16, 256, bound) == (1024, 4), "not 64000x256"
    assert size(1, 1, 256, bound) == (1, 1) and size(320, 240, 256, bound) == (320, 240), "never enlarged"
    assert size(1920, 1080, 256, bound) == (455, 256) and size(1080, 1920, 256, bound) == (256, 455)
    assert size(1920, 1080, 0, 0) == (1920, 1080) and size(4000, 16, 0, 1000) == (1000, 4)
    src, out = tmp_path / "src", tmp_path / "out"
    write_video(src / "strip.avi", n=2, size=(200, 8), codec="mpeg4")
    write_video(src / "small.avi", n=2, size=(16, 16), codec="mpeg4")
    extract_frames.run_extraction(src, out, workers=0, short_side=4, progress=False)
    assert Image.open(out / "strip" / "img_00001.jpg").size == (16, 1)  # 200x8 -> short 4 -> long bounded to 16
    assert Image.open(out / "small" / "img_00001.jpg").size == (4, 4)
    with pytest.raises(ValueError, match="--max-long-side must be 0 .* at least --short-side"):
        extract_frames.run_extraction(src, out, workers=0, short_side=32, max_long_side=16, progress=False)


# ----------------------------------------------------------------------------- decord: fallback and its log lines

def test_pyav_reads_what_decord_cannot_and_decords_log_lines_stay_off_the_terminal(tmp_path, decord_backend, capfd,
                                                                                    caplog):
    tiny = write_video(tmp_path / "one.avi", n=3, size=(2, 2), codec="mpeg4")  # decord 0.6 fails on such widths
    odd = write_video(tmp_path / "w48.mp4", n=3, size=(48, 32))
    for path in (tiny, odd):
        video = readers.VideoFile(str(path))
        frames = video.read([0, 2])
        assert video.backend == "pyav", "fell back for this file"
        assert torch.equal(frames, readers.VideoFile(str(path), backend="pyav").read([0, 2]))
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(b"not a video at all" * 100)
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="datasets.readers"):
        with pytest.raises(SampleLoadError, match=r"noise.mp4: cannot open video \("):
            readers.VideoFile(str(noise))
    err = capfd.readouterr().err
    assert "video_reader.cc" not in err and "ERROR opening" not in err, err
    assert "ERROR opening" in caplog.text, "decord's own line went to the debug log"


# ----------------------------------------------------------------------------- your own dataset in one command

def test_split_counts():
    sc = build_lists.split_counts
    assert sc(10, 0.2, 0.1) == (7, 2, 1) and sc(100, 0.2, 0.0) == (80, 20, 0)
    assert sc(3, 0.2, 0.1) == (1, 1, 1), "every asked-for split gets one video when the class has three"
    assert sc(2, 0.2, 0.1) == (1, 1, 0) and sc(1, 0.2, 0.1) == (1, 0, 0), "training always keeps one"
    assert sc(5, 0.0, 0.0) == (5, 0, 0)


def test_folders_writes_classes_stratified_seeded_lists_and_configs(tmp_path):
    src = tmp_path / "my_videos"
    for c, n in (("waving", 10), ("clapping", 10), ("jumping", 6)):
        for i in range(n):
            (src / c).mkdir(parents=True, exist_ok=True)
            if c == "jumping" and i == 0:
                write_frames(src / c / "frames_00", n=5)  # a frames folder among the videos
            else:
                write_video(src / c / f"v{i:02d}.mp4", n=3, size=(32, 32))
    (src / "jumping" / "broken.mp4").write_bytes(b"")
    (src / "waving" / "notes.txt").write_text("not a video")
    out = tmp_path / "lists"
    argv = ["folders", str(src), "--out-dir", str(out), "--val", "0.2", "--test", "0.1", "--workers", "0",
            "--no-progress"]
    assert build_lists.main(argv) == 0
    assert (out / "classes.csv").read_text() == "id,name\n0,clapping\n1,jumping\n2,waving\n"
    lists = {s: read_list_file(str(out / f"{s}.txt"), root=str(src), num_classes=3) for s in ("train", "val", "test")}
    per_class = {s: np.bincount([r.label for r in recs], minlength=3).tolist() for s, recs in lists.items()}
    assert per_class == {"train": [7, 4, 7], "val": [2, 1, 2], "test": [1, 1, 1]}, "stratified"
    paths = [r.path for recs in lists.values() for r in recs]
    assert len(paths) == len(set(paths)) == 26, "disjoint, every readable video once"
    assert failures(out / "failures.txt") == {"jumping/broken.mp4": "video file is empty (0 bytes)"}
    frames_rec = next(r for recs in lists.values() for r in recs if r.path.endswith("frames_00"))
    assert frames_rec.num_frames == 5 and all(r.num_frames == 3 for recs in lists.values() for r in recs
                                              if r is not frames_rec)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert build_lists.main(argv) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first, "the same command writes the same files"
    assert build_lists.main(argv + ["--seed", "1"]) == 0
    assert (out / "val.txt").read_text() != first["val.txt"].decode(), "another seed, another split"
    # the configs extend the base recipe and are ready to run
    cfg = load_config(out / "config.yaml")
    base = load_config(ROOT / "configs" / "base.yaml")
    assert (cfg.solver.lr, cfg.data.num_frames, cfg.network.pretrained) == (base.solver.lr, 8, "ViT-B/16")
    assert Path(cfg.data.train_list) == (out / "train.txt").resolve() and Path(cfg.data.root) == src.resolve()
    assert cfg.data.text_mode == "templates" and cfg.data.descriptions is None
    assert [s.name for s in cfg.eval.sets] == ["my_videos_val"] and cfg.output_dir == "output/my_videos"
    assert cfg.data.batch_size == 8, "lowered from 80 to fit the 18 training videos"
    check_paths(cfg, train=True)
    test_cfg = load_config(out / "test.yaml")
    assert [s.name for s in test_cfg.eval.sets] == ["my_videos_test"] and test_cfg.output_dir == "output/my_videos_test"
    check_paths(test_cfg, train=False)
    # with --descriptions the class texts are that file's, in training and in every eval set
    desc = tmp_path / "descriptions.csv"
    desc.write_text("SNo,Class Name,Description\n1,clapping,Hands meet.\n2,jumping,Feet leave.\n3,waving,A hand moves.\n")
    assert build_lists.main(argv + ["--descriptions", str(desc)]) == 0
    cfg, test_cfg = load_config(out / "config.yaml"), load_config(out / "test.yaml")
    assert cfg.data.text_mode == "descriptions" and Path(cfg.data.descriptions) == desc.resolve()
    assert Path(cfg.eval.sets[0].descriptions) == Path(test_cfg.eval.sets[0].descriptions) == desc.resolve()
    check_paths(cfg, train=True)


def test_own_dataset_trains_and_tests_from_the_written_configs(tmp_path):
    import test as test_script
    import train as train_script
    from test_train_test import TINY_OPTS

    import make_synthetic_demo
    data = tmp_path / "demo"
    assert make_synthetic_demo.main([str(data), "--train-per-class", "3", "--val-per-class", "0", "--size", "32",
                                     "--frames", "8", "--no-extract", "--no-progress", "--workers", "1"]) == 0
    src, out = data / "videos" / "train", tmp_path / "lists"
    assert build_lists.main(["folders", str(src), "--out-dir", str(out), "--test", "0.2", "--workers", "0",
                             "--no-progress", "--extends", str(ROOT / "configs" / "demo" / "demo_train.yaml")]) == 0
    run = tmp_path / "run"
    summary = train_script.main(["--config", str(out / "config.yaml"), "--opts", *TINY_OPTS, f"output_dir={run}",
                                 "solver.epochs=1"])
    assert summary["steps"] == 2 and (run / "best_train_val.pt").is_file()
    res = test_script.main(["--config", str(out / "test.yaml"), "--weights", str(run / "last.pt"), "--opts",
                            *TINY_OPTS, f"output_dir={tmp_path / 'test'}"])
    entry = res["results"]["train_test"]
    assert entry["num_videos"] == len((out / "test.txt").read_text().splitlines()) == 8
    assert entry["num_classes"] == 8


# ----------------------------------------------------------------------------- --help examples

def _scripts():
    """Every script with a command line: a __main__ block in a .py file outside tests/."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".git") or any(p.startswith(".") for p in rel.parts):
            continue
        if re.search(r'^if __name__ == "__main__":', path.read_text(encoding="utf-8"), re.M):
            found.append(rel.as_posix())
    return found


def _help(rel: str, *args: str) -> str:
    path = ROOT / rel
    buf = io.StringIO()
    argv, sys.argv = sys.argv, [str(path), *args, "--help"]
    sys.path.insert(0, str(path.parent))
    try:
        with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as info:
            if (path.parent / "__init__.py").is_file():  # a module of a package: python -m package.module
                runpy.run_module(rel[:-3].replace("/", "."), run_name="__main__")
            else:
                runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = argv
        sys.path.remove(str(path.parent))
    assert info.value.code in (0, None), f"{rel} {' '.join(args)} --help exited with {info.value.code}"
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore:.* found in sys.modules after import of package:RuntimeWarning")
@pytest.mark.parametrize("rel", _scripts())
def test_every_help_names_configs_and_lists_that_exist(rel):
    texts = [_help(rel)]
    commands = re.search(r"\{([\w,-]+)\}", texts[0].split("\n\n")[0])  # subcommands in the usage line
    for sub in commands.group(1).split(",") if commands else ():
        texts.append(_help(rel, sub))
    named = {m for text in texts for m in re.findall(r"(?<![\w/.-])((?:configs|lists)/[\w./-]+\.(?:yaml|csv))", text)}
    missing = [p for p in named if not (ROOT / p).is_file()]
    assert not missing, f"{rel} --help names files that do not exist: {missing}"
    for p in named:
        if p.endswith(".yaml"):
            load_config(ROOT / p)  # every example config runs as far as its own validation
