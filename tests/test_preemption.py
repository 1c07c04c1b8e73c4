"""Preemption-safe training (issue 21): mid-epoch checkpoints, stop signals, exact resumes, the work a kill loses.

Every scenario is a row of docs/RELIABILITY.md (part 7). The data is the synthetic demo set and the tiny random CLIP of
tests/test_train_test.py; runs are in-process (``train.main``) where a stop signal is the point, forked where the
process must die (SIGKILL), and a real ``python train.py`` where its exit status and its DataLoader workers are. The
points where signals land are drawn from ``random.Random(SEED)``. The torchrun cases (one rank signalled, one rank
SIGKILLed, ``--max-restarts``) are in tests/test_train_test.py, next to the torchrun run they are compared with.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train as train_script
import with_faults
from datasets.samplers import ResumableDistributedSampler
from utils import training_state
from utils.checkpoint import safe_load
from utils.preemption import EXIT_REQUEUE, CheckpointClock, StopSignals

import test_train_test as end_to_end
from test_reliability import patch_loss, assert_same_checkpoint, metrics_rows, run_forked, tmp_files
from test_reliability import one_thread_at_the_repo_root  # noqa: F401 (an autouse fixture: one torch thread, cwd)
from test_reliability import reference  # noqa: F401 (module-scoped: an uninterrupted two-epoch run, made once here)
from test_train_test import train_args

demo = end_to_end.demo
ROOT = Path(__file__).resolve().parents[1]
SEED = 21  # the number: the signal points below are drawn from random.Random(SEED)
BATCHES = 4  # per epoch: 16 demo videos, batch 4
EVERY = 3  # checkpoint.every_steps of the interrupted runs: a SIGKILL loses fewer steps than this


def progress(out: Path) -> int:
    """Global batches done by the checkpoint a rerun in ``out`` resumes from (0 when there is none)."""
    path, ckpt = training_state.latest_checkpoint(out)
    if path is None:
        return 0
    epoch, batches = training_state.progress_of(ckpt or safe_load(path))
    return epoch * BATCHES + batches


def stopped_run(argv, plan: dict) -> list:
    """train.main(argv) with signals sent at chosen loss calls (in this process); returns what fired."""
    records = []
    undo = with_faults.arm(plan, records=records)
    try:
        with pytest.raises(train_script.Preempted):
            train_script.main(argv)
    finally:
        undo()
    return records


def assert_equals_reference(out: Path, reference: Path, resumes: tuple = ()):
    """Bit-equal checkpoints and equal metrics.csv rows. ``resumes``: the setting changes the resumed run applied
    (last.pt records them; a file written before the resume records a first part of them)."""
    assert sorted(p.name for p in out.glob("*.pt")) == sorted(p.name for p in reference.glob("*.pt"))  # no mid_epoch
    expected = [sorted(r) for r in resumes]
    for name in [p.name for p in reference.glob("*.pt")]:
        ours, theirs = safe_load(out / name), safe_load(reference / name)
        changes = [sorted(r["changes"]) for r in ours.pop("resumes")]
        assert changes == expected if name == "last.pt" else changes == expected[:len(changes)], (name, changes)
        assert theirs.pop("resumes") == []
        assert_same_checkpoint(theirs, ours, name)
    assert metrics_rows(out) == metrics_rows(reference)
    assert tmp_files(out) == []


# ============================================================================ the pieces
def test_checkpoint_clock_intervals_and_stop_requests():
    now = [0.0]
    clock = CheckpointClock(every_steps=3, every_minutes=0.5, clock=lambda: now[0])
    assert clock.enabled and not CheckpointClock().enabled
    assert [s for s in range(1, 8) if clock.interval_due(s, stepped=True)] == [3, 6]
    assert not clock.interval_due(3, stepped=False)  # half-way through a gradient accumulation: wait for the step
    now[0] = 31.0
    assert clock.interval_due(1, stepped=True)  # 31 s > 0.5 min since the start
    clock.written(1)
    assert not clock.interval_due(1, stepped=True) and not clock.interval_due(2, stepped=True)  # written; 0 s since
    now[0] = 61.5
    assert clock.interval_due(2, stepped=True)
    assert clock.decide(2, stepped=False, stop_requested=True) == (True, True)  # a stop is served at once
    clock.written(2)
    assert clock.decide(4, stepped=True, stop_requested=False) == (False, False)
    assert clock.decide(6, stepped=True, stop_requested=False) == (True, False)


def test_the_resumable_sampler_leaves_out_exactly_the_consumed_samples():
    data = list(range(22))
    for rank in range(2):
        plain = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=rank, seed=5, drop_last=True)
        ours = ResumableDistributedSampler(data, num_replicas=2, rank=rank, seed=5, drop_last=True)
        for epoch, skip in ((0, 0), (3, 4), (3, 0), (1, 11)):
            plain.set_epoch(epoch)
            ours.set_epoch(epoch, skip=skip)
            assert list(ours) == list(plain)[skip:] and len(ours) == len(plain) == 11
    with pytest.raises(ValueError, match="cannot start epoch 2 after 12 samples: this rank's share has 11"):
        ours.set_epoch(2, skip=12)


def test_stop_signals_set_a_flag_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_resume_picks_the_later_checkpoint_and_a_restart_ignores_no_resume(tmp_path, monkeypatch):
    out = tmp_path
    torch.save({"epoch": 1, "format": "t2l"}, out / "last.pt")  # epochs 1-2 done
    torch.save({"epoch": 0, "position": {"epoch": 1, "batches": 3}}, out / "mid_epoch.pt")  # older: stale
    assert training_state.latest_checkpoint(out)[0] == out / "last.pt"
    torch.save({"epoch": 1, "position": {"epoch": 2, "batches": 1}}, out / "mid_epoch.pt")  # part-way through epoch 3
    assert training_state.latest_checkpoint(out)[0] == out / "mid_epoch.pt"
    args = SimpleNamespace(resume=None, no_resume=True)
    for var in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    assert training_state.choose_resume(args, out)[0] is None  # a first start: --no-resume is obeyed
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarted the same command line
    assert training_state.choose_resume(args, out)[0] == out / "mid_epoch.pt"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # a requeued Slurm job
    assert training_state.choose_resume(SimpleNamespace(resume=str(out / "x.pt"), no_resume=False), out)[0] == \
        out / "mid_epoch.pt"


# ============================================================================ stop signals and kills, resumed
def test_signals_and_kills_at_seeded_points_then_resume_equals_an_uninterrupted_run(demo, reference, tmp_path):
    """SIGTERM and SIGUSR1 (in-process: checkpoint at the next batch, then Preempted) and SIGKILL (forked: the last
    interval checkpoint survives) at seeded training steps across both epochs; then a plain rerun."""
    rng = random.Random(SEED)
    out = tmp_path / "run"
    argv = train_args(demo, out, f"checkpoint.every_steps={EVERY}")
    total = 2 * BATCHES
    lost = []
    events = []
    for i, sig in enumerate((signal.SIGTERM, signal.SIGKILL, signal.SIGUSR1, signal.SIGKILL, signal.SIGTERM)):
        done = progress(out)
        if total - done < 2:
            break
        n = rng.randint(1, min(3, total - done - 1))  # the n-th loss computation of this run: in global batch done + n
        events.append((sig.name, done + n))
        if sig == signal.SIGKILL:
            status = run_forked(argv, tmp_path / f"kill{i}.log", ("step", None, n, 0))
            assert status == "killed", (tmp_path / f"kill{i}.log").read_text()[-3000:]
            now = progress(out)
            lost.append(done + n - 1 - now)  # batches finished before the kill that the rerun must redo
            assert 0 <= lost[-1] < EVERY, (done, n, now)
        else:
            fired = stopped_run(argv, {n: (sig, "")})
            assert [r["steps_done"] for r in fired] == [done + n - 1]  # the signal came during this step ...
            assert progress(out) == done + n  # ... and the checkpoint holds it: nothing lost
            ckpt = safe_load(out / training_state.latest_checkpoint(out)[0].name)
            assert ckpt["step"] == done + n
    assert run_forked(argv, tmp_path / "final.log") == "finished", (tmp_path / "final.log").read_text()[-3000:]
    assert_equals_reference(out, reference)
    assert len(events) == 5 and max(lost) > 0, f"the seed tests less than it should: {events}, lost {lost}"
    print("signals at global batches", events, "batches lost by the kills", lost)


def test_a_stop_half_way_through_a_gradient_accumulation_keeps_the_gradient(demo, tmp_path):
    opts = ("solver.grad_accum=2", "eval.every=0", "data.text_mode=templates")  # templates: a text view per sample
    whole = tmp_path / "whole"
    train_script.main(train_args(demo, whole, *opts))
    out = tmp_path / "run"
    stopped_run(train_args(demo, out, *opts), {3: (signal.SIGTERM, "")})  # during batch 3: one of 2 accumulated
    position = safe_load(out / "mid_epoch.pt")["position"]
    assert position["batches"] == 3 and position["grads"], "the half-accumulated gradient was not kept"
    train_script.main(train_args(demo, out, *opts))
    assert_equals_reference(out, whole)


def test_the_count_of_nonfinite_losses_in_a_row_survives_a_mid_epoch_stop(demo, monkeypatch, tmp_path):
    out = tmp_path / "run"
    argv = train_args(demo, out, "eval.every=0", "solver.max_nonfinite_steps=2")
    patch_loss(monkeypatch, bad={3})
    stopped_run(argv, {3: (signal.SIGTERM, "")})  # the 3rd loss is NaN, and the stop comes during it
    assert safe_load(out / "mid_epoch.pt")["nonfinite_run"] == 1
    patch_loss(monkeypatch, bad={1})  # the resumed run's first loss (batch 4) is NaN too: two in a row
    with pytest.raises(train_script.NonFiniteLossError, match=r"^2 non-finite losses in a row, the last at epoch 1 "):
        train_script.main(argv)


def test_a_mid_epoch_checkpoint_continues_only_with_its_data_layout(demo, tmp_path):
    out = tmp_path / "run"
    stopped_run(train_args(demo, out, "eval.every=0"), {2: (signal.SIGTERM, "")})
    with pytest.raises(ValueError, match=r"mid_epoch.pt was written part-way through an epoch, which can only be "
                                         r"continued with the same data layout: data.batch_size \(videos per rank "
                                         r"and batch\) was 4 and is now 2\. .*--resume .*last\.pt"):
        train_script.main(train_args(demo, out, "eval.every=0", "data.batch_size=2"))


def test_a_mid_epoch_resume_applies_a_changed_lr_from_where_it_stopped(demo, tmp_path):
    from utils.schedule import WarmupCosine

    out = tmp_path / "run"
    opts = ("eval.every=0", "solver.epochs=1")
    stopped_run(train_args(demo, out, *opts), {2: (signal.SIGTERM, "")})
    old_lr = safe_load(out / "mid_epoch.pt")["config"]["solver"]["lr"]
    train_script.main(train_args(demo, out, *opts, f"solver.lr={old_lr * 5}"))
    last = safe_load(out / "last.pt")
    assert last["resumes"] == [{"epoch": 0, "changes": {"solver.lr": [old_lr, old_lr * 5]}}]
    assert last["step"] == BATCHES and last["scheduler"]["last_step"] == BATCHES  # continued at step 2, not 0
    expect = WarmupCosine(torch.optim.SGD([torch.zeros(1)], lr=old_lr * 5), total_steps=BATCHES, warmup_steps=BATCHES)
    assert last["scheduler"]["base_lrs"][0] == old_lr * 5
    assert metrics_rows(out)[0]["lr"] == pytest.approx(expect.lr_at(BATCHES)[0])


def test_dataloader_workers_survive_a_sigterm_to_the_process_group_and_prefetched_batches_are_redone(demo,
                                                                                                      reference,
                                                                                                      tmp_path):
    """A preempting cluster signals every process of the job. PyTorch's DataLoader workers die of SIGTERM (their own
    handler), which would end the run before its checkpoint: train.py's workers ignore it. The two workers had
    prefetched the rest of the epoch; those batches must be trained after the resume, not skipped."""
    out = tmp_path / "run"
    pid = os.fork()
    if pid == 0:  # a run in a process group of its own, which the signal goes to
        code = 4
        try:
            os.setpgid(0, 0)
            sys.stdout = sys.stderr = open(tmp_path / "child.log", "w")
            torch.set_num_threads(1)
            with_faults.arm({2: (signal.SIGTERM, "group")})
            train_script.main(train_args(demo, out, "data.num_workers=2"))
        except train_script.Preempted:
            code = EXIT_REQUEUE
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_REQUEUE, (tmp_path / "child.log").read_text()[-3000:]
    assert "DataLoader worker" not in (tmp_path / "child.log").read_text()
    assert progress(out) == 2  # batch 2 finished; batches 3 and 4 were prefetched, not trained
    train_script.main(train_args(demo, out))  # the rerun (num_workers 0: the clips do not depend on the workers)
    assert_equals_reference(out, reference, resumes=(["data.num_workers"],))


def test_the_command_line_ends_on_an_error_raised_while_its_workers_are_alive(demo, tmp_path):
    """The workers ignore SIGTERM, which multiprocessing sends its children at exit before waiting for them: an error
    raised while the loader is in use (here an unreadable video with data.on_error=raise, in a worker) used to leave
    ``python train.py`` waiting forever after its error line. It must end with status 1, naming the file."""
    bad_list = tmp_path / "train.txt"
    lines = (demo / "train.txt").read_text().splitlines()
    bad_list.write_text("\n".join([*lines[:6], "train/nowhere/missing_000 16 0", *lines[6:]]) + "\n")
    args = [*train_args(demo, tmp_path / "run"), f"data.train_list={bad_list}", "data.on_error=raise",
            "data.num_workers=1", "--no-resume"]
    try:
        done = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=90, env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"train.py did not end after its error: {(e.stderr or b'')[-2000:]!r}")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "missing_000: no such frames folder or video file" in done.stderr
    assert "exited unexpectedly" not in done.stderr


def _fake_slurm(folder: Path) -> Path:
    """``srun`` (runs its command here) and ``scontrol`` (this host; ``requeue`` is written to $FAKE_SLURM_LOG)."""
    folder.mkdir()
    (folder / "srun").write_text('#!/bin/bash\nwhile [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done\n'
                                 'exec "$@"\n')
    (folder / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then echo localhost; '
                                     'else echo "$@" >> "$FAKE_SLURM_LOG"; fi\n')
    for name in ("srun", "scontrol"):
        (folder / name).chmod(0o755)
    return folder


def test_the_sbatch_script_requeues_at_the_time_limit_warning_and_the_requeued_job_goes_on(demo, reference, tmp_path,
                                                                                           monkeypatch, caplog):
    """scripts/slurm_train.sbatch with stand-ins for srun and scontrol (no Slurm here): SIGUSR1 to the batch script,
    as ``--signal=B:USR1@120`` sends it, goes through srun and torchrun (--signals-to-handle; it signals the
    trainer's whole process group, its two DataLoader workers too, which must survive it) to train.py, which
    checkpoints part-way through the epoch and exits 75; the script requeues the job. The workers had prefetched
    the rest of the epoch, which must be trained after the requeue, not skipped. The requeued job (the same script,
    SLURM_RESTART_COUNT=1, its command line saying --no-resume) continues and ends as the uninterrupted run. The
    signal is sent from inside the 3rd training step, so that it lands there whatever the machine's speed."""
    import socket

    script = tmp_path / "slurm_train.sbatch"  # the script itself, with train.py wrapped to time the signal
    script.write_text((ROOT / "scripts" / "slurm_train.sbatch").read_text().replace(
        "    train.py --config", "    tests/with_faults.py train.py --config"))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    log = tmp_path / "slurm.log"
    env = {**os.environ, "PATH": f"{_fake_slurm(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "4242", "NPROC_PER_NODE": "1", "T2L_RDZV_PORT": str(port),
           "FAKE_SLURM_LOG": str(log)}
    out = tmp_path / "run"
    args = train_args(demo, out, "data.num_workers=2")[1:]  # CONFIG, then --opts ...
    # BATCH_PID: the batch script's own pid (exec keeps it), where the wrapped train.py sends SIGUSR1
    first = subprocess.run(["bash", "-c", 'export BATCH_PID=$$; exec bash "$0" "$@"', str(script), *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, start_new_session=True,
                           env={**env, "T2L_TEST_FAULTS": "0:0:3:SIGUSR1:via=BATCH_PID"})
    assert log.read_text() == "requeue 4242\n", first.stdout[-3000:] + first.stderr[-3000:]
    assert "the time limit is near" in first.stdout and "stopped on SIGUSR1 part-way through epoch 1 (step 3)" in \
        first.stderr, first.stdout[-2000:] + first.stderr[-3000:]
    assert "exit status 75" in first.stderr and "DataLoader worker" not in first.stderr, first.stderr[-3000:]
    assert progress(out) == 3  # batch 3 finished; batches 4 to 8 were prefetched, not trained
    # The requeued job runs the same command again, now with SLURM_RESTART_COUNT=1 (in this process, to save the
    # seconds of another torchrun start; its command line also says --no-resume, which a restart must not obey).
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with caplog.at_level(logging.INFO, logger="train"):
        train_script.main(train_args(demo, out, "data.num_workers=2") + ["--no-resume"])
    assert "restart 1 of this job: continuing from" in caplog.text
    assert_equals_reference(out, reference)
