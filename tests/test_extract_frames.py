"""Tests of Dataset_creation_scripts/extract_frames.py on videos the tests write themselves.

Frame k (1-based) of every test video is a solid grey of level 10*k, so the mean of a decoded JPEG
identifies which frame it holds, whatever the codec and JPEG rounding.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av")

SCRIPTS = Path(__file__).resolve().parents[1] / "Dataset_creation_scripts"
sys.path.insert(0, str(SCRIPTS))

import extract_frames  # noqa: E402
from extract_frames import FAULT_ENV, frame_name, run_extraction  # noqa: E402

from datasets.lists import MANIFEST_HEADER  # noqa: E402

CODECS = {".mp4": ("libx264" if "libx264" in av.codecs_available else "mpeg4", "mp4"), ".avi": ("mpeg4", "avi")}


def write_grey_video(path, num_frames, size=(32, 32), offset=0):
    """Frame k (1-based) is solid grey 10*k + offset; size is (width, height)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec, fmt = CODECS[path.suffix]
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=8)
        s.width, s.height = size
        s.pix_fmt = "yuv420p"
        s.options = {"qscale": "1"} if codec == "mpeg4" else {"crf": "10", "preset": "ultrafast"}
        for k in range(1, num_frames + 1):
            img = np.full((size[1], size[0], 3), 10 * k + offset, np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def manifest_body(out):
    """manifest.txt without its header line (which must be there)."""
    header, _, body = (Path(out) / "manifest.txt").read_text().partition("\n")
    assert header == MANIFEST_HEADER
    return body


def mean_levels(folder):
    files = sorted(Path(folder).iterdir())
    return [float(np.asarray(Image.open(f).convert("L"), dtype=np.float64).mean()) for f in files], [f.name for f in files]


def snapshot(root):
    """{relative path: bytes} of every file under root except the lock file."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if name != extract_frames.LOCK_NAME:
                out[rel] = p.read_bytes()
    return out


def run_cli(src, out, *extra, env_extra=None, timeout=120):
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "extract_frames.py"), str(src), str(out), "--no-progress", *extra],
        env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True,
    )


@pytest.mark.parametrize("ext", [".mp4", ".avi"])
def test_frames_are_the_decoded_frames_in_order(tmp_path, ext):
    src, out = tmp_path / "src", tmp_path / "out"
    write_grey_video(src / "cls" / f"clip{ext}", 14)
    write_grey_video(src / "other" / f"short{ext}", 3)
    result = run_extraction(src, out, workers=2, progress=False)
    assert result.failures == {}
    assert manifest_body(out) == "cls/clip 14\nother/short 3\n"
    assert (out / "failures.txt").read_text() == ""
    levels, names = mean_levels(out / "cls" / "clip")
    assert names == [frame_name(k) for k in range(1, 15)]
    # img_0000k.jpg holds video frame k-1 (0-based), i.e. grey level 10*k.
    assert np.allclose(levels, [10 * k for k in range(1, 15)], atol=4), levels


def test_short_side_resize_keeps_aspect(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_grey_video(src / "wide.mp4", 2, size=(48, 32))
    write_grey_video(src / "tall.mp4", 2, size=(32, 48))
    write_grey_video(src / "small.mp4", 2, size=(16, 16))
    run_extraction(src, out, workers=0, short_side=16, progress=False)
    assert Image.open(out / "wide" / "img_00001.jpg").size == (24, 16)
    assert Image.open(out / "tall" / "img_00002.jpg").size == (16, 24)
    assert Image.open(out / "small" / "img_00001.jpg").size == (16, 16)
    assert extract_frames.resized_size(320, 240, 0) == (320, 240)
    assert extract_frames.resized_size(341, 256, 128) == (170, 128)


def test_unreadable_videos_are_recorded_and_retried(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_grey_video(src / "a" / "good1.mp4", 4)
    write_grey_video(src / "b" / "good2.avi", 5)
    (src / "a" / "empty.mp4").write_bytes(b"")
    (src / "b" / "noise.avi").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    proc = run_cli(src, out, "--workers", "2")
    assert proc.returncode == 1, proc.stderr  # some videos failed
    assert manifest_body(out) == "a/good1 4\nb/good2 5\n"
    failures = dict(line.split("\t", 1) for line in (out / "failures.txt").read_text().splitlines())
    assert set(failures) == {"a/empty.mp4", "b/noise.avi"}
    assert all(reason.strip() for reason in failures.values())
    assert not (out / "a" / "empty").exists() and not (out / "b" / "noise").exists()
    # Repair one video: the rerun retries failures, and failures.txt says what is true now.
    write_grey_video(src / "a" / "empty.mp4", 6)
    proc = run_cli(src, out, "--workers", "2")
    assert proc.returncode == 1
    assert manifest_body(out) == "a/empty 6\na/good1 4\nb/good2 5\n"
    assert list((out / "failures.txt").read_text().splitlines())[0].startswith("b/noise.avi\t")
    assert len((out / "failures.txt").read_text().splitlines()) == 1


def _make_source(src):
    for i in range(8):
        ext = ".mp4" if i % 2 == 0 else ".avi"
        write_grey_video(src / f"class{i % 3}" / f"video{i}{ext}", 10 + i, offset=i)


def _assert_manifest_honest(out):
    """Every manifest line is complete and names a complete folder (never a half-written one)."""
    text = manifest_body(out)
    assert text == "" or text.endswith("\n")
    for line in text.splitlines():
        folder, n = line.rsplit(" ", 1)
        files = sorted(p.name for p in (out / folder).iterdir())
        assert files == [frame_name(k) for k in range(1, int(n) + 1)], folder
        assert not Path(folder).name.startswith(".tmp-")


def test_killed_run_resumes_to_the_same_result_as_a_clean_run(tmp_path):
    src = tmp_path / "src"
    _make_source(src)
    clean = tmp_path / "clean"
    assert run_cli(src, clean, "--workers", "2").returncode == 0

    out = tmp_path / "out"
    # The worker that reaches frame 5 of class1/video4.mp4 SIGKILLs the whole run (main + workers).
    proc = run_cli(src, out, "--workers", "2", env_extra={FAULT_ENV: "killgroup:5:class1/video4.mp4"})
    assert proc.returncode == -signal.SIGKILL
    half = list((out / "class1").glob(".tmp-video4-*"))
    assert len(half) == 1 and len(list(half[0].iterdir())) == 5  # the half-written video is there...
    _assert_manifest_honest(out)
    assert "class1/video4 " not in manifest_body(out)  # ...and not listed
    # A kill in the middle of a manifest write leaves an unfinished last line; the next run must not
    # glue its first line onto it, even if that run is killed too.
    with open(out / "manifest.txt", "a") as f:
        f.write("class2/vid")
    proc = run_cli(src, out, "--workers", "2", env_extra={FAULT_ENV: "killgroup:7:class1/video4.mp4"})
    assert proc.returncode == -signal.SIGKILL
    _assert_manifest_honest(out)

    proc = run_cli(src, out, "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    _assert_manifest_honest(out)
    assert snapshot(out) == snapshot(clean)  # manifest, failures, every folder's files and bytes
    assert not [p for p in out.rglob(".tmp-*")]


def test_a_dying_worker_does_not_hang_the_run(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _make_source(src)
    # The worker decoding class0/video3.avi exits abruptly after 2 frames, every time it tries.
    proc = run_cli(src, out, "--workers", "2", env_extra={FAULT_ENV: "exit:2:class0/video3.avi"}, timeout=90)
    assert proc.returncode == 1, proc.stderr
    failures = (out / "failures.txt").read_text().splitlines()
    assert len(failures) == 1 and failures[0].startswith("class0/video3.avi\t") and "died" in failures[0]
    manifest = manifest_body(out).splitlines()
    assert len(manifest) == 7 and not any(line.startswith("class0/video3 ") for line in manifest)
    _assert_manifest_honest(out)
    # Without the fault the rerun extracts only the failed video.
    proc = run_cli(src, out, "--workers", "2")
    assert proc.returncode == 0
    assert "1 to do" in proc.stderr
    assert (out / "failures.txt").read_text() == ""
    assert len(manifest_body(out).splitlines()) == 8


def test_rerun_skips_finished_and_redoes_missing_folders(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(3):
        write_grey_video(src / f"v{i}.mp4", 3 + i)
    first = run_extraction(src, out, workers=0, progress=False)
    assert first.extracted == 3
    second = run_extraction(src, out, workers=0, progress=False)
    assert (second.extracted, second.skipped) == (0, 3)
    import shutil

    shutil.rmtree(out / "v1")
    third = run_extraction(src, out, workers=0, progress=False)
    assert (third.extracted, third.skipped) == (1, 2)
    assert manifest_body(out) == "v0 3\nv1 4\nv2 5\n"


def test_class_folders_give_a_list_file(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_grey_video(src / "Apply_Eye_Makeup" / "x1.mp4", 3)
    write_grey_video(src / "YoYo" / "x2.mp4", 4)
    write_grey_video(src / "YoYo" / "x3.avi", 2)
    classes = tmp_path / "classes.csv"
    classes.write_text("id,name\n0,YoYo\n1,Apply Eye Makeup\n")
    listing = tmp_path / "all.txt"
    proc = run_cli(src, out, "--workers", "1", "--classes", str(classes), "--list-out", str(listing))
    assert proc.returncode == 0, proc.stderr
    assert listing.read_text() == "Apply_Eye_Makeup/x1 3 1\nYoYo/x2 4 0\nYoYo/x3 2 0\n"

    write_grey_video(src / "Juggling" / "x4.mp4", 2)
    out2 = tmp_path / "out2"
    proc = run_cli(src, out2, "--classes", str(classes), "--list-out", str(tmp_path / "l2.txt"))
    assert proc.returncode == 2
    assert "'Juggling'" in proc.stderr and str(classes) in proc.stderr
    assert not (out2 / "YoYo").exists()  # checked before any decoding


def test_colliding_output_folders_are_refused(tmp_path):
    src = tmp_path / "src"
    write_grey_video(src / "same.mp4", 2)
    write_grey_video(src / "same.avi", 2)
    with pytest.raises(ValueError, match="same"):
        extract_frames.find_videos(src)


def test_three_shards_one_killed_and_rerun_give_the_manifest_of_one_run(tmp_path):
    """Three --shard processes over one SRC and OUT, run at the same time; shard 2 is SIGKILLed part-way (main
    process and workers) and rerun after the others finished: the manifest, failures and frames are those of one
    run over everything, no line lost or doubled."""
    src = tmp_path / "src"
    for i in range(12):
        write_grey_video(src / f"class{i % 3}" / f"video{i}{'.mp4' if i % 2 else '.avi'}", 6 + i % 4, offset=i)
    (src / "class1" / "noise.avi").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes())
    clean = tmp_path / "clean"
    assert run_cli(src, clean, "--workers", "0").returncode == 1  # 1: the noise file is a failure
    videos = extract_frames.find_videos(src)
    owner = {v.rel: extract_frames.shard_of(v.rel, 3) + 1 for v in videos}
    assert sorted(set(owner.values())) == [1, 2, 3]  # every shard has work
    assert sum(1 for s in owner.values() if s == 2) >= 2
    victim = sorted(r for r, s in owner.items() if s == 2 and not r.endswith("noise.avi"))[-1]  # not its first video

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    procs = [subprocess.Popen([sys.executable, str(SCRIPTS / "extract_frames.py"), str(src), str(out), "--no-progress",
                               "--workers", "1", "--shard", f"{i}/3"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env={**env, FAULT_ENV: f"killgroup:3:{victim}"} if i == 2 else env)
             for i in (1, 2, 3)]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes[1] == -signal.SIGKILL, procs[1].stderr.read()
    _assert_manifest_honest(out)
    assert f"{extract_frames.frames_folder(victim, Path(victim).suffix)} " not in manifest_body(out)
    assert codes[0] in (0, 1) and codes[2] in (0, 1)  # 1 for the shard that has the noise file
    proc = run_cli(src, out, "--workers", "1", "--shard", "2/3")  # the rerun of the killed shard
    assert proc.returncode in (0, 1), proc.stderr
    assert sorted(manifest_body(out).splitlines()) == sorted(manifest_body(clean).splitlines())
    assert (out / "failures.txt").read_text() == (clean / "failures.txt").read_text()
    assert {k: v for k, v in snapshot(out).items() if not k.startswith(".shards/")} == snapshot(clean)
    assert {p.suffix for p in (out / ".shards").iterdir()} == {".lock"}  # every shard merged and removed its records
    assert not [p for p in out.rglob(".tmp-*")]
    # A run without --shard afterwards does nothing again and leaves the same files (and no .shards folder).
    proc = run_cli(src, out, "--workers", "1")
    assert proc.returncode == 1 and "12 of 13 videos already extracted; 1 to do" in proc.stderr, proc.stderr
    assert snapshot(out) == snapshot(clean) and not (out / ".shards").exists()


def test_shard_arguments_are_checked(tmp_path):
    for bad in ("0/3", "4/3", "2", "a/b", "1/0"):
        with pytest.raises(ValueError, match=r"--shard takes I/N with 1 <= I <= N"):
            extract_frames.parse_shard(bad)
    assert extract_frames.parse_shard("3/3") == (3, 3)
    src = tmp_path / "src"
    write_grey_video(src / "a.mp4", 2)
    with pytest.raises(ValueError, match="--list-out lists every video"):
        extract_frames.main([str(src), str(tmp_path / "out"), "--shard", "1/2", "--classes", "x.csv",
                             "--list-out", str(tmp_path / "l.txt")])
    (tmp_path / "out" / ".shards").mkdir(parents=True)
    (tmp_path / "out" / ".shards" / "manifest-1-of-4.txt").write_text("")
    with pytest.raises(RuntimeError, match=r"holds the records of --shard runs over 4 shards, not 2"):
        extract_frames.run_extraction(src, tmp_path / "out", workers=0, progress=False, shard=(1, 2))


def test_shard_merges_wait_for_each_other(tmp_path):
    """The merge into manifest.txt is one process at a time: while another holds OUT/.shards/merge.lock, a shard
    does not write manifest.txt (two merges at once could each drop the other's new lines)."""
    import fcntl

    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(4):
        write_grey_video(src / f"v{i}.mp4", 3)
    (out / ".shards").mkdir(parents=True)
    fd = os.open(out / ".shards" / "merge.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = subprocess.Popen([sys.executable, str(SCRIPTS / "extract_frames.py"), str(src), str(out),
                                 "--no-progress", "--workers", "0", "--shard", "1/1"], stderr=subprocess.PIPE,
                                text=True)
        time.sleep(1.5)  # the shard has found its videos and waits for the lock to merge (its start takes ~0.5 s)
        assert proc.poll() is None and not (out / "manifest.txt").exists(), "the shard merged without the lock"
    finally:
        os.close(fd)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert manifest_body(out) == "v0 3\nv1 3\nv2 3\nv3 3\n"
