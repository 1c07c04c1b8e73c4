"""utils/schedule.py and utils/logger.py: lr values at known steps, exact resume, logging set-up, the metrics
CSV on resume, curves and the optional wandb logger."""
import csv
import logging
import sys
import types

import pytest
import torch
from PIL import Image

from utils.logger import MetricsCSV, WandbLogger, plot_curves, read_metrics_csv, setup_logging
from utils.schedule import WarmupCosine


def make_optimizer(lrs=(1e-3, 1e-4)):
    # SGD with momentum rather than AdamW: same param-group lr handling, and AdamW's first construction
    # costs seconds of imports
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)


def lrs_after(scheduler, steps):
    for _ in range(steps):
        scheduler.step()
    return [g["lr"] for g in scheduler.optimizer.param_groups]


def test_warmup_cosine_values_at_known_steps():
    # base lrs 1e-3 and 1e-4, 10 warm-up steps, 110 in all, min_lr 1e-5: cosine phase is 100 steps long
    opt = make_optimizer()
    sched = WarmupCosine(opt, total_steps=110, warmup_steps=10, min_lr=1e-5)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]  # step 0: the warm-up start
    assert lrs_after(sched, 5) == pytest.approx([5e-4, 5e-5])  # half-way through warm-up
    assert lrs_after(sched, 5) == pytest.approx([1e-3, 1e-4])  # end of warm-up: the base lrs
    assert sched.last_step == 10
    # a quarter into the cosine: min + (base - min) * (1 + cos(pi/4)) / 2
    assert lrs_after(sched, 25) == pytest.approx([1e-5 + 0.99e-3 * 0.8535533906, 1e-5 + 0.9e-4 * 0.8535533906])
    assert lrs_after(sched, 25) == pytest.approx([5.05e-4, 5.5e-5])  # half-way: the mean of base and min
    assert lrs_after(sched, 50) == pytest.approx([1e-5, 1e-5])  # step 110: min_lr
    assert lrs_after(sched, 7) == pytest.approx([1e-5, 1e-5])  # and it stays there
    assert sched.get_lr() == [g["lr"] for g in opt.param_groups]


def test_warmup_start_lr_and_no_warmup():
    sched = WarmupCosine(make_optimizer((1e-3,)), total_steps=20, warmup_steps=10, warmup_start_lr=1e-6)
    assert sched.get_lr() == pytest.approx([1e-6])
    assert lrs_after(sched, 5) == pytest.approx([1e-6 + (1e-3 - 1e-6) * 0.5])
    sched = WarmupCosine(make_optimizer((1e-3,)), total_steps=4, warmup_steps=0)
    assert sched.get_lr() == pytest.approx([1e-3])  # no warm-up: the first step uses the base lr
    assert lrs_after(sched, 2) == pytest.approx([0.5e-3])
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(make_optimizer(), total_steps=5, warmup_steps=6)


def test_optimizer_uses_the_scheduled_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = WarmupCosine(opt, total_steps=10, warmup_steps=4)
    moved = []
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
        moved.append(float(before - p.detach()))
    assert moved == pytest.approx([0.0, 0.025, 0.05])  # lr 0, 0.1/4, 0.2/4 for the first three steps


def test_state_dict_round_trip_continues_identically(tmp_path):
    def fresh():
        return WarmupCosine(make_optimizer(), total_steps=60, warmup_steps=8, min_lr=1e-6, warmup_start_lr=1e-7)

    reference = fresh()
    expected = [lrs_after(reference, 1) for _ in range(60)]

    first = fresh()
    lrs_after(first, 23)
    torch.save({"scheduler": first.state_dict(), "optimizer": first.optimizer.state_dict()}, tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    assert saved["scheduler"]["last_step"] == 23

    # as train.py does it: a new optimiser from the config, its state loaded, then the scheduler's
    resumed = fresh()
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    assert [g["lr"] for g in resumed.optimizer.param_groups] == expected[22]
    assert [lrs_after(resumed, 1) for _ in range(37)] == expected[23:]

    # the other order: scheduler built after the optimiser state (whose lr is a mid-warm-up value) was loaded
    opt = make_optimizer()
    opt.load_state_dict(saved["optimizer"])
    late = WarmupCosine(opt, total_steps=60, warmup_steps=8, min_lr=1e-6, warmup_start_lr=1e-7)
    late.load_state_dict(saved["scheduler"])
    assert late.base_lrs == [1e-3, 1e-4]
    assert [lrs_after(late, 1) for _ in range(37)] == expected[23:]

    with pytest.raises(ValueError, match="parameter groups"):
        WarmupCosine(make_optimizer((1e-3,)), 60, 8).load_state_dict(saved["scheduler"])


@pytest.fixture
def clean_root_logger():
    root = logging.getLogger()
    level = root.level
    yield root
    for h in [h for h in root.handlers if getattr(h, "_t2l_handler", False)]:
        root.removeHandler(h)
        h.close()
    root.setLevel(level)
    logging.captureWarnings(False)


def ours(root):
    return [h for h in root.handlers if getattr(h, "_t2l_handler", False)]


def test_setup_logging_is_idempotent_and_writes_the_file(tmp_path, clean_root_logger):
    root = clean_root_logger
    setup_logging(str(tmp_path / "run"), rank=0)
    setup_logging(str(tmp_path / "run"), rank=0)
    assert len(ours(root)) == 2  # one console, one file: not doubled by the second call
    log = logging.getLogger("t2l.test")
    log.info("first message")
    log.debug("hidden at INFO")
    for h in ours(root):
        h.flush()
    text = (tmp_path / "run" / "log.txt").read_text()
    assert text.count("first message") == 1
    assert "hidden at INFO" not in text
    assert "INFO t2l.test: first message" in text

    setup_logging(str(tmp_path / "other"), rank=0, filename="test_log.txt")  # switches the file
    log.info("second message")
    for h in ours(root):
        h.flush()
    assert len(ours(root)) == 2
    assert "second message" in (tmp_path / "other" / "test_log.txt").read_text()
    assert "second message" not in (tmp_path / "run" / "log.txt").read_text()


def test_other_ranks_print_only_warnings_with_their_rank(tmp_path, clean_root_logger, capsys):
    setup_logging(str(tmp_path), rank=3)
    assert len(ours(clean_root_logger)) == 1  # console only
    log = logging.getLogger("t2l.test")
    log.info("rank info")
    log.warning("rank warning")
    err = capsys.readouterr().err
    assert "rank info" not in err
    assert "[rank 3]" in err and "rank warning" in err
    assert not (tmp_path / "log.txt").exists()


def test_console_goes_through_tqdm_write(tmp_path, clean_root_logger, monkeypatch):
    import tqdm

    written = []
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, s, file=None, end="\n", nolock=False:
                                                        written.append(s)))
    setup_logging(None, rank=0)
    logging.getLogger("t2l.test").warning("above the bar")
    assert len(written) == 1 and written[0].endswith("WARNING t2l.test: above the bar")


def test_metrics_csv_resume_drops_redone_epochs(tmp_path):
    path = tmp_path / "metrics.csv"
    m = MetricsCSV(path)
    for epoch in range(1, 6):
        row = {"epoch": epoch, "loss": 1.0 / epoch}
        if epoch >= 2:
            row["val_top1"] = 10.0 * epoch  # a column that appears later
        m.log(row)
    m.log({"epoch": 5, "val_top5": 90.0})  # merged into epoch 5's row
    with path.open(newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["epoch", "loss", "val_top1", "val_top5"]
    assert table[1] == ["1", "1.0", "", ""]
    assert table[5] == ["5", "0.2", "50.0", "90.0"]
    assert len(table) == 6

    # resume at epoch 4: rows of epochs 4 and 5 are redone, so they go, on disk as well
    resumed = MetricsCSV(path, start_epoch=4)
    assert [r["epoch"] for r in resumed.rows] == [1, 2, 3]
    assert [r["epoch"] for r in read_metrics_csv(path)] == [1, 2, 3]
    assert resumed.rows[0] == {"epoch": 1, "loss": 1.0}  # empty cells are not values
    assert resumed.columns == ["epoch", "loss", "val_top1"]  # val_top5 only existed in a dropped row
    resumed.log({"epoch": 4, "loss": 0.3, "val_top1": 41.0})
    rows = read_metrics_csv(path)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[3]["loss"] == 0.3 and rows[3]["val_top1"] == 41.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # temp files renamed, none left

    with pytest.raises(KeyError, match="epoch"):
        resumed.log({"loss": 1.0})
    (tmp_path / "bad.csv").write_text("epoch,loss\n1,0.5\n2\n")
    with pytest.raises(ValueError, match="bad.csv: line 3"):
        MetricsCSV(tmp_path / "bad.csv", start_epoch=5)


def test_plot_curves_writes_a_png(tmp_path, caplog):
    path = tmp_path / "metrics.csv"
    m = MetricsCSV(path)
    m.log({"epoch": 1, "loss": 2.0, "align": 1.5})
    m.log({"epoch": 2, "loss": 1.5, "align": 1.1, "hmdb_top1": 40.0, "ucf_top1": 70.0})
    m.log({"epoch": 3, "loss": 1.2, "align": 0.9})
    plot_curves(path, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as img:
        assert img.format == "PNG" and img.width > img.height > 100
        img.load()

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with caplog.at_level(logging.DEBUG, logger="utils.logger"):
        plot_curves(empty, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    assert "no rows" in caplog.text


def test_wandb_logger_needs_wandb_and_passes_through(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail as if not installed
    with pytest.raises(ImportError, match="pip install wandb"):
        WandbLogger("t2l", mode="offline")

    calls = []

    class FakeRun:
        def log(self, data, step=None):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    w = WandbLogger("t2l", name="run1", config={"lr": 1e-4}, mode="offline", dir=tmp_path / "wb")
    w.log({"loss": 1.0}, step=7)
    w.finish()
    assert calls[0] == ("init", dict(project="t2l", name="run1", config={"lr": 1e-4}, mode="offline",
                                     dir=str(tmp_path / "wb")))
    assert calls[1:] == [("log", {"loss": 1.0}, 7), ("finish",)]
    with pytest.raises(ValueError, match="mode"):
        WandbLogger("t2l", mode="sometimes")


def test_lr_held_for_ten_steps_as_the_published_schedule():
    """The published loop sets the lr at iterations 0, 9, 19, 29, ... of every epoch to f(epoch + it / len) with
    f(x) = lr * x / 5 during 5 warm-up epochs, then lr * (1 + cos(pi * (x - 5) / (E - 5))) / 2."""
    import math

    spe, epochs, base = 25, 12, 1e-4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = WarmupCosine(opt, total_steps=epochs * spe, warmup_steps=5 * spe, update_every=10, steps_per_epoch=spe)

    def published(x):
        return base * x / 5 if x < 5 else base * (math.cos(math.pi * (x - 5) / (epochs - 5)) + 1) / 2

    for step in range(epochs * spe):
        e, it = divmod(step, spe)
        set_at = 0 if it < 9 else ((it + 1) // 10) * 10 - 1  # the last of 0, 9, 19, ... not after `it`
        assert opt.param_groups[0]["lr"] == pytest.approx(published(e + set_at / spe), rel=1e-12, abs=1e-20), step
        opt.step()
        sched.step()
    # the held value is restored exactly on resume
    state = sched.state_dict()
    other = WarmupCosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base), total_steps=epochs * spe,
                         warmup_steps=5 * spe)
    other.load_state_dict(state)
    assert other.get_lr() == sched.get_lr() and other.update_every == 10
    with pytest.raises(ValueError, match="steps_per_epoch"):
        WarmupCosine(opt, total_steps=10, warmup_steps=1, update_every=10)
