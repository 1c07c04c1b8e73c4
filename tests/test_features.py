"""Tests of features.py (the Python API) and extract_features.py (sharded, resumable export).

Everything runs on a synthetic demo set (2 videos per class and split) and a tiny random T2L checkpoint of ours:
exported embeddings equal the API's, nearest-class lookup over exported features equals test.py, a kill at a
random point followed by a rerun gives the files of an uninterrupted run, and unreadable videos are listed.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Dataset_creation_scripts"))

import engine  # noqa: E402
from conftest import random_clip_opts  # noqa: E402
from datasets import SampleLoadError, VideoDataset  # noqa: E402
import extract_features  # noqa: E402
import features  # noqa: E402
from features import load_model  # noqa: E402
from modules import build_t2l, class_texts, factory, make_checkpoint, random_clip, save_published  # noqa: E402
from modules import tokenize_class_texts  # noqa: E402
from utils.checkpoint import atomic_save  # noqa: E402
from utils.config import load_config  # noqa: E402

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2,
            vision_heads=1)


def tiny_t2l(seed: int = 0):
    """A tiny T2L on the seeded random CLIP, every T2L tensor perturbed so adapters and tokens matter."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # T2L's own initialisation draws from the global generator
        model = build_t2l(random_clip(TINY, seed=0), num_frames=8, drop_path_rate=0.0)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("clip."):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def save_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    model = tiny_t2l(seed)
    atomic_save(make_checkpoint(model, backbone={"name_or_path": "random", "seed": 0, "config": dict(TINY)}), path)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread_and_own_logging():
    """One intra-op thread (on a busy 2-core machine two threads spin against each other and run 20x slower);
    afterwards, the root logger as it was (extract_features.main sets up console and file logging)."""
    import logging

    before = torch.get_num_threads()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
        h.close()
    root.setLevel(level)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_t2l.pt")


@pytest.fixture(scope="module")
def encoder(ckpt):
    return load_model(ckpt, device="cpu")


def run_export(*args) -> int:
    return extract_features.main([str(a) for a in args] + ["--no-progress"])


def read_export(out: Path):
    """(embeddings (N, E), manifest lines) of an export folder, shards in order."""
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    shards = sorted(out.glob("shard_*.npy"))
    emb = np.concatenate([np.load(p) for p in shards]) if shards else np.zeros((0, 0), np.float32)
    # Manifest order is shard order, and each shard's lines name its rows 0..n-1 in order.
    assert [(e["shard"], e["row"]) for e in manifest] == [(int(p.stem.split("_")[1]), r) for p in shards
                                                          for r in range(np.load(p).shape[0])]
    return emb, manifest


def folder_bytes(out: Path) -> dict:
    """Every file an export is judged by (the log and the run's summary excluded)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.name not in ("extract_log.txt", "summary.json")}


# ---------------------------------------------------------------------------------------------- acceptance
def test_export_equals_api_and_nearest_class_equals_test_py(demo, ckpt, encoder, tmp_path):
    vids, texts = tmp_path / "vids", tmp_path / "texts"
    assert run_export(demo / "val.txt", "--root", demo / "frames", "--model", ckpt, "--out", vids, "--shard-size", 5,
                      "--batch-size", 3, "--workers", 2, "--per-frame") == 0
    emb, manifest = read_export(vids)
    assert emb.shape == (16, 32) and emb.dtype == np.float32
    assert len(list(vids.glob("shard_*.npy"))) == 4  # 5 + 5 + 5 + 1
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert all(e["num_frames"] == 16 and e["config_hash"] == manifest[0]["config_hash"] for e in manifest)

    api, frames = encoder.encode_videos([e["path"] for e in manifest], batch_size=4, return_frames=True)
    assert float(np.abs(api.numpy() - emb).max()) < 1e-6
    exported_frames = np.concatenate([np.load(p) for p in sorted(vids.glob("frames_*.npy"))])
    assert exported_frames.shape == (16, 1, 8, 32)
    assert float(np.abs(frames.numpy() - exported_frames).max()) < 1e-6

    assert run_export("--texts", demo / "classes.csv", "--descriptions", demo / "descriptions.csv", "--model", ckpt,
                      "--out", texts) == 0
    text_emb, text_manifest = read_export(texts)
    assert [e["class_id"] for e in text_manifest] == list(range(8))
    nearest = (emb @ text_emb.T).argmax(axis=1)
    labels = np.array([e["label"] for e in manifest])

    # test.py itself, in-process, on the same list, checkpoint and class texts.
    import test as test_py

    sets = [{"name": "val", "lists": [str(demo / "val.txt")], "root": str(demo / "frames"),
             "classes": str(demo / "classes.csv"), "descriptions": str(demo / "descriptions.csv")}]
    results = test_py.main(["--config", str(REPO / "configs/demo/demo_test.yaml"), "--weights", str(ckpt), "--opts",
                            f"output_dir={tmp_path / 'test_out'}", *random_clip_opts(TINY),
                            "network.random_seed=0", "data.input_size=32", "data.num_workers=0",
                            "eval.batch_size=8", f"eval.sets={json.dumps(sets)}"])
    top1 = results["results"]["val"]["top1"]
    assert top1 == pytest.approx(100.0 * float((nearest == labels).mean()), abs=1e-9)
    # Per video, not only the accuracy: the same predictions as test.py's scorer.
    model = factory.load_eval_model(load_config(str(REPO / "configs/demo/demo_test.yaml"), [
        *random_clip_opts(TINY), "data.input_size=32"]), str(ckpt))
    names, tokens = engine.class_tokens(str(demo / "classes.csv"), str(demo / "descriptions.csv"), "descriptions")
    ds = VideoDataset(str(demo / "val.txt"), root=str(demo / "frames"), num_frames=8, mode="test",
                             input_size=32, on_error="raise")
    text_emb = engine.encode_class_texts(model, tokens, torch.device("cpu"))
    scores, score_labels, _ = engine.score_dataset(model, ds, text_emb, torch.device("cpu"), batch_size=8,
                                                   num_workers=0)
    assert scores.argmax(1).tolist() == nearest.tolist()
    assert score_labels.tolist() == labels.tolist()


def linked_inputs(demo, src: Path, n: int, broken: str, empty: str) -> Path:
    """Many distinct inputs cheaply: ``n`` links to the demo's frame folders, plus two unreadable files (random bytes
    and an empty file, named ``<broken>_broken.mp4`` and ``<empty>_empty.mp4``)."""
    src.mkdir()
    folders = sorted(p for p in (demo / "frames").glob("*/*/*") if p.is_dir())
    for i in range(n):
        (src / f"v{i:03d}").symlink_to(folders[i % len(folders)], target_is_directory=True)
    (src / f"{broken}_broken.mp4").write_bytes(os.urandom(3000))
    (src / f"{empty}_empty.mp4").write_bytes(b"")
    return src


def test_kill_at_random_point_then_rerun_gives_identical_files(demo, ckpt, tmp_path):
    src = linked_inputs(demo, tmp_path / "src", 80, broken="v050", empty="v090")
    common = ["--model", str(ckpt), "--shard-size", "4", "--batch-size", "2", "--workers", "0", "--per-frame"]

    full = tmp_path / "full"
    assert run_export(src, "--out", full, *common) == 1  # 1: two videos could not be read
    killed = tmp_path / "killed"
    rng = random.Random(12)
    shards_before_kill, extra_delay = rng.randint(2, 12), rng.uniform(0.0, 0.03)
    proc = subprocess.Popen([sys.executable, str(REPO / "extract_features.py"), str(src), "--out", str(killed),
                             *common, "--no-progress"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        manifest = killed / "manifest.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if manifest.exists() and manifest.read_bytes().count(b"\n") >= 4 * shards_before_kill:
                break
            time.sleep(0.002)
        time.sleep(extra_delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the export finished before it could be killed"
    rows_at_kill = manifest.read_bytes().count(b"\n")
    assert 0 < rows_at_kill < 80

    assert run_export(src, "--out", killed, *common) == 1
    assert folder_bytes(killed) == folder_bytes(full)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["exported"] == 80 and summary["failed"] == 2
    assert summary["last_run"]["already_done"] >= rows_at_kill - 4


def test_torchrun_ranks_export_the_files_of_one_process_and_resume_each_its_own_part(demo, ckpt, tmp_path):
    """``torchrun --nproc_per_node 2``: rank 1 is SIGKILLed after its second shard (its part folder keeps them),
    torchrun restarts both ranks, each resumes its own part, rank 0 merges: every file byte-identical to a
    single-process export of the same inputs (two of them unreadable)."""
    src = linked_inputs(demo, tmp_path / "src", 22, broken="v005", empty="v019")
    common = ["--model", str(ckpt), "--shard-size", "3", "--batch-size", "2", "--workers", "0", "--per-frame"]
    one = tmp_path / "one"
    assert run_export(src, "--out", one, *common) == 1  # 1: two videos could not be read
    two, faults = tmp_path / "two", tmp_path / "faults.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "T2L_TEST_FAULTS": "0:1:2:SIGKILL",
           "T2L_TEST_FAULT_LOG": str(faults)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--max-restarts", "1", "tests/with_faults.py", "extract_features.py", str(src), "--out",
                           str(two), *common, "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]  # complete: 0 under torchrun, the failures are in the files
    assert [json.loads(line)["rank"] for line in faults.read_text().splitlines()] == [1]
    assert "exitcode: -9" in done.stderr  # rank 1 was killed, and torchrun restarted the pair
    assert folder_bytes(two) == folder_bytes(one)
    assert not (two / extract_features.PARTS).exists()
    summary = json.loads((two / "summary.json").read_text())
    assert summary["exported"] == 22 and summary["failed"] == 2 and summary["last_run"]["ranks"] == 2
    assert summary["last_run"]["already_done"] >= 6  # at least rank 1's two shards of 3 rows were not redone


def test_each_rank_exports_whole_batches_of_a_contiguous_part():
    for n, batch, world in ((24, 2, 2), (25, 4, 3), (3, 8, 4), (0, 2, 2)):
        parts = [extract_features.rank_slice(n, batch, r, world) for r in range(world)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # disjoint and complete, in rank order
        assert all(lo % batch == 0 for lo, _ in parts)  # each part starts at a single process's batch boundary
    assert [extract_features.rank_slice(25, 4, r, 3) for r in range(3)] == [(0, 8), (8, 16), (16, 25)]


@pytest.fixture(scope="module")
def reference_export(demo, ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    assert run_export(demo / "val.txt", "--root", demo / "frames", "--model", ckpt, "--out", out, "--shard-size", 3,
                      "--workers", 0, "--per-frame") == 0
    return out


def _drop_last_shard_file(out):
    (out / "shard_00005.npy").unlink()  # manifest lines whose shard is missing


def _cut_last_manifest_line(out):
    data = (out / "manifest.jsonl").read_bytes()
    (out / "manifest.jsonl").write_bytes(data[:-25])  # the append of the last shard's lines was cut short


def _shard_without_manifest_lines(out):
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    (out / "manifest.jsonl").write_text("".join(l for l in lines if json.loads(l)["shard"] != 5))


def _stray_files(out):
    (out / "shard_00006.npy").write_bytes(b"half a shard")
    (out / "frames_00006.npy").write_bytes(b"")
    (out / ".shard_00006.npy.x1y2.tmp").write_bytes(b"temp")


def _frames_file_of_last_shard_missing(out):
    (out / "frames_00005.npy").unlink()


@pytest.mark.parametrize("damage", [_drop_last_shard_file, _cut_last_manifest_line, _shard_without_manifest_lines,
                                    _stray_files, _frames_file_of_last_shard_missing])
def test_rerun_repairs_every_crash_state(damage, demo, ckpt, reference_export, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference_export, out)
    damage(out)
    assert run_export(demo / "val.txt", "--root", demo / "frames", "--model", ckpt, "--out", out, "--shard-size", 3,
                      "--workers", 0, "--per-frame") == 0
    assert folder_bytes(out) == folder_bytes(reference_export)


def test_a_deleted_middle_shard_is_redone_once(demo, ckpt, reference_export, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference_export, out)
    (out / "shard_00002.npy").unlink()
    assert run_export(demo / "val.txt", "--root", demo / "frames", "--model", ckpt, "--out", out, "--shard-size", 3,
                      "--workers", 0, "--per-frame") == 0
    ref_emb, ref_manifest = read_export(reference_export)
    emb, manifest = read_export(out)
    assert not (out / "frames_00002.npy").exists()  # the orphaned per-frame file went with its shard
    assert sorted(e["path"] for e in manifest) == sorted(e["path"] for e in ref_manifest)  # each video once
    row = {e["path"]: i for i, e in enumerate(manifest)}
    np.testing.assert_array_equal(emb[[row[e["path"]] for e in ref_manifest]], ref_emb)


def test_unreadable_videos_are_listed_and_the_rest_exported(demo, ckpt, encoder, tmp_path):
    src = tmp_path / "videos"
    (src / "sub").mkdir(parents=True)
    good = sorted((demo / "videos" / "val").glob("*/*.mp4"))[:3]
    for i, v in enumerate(good):
        (src / ("sub" if i else "") / v.name).write_bytes(v.read_bytes())
    (src / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    (src / "empty.avi").write_bytes(b"")
    (src / "notes.txt").write_text("not a video")
    out = tmp_path / "out"
    assert run_export(src, "--model", ckpt, "--out", out, "--workers", 2, "--batch-size", 2) == 1
    failures = dict(line.split("\t") for line in (out / "failures.txt").read_text().splitlines())
    assert set(failures) == {str(src / "corrupt.mp4"), str(src / "empty.avi")}
    assert "empty" in failures[str(src / "empty.avi")]
    assert "cannot" in failures[str(src / "corrupt.mp4")]
    emb, manifest = read_export(out)
    assert sorted(e["path"] for e in manifest) == sorted(str(p) for p in src.rglob("*.mp4") if p.name != "corrupt.mp4")
    assert all(e["label"] is None for e in manifest)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["exported"], summary["failed"], summary["videos_in_input"]) == (3, 2, 5)
    np.testing.assert_allclose(encoder.encode_videos([e["path"] for e in manifest]).numpy(), emb, atol=1e-6)
    # A rerun tries the failed videos again and writes nothing twice.
    assert run_export(src, "--model", ckpt, "--out", out, "--workers", 0) == 1
    assert read_export(out)[0].shape == (3, 32)


def test_rerun_with_other_model_or_settings_is_refused(demo, ckpt, tmp_path, caplog):
    out = tmp_path / "out"
    args = [demo / "val.txt", "--root", demo / "frames", "--out", out, "--workers", 0]
    assert run_export(*args, "--model", ckpt) == 0
    before = folder_bytes(out)
    other = save_tiny_checkpoint(tmp_path / "other.pt", seed=1)
    assert run_export(*args, "--model", other) == 2
    assert "another model or other settings" in caplog.text
    assert run_export(*args, "--model", ckpt, "--clips", 2) == 2
    assert "num_clips: 1 -> 2" in caplog.text
    assert folder_bytes(out) == before
    # The same checkpoint copied elsewhere is the same model: accepted, nothing redone.
    copy = tmp_path / "copy.pt"
    copy.write_bytes(Path(ckpt).read_bytes())
    assert run_export(*args, "--model", copy) == 0
    assert folder_bytes(out) == before


# ---------------------------------------------------------------------------------------------- texts
def test_text_exports_match_api_and_test_py_layout(demo, ckpt, encoder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a shape moving left\n\n  a growing square  \nsomething rotates\n")
    assert run_export("--texts", prompts, "--model", ckpt, "--out", tmp_path / "p") == 0
    emb, manifest = read_export(tmp_path / "p")
    assert [(e["line"], e["text"]) for e in manifest] == [(1, "a shape moving left"), (3, "a growing square"),
                                                         (4, "something rotates")]
    np.testing.assert_allclose(emb, encoder.encode_texts([e["text"] for e in manifest]).numpy(), atol=1e-6)

    # Templates: 16 x K rows, view-major, equal to what test.py encodes for the class list.
    assert run_export("--texts", demo / "classes.csv", "--templates", "--model", ckpt, "--out", tmp_path / "t",
                      "--shard-size", 50) == 0
    emb, manifest = read_export(tmp_path / "t")
    assert emb.shape == (16 * 8, 32)
    assert [(e["view"], e["class_id"]) for e in manifest[:9]] == [(0, k) for k in range(8)] + [(1, 0)]
    _, tokens = engine.class_tokens(str(demo / "classes.csv"), None, "templates")
    ref = engine.encode_class_texts(encoder.model, tokens, torch.device("cpu"))  # (16, 8, E)
    np.testing.assert_allclose(emb.reshape(16, 8, 32), ref.numpy(), atol=1e-6)

    # A descriptions CSV alone: its classes in file order, its descriptions as texts.
    assert run_export("--texts", demo / "descriptions.csv", "--model", ckpt, "--out", tmp_path / "d") == 0
    _, manifest = read_export(tmp_path / "d")
    assert [e["class_name"] for e in manifest][:2] == ["moving left", "moving right"]
    assert manifest[0]["text"].startswith("A single shape slides")
    # Another texts file into the same folder is refused (its line numbers would be taken for these rows).
    prompts.write_text("other text\n")
    assert run_export("--texts", prompts, "--model", ckpt, "--out", tmp_path / "p") == 2


# ---------------------------------------------------------------------------------------------- API
def test_clip_file_gives_frame_averaged_clip_and_views_are_averaged(demo, tmp_path):
    clip_file = tmp_path / "clip.pt"
    torch.save(random_clip(TINY, seed=3).state_dict(), clip_file)
    m = load_model(clip_file, device="cpu", num_frames=4, num_clips=2, num_crops=3)
    assert m.kind == "clip" and isinstance(m.model, factory.FrameAverageCLIP) and m.num_views == 6
    paths = [demo / "frames/val/growing/growing_000", demo / "videos/val/shrinking/shrinking_001.mp4"]
    video, frames = m.encode_videos(paths, return_frames=True)
    assert video.shape == (2, 32) and frames.shape == (2, 6, 4, 32)
    torch.testing.assert_close(video.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(frames.norm(dim=-1), torch.ones(2, 6, 4))
    # By hand: every view through the CLIP on its own, frame average, normalise, average the views, normalise.
    views = m.load_views(paths[1])  # (6, 4, 3, 32, 32)
    per_view = torch.stack([torch.nn.functional.normalize(m.model.clip.encode_image(v).mean(0), dim=0)
                            for v in views])
    expected = torch.nn.functional.normalize(per_view.mean(0), dim=0)
    torch.testing.assert_close(video[1], expected, atol=1e-5, rtol=0)
    # Different views of a moving video give different embeddings: averaging is not a no-op.
    assert float((per_view[0] - per_view[-1]).abs().max()) > 1e-4


def test_published_checkpoint_loads_as_t2l_with_the_same_embeddings(demo, ckpt, encoder, tmp_path):
    published = tmp_path / "published.pth"
    save_published(tiny_t2l(0), published, half=False)
    assert features.model_kind(published) == "t2l" and features.model_kind(ckpt) == "t2l"
    m = load_model(published, device="cpu")
    assert m.kind == "t2l" and m.identity["format"] == "published" and m.num_frames == 8
    path = [demo / "frames/val/moving_left/moving_left_000"]
    torch.testing.assert_close(m.encode_videos(path), encoder.encode_videos(path), atol=1e-6, rtol=0)
    torch.testing.assert_close(m.encode_texts(["a circle"]), encoder.encode_texts("a circle"), atol=1e-6, rtol=0)


def test_bad_arguments_are_clear_errors(ckpt, tmp_path, demo):
    with pytest.raises(ValueError, match="positional embedding"):
        load_model(ckpt, device="cpu", input_size=48)
    with pytest.raises(ValueError, match="trained with 8 frames"):
        load_model(ckpt, device="cpu", num_frames=16)
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(SampleLoadError, match="missing.mp4"):
        load_model(ckpt, device="cpu").encode_videos([tmp_path / "missing.mp4"])
    assert run_export(tmp_path / "nothing_here", "--model", ckpt, "--out", tmp_path / "o") == 2
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    assert run_export(empty, "--model", ckpt, "--out", tmp_path / "o2") == 2


# ---------------------------------------------------------------------------------------------- foreign files
def test_files_an_export_did_not_write_are_refused_and_left_as_they_were(demo, ckpt, reference_export, tmp_path,
                                                                         caplog):
    import shutil

    args = [demo / "val.txt", "--root", demo / "frames", "--model", ckpt, "--shard-size", 3, "--workers", 0,
            "--per-frame"]
    # A folder of someone else's: a manifest.jsonl of another tool and a shard_00000.npy, no export_config.json.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.jsonl").write_text('{"video": "a.mp4", "vector": 0}\n')
    np.save(foreign / "shard_00000.npy", np.arange(6.0).reshape(2, 3))
    before = folder_bytes(foreign)
    assert run_export(*args, "--out", foreign) == 2
    assert re.search(r"holds manifest.jsonl, shard_00000.npy but no export_config.json: these files were not "
                     r"written by extract_features.py", caplog.text)
    assert folder_bytes(foreign) == before  # before the fix: KeyError 'shard' (or the shard overwritten)
    # Our export, with a line appended that this tool never writes: refused, naming the line, nothing dropped.
    out = tmp_path / "ours"
    shutil.copytree(reference_export, out)
    with (out / "manifest.jsonl").open("a") as f:
        f.write('{"note": "added by hand"}\n')
    before = folder_bytes(out)
    assert run_export(*args, "--out", out) == 2
    lines = len((out / "manifest.jsonl").read_text().splitlines())
    assert re.search(rf"manifest.jsonl:{lines}: not a line this tool writes \(no shard, row, path\)", caplog.text)
    assert folder_bytes(out) == before
    # A damaged manifest of ours (the last append cut short) is still repaired, as before.
    data = (out / "manifest.jsonl").read_bytes()
    (out / "manifest.jsonl").write_bytes(data[:data.rindex(b'{"note"')][:-25])
    assert run_export(*args, "--out", out) == 0
    assert folder_bytes(out) == folder_bytes(reference_export)


# ---------------------------------------------------------------------------------------------- text batches
class _CountingTextModel(torch.nn.Module):
    """A model whose text tower records the rows of every call (to see that texts go in bounded batches)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.calls = []

    def encode_text(self, tokens):
        self.calls.append(tokens.shape[0])
        return self.inner.encode_text(tokens)

    def encode_video(self, videos):
        return self.inner.encode_video(videos)

    @property
    def logit_scale(self):
        return self.inner.logit_scale


def test_class_texts_are_encoded_in_bounded_batches_with_the_same_embeddings(encoder):
    names = [f"action number {i}" for i in range(20)]  # 20 classes x 16 templates = 320 texts
    classes = features.ClassTexts(names=names, texts=class_texts(names, None, mode="templates"),
                                  mode="templates", source="test")
    counting = _CountingTextModel(encoder.model)
    batched = features.VideoTextEncoder(counting, "t2l", {"source": "x"}, device="cpu", num_frames=8, input_size=32)
    emb = batched.encode_class_texts(classes, batch_size=100)
    assert emb.shape == (16, 20, 32) and counting.calls == [100, 100, 100, 20]
    # The same numbers as encoding everything in one call, and as test.py's path (engine.encode_class_texts).
    tokens = tokenize_class_texts(classes.texts)
    with torch.no_grad():
        whole = torch.nn.functional.normalize(encoder.model.encode_text(tokens.view(320, -1)), dim=-1)
    torch.testing.assert_close(emb, whole.view(16, 20, -1), atol=1e-6, rtol=1e-5)
    counting.calls.clear()
    torch.testing.assert_close(engine.encode_class_texts(counting, tokens, torch.device("cpu"), batch_size=128), emb,
                               atol=1e-6, rtol=1e-5)
    assert counting.calls == [128, 128, 64]
