"""The recorded run is the run that happened (issue 23): one writer per output folder, resumes that apply or refuse
every changed setting, result files written atomically (a real full disk where a tmpfs can be mounted), one-line
errors, texts encoded in bounded batches. Each case is a row of docs/RELIABILITY.md.

The data is the synthetic demo set and the tiny random CLIP of tests/test_train_test.py (its fixture and option
helpers are reused); runs are in-process (``train.main``/``test.main``) unless the command line itself is the point.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine
import test as test_script
import train as train_script
from modules import factory
from utils.checkpoint import safe_load
from utils.lock import LOCK_NAME, FolderLock, FolderLockedError
from utils.logger import read_metrics_csv
from utils.schedule import WarmupCosine

import test_train_test as end_to_end
from test_reliability import run_as_script, assert_same_checkpoint, metrics_rows, snapshot
from test_reliability import one_thread_at_the_repo_root  # noqa: F401 (an autouse fixture: one torch thread, cwd)
from test_train_test import data_opts, train_args

demo = end_to_end.demo
ROOT = Path(__file__).resolve().parents[1]
ONE_EPOCH = ("solver.epochs=1", "eval.every=0")  # short: no evaluation


@pytest.fixture(scope="module")
def one_epoch(demo, tmp_path_factory):
    """An undisturbed one-epoch run: the reference of the concurrent-run test, the checkpoint of the resume tests."""
    out = tmp_path_factory.mktemp("one_epoch")
    train_script.main(train_args(demo, out, *ONE_EPOCH))
    return out


def subprocess_env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ============================================================================ one writer per output folder
def test_a_second_train_run_into_a_busy_folder_stops_at_once_and_the_first_is_undisturbed(demo, one_epoch, tmp_path):
    out = tmp_path / "busy"
    first = subprocess.Popen([sys.executable, "train.py", *train_args(demo, out, *ONE_EPOCH)], cwd=ROOT,
                             env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / LOCK_NAME).exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, "the first run ended before its lock was seen"
        start = time.perf_counter()
        with pytest.raises(FolderLockedError, match=rf"output folder {re.escape(str(out))} is in use by another run: "
                                                    rf"pid {first.pid} on .*train.py"):
            train_script.main(train_args(demo, out, *ONE_EPOCH))
        assert time.perf_counter() - start < 5
        assert first.poll() is None, "the second run must have met the first one running"
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    # The first run's files are those of an undisturbed run (log.txt holds timestamps; output_dir differs).
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one_epoch.iterdir())
    assert_same_checkpoint(safe_load(one_epoch / "last.pt"), safe_load(out / "last.pt"), "last.pt")
    assert metrics_rows(out) == metrics_rows(one_epoch)
    assert (out / "config.yaml").read_text() == (one_epoch / "config.yaml").read_text().replace(str(one_epoch),
                                                                                                  str(out))


def test_the_command_line_names_the_folder_and_the_holder_within_5_seconds(demo, tmp_path):
    out = tmp_path / "held"
    with FolderLock(out, "train.py"):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "train.py", *train_args(demo, out)], cwd=ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=60)
        seconds = time.perf_counter() - start
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"output folder {out} is in use by another run: pid {os.getpid()}" in lines[0], lines
    assert seconds < 5, f"the second run took {seconds:.1f} s to stop"
    assert sorted(p.name for p in out.iterdir()) == [], "the refused run wrote into the folder"  # lock gone too


def test_a_killed_runs_lock_is_taken_over_and_said(tmp_path, caplog):
    folder = tmp_path / "out"
    pid = os.fork()
    if pid == 0:  # a run that takes the lock and is killed while holding it
        FolderLock(folder, "train.py").acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == pid  # the lock file stayed behind
    with caplog.at_level(logging.INFO, logger="utils.lock"):
        with FolderLock(folder, "test.py") as lock:
            lock.log_takeover()
            assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
            with pytest.raises(FolderLockedError, match=rf"pid {os.getpid()}"):  # a live holder is never taken over
                FolderLock(folder, "test.py").acquire()
    assert f"lock file of an earlier run (pid {pid}" in caplog.text and "no longer running" in caplog.text
    assert not (folder / LOCK_NAME).exists()


# ============================================================================ resume: applied or refused, recorded
def test_a_resume_with_a_changed_lr_trains_on_and_records_the_new_schedule(demo, one_epoch, tmp_path, caplog):
    out = tmp_path / "resumed"
    shutil.copytree(one_epoch, out)
    saved = safe_load(out / "last.pt")
    old_lr = saved["config"]["solver"]["lr"]
    new_lr, new_wd = old_lr * 5, 0.123
    with caplog.at_level(logging.INFO, logger="train"):
        train_script.main(train_args(demo, out, "solver.epochs=3", f"solver.lr={new_lr}",
                                     f"solver.weight_decay={new_wd}", "eval.every=0"))
    # The schedule the run used is this config's: warm-up 1 epoch, cosine over 3 epochs of 4 steps from new_lr.
    steps = 4
    expect = WarmupCosine(torch.optim.SGD([torch.zeros(1)], lr=new_lr), total_steps=3 * steps, warmup_steps=steps)
    rows = read_metrics_csv(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[1]["lr"] == pytest.approx(expect.lr_at(2 * steps)[0]) and rows[1]["lr"] > 0  # before: 0 (saved end)
    last = safe_load(out / "last.pt")
    groups = last["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [new_wd, 0.0, 0.0]  # before: the saved 0.05 kept
    assert groups[0]["lr"] == pytest.approx(expect.lr_at(3 * steps)[0])
    assert last["scheduler"]["base_lrs"][0] == new_lr and last["scheduler"]["total_steps"] == 3 * steps
    # What is recorded is what ran: config.yaml, the checkpoint's config and its record of the change.
    assert f"lr: {new_lr}" in (out / "config.yaml").read_text()
    assert last["config"]["solver"]["lr"] == new_lr
    assert last["resumes"][0]["epoch"] == 1 and last["resumes"][0]["changes"]["solver.lr"] == [old_lr, new_lr]
    assert re.search(r"lr schedule is rebuilt .*base_lrs", caplog.text)
    assert re.search(rf"solver.lr {old_lr!r} -> {new_lr!r}", caplog.text)


@pytest.mark.parametrize("opt, named", [
    ("network.t2l.adapter_ratio=0.5", r"network.t2l.adapter_ratio was 0.25 and is now 0.5"),
    ("network.t2l.train_temporal_embedding=true", r"network.t2l.train_temporal_embedding was False and is now True"),
    ("network.random_seed=3", r"trained on a random CLIP with seed 0 .* seed 3 .*differing: seed"),
])
def test_a_resume_with_a_setting_the_checkpoint_cannot_follow_stops_before_training(demo, one_epoch, tmp_path, opt,
                                                                                    named):
    out = tmp_path / "refused"
    shutil.copytree(one_epoch, out)
    before = snapshot(out)
    with pytest.raises(ValueError, match=named):
        train_script.main(train_args(demo, out, *ONE_EPOCH, opt))
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "log.txt"} == {k: v for k, v in before.items() if k != "log.txt"}


# ============================================================================ result files: atomic, errors name them
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (a real full disk); skipped where this process may not mount one."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); the full-disk case is then covered only by the "
                    "injected ENOSPC of test_reliability.py")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """Fill the file system of ``folder`` until ``leave`` bytes are free; returns the filler file."""
    st = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


RESULT_NAMES = re.compile(r"^(results\.json|config\.yaml|per_class_.*\.csv|scores_.*\.npz|confusion_.*\.png)$")


def assert_complete(path: Path):
    """A result file is readable to its end (a partial or empty file is not)."""
    import numpy as np
    import yaml
    from PIL import Image

    assert path.stat().st_size > 0, f"{path.name} is empty"
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".yaml":
        assert yaml.safe_load(path.read_text())["output_dir"]
    elif path.suffix == ".csv":
        assert path.read_text().splitlines()[0] == "id,name,num_videos,top1" and len(path.read_text().splitlines()) == 9
    elif path.suffix == ".npz":
        assert np.load(path)["scores"].shape == (8, 8)
    elif path.suffix == ".png":
        with Image.open(path) as im:
            im.load()


def test_a_full_disk_during_test_py_leaves_no_partial_result_and_names_the_file(demo, one_epoch, small_tmpfs):
    out = small_tmpfs / "results"
    args = ["--config", "configs/demo/demo_test.yaml", "--weights", str(one_epoch / "last.pt"), "--opts",
            *end_to_end.TINY_OPTS, *data_opts(demo, out)]
    out.mkdir()
    filler = fill(small_tmpfs, leave=24 * 1024)  # the log and the small files fit; not every result does
    with pytest.raises(OSError, match=rf"could not write [a-z -]+{re.escape(str(out))}/\S+: \[Errno 28\] No space "
                                      rf"left on device; the previous file \(if any\) is unchanged") as info:
        test_script.main(args)
    named = Path(re.search(r"could not write [a-z -]+ (\S+): ", str(info.value)).group(1))
    assert not named.exists(), f"{named.name} was left behind, partial"  # here the confusion PNG does not fit
    left = sorted(p.name for p in out.iterdir())
    assert not [n for n in left if n.endswith(".tmp")], left
    for name in left:
        if RESULT_NAMES.match(name):
            assert_complete(out / name)
    assert "results.json" not in left
    filler.unlink()  # space is back: the same command writes every result, complete
    test_script.main(args)
    for name in ("results.json", "config.yaml", "per_class_demo_val_val.csv", "scores_demo_val_val.npz",
                 "confusion_demo_val_val.png"):
        assert_complete(out / name)


# ============================================================================ one-line endings
def test_ctrl_c_in_test_py_and_train_py_ends_with_one_line(demo, one_epoch, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "evaluate_set", interrupted)
    argv = ["test.py", "--config", "configs/demo/demo_test.yaml", "--weights", str(one_epoch / "last.pt"), "--opts",
            *end_to_end.TINY_OPTS, *data_opts(demo, tmp_path / "out")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_as_script("test.py", argv)
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if " ERROR " in line or line.startswith("ERROR")]
    assert len(errors) == 1 and "interrupted" in errors[0], err[-2000:]
    assert not (tmp_path / "out" / LOCK_NAME).exists() and not (tmp_path / "out" / "results.json").exists()
    # train.py likewise (interrupted while it builds the model).
    monkeypatch.setattr(factory, "build_model", interrupted)
    with pytest.raises(SystemExit) as info:
        run_as_script("train.py", ["train.py", *train_args(demo, tmp_path / "train")])
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(r"ERROR train: interrupted: .*run the same command again", err)
