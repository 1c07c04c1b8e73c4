"""utils.training_state called alone: a tiny model, optimiser, schedule and scaler resumed from a checkpoint dict."""
import pytest
import torch

from conftest import TINY_CLIP, random_clip_opts
from modules import build_t2l, random_clip
from train import param_groups
from utils.checkpoint import rng_state
from utils.config import load_config
from utils.schedule import WarmupCosine
from utils.training_state import check_layout, resume_training, training_checkpoint

STEPS_PER_EPOCH = 4


def config(*opts):
    return load_config(None, ["network.pretrained=random", *random_clip_opts(TINY_CLIP), "data.num_frames=2",
                              "solver.epochs=3", "solver.warmup_epochs=1", "network.t2l.drop_path_rate=0.0", *opts])


def solver(cfg, seed: int):
    """A tiny T2L (T2L tensors drawn from ``seed``; the same frozen CLIP for every seed), AdamW, schedule, scaler."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_t2l(random_clip(TINY_CLIP, seed=0), num_frames=cfg.data.num_frames, **vars(cfg.network.t2l))
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.solver.lr, betas=tuple(cfg.solver.betas),
                                  eps=cfg.solver.eps)
    scheduler = WarmupCosine(optimizer, total_steps=cfg.solver.epochs * STEPS_PER_EPOCH,
                             warmup_steps=int(cfg.solver.warmup_epochs * STEPS_PER_EPOCH), min_lr=cfg.solver.min_lr,
                             update_every=cfg.solver.lr_update_every, steps_per_epoch=STEPS_PER_EPOCH)
    return model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)


def trained_checkpoint(cfg, **fields):
    """A checkpoint after one epoch (4 steps) of a toy loss on every trained tensor: optimiser state is non-trivial."""
    model, optimizer, scheduler, scaler = solver(cfg, seed=1)
    for _ in range(STEPS_PER_EPOCH):
        loss = sum((p.float() ** 2).sum() for _, p in model.trainable_parameters())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    ckpt = training_checkpoint(model, optimizer, scheduler, scaler, [rng_state()], cfg, epoch=0, step=STEPS_PER_EPOCH,
                               best={"val": {"top1": 12.5, "epoch": 1}}, nonfinite_skipped=2, nonfinite_run=1,
                               resumes=[], **fields)
    return ckpt, (model, optimizer, scheduler)


def assert_same_state(a, b):
    """Two optimiser (or scheduler) state dicts hold equal values, tensors compared with torch.equal."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


def test_resume_restores_exactly_what_was_saved():
    cfg = config()
    ckpt, (saved_model, saved_optimizer, saved_scheduler) = trained_checkpoint(cfg)
    model, optimizer, scheduler, scaler = solver(cfg, seed=2)  # other T2L tensors: the resume must replace them
    assert not torch.equal(model.temporal_tokens, saved_model.temporal_tokens)
    state = resume_training("run/last.pt", cfg, model, optimizer, scheduler, scaler, STEPS_PER_EPOCH, ckpt=ckpt)
    for (name, p), (_, q) in zip(model.trainable_parameters(), saved_model.trainable_parameters()):
        assert torch.equal(p, q), name
    assert_same_state(optimizer.state_dict(), saved_optimizer.state_dict())
    assert_same_state(scheduler.state_dict(), saved_scheduler.state_dict())
    assert scheduler.get_lr() == saved_scheduler.get_lr()
    assert (state["start_epoch"], state["step"], state["best"]) == (1, STEPS_PER_EPOCH, {"val": {"top1": 12.5,
                                                                                                  "epoch": 1}})
    assert (state["nonfinite_total"], state["nonfinite_run"], state["resumes"], state["position"]) == (2, 1, [], None)
    assert_same_state(state["rng"], ckpt["rng"])


def test_a_changed_setting_is_applied_and_recorded_or_refused_by_name():
    ckpt, _ = trained_checkpoint(config())
    # The lr may change: this config's hyper-parameters win, the schedule is rebuilt at the same step.
    cfg = config("solver.lr=0.0005")
    model, optimizer, scheduler, scaler = solver(cfg, seed=2)
    state = resume_training("run/last.pt", cfg, model, optimizer, scheduler, scaler, STEPS_PER_EPOCH, ckpt=ckpt)
    assert scheduler.state_dict()["base_lrs"][0] == 0.0005 and state["step"] == STEPS_PER_EPOCH
    assert state["resumes"] == [{"epoch": 1, "changes": {"solver.lr": [1e-4, 0.0005]}}]
    # The adapters' width may not: the saved tensors are made for the old one.
    cfg = config("network.t2l.adapter_ratio=0.5")
    with pytest.raises(ValueError, match=r"run/last\.pt cannot be resumed with this config: network\.t2l\."
                                         r"adapter_ratio was 0\.25 and is now 0\.5 .*--opts network\.t2l\."
                                         r"adapter_ratio=0\.25"):
        resume_training("run/last.pt", cfg, *solver(cfg, seed=2), STEPS_PER_EPOCH, ckpt=ckpt)
    # Nor may the grouping of the optimiser.
    cfg = config("solver.temporal_token_lr_scale=10")
    with pytest.raises(ValueError, match=r"optimiser with 2 parameter groups, this config makes 3"):
        resume_training("run/last.pt", cfg, *solver(cfg, seed=2), STEPS_PER_EPOCH, ckpt=ckpt)
    with pytest.raises(ValueError, match=r"run/x\.pt is not a training checkpoint of this project.*missing "
                                         r"optimizer"):
        resume_training("run/x.pt", config(), *solver(config(), seed=2), STEPS_PER_EPOCH,
                        ckpt={k: v for k, v in ckpt.items() if k != "optimizer"})


def test_a_mid_epoch_position_continues_only_with_its_data_layout():
    layout = {"world_size": 1, "batch_size": 2, "grad_accum": 1, "videos": 16, "seed": 0}
    position = {"epoch": 1, "batches": 3, "layout": layout}
    ckpt, _ = trained_checkpoint(config(), position=position)
    cfg = config()
    state = resume_training("run/mid_epoch.pt", cfg, *solver(cfg, seed=2), STEPS_PER_EPOCH, layout=layout, ckpt=ckpt)
    assert state["position"] == position
    with pytest.raises(ValueError, match=r"run/mid_epoch\.pt was written part-way through an epoch.*data\.batch_size "
                                         r"\(videos per rank and batch\) was 2 and is now 4.*--resume run/last\.pt"):
        resume_training("run/mid_epoch.pt", cfg, *solver(cfg, seed=2), STEPS_PER_EPOCH,
                        layout={**layout, "batch_size": 4}, ckpt=ckpt)
    check_layout(layout, None, "run/mid_epoch.pt")  # no layout given: nothing to compare
