"""train.py and test.py end to end on generated videos (issue 5): contract, resume, torchrun, protocols, errors."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import test as test_script
import train as train_script
from modules import factory
from utils.config import ConfigError
from utils.schedule import WarmupCosine

ROOT = Path(__file__).resolve().parents[1]

TINY_OPTS = [
    "network.random_clip.image_resolution=32", "network.random_clip.vision_patch_size=8",
    "network.random_clip.vision_width=64", "network.random_clip.vision_heads=1",
    "network.random_clip.vision_layers=2", "network.random_clip.transformer_layers=1",
    "network.random_clip.embed_dim=32", "data.input_size=32", "data.batch_size=4", "data.num_workers=0",
    "eval.batch_size=8", "solver.epochs=2", "solver.warmup_epochs=1", "eval.every=1",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small synthetic motion set made by the real generator and extractor."""
    out = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, "Dataset_creation_scripts/make_synthetic_demo.py", str(out),
                    "--train-per-class", "2", "--val-per-class", "1", "--size", "32", "--frames", "8",
                    "--no-progress", "--workers", "1"], cwd=ROOT, check=True, capture_output=True)
    return out


def data_opts(demo: Path, out: Path):
    return [f"output_dir={out}", f"data.train_list={demo}/train.txt", f"data.root={demo}/frames",
            f"data.classes={demo}/classes.csv", f"data.descriptions={demo}/descriptions.csv",
            f'eval.sets=[{{name: demo_val, lists: ["{demo}/val.txt"], root: "{demo}/frames", '
            f'classes: "{demo}/classes.csv", descriptions: "{demo}/descriptions.csv", select_best: true}}]']


def train_args(demo, out, *extra):
    return ["--config", "configs/demo/demo_train.yaml", "--opts", *TINY_OPTS, *data_opts(demo, out), *extra]


def trained(out: Path) -> dict:
    return torch.load(out / "last.pt", weights_only=True)


@pytest.fixture(scope="module")
def run_two_epochs(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    os.chdir(ROOT)
    summary = train_script.main(train_args(demo, out))
    return out, summary


def test_train_writes_its_outputs(run_two_epochs):
    out, summary = run_two_epochs
    assert summary["steps"] == 2 * (16 // 4)
    for name in ("config.yaml", "log.txt", "metrics.csv", "curves.png", "last.pt", "best_demo_val.pt"):
        assert (out / name).is_file(), name
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 3 and "demo_val_top1" in rows[0]
    ckpt = trained(out)
    assert ckpt["format"] == "t2l" and ckpt["epoch"] == 1 and ckpt["backbone"]["name_or_path"] == "random"
    assert not any(k.startswith("clip.") for k in ckpt["model"])  # the frozen weights are not saved


def test_test_py_writes_results_json_by_the_contract(run_two_epochs, demo, tmp_path):
    out, _ = run_two_epochs
    res = test_script.main(["--config", "configs/demo/demo_test.yaml", "--weights", str(out / "last.pt"),
                            "--opts", *TINY_OPTS, *data_opts(demo, tmp_path)])
    written = json.loads((tmp_path / "results.json").read_text())
    entry = written["results"]["demo_val"]
    for key in ("top1", "top5", "mean_class_acc", "num_videos", "num_classes"):
        assert key in entry
    assert entry["num_videos"] == 8 and entry["num_classes"] == 8
    assert 0 <= entry["top1"] <= entry["top5"] <= 100
    assert set(entry["aggregate"]["top1"]) >= {"mean", "std"}
    assert (tmp_path / "per_class_demo_val_val.csv").is_file()
    assert (tmp_path / "confusion_demo_val_val.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["results"]["demo_val"]["top1"] == entry["top1"]


def test_resume_after_a_kill_gives_the_uninterrupted_weights(run_two_epochs, demo, tmp_path):
    reference, _ = run_two_epochs
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "train.py", *train_args(demo, tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "last.pt").exists():
            proc.send_signal(signal.SIGKILL)  # killed right after epoch 1's checkpoint
            break
        time.sleep(0.05)
    proc.wait()
    assert trained(tmp_path)["epoch"] == 0, "the kill came too late to test a resume"
    train_script.main(train_args(demo, tmp_path))  # resumes from last.pt automatically
    a, b = trained(reference), trained(tmp_path)
    assert b["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_torchrun_two_processes_match_a_single_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "tests/ddp_worker.py", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for step in range(2):
        for k in r0["params"][step]:
            assert torch.equal(r0["params"][step][k], r1["params"][step][k]), (step, k)
    # the same two steps in one process on the whole global batch
    sys.path.insert(0, str(ROOT / "tests"))
    import ddp_worker

    from modules import T2LLoss

    model = ddp_worker.make_model()
    start = {k: p.detach().clone() for k, p in model.trainable_parameters()}
    opt = ddp_worker.make_optimizer(model)
    for step in range(2):
        videos, labels, tokens = ddp_worker.global_batch(step)
        v, f, t = model(videos, tokens)
        loss, _ = T2LLoss()(v, f, t, labels, model.logit_scale)
        assert abs(loss.item() - r0["loss"][step]) < 1e-5
        opt.zero_grad()
        loss.backward()
        opt.step()
        for k, p in model.trainable_parameters():
            assert torch.allclose(p, r0["params"][step][k], atol=1e-5), (step, k)
    moved = max((p - start[k]).abs().max().item() for k, p in model.trainable_parameters())
    assert moved > 1e-3  # the steps changed the parameters, so the comparison above means something


TORCHRUN_OPTS = ("solver.epochs=1", "loss.gather=true", "data.batch_size=2")  # 4 steps of 2 ranks x 2 videos


@pytest.fixture(scope="module")
def torchrun_run(demo, tmp_path_factory):
    """train.py under ``torchrun --nproc_per_node 2`` (gloo), uninterrupted; evaluated at the end of its epoch."""
    out = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
           "train.py", *train_args(demo, out, *TORCHRUN_OPTS)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_torchrun_train_py_smoke(torchrun_run):
    assert trained(torchrun_run)["step"] == 16 // (2 * 2)


def test_torchrun_restarts_after_a_signalled_rank_and_a_killed_rank_end_as_the_uninterrupted_run(demo, torchrun_run,
                                                                                                  tmp_path):
    """``torchrun --max-restarts 2`` (c10d rendezvous): attempt 0, rank 0 alone gets SIGTERM in step 2, both ranks
    agree to checkpoint and exit 75; attempt 1 resumes part-way through the epoch, and rank 1 is SIGKILLed in step 4
    (checkpoint.every_steps=2: the last checkpoint is step 2's); attempt 2 resumes from it and finishes. The result
    is bit-equal to the uninterrupted torchrun run, and the kill lost less than the interval."""
    from test_reliability import assert_same_checkpoint, metrics_rows

    out, faults = tmp_path / "run", tmp_path / "faults.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "T2L_TEST_FAULT_LOG": str(faults),
           "T2L_TEST_FAULTS": "0:0:2:SIGTERM,1:1:2:SIGKILL"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts",
           "2", "tests/with_faults.py", "train.py", *train_args(demo, out, *TORCHRUN_OPTS, "checkpoint.every_steps=2")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "exitcode: 75" in done.stderr and "exitcode: -9" in done.stderr  # both faults happened, then restarts
    fired = [json.loads(line) for line in faults.read_text().splitlines()]
    assert [(f["attempt"], f["rank"], f["signal"]) for f in fired] == [(0, 0, "SIGTERM"), (1, 1, "SIGKILL")]
    log = (out / "log.txt").read_text()
    assert "stopped on SIGTERM part-way through epoch 1 (step 2)" in log
    resumed = [int(s) for s in re.findall(r"resumed from \S*mid_epoch\.pt: part-way through epoch 1 \(\d+ of 4 "
                                          r"batches done\), step (\d+)", log)]
    assert resumed == [2, 2]
    assert fired[0]["steps_done"] + 1 == resumed[0]  # SIGTERM: the step in flight was finished and kept
    lost = fired[1]["steps_done"] - resumed[1]  # SIGKILL: the steps since the last interval checkpoint
    assert 0 <= lost < 2, lost
    assert not (out / "mid_epoch.pt").exists()
    assert_same_checkpoint(trained(torchrun_run), trained(out), "last.pt")
    assert metrics_rows(out) == metrics_rows(torchrun_run)


def test_frozen_clip_baseline_equals_t2l_at_identity(demo, tmp_path):
    from modules import make_checkpoint
    from utils.checkpoint import atomic_save
    from utils.config import load_config

    cfg = load_config("configs/demo/demo_train.yaml", TINY_OPTS + data_opts(demo, tmp_path) +
                      ["network.t2l.temporal_tokens=none"])
    model = factory.build_model(cfg)  # adapters at their zero initialisation
    atomic_save(make_checkpoint(model), tmp_path / "identity.pt")
    common = ["--config", "configs/demo/demo_test.yaml", "--opts", *TINY_OPTS, *data_opts(demo, tmp_path)]
    t2l = test_script.main(common[:2] + ["--weights", str(tmp_path / "identity.pt")] + common[2:])
    base = test_script.main(common[:2] + ["--baseline"] + common[2:])
    for m in ("top1", "top5", "mean_class_acc"):
        assert t2l["results"]["demo_val"][m] == base["results"]["demo_val"][m]


def test_bad_inputs_stop_before_training(demo, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) data.batchsize; valid keys of data: .*batch_size"):
        train_script.main(train_args(demo, tmp_path, "data.batchsize=3"))
    with pytest.raises(ConfigError, match=r"data.train_list: .*nope.txt does not exist"):
        train_script.main(train_args(demo, tmp_path, f"data.train_list={tmp_path}/nope.txt"))
    short = tmp_path / "classes.csv"
    short.write_text("id,name\n0,moving left\n1,moving right\n")
    with pytest.raises(ValueError, match=r"label \d+ is outside the class list \[0, 2\)"):
        train_script.main(train_args(demo, tmp_path, f"data.classes={short}"))
    assert not (tmp_path / "last.pt").exists()


def test_checkpoint_for_other_frame_count_is_refused(run_two_epochs, demo, tmp_path):
    out, _ = run_two_epochs
    with pytest.raises(ValueError, match=r"trained with 8 frames but data.num_frames is 4"):
        test_script.main(["--config", "configs/demo/demo_test.yaml", "--weights", str(out / "last.pt"),
                          "--opts", *TINY_OPTS, *data_opts(demo, tmp_path), "data.num_frames=4"])


def test_temporal_token_lr_scale_gives_the_tokens_their_own_group():
    from utils.config import load_config

    for scale, n_groups in ((1.0, 2), (10.0, 3)):
        cfg = load_config("configs/demo/demo_train.yaml", TINY_OPTS + [f"solver.temporal_token_lr_scale={scale}"])
        model = factory.build_model(cfg)
        groups = train_script.param_groups(model, cfg)
        assert len(groups) == n_groups
        trainable = dict(model.trainable_parameters())
        grouped = [id(p) for g in groups for p in g["params"]]
        assert sorted(grouped) == sorted(id(p) for p in trainable.values())  # each parameter exactly once
        if n_groups == 3:
            assert groups[2]["params"] == [trainable["temporal_tokens"]]
            assert groups[2]["lr"] == pytest.approx(cfg.solver.lr * 10) and groups[2]["weight_decay"] == 0.0
            # the schedule scales this group like the others: its lr stays 10x theirs at every step
            opt = torch.optim.AdamW(groups, lr=cfg.solver.lr)
            sched = WarmupCosine(opt, total_steps=20, warmup_steps=5)
            for _ in range(7):
                sched.step()
            assert opt.param_groups[2]["lr"] == pytest.approx(10 * opt.param_groups[0]["lr"]) and opt.param_groups[0]["lr"] > 0
    with pytest.raises(ConfigError, match="temporal_token_lr_scale must be positive"):
        load_config("configs/demo/demo_train.yaml", ["solver.temporal_token_lr_scale=0"])


def test_resume_with_another_token_lr_scale_is_refused(run_two_epochs, demo, tmp_path):
    import shutil

    reference, _ = run_two_epochs  # trained with the demo's temporal_token_lr_scale 10: three optimiser groups
    shutil.copy(reference / "last.pt", tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"last.pt holds an optimiser with 3 parameter groups, this config makes 2"):
        train_script.main(train_args(demo, tmp_path, "solver.temporal_token_lr_scale=1"))


def test_compile_flag_compiles_both_encoders_and_changes_no_score(run_two_epochs, demo, tmp_path, monkeypatch,
                                                                    caplog):
    """--compile goes through torch.compile for the video and the text encoder of test.py and train.py. The eager
    backend stands in for inductor here (CPU code generation takes a minute); it still runs TorchDynamo's tracing
    of the whole T2L forward and backward."""
    import logging

    import numpy as np

    out, _ = run_two_epochs
    calls = []
    real = torch.compile

    def eager_compile(fn, mode=None, backend="inductor", **kw):
        calls.append((getattr(fn, "__name__", "?"), mode))
        return real(fn, mode=mode, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager_compile)
    plain = test_script.main(["--config", "configs/demo/demo_test.yaml", "--weights", str(out / "last.pt"),
                              "--opts", *TINY_OPTS, *data_opts(demo, tmp_path / "plain")])
    with caplog.at_level(logging.INFO):
        compiled = test_script.main(["--config", "configs/demo/demo_test.yaml", "--weights", str(out / "last.pt"),
                                     "--compile", "--opts", *TINY_OPTS, *data_opts(demo, tmp_path / "compiled")])
    assert calls == [("encode_video", None), ("encode_text", None)]
    assert compiled["results"]["demo_val"]["top1"] == plain["results"]["demo_val"]["top1"]
    a = np.load(tmp_path / "plain" / "scores_demo_val_val.npz")["scores"]
    b = np.load(tmp_path / "compiled" / "scores_demo_val_val.npz")["scores"]
    assert np.allclose(a, b, atol=1e-6)
    assert "encode_video compiled and ran its first batch in" in caplog.text
    calls.clear()
    summary = train_script.main(train_args(demo, tmp_path / "train", "solver.epochs=1", "eval.every=0") +
                                ["--compile", "reduce-overhead", "--no-resume"])
    assert calls == [("encode_video", "reduce-overhead"), ("encode_text", "reduce-overhead")]
    assert summary["steps"] == 16 // 4


def test_the_transform_on_the_device_trains_and_tests_exactly_as_in_the_loader(demo, tmp_path):
    """data.transform_on: device (the loader only decodes) on the CPU: the same trained weights and the same scores as
    the transform in the loader workers."""
    import numpy as np

    runs = {}
    for where in ("loader", "device"):
        out = tmp_path / where
        train_script.main(train_args(demo, out, "solver.epochs=1", "eval.every=0", "data.num_workers=1",
                                     f"data.transform_on={where}") + ["--no-resume"])
        runs[where] = trained(out)
        test_script.main(["--config", "configs/demo/demo_test.yaml", "--weights", str(out / "last.pt"), "--opts",
                          *TINY_OPTS, *data_opts(demo, out / "test"), "eval.rules=centre", f"data.transform_on={where}"])
    for name, tensor in runs["loader"]["model"].items():
        assert torch.equal(tensor, runs["device"]["model"][name]), name
    a = np.load(tmp_path / "loader" / "test" / "scores_demo_val_val.npz")["scores"]
    b = np.load(tmp_path / "device" / "test" / "scores_demo_val_val.npz")["scores"]
    assert np.array_equal(a, b)
