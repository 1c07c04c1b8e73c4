"""Reliability (issue 9): faults injected into train.py/test.py, bad inputs, untrusted files, extraction faults.

Every scenario here is listed, with what it showed, in docs/RELIABILITY.md. The data is the tiny synthetic demo set
of tests/test_train_test.py (its ``demo`` fixture and option helpers are reused, not copied); the model is the tiny
random CLIP of ``TINY_OPTS``; everything runs on the CPU with one torch thread (two threads on a shared two-core
machine are several times slower, not faster) and ``num_workers=0``.

Killed runs are forked from this process (no interpreter start-up per run) and SIGKILL themselves at a chosen point:
inside a training step, half-way through writing a checkpoint, between a checkpoint's temporary file and its rename,
right after a rename, or while evaluating. The points come from a seeded RNG, so a failure reproduces.
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import runpy
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

import engine
import test as test_script
import train as train_script
from modules import T2LLoss, factory, load_t2l, make_checkpoint
from modules import losses as losses_module
from utils.checkpoint import UnsafeCheckpointError, safe_load
from utils.config import ConfigError
from utils.logger import read_metrics_csv

import test_train_test as end_to_end
from test_extract_frames import FAULT_ENV, run_cli, write_grey_video
from test_extract_frames import snapshot as tree_snapshot
from test_train_test import TINY_OPTS, data_opts, train_args

demo = end_to_end.demo  # the synthetic demo set (a module-scoped fixture), made as the end-to-end tests make it

ROOT = Path(__file__).resolve().parents[1]
SEED = 9  # the number: the kill points below are drawn from random.Random(SEED)
TIMING = {"epoch_time_s", "videos_per_s"}  # metrics.csv columns that depend on the machine's speed


@pytest.fixture(scope="module", autouse=True)
def one_thread_at_the_repo_root():
    """One torch thread (also in forked runs) and the repository root as working directory (configs are relative)."""
    threads, cwd = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(1)
    os.chdir(ROOT)
    yield
    torch.set_num_threads(threads)
    os.chdir(cwd)


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory):
    """An uninterrupted two-epoch run (evaluated every epoch): what every interrupted run must end up equal to."""
    out = tmp_path_factory.mktemp("reference")
    train_script.main(train_args(demo, out))
    return out


def tmp_files(out: Path) -> list:
    """The temporary files atomic writers leave when killed (``.<name>.<random>.tmp``)."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def snapshot(out: Path) -> dict:
    """{file name: bytes} of an output folder (flat)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def assert_unchanged_except_log(before: dict, out: Path, log: str = "log.txt"):
    """Every file of ``before`` is still there with the same bytes; the log may only have grown."""
    after = snapshot(out)
    for name, data in before.items():
        assert name in after, f"{name} was deleted"
        if name == log:
            assert after[name].startswith(data), f"{name} was truncated"
        else:
            assert after[name] == data, f"{name} was changed"


def metrics_rows(out: Path) -> list:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics_csv(out / "metrics.csv")]


def assert_same_checkpoint(a: dict, b: dict, what: str):
    """Bit-equal T2L tensors, optimiser, schedule, scaler, RNG states, epoch, step and best metrics."""
    assert set(a) == set(b), what
    for key in a:
        if key == "config":  # holds output_dir, which differs by construction
            continue
        assert_equal_nested(a[key], b[key], f"{what}[{key}]")


def assert_equal_nested(x, y, where):
    if torch.is_tensor(x):
        assert torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert isinstance(y, dict) and set(x) == set(y), where
        for k in x:
            assert_equal_nested(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert isinstance(y, (list, tuple)) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_equal_nested(u, v, f"{where}[{i}]")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


# ============================================================================ 1. kills, non-finite losses, full disk
def _arm(kind: str, target, n: int, fraction: float) -> None:
    """In a forked run: SIGKILL this process at the n-th occurrence of the event ``kind`` (on file ``target``)."""
    count = [0]

    def due() -> bool:
        count[0] += 1
        return count[0] == n

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kind == "step":  # inside the n-th training step, before its optimiser update
        forward = losses_module.T2LLoss.forward

        def killing_forward(self, *args, **kwargs):
            if due():
                die()
            return forward(self, *args, **kwargs)
        losses_module.T2LLoss.forward = killing_forward
    elif kind == "eval":  # while scoring the n-th evaluation set
        score = engine.score_dataset

        def killing_score(*args, **kwargs):
            if due():
                die()
            return score(*args, **kwargs)
        engine.score_dataset = killing_score
    elif kind == "half_write":  # utils.checkpoint.atomic_save -> torch.save(obj, file): write a part, die
        save = torch.save

        def killing_save(obj, f, *args, **kwargs):
            final = _atomic_target(f)  # atomic_save writes into ".<target>.<random>.tmp" next to the target
            if final is not None and final.name == target and due():
                buf = io.BytesIO()
                save(obj, buf, *args, **kwargs)
                f.write(buf.getvalue()[:int(len(buf.getvalue()) * fraction)])
                f.flush()
                os.fsync(f.fileno())
                die()
            return save(obj, f, *args, **kwargs)
        torch.save = killing_save
    elif kind in ("before_rename", "after_rename"):  # around the rename that commits a file
        replace = os.replace

        def killing_replace(src, dst, *args, **kwargs):
            if Path(dst).name == target and due():
                if kind == "after_rename":
                    replace(src, dst, *args, **kwargs)
                die()
            return replace(src, dst, *args, **kwargs)
        os.replace = killing_replace
    else:
        raise ValueError(kind)


def run_forked(argv: list, log: Path, kill=None, timeout: float = 300.0) -> str:
    """train.main(argv) in a forked child; returns "killed", "finished" or "failed" (the child's output is in log)."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 4
        try:
            sys.stdout = sys.stderr = open(log, "w")
            torch.set_num_threads(1)
            if kill:
                _arm(*kill)
            train_script.main(argv)
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(code)
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"forked run {argv} hung; see {log}")
        time.sleep(0.02)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL, log.read_text()[-3000:]
        return "killed"
    return "finished" if os.WEXITSTATUS(status) == 0 else "failed"


def assert_consistent(out: Path) -> int:
    """What a killed run left is usable: every checkpoint loads, the committed epoch's metrics and best files exist.

    Returns the committed epoch (0-based; -1 when there is no last.pt). Only hidden ``.tmp`` files may be partial.
    """
    checkpoints = {}
    for p in sorted(out.glob("*.pt")):
        checkpoints[p.name] = safe_load(p)  # raises on a truncated or corrupt file
        assert checkpoints[p.name]["format"] == "t2l", p
    for name in os.listdir(out):
        assert not name.endswith(".tmp") or name.startswith("."), name
    if (out / "metrics.csv").exists():
        read_metrics_csv(out / "metrics.csv")  # complete and parseable
    last = checkpoints.get("last.pt")
    if last is None:
        return -1
    # The committed epoch's side files are there: its metrics row and the best checkpoints it claims.
    epochs = {row["epoch"] for row in read_metrics_csv(out / "metrics.csv")}
    assert set(range(1, last["epoch"] + 2)) <= epochs, f"metrics.csv has epochs {sorted(epochs)}, last.pt is " \
                                                      f"epoch {last['epoch'] + 1}"
    for name, best in last["best"].items():
        best_file = checkpoints.get(f"best_{name}.pt")
        assert best_file is not None, f"last.pt records a best {name} at epoch {best['epoch']} but best_{name}.pt " \
                                      f"is missing"
        assert best_file["epoch"] >= best["epoch"] - 1
    return last["epoch"]


def test_sigkill_at_seeded_points_then_resume_equals_an_uninterrupted_run(demo, reference, tmp_path):
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    rng = random.Random(SEED)
    out = tmp_path / "run"
    argv = train_args(demo, out)
    plan = [
        ("step", None, rng.randint(1, 4), 0),                            # inside a step of epoch 1
        ("half_write", "last.pt", 1, rng.uniform(0.05, 0.95)),           # epoch 1's checkpoint half-written
        ("before_rename", "last.pt", 1, 0),                              # complete temp file, not renamed
        ("after_rename", "last.pt", 1, 0),                               # epoch 1 committed, nothing after it
        rng.choice([("eval", None, 1, 0), ("step", None, rng.randint(1, 4), 0)]),  # somewhere in epoch 2
        ("half_write", "last.pt", 1, rng.uniform(0.05, 0.95)),           # epoch 2's checkpoint over epoch 1's
        ("after_rename", "metrics.csv", 1, 0),                           # epoch 2's metrics row written
    ]
    committed, saw_partial = -1, False
    for i, kill in enumerate(plan):
        before = (out / "last.pt").read_bytes() if (out / "last.pt").exists() else None
        status = run_forked(argv, tmp_path / f"kill{i}.log", kill)
        assert status == "killed", f"{kill}: the run {status} instead of being killed; see kill{i}.log"
        now = assert_consistent(out)
        assert now >= committed, f"{kill}: the committed epoch went back from {committed} to {now}"
        if kill[0] == "half_write":
            partial = tmp_files(out)  # the killed run's own (each run removes older ones when it starts)
            assert len(partial) == 1, f"{kill}: expected the one half-written temporary file, found {partial}"
            with pytest.raises(ValueError, match="truncated or not a PyTorch file"):
                safe_load(out / partial[0])
            saw_partial = True
            if before is not None:  # the previous checkpoint is untouched by the half write over it
                assert (out / "last.pt").read_bytes() == before
        committed = now
    assert saw_partial
    assert run_forked(argv, tmp_path / "final.log") == "finished", (tmp_path / "final.log").read_text()[-3000:]
    assert tmp_files(out) == [], "temporary files of killed runs were left behind"
    assert sorted(p.name for p in out.glob("*.pt")) == sorted(p.name for p in reference.glob("*.pt"))
    for name in [p.name for p in reference.glob("*.pt")]:
        assert_same_checkpoint(safe_load(reference / name), safe_load(out / name), name)
    assert metrics_rows(out) == metrics_rows(reference)


class _NaNAt(T2LLoss):
    """T2LLoss whose total is NaN (keeping the graph) at the 1-based calls ``bad`` and from call ``from_call`` on;
    ``abort_at`` simulates a crash (an exception out of train.main leaves the disk as a kill would)."""

    def __init__(self, *args, bad=(), from_call=None, abort_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad, self.from_call, self.abort_at, self.calls = set(bad), from_call, abort_at, 0

    def forward(self, *args):
        total, parts = super().forward(*args)
        self.calls += 1
        if self.calls == self.abort_at:
            raise KeyboardInterrupt("simulated crash")
        if self.calls in self.bad or (self.from_call is not None and self.calls >= self.from_call):
            total = total * float("nan")
            parts = {**parts, "loss": total.detach()}
        return total, parts


def patch_loss(monkeypatch, **kwargs):
    monkeypatch.setattr(train_script, "T2LLoss", lambda *a, **k: _NaNAt(*a, **k, **kwargs))


def test_a_nonfinite_loss_skips_the_step_is_counted_and_survives_a_resume(demo, monkeypatch, tmp_path):
    opts = ("eval.every=0",)
    patch_loss(monkeypatch, bad={2})
    whole = train_script.main(train_args(demo, tmp_path / "whole", *opts))
    assert whole["nonfinite_skipped"] == 1 and whole["steps"] == 2 * 4 - 1
    rows = metrics_rows(tmp_path / "whole")
    assert [r["nonfinite_skipped"] for r in rows] == [1, 1]  # cumulative over the run
    ckpt = safe_load(tmp_path / "whole" / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    # The same run crashing in epoch 2 (after the NaN of epoch 1) and resumed: same counts, same weights.
    patch_loss(monkeypatch, bad={2}, abort_at=6)
    with pytest.raises(KeyboardInterrupt):
        train_script.main(train_args(demo, tmp_path / "resumed", *opts))
    patch_loss(monkeypatch)  # the resumed process sees no NaN: epoch 1's is in the checkpoint
    train_script.main(train_args(demo, tmp_path / "resumed", *opts))
    assert metrics_rows(tmp_path / "resumed") == rows
    assert_same_checkpoint(ckpt, safe_load(tmp_path / "resumed" / "last.pt"), "last.pt")


def test_nonfinite_losses_in_a_row_stop_naming_the_step_and_the_last_good_checkpoint(demo, monkeypatch, tmp_path):
    out = tmp_path / "run"
    # NaN from the 5th loss on: epoch 1 (4 steps) finishes and is saved, epoch 2 never makes a step.
    patch_loss(monkeypatch, from_call=5)
    with pytest.raises(train_script.NonFiniteLossError,
                       match=rf"3 non-finite losses in a row, the last at epoch 2 step 4; stopping\. The last good "
                             rf"checkpoint is {re.escape(str(out / 'last.pt'))}\."):
        train_script.main(train_args(demo, out, "eval.every=0", "solver.max_nonfinite_steps=3"))
    last = safe_load(out / "last.pt")
    assert last["epoch"] == 0 and last["step"] == 4
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    # From the first step: there is no good checkpoint, and the message says so.
    patch_loss(monkeypatch, from_call=1)
    with pytest.raises(train_script.NonFiniteLossError, match=r"the last at epoch 1 step 0;.*none \(no epoch "
                                                              r"finished yet\)"):
        train_script.main(train_args(demo, tmp_path / "fresh", "eval.every=0", "solver.max_nonfinite_steps=2"))
    assert not (tmp_path / "fresh" / "last.pt").exists()


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_names_the_file(demo, reference, monkeypatch,
                                                                                   tmp_path):
    out = tmp_path / "run"
    real_save = torch.save
    seen = {"last.pt": 0}
    kept = {}

    def full_disk(obj, f, *args, **kwargs):
        path = _atomic_target(f)
        if path is not None and path.name == "last.pt":
            seen["last.pt"] += 1
            if seen["last.pt"] == 2:  # epoch 2's checkpoint: half of it fits, then the disk is full
                kept["bytes"] = Path(path).read_bytes()
                buf = io.BytesIO()
                real_save(obj, buf)
                f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=rf"could not write checkpoint {re.escape(str(out / 'last.pt'))}: .*No space "
                                      rf"left on device.*previous file .* is unchanged"):
        train_script.main(train_args(demo, out))
    assert (out / "last.pt").read_bytes() == kept["bytes"]
    assert safe_load(out / "last.pt")["epoch"] == 0
    assert tmp_files(out) == []
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the rerun resumes and ends where it should
    train_script.main(train_args(demo, out))
    assert_same_checkpoint(safe_load(reference / "last.pt"), safe_load(out / "last.pt"), "last.pt")
    assert metrics_rows(out) == metrics_rows(reference)


def _atomic_target(f):
    """The final path an atomic writer's temporary file ``.<name>.<random>.tmp`` stands for (None otherwise)."""
    if not hasattr(f, "fileno"):
        return None
    tmp = Path(os.readlink(f"/proc/self/fd/{f.fileno()}"))
    m = re.fullmatch(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp", tmp.name)
    return tmp.with_name(m.group(1)) if m else None


# ================================================================================ 2. bad inputs
def _bad_inputs(demo: Path, folder: Path) -> dict:
    """One of each broken video, made from the demo's own files: {kind: path}."""
    import av

    folder.mkdir(parents=True, exist_ok=True)
    good_frames = next((demo / "frames" / "train").glob("*/*"))
    good_video = next((demo / "videos" / "train").glob("*/*.mp4"))
    bad = {"missing frames folder": folder / "no_such_video"}
    corrupt = folder / "corrupt_jpeg"
    shutil.copytree(good_frames, corrupt)
    data = (corrupt / "img_00003.jpg").read_bytes()
    (corrupt / "img_00003.jpg").write_bytes(data[:len(data) // 2])
    bad["corrupt JPEG"] = corrupt / "img_00003.jpg"  # the file that the error names
    bad["zero-byte video"] = folder / "empty.mp4"
    bad["zero-byte video"].write_bytes(b"")
    bad["truncated video"] = folder / "truncated.mp4"
    data = good_video.read_bytes()
    bad["truncated video"].write_bytes(data[:len(data) // 2])
    bad["video without frames"] = folder / "no_frames.avi"
    with av.open(str(bad["video without frames"]), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    return bad


def _mixed_list(path: Path, good_lines: list, bad: dict) -> Path:
    """Good lines with one bad video after each of the first len(bad) of them (a bad one is never last, never two
    in a row, so each bad video is replaced by a good neighbour exactly once)."""
    lines = []
    bad_paths = [p.parent if p.suffix == ".jpg" else p for p in bad.values()]
    for i, line in enumerate(good_lines):
        lines.append(line)
        if i < len(bad_paths):
            lines.append(f"{bad_paths[i]} 8 0")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_unreadable_videos_are_skipped_counted_and_named_in_training_and_testing(demo, reference, tmp_path):
    bad = _bad_inputs(demo, tmp_path / "bad")
    train_lines = [f"{demo / 'frames' / line}" for line in (demo / "train.txt").read_text().splitlines()][:15]
    train_list = _mixed_list(tmp_path / "train_mixed.txt", train_lines, bad)  # 20 videos: 5 steps of 4
    out = tmp_path / "train"
    train_script.main(train_args(demo, out, f"data.train_list={train_list}", "data.root=null", "eval.every=0",
                                 "solver.epochs=1"))
    (row,) = read_metrics_csv(out / "metrics.csv")
    assert row["unreadable_samples"] == len(bad) and row["step"] == 5
    log = (out / "log.txt").read_text()
    for kind, path in bad.items():
        assert f"skipping {path} (list {train_list} line" in log, kind

    val_lines = [f"{demo / 'frames' / line}" for line in (demo / "val.txt").read_text().splitlines()]
    val_list = _mixed_list(tmp_path / "val_mixed.txt", val_lines, bad)
    res = test_script.main(["--config", "configs/demo/demo_test.yaml", "--weights", str(reference / "last.pt"),
                            "--opts", *TINY_OPTS, *data_opts(demo, tmp_path / "test"),
                            f'eval.sets=[{{name: demo_val, lists: ["{val_list}"], classes: "{demo}/classes.csv", '
                            f'descriptions: "{demo}/descriptions.csv"}}]'])
    entry = res["results"]["demo_val"]
    assert entry["num_videos"] == len(val_lines) and entry["splits"][0]["unreadable_videos"] == len(bad)
    written = json.loads((tmp_path / "test" / "results.json").read_text())
    assert written["results"]["demo_val"]["num_videos"] == len(val_lines)


def test_on_error_raise_names_the_file_and_keeps_the_output_folder(demo, reference, tmp_path):
    bad = _bad_inputs(demo, tmp_path / "bad")
    out = tmp_path / "existing"
    shutil.copytree(reference, out)
    before = snapshot(out)
    lst = _mixed_list(tmp_path / "mixed.txt", [f"{demo / 'frames' / line}" for line in
                                               (demo / "train.txt").read_text().splitlines()][:15], bad)
    with pytest.raises(RuntimeError) as info:  # SampleLoadError
        train_script.main(train_args(demo, out, f"data.train_list={lst}", "data.root=null", "data.on_error=raise",
                                     "--no-resume"))
    assert any(str(p) in str(info.value) for p in bad.values()), str(info.value)
    for name in ("last.pt", "best_demo_val.pt", "metrics.csv", "curves.png"):
        assert (out / name).read_bytes() == before[name], name


def test_bad_inputs_before_any_work_name_the_file_and_lose_nothing(demo, reference, tmp_path):
    out = tmp_path / "existing"
    shutil.copytree(reference, out)
    before = snapshot(out)
    lines = (demo / "train.txt").read_text().splitlines()

    def fails(exc, pattern, *extra, resume=None):
        with pytest.raises(exc, match=pattern):
            train_script.main((["--resume", str(resume)] if resume else []) + train_args(demo, out, *extra))
        assert_unchanged_except_log(before, out)

    malformed = tmp_path / "malformed.txt"
    malformed.write_text("\n".join(lines[:3] + [lines[3].rsplit(" ", 1)[0] + " four"] + lines[4:]) + "\n")
    fails(ValueError, rf"{re.escape(str(malformed))}:4: label must be an integer, got 'four'",
          f"data.train_list={malformed}")
    fails(ConfigError, r"data.root: .*no_such_folder does not exist", f"data.root={tmp_path}/no_such_folder")
    out_of_range = tmp_path / "labels.txt"
    out_of_range.write_text("\n".join(lines[:5] + [lines[5].rsplit(" ", 1)[0] + " 8"] + lines[6:]) + "\n")
    fails(ValueError, rf"{re.escape(str(out_of_range))}:6: label 8 is outside the class list \[0, 8\)",
          f"data.train_list={out_of_range}")
    # Descriptions for other classes altogether: an error naming the file.
    other = tmp_path / "other_descriptions.csv"
    other.write_text("SNo,Class Name,Description\n1,juggling,Balls in the air.\n2,archery,A bow is drawn.\n")
    fails(ValueError, rf"{re.escape(str(other))}: none of the 8 classes has a description",
          f"data.descriptions={other}")
    # Wrong types in the config.
    fails(ConfigError, r"data.batch_size: expected an integer, got 'four'", "data.batch_size=four")
    fails(ConfigError, r"solver.lr: expected a number, got \[0.1\]", "solver.lr=[0.1]")
    fails(ConfigError, r"data.flip: expected true or false, got 'maybe'", "data.flip=maybe")
    # Resume files of the wrong kind: a CLIP state dict, a checkpoint for evaluation only, random bytes.
    clip_sd = tmp_path / "clip_state_dict.pt"
    torch.save(factory.build_clip(_tiny_cfg(demo, out)).state_dict(), clip_sd)
    fails(ValueError, rf"{re.escape(str(clip_sd))} is not a training checkpoint of this project", resume=clip_sd)
    eval_only = tmp_path / "eval_only.pt"
    torch.save(make_checkpoint(load_t2l(reference / "last.pt")), eval_only)
    fails(ValueError, rf"{re.escape(str(eval_only))} is not a training checkpoint of this project.*optimizer",
          resume=eval_only)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(random.Random(SEED).randbytes(4096))
    fails(ValueError, rf"checkpoint {re.escape(str(noise))} could not be read: it is truncated or not a PyTorch file",
          resume=noise)
    half = tmp_path / "half.pt"
    half.write_bytes((reference / "last.pt").read_bytes()[:5000])
    fails(ValueError, rf"checkpoint {re.escape(str(half))} could not be read", resume=half)


def _tiny_cfg(demo, out):
    from utils.config import load_config

    return load_config("configs/demo/demo_train.yaml", TINY_OPTS + data_opts(demo, out))


def _test_args(demo, out, *extra, weights=None, flags=()):
    args = ["--config", "configs/demo/demo_test.yaml", *flags]
    if weights is not None:
        args += ["--weights", *map(str, weights)]
    return args + ["--opts", *TINY_OPTS, *data_opts(demo, out), *extra]


def test_test_py_refuses_wrong_weight_files_by_name_and_keeps_earlier_results(demo, reference, tmp_path):
    out = tmp_path / "results"
    test_script.main(_test_args(demo, out, weights=[reference / "last.pt"]))
    before = snapshot(out)
    clip_sd = tmp_path / "clip_state_dict.pt"
    torch.save(factory.build_clip(_tiny_cfg(demo, out)).state_dict(), clip_sd)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(random.Random(SEED).randbytes(4096))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    cases = [(clip_sd, rf"{re.escape(str(clip_sd))} is neither a T2L checkpoint.*loaded with clip.load instead"),
             (noise, rf"{re.escape(str(noise))} could not be read: it is truncated or not a PyTorch file"),
             (empty, rf"{re.escape(str(empty))} is empty \(0 bytes\)")]
    for path, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            test_script.main(_test_args(demo, out, weights=[path]))
        assert_unchanged_except_log(before, out, log="test_log.txt")
    labels = tmp_path / "val_labels.txt"
    val = (demo / "val.txt").read_text().splitlines()
    labels.write_text("\n".join(val[:2] + [val[2].rsplit(" ", 1)[0] + " 12"] + val[3:]) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(labels))}:3: label 12 is outside the class list"):
        test_script.main(_test_args(demo, out, f'eval.sets=[{{name: demo_val, lists: ["{labels}"], root: '
                                               f'"{demo}/frames", classes: "{demo}/classes.csv"}}]',
                                    weights=[reference / "last.pt"]))
    assert_unchanged_except_log(before, out, log="test_log.txt")


def test_missing_descriptions_are_refused_or_on_request_fall_back_with_a_warning(demo, reference, tmp_path):
    from modules import TEMPLATES, tokenize_class_texts

    rows = (demo / "descriptions.csv").read_text().splitlines()
    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join(rows[:1] + rows[1:3] + rows[5:]) + "\n")  # classes 2 and 3 are not described
    names = [line.split(",", 1)[1] for line in (demo / "classes.csv").read_text().splitlines()[1:]]
    # By default a class without a description stops the run, naming the file and the classes.
    with pytest.raises(ValueError, match=rf"{re.escape(str(partial))}: 2 of 8 classes have no description: "
                                         rf"{names[2]}, {names[3]}.*missing_descriptions"):
        engine.class_tokens(str(demo / "classes.csv"), str(partial), "descriptions")
    out = tmp_path / "results"
    sets = (f'eval.sets=[{{name: demo_val, lists: ["{demo}/val.txt"], root: "{demo}/frames", classes: '
            f'"{demo}/classes.csv", descriptions: "{partial}"}}]')
    with pytest.raises(ValueError, match="2 of 8 classes have no description"):
        test_script.main(_test_args(demo, out, sets, weights=[reference / "last.pt"]))
    assert not (out / "results.json").exists()
    # On request they get the first template, and a warning names them.
    names, tokens = engine.class_tokens(str(demo / "classes.csv"), str(partial), "descriptions", missing="template")
    for k in (2, 3):
        assert torch.equal(tokens[0, k], tokenize_class_texts([[TEMPLATES[0].format(names[k])]])[0, 0])
    full_names, full = engine.class_tokens(str(demo / "classes.csv"), str(demo / "descriptions.csv"), "descriptions")
    assert torch.equal(tokens[0, :2], full[0, :2]) and torch.equal(tokens[0, 4:], full[0, 4:])
    res = test_script.main(_test_args(demo, out, sets, "data.missing_descriptions=template",
                                      weights=[reference / "last.pt"]))
    assert res["results"]["demo_val"]["num_videos"] == 8
    log = (out / "test_log.txt").read_text()
    assert re.search(rf"{re.escape(str(partial))}: 2 class\(es\) have no description and use the template .*"
                     rf"{names[2]}, {names[3]}", log), log[-2000:]


# ================================================================================ 3. untrusted files
class _Exploit:
    """Unpickling this runs ``touch marker``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_runs_code_is_refused_everywhere_by_default(demo, reference, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    ckpt = safe_load(reference / "last.pt")
    torch.save({**ckpt, "payload": _Exploit(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError,
                       match=rf"{re.escape(str(evil))} is not a plain weights file.*GLOBAL \S*system"):
        load_t2l(evil)
    with pytest.raises(UnsafeCheckpointError, match=r"--trust-checkpoint"):
        test_script.main(_test_args(demo, tmp_path / "test", weights=[evil]))
    assert not (tmp_path / "test" / "results.json").exists()
    out = tmp_path / "train"
    with pytest.raises(UnsafeCheckpointError, match=re.escape(str(evil))):
        train_script.main(["--resume", str(evil)] + train_args(demo, out))
    assert not (out / "last.pt").exists()
    assert not marker.exists()
    # As a command line: one error line naming the file, exit status 1, no traceback (runpy: no new interpreter).
    argv = ["train.py", *["--resume", str(evil)] + train_args(demo, out)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_as_script("train.py", argv)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert re.search(rf"ERROR train: {re.escape(str(evil))} is not a plain weights file", err)
    assert "Traceback" not in err
    assert not marker.exists()


def run_as_script(script: str, argv: list):
    saved = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.argv = saved


def test_a_trusted_checkpoint_needing_full_unpickling_loads_with_a_warning(demo, reference, tmp_path, caplog):
    import argparse

    old_style = tmp_path / "old_style.pt"  # args pickled into the checkpoint, as older research code does
    torch.save({**safe_load(reference / "last.pt"), "args": argparse.Namespace(lr=0.1)}, old_style)
    out = tmp_path / "test"
    with pytest.raises(UnsafeCheckpointError):
        test_script.main(_test_args(demo, out, weights=[old_style]))
    res = test_script.main(_test_args(demo, out, weights=[old_style], flags=["--trust-checkpoint"]))
    base = test_script.main(_test_args(demo, tmp_path / "plain", weights=[reference / "last.pt"]))
    assert res["results"]["demo_val"]["top1"] == base["results"]["demo_val"]["top1"]
    assert f"loading {old_style} with full unpickling because it was marked as trusted" in \
        (out / "test_log.txt").read_text()
    # train.py: refused, then network.trust_checkpoint lets --resume read it (the run had finished: nothing to do).
    train_out = tmp_path / "train"
    with pytest.raises(UnsafeCheckpointError):
        train_script.main(["--resume", str(old_style)] + train_args(demo, train_out))
    summary = train_script.main(["--resume", str(old_style)] + train_args(demo, train_out,
                                                                          "network.trust_checkpoint=true"))
    assert summary["steps"] == 2 * 4
    log = (train_out / "log.txt").read_text()
    assert f"loading {old_style} with full unpickling" in log and f"resumed from {old_style}: epoch 2 done" in log


def test_yaml_code_tags_are_refused_in_opts_and_extended_files(demo, tmp_path):
    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    with pytest.raises(ConfigError, match=r"seed: expected an integer, got \"!!python"):
        train_script.main(train_args(demo, tmp_path / "out", f"seed={tag}"))
    parent = tmp_path / "parent.yaml"
    parent.write_text(f"seed: {tag}\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {parent.name}\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(parent))}: not valid YAML"):
        train_script.main(["--config", str(child)])
    assert not marker.exists()


def test_an_eval_set_name_cannot_write_outside_the_output_folder(demo, tmp_path):
    out = tmp_path / "runs" / "run"
    sets = (f'eval.sets=[{{name: "x/../../escaped", lists: ["{demo}/val.txt"], root: "{demo}/frames", '
            f'classes: "{demo}/classes.csv"}}]')
    with pytest.raises(ValueError, match=r"eval set name 'x/../../escaped' may hold only letters"):
        train_script.main(train_args(demo, out, "solver.epochs=1", sets))
    assert not list(tmp_path.rglob("escaped*"))  # refused before any work: nothing written anywhere


# ================================================================================ 3b, 4. frame extraction


def test_extraction_stays_inside_out_with_symlinks_pointing_outside_src(tmp_path):
    outside = tmp_path / "outside"
    write_grey_video(outside / "clips" / "far.mp4", 3)
    src, out = tmp_path / "src", tmp_path / "out"
    write_grey_video(src / "near.mp4", 2)
    (src / "linked_dir").symlink_to(outside / "clips", target_is_directory=True)
    (src / "linked_file.mp4").symlink_to(outside / "clips" / "far.mp4")
    before = tree_snapshot(outside)
    siblings = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli(src, out, "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert (out / "manifest.txt").read_text().split("\n", 1)[1] == "linked_dir/far 3\nlinked_file 3\nnear 2\n"
    assert tree_snapshot(outside) == before  # nothing written next to the link targets
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(siblings + ["out"])
    for path in out.rglob("*"):
        assert path.resolve().is_relative_to(out.resolve()), path


def test_extraction_visits_a_symlink_loop_once(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_grey_video(src / "a" / "v.mp4", 2)
    (src / "a" / "loop").symlink_to("..", target_is_directory=True)
    proc = run_cli(src, out, "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert (out / "manifest.txt").read_text().split("\n", 1)[1] == "a/v 2\n"


def test_extraction_killed_with_unreadable_videos_among_good_ones_reruns_to_the_clean_result(tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        write_grey_video(src / f"c{i % 2}" / f"v{i}.mp4", 6 + i, offset=i)
    (src / "c0" / "empty.mp4").write_bytes(b"")
    (src / "c1" / "noise.avi").write_bytes(random.Random(SEED).randbytes(2048))
    clean = tmp_path / "clean"
    assert run_cli(src, clean, "--workers", "2").returncode == 1  # 1: some videos failed
    out = tmp_path / "out"
    proc = run_cli(src, out, "--workers", "2", env_extra={FAULT_ENV: "killgroup:3:c1/v3.mp4"})
    assert proc.returncode == -signal.SIGKILL
    assert "c1/v3 " not in (out / "manifest.txt").read_text()
    assert run_cli(src, out, "--workers", "2").returncode == 1
    assert tree_snapshot(out) == tree_snapshot(clean)  # frames, manifest and failures.txt alike
    assert sorted(line.split("\t")[0] for line in (out / "failures.txt").read_text().splitlines()) == \
        ["c0/empty.mp4", "c1/noise.avi"]
