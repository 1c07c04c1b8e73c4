"""Train T2L: ``python train.py --config configs/K-400/k400_train.yaml [--opts key=value ...]``.

One GPU, or several with ``torchrun --nproc_per_node N train.py ...`` (also across machines; Slurm:
``scripts/slurm_train.sbatch``). A run writes into ``output_dir``: the resolved ``config.yaml``, ``log.txt``,
``metrics.csv``, ``curves.png``, ``last.pt`` every epoch, ``mid_epoch.pt`` part-way through an epoch (every
``checkpoint.every_steps`` optimiser steps or ``checkpoint.every_minutes`` minutes, and on SIGTERM or SIGUSR1, after
which the run exits with status 75: preempted, rerun to continue) and ``best_<eval set>.pt`` when an evaluation set
marked ``select_best`` (a validation set, never a test set) improves. Rerunning the same command resumes from the
later of ``last.pt`` and ``mid_epoch.pt``, exactly where it stopped; ``network.init_from`` starts from the T2L tensors
of another checkpoint (ours or a published one).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Optional

from utils.lock import FolderLockedError, exit_if_busy, lock_output_folder

if __name__ == "__main__":  # a run into a busy output folder stops here, not after the seconds torch takes to import
    exit_if_busy("train", sys.argv[1:])

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import engine
from datasets import VideoDataset, failure_summary_line
from datasets.samplers import ResumableDistributedSampler
from modules import T2LLoss, convert_to_fp16_like_published, factory, make_checkpoint, save_published
from modules.checkpoint import init_from_checkpoint, is_published
from utils import distributed
from utils.checkpoint import atomic_save, atomic_write_text, remove_stale_tmp, rng_state, safe_load, set_rng_state
from utils.config import check_paths, load_config, save_config
from utils.logger import MetricsCSV, WandbLogger, plot_curves, setup_logging
from utils.precision import Fp16MasterStep
from utils.preemption import EXIT_REQUEUE, CheckpointClock, Preempted, StopSignals, ignore_stop_signals, signal_name
from utils.schedule import WarmupCosine

logger = logging.getLogger("train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  python train.py --config configs/K-400/k400_train.yaml\n"
                                       "  python train.py --config configs/demo/demo_train.yaml "
                                       "--opts solver.epochs=2 data.batch_size=8\n"
                                       "  torchrun --nproc_per_node 4 train.py --config configs/K-400/k400_train.yaml")
    p.add_argument("--config", required=True, help="experiment YAML (extends a base file)")
    p.add_argument("--opts", nargs="*", default=[], help="overrides by dotted key, e.g. data.batch_size=8")
    p.add_argument("--resume", default=None,
                   help="checkpoint to resume from (default: the later of output_dir/last.pt and mid_epoch.pt)")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh even if output_dir holds a checkpoint (a launcher's restart of this run still "
                        "continues from it: TORCHELASTIC_RESTART_COUNT / SLURM_RESTART_COUNT > 0)")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the encoders (network.compile): default, reduce-overhead or max-autotune")
    return p.parse_args(argv)


class NonFiniteLossError(RuntimeError):
    pass


TRAINING_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng")


def check_training_checkpoint(ckpt, path) -> None:
    """Refuse, naming the file, anything but a training checkpoint of ours (a CLIP file, weights for evaluation)."""
    keys = set(ckpt) if isinstance(ckpt, dict) else set()
    missing = [k for k in TRAINING_CHECKPOINT_KEYS if k not in keys]
    if isinstance(ckpt, dict) and ckpt.get("format") == "t2l" and not missing:
        return
    found = f"keys {sorted(map(str, keys))[:8]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
    raise ValueError(f"{path} is not a training checkpoint of this project: expected format 't2l' with "
                     f"{', '.join(TRAINING_CHECKPOINT_KEYS)}, found {found}"
                     f"{' (missing ' + ', '.join(missing) + ')' if missing and keys else ''}. --resume takes the "
                     f"last.pt (or mid_epoch.pt, best_*.pt, epoch_*.pt) that train.py writes; evaluate other T2L "
                     f"weights with test.py --weights")


# Settings a resumed run cannot change, and why: the checkpoint's tensors or optimiser state are made for them.
# (The frozen backbone, network.pretrained / random_clip / random_seed, is checked by its identity instead, so a
# CLIP file that was only moved is accepted.) Every other setting is applied from the resumed epoch on.
FIXED_ON_RESUME = {
    "data.num_frames": "the temporal tokens hold one vector per frame",
    "network.t2l.temporal_tokens": "the trained tensors are made for it",
    "network.t2l.adapter_ratio": "the trained tensors are made for it",
    "network.t2l.vision_adapters": "the trained tensors are made for it",
    "network.t2l.text_adapters": "the trained tensors are made for it",
    "network.t2l.train_temporal_embedding": "it changes which tensors are trained, and so the optimiser state",
    "solver.no_decay_for_1d": "it moves tensors between optimiser groups, whose saved state is kept per group",
    "network.init_from": "it says what the run started from, and the run has started",
}


def flat_settings(tree: dict, prefix: str = "") -> dict:
    """A nested config dict -> {dotted key: value}; lists (eval.sets, betas) stay whole values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, current: dict) -> dict:
    """{dotted key: (the checkpoint's value, this config's)} for every setting that differs."""
    old, new = flat_settings(saved), flat_settings(current)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def resume_training(resume, cfg, model, optimizer, scheduler, scaler, steps_per_epoch: int,
                    layout: Optional[dict] = None, ckpt: Optional[dict] = None) -> dict:
    """Load a training checkpoint into the freshly built model, optimiser, schedule and scaler.

    What the run does is what ``cfg`` says: a setting that differs from the checkpoint's config is applied (the
    optimiser's hyper-parameters are this config's, and the lr schedule is rebuilt when any of its inputs changed),
    and each is named in the log; a setting the checkpoint cannot follow (``FIXED_ON_RESUME``, another backbone, a
    different optimiser grouping) stops the run here, before any training, naming the setting.

    A mid-epoch checkpoint (``mid_epoch.pt``) also holds its place in the epoch (``position``, returned as is): it
    continues only with the data layout it was written with (``layout``: ranks, batch size, accumulation, videos,
    seed; :func:`check_layout`). ``ckpt``: the file's content when the caller has read it already.
    """
    from modules.checkpoint import check_backbone, load_t2l_tensors

    if ckpt is None:
        ckpt = safe_load(resume, trust=cfg.network.trust_checkpoint)
    if isinstance(ckpt, dict) and is_published(ckpt):
        raise ValueError(f"{resume} is a published T2L checkpoint, not a training checkpoint of this project: "
                         f"--resume continues a run of train.py (its last.pt). To start training or fine-tuning "
                         f"from it, set network.init_from: {resume} (--opts network.init_from={resume})")
    check_training_checkpoint(ckpt, resume)
    saved_cfg = ckpt.get("config")
    changes = config_changes(saved_cfg, cfg.to_dict()) if isinstance(saved_cfg, dict) else {}
    if not isinstance(saved_cfg, dict):
        logger.warning("%s holds no config: the settings it was trained with cannot be compared with this run's",
                       resume)
    fixed = {k: v for k, v in changes.items() if k in FIXED_ON_RESUME}
    if ckpt.get("num_frames") != cfg.data.num_frames:
        fixed["data.num_frames"] = (ckpt.get("num_frames"), cfg.data.num_frames)
    if fixed:
        raise ValueError(f"{resume} cannot be resumed with this config: " + "; ".join(
            f"{k} was {old!r} and is now {new!r} ({FIXED_ON_RESUME[k]})" for k, (old, new) in fixed.items())
            + ". Resume with the checkpoint's value (--opts "
            + " ".join(f"{k}={json.dumps(old)}" for k, (old, _) in fixed.items())
            + "), or start afresh with --no-resume or another output_dir")
    check_backbone(ckpt.get("backbone") or {}, model.clip, source=str(resume))
    load_t2l_tensors(model, ckpt["model"], source=str(resume))
    saved_groups = [len(g.get("params", [])) for g in ckpt["optimizer"].get("param_groups", [])]
    groups = [len(g["params"]) for g in optimizer.param_groups]
    if len(saved_groups) != len(groups):
        raise ValueError(f"{resume} holds an optimiser with {len(saved_groups)} parameter groups, this config makes "
                         f"{len(groups)}: solver.temporal_token_lr_scale differs from the run's (1 gives 2 groups, any "
                         f"other value 3). Resume with the run's config, or start over with --no-resume")
    if saved_groups != groups:
        raise ValueError(f"{resume} holds an optimiser whose parameter groups have {saved_groups} tensors, this "
                         f"config makes {groups}: the set of trained tensors differs. Resume with the run's config, "
                         f"or start over with --no-resume")
    # load_state_dict restores the saved hyper-parameters too; this config's win (it is what config.yaml records).
    wanted = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, want in zip(optimizer.param_groups, wanted):
        group.update(want)
    if ckpt["scaler"] or not scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    else:  # the run trained without a loss scaler (another solver.precision): this one starts a fresh scale
        logger.info("resume: %s holds no loss-scaler state (trained without fp16 autocast); starting a fresh scale",
                    resume)
    start_epoch, step = int(ckpt["epoch"]) + 1, int(ckpt["step"])
    place = ckpt.get("position")  # in the epoch, for a mid-epoch checkpoint
    if place is not None:
        if int(place["epoch"]) != start_epoch:
            raise ValueError(f"{resume} is inconsistent: it stands part-way through epoch {int(place['epoch']) + 1} "
                             f"but records epoch {start_epoch} as the last one done; resume from last.pt instead")
        check_layout(place["layout"], layout, resume)

    saved_sched = {"update_every": 1, "steps_per_epoch": 0, **ckpt["scheduler"]}  # states older than these keys
    ours = scheduler.settings()
    differs = {k: (saved_sched.get(k), v) for k, v in ours.items() if saved_sched.get(k) != v}
    if saved_sched["update_every"] == ours["update_every"] == 1:
        differs.pop("steps_per_epoch", None)  # only read to hold the lr for update_every steps
    if not differs:
        scheduler.load_state_dict(saved_sched)
    else:
        # Rebuilt from this config: the same position when an epoch still has as many steps, else the start of the
        # resumed epoch in the new schedule.
        old_epochs = (saved_cfg or {}).get("solver", {}).get("epochs")
        old_per_epoch = saved_sched["steps_per_epoch"] or (saved_sched["total_steps"] // old_epochs if old_epochs
                                                            else None)
        position = step if old_per_epoch == steps_per_epoch else start_epoch * steps_per_epoch
        scheduler.set_step(position)
        step = position
        logger.info("resume: the lr schedule is rebuilt from this config (%s); it continues at step %d with lr %s",
                    ", ".join(f"{k} {old} -> {new}" for k, (old, new) in differs.items()), step,
                    ", ".join(f"{lr:.4g}" for lr in scheduler.get_lr()))
    if changes:
        logger.info("resume: %d setting(s) differ from %s's and are applied from epoch %d on: %s", len(changes),
                    resume, start_epoch + 1, "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
    resumes = list(ckpt.get("resumes", []))
    if changes:
        resumes.append({"epoch": start_epoch, "changes": {k: list(v) for k, v in changes.items()}})
    return {"start_epoch": start_epoch, "step": step, "best": dict(ckpt.get("best", {})), "resumes": resumes,
            "nonfinite_total": int(ckpt.get("nonfinite_skipped", 0)),  # metrics.csv counts over the whole run
            "nonfinite_run": int(ckpt.get("nonfinite_run", 0)),  # so solver.max_nonfinite_steps counts across a resume
            "rng": ckpt["rng"], "position": place}


# ---------------------------------------------------------------------------------------------- checkpoints
LAST, MID_EPOCH = "last.pt", "mid_epoch.pt"
# What fixes the order of an epoch's samples and how they are cut into batches and steps: a mid-epoch checkpoint
# continues only under the same values (the rest of its epoch would otherwise be other samples than the ones left).
LAYOUT_KEYS = {"world_size": "ranks (GPUs) in the run", "batch_size": "data.batch_size (videos per rank and batch)",
               "grad_accum": "solver.grad_accum", "videos": "videos in data.train_list", "seed": "seed"}


def data_layout(cfg, dist_info, num_videos: int) -> dict:
    """The values of :data:`LAYOUT_KEYS` for this run."""
    return {"world_size": dist_info.world_size, "batch_size": cfg.data.batch_size,
            "grad_accum": cfg.solver.grad_accum, "videos": num_videos, "seed": cfg.seed}


def check_layout(saved: dict, current: Optional[dict], source) -> None:
    """Refuse to continue a partial epoch under another data layout, naming what differs and the ways out."""
    if current is None:
        return
    differs = {k: (saved.get(k), current.get(k)) for k in LAYOUT_KEYS if saved.get(k) != current.get(k)}
    if differs:
        raise ValueError(
            f"{source} was written part-way through an epoch, which can only be continued with the same data layout: "
            + "; ".join(f"{LAYOUT_KEYS[k]} was {old} and is now {new}" for k, (old, new) in differs.items())
            + f". Run with the checkpoint's values, or resume from the end of the last full epoch with --resume "
              f"{Path(source).with_name(LAST)} (the partial epoch is trained again)")


def progress_of(ckpt: dict) -> tuple[int, int]:
    """Where a training checkpoint stands: (the epoch to run next, 0-based; its batches already done)."""
    position = ckpt.get("position")
    if position:
        return int(position["epoch"]), int(position["batches"])
    return int(ckpt["epoch"]) + 1, 0


def latest_checkpoint(out: Path, trust: bool = False) -> tuple[Optional[Path], Optional[dict]]:
    """The later of ``out/last.pt`` and ``out/mid_epoch.pt`` (None when neither exists), with its content when
    both had to be read to compare them (else None: read it when resuming)."""
    found = [p for p in (out / LAST, out / MID_EPOCH) if p.is_file()]
    if len(found) < 2:
        return (found[0] if found else None), None
    last, mid = (safe_load(p, trust=trust) for p in found)
    # A kill between last.pt's rename and mid_epoch.pt's removal leaves an older mid_epoch.pt: compare, never assume.
    return (found[1], mid) if progress_of(mid) > progress_of(last) else (found[0], last)


def restart_count() -> int:
    """How often a launcher has restarted this job: torchrun's elastic restarts or Slurm's requeues (0: first start)."""
    counts = [os.environ.get(k, "") for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")]
    return max(int(c) if c.isdigit() else 0 for c in counts)


def choose_resume(args, out: Path, trust: bool = False) -> tuple[Optional[Path], Optional[dict]]:
    """(checkpoint to resume from or None, its content if already read).

    ``--resume`` and ``--no-resume`` decide a first start; a launcher's restart (``torchrun --max-restarts``, a Slurm
    requeue) repeats the same command line, so it always continues from the folder's latest checkpoint instead:
    restarting from ``--resume`` again, or afresh, would throw away what the interrupted attempt had done.
    """
    latest, ckpt = latest_checkpoint(out, trust)
    restarts = restart_count()
    if restarts and latest is not None:
        if args.resume or args.no_resume:
            logger.info("restart %d of this job: continuing from %s (--resume/--no-resume apply to its first start)",
                        restarts, latest)
        return latest, ckpt
    if args.resume:
        return Path(args.resume), None
    return (None, None) if args.no_resume else (latest, ckpt)


def stop_reason(stop: Optional[StopSignals]) -> str:
    """What stopped the run, for its last log line: this rank's signal, or another rank's."""
    return signal_name(stop.received) if stop is not None and stop.received is not None else "another rank's signal"


def training_checkpoint(model, optimizer, scheduler, scaler, rngs: list, cfg, **fields) -> dict:
    """The dict train.py writes (last.pt, best_*.pt, epoch_*.pt, mid_epoch.pt): the T2L tensors, optimiser, schedule,
    scaler, every rank's RNG states, the config, and ``fields`` (epoch, step, best, counters, resumes, position)."""
    return make_checkpoint(model, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                           scaler=scaler.state_dict(), rng=rngs, config=cfg.to_dict(), **fields)


def save_mid_epoch(out: Path, dist_info, build, epoch: int, batches: int, layout: dict, view_rng: torch.Generator,
                   elapsed: float, counters: dict, grads: dict) -> Path:
    """Write ``out/mid_epoch.pt``: the run ``batches`` batches into ``epoch`` (a collective: every rank calls it).

    ``build(rngs, position)`` makes the checkpoint dict (:func:`training_checkpoint`) from every rank's RNG states
    and the position, which holds what the rest of the epoch needs to go on exactly as if uninterrupted: the batches
    consumed (the sampler skips them: prefetched but unused batches are fetched again), the layout, the text-view
    generator, the time spent, each rank's partial sums for metrics.csv (no row is written for a partial epoch) and,
    mid-way through a gradient accumulation, the accumulated gradients (DDP leaves every rank the same ones).
    """
    gathered = distributed.all_gather_objects({"rng": rng_state(), "counters": counters})
    path = out / MID_EPOCH
    if dist_info.is_main:
        position = {"epoch": epoch, "batches": batches, "layout": layout, "view_rng": view_rng.get_state(),
                    "elapsed_s": float(elapsed), "counters": [g["counters"] for g in gathered], "grads": grads}
        atomic_save(build([g["rng"] for g in gathered], position), path)
    return path


def restore_partial_epoch(position: dict, model, view_rng: torch.Generator, rank: int) -> dict:
    """Put back what :func:`save_mid_epoch` kept of the epoch under way; returns this rank's partial counters."""
    view_rng.set_state(position["view_rng"])
    for name, p in model.trainable_parameters():
        if name in position["grads"]:
            p.grad = position["grads"][name].to(device=p.device, dtype=p.dtype).clone()
    counters = position["counters"][rank]
    return {"sums": dict(counters["sums"]), "counted": int(counters["counted"]), "failed": int(counters["failed"]),
            "seen": int(counters["seen"])}


def param_groups(model, cfg):
    """AdamW groups: weight decay on matrices; none on biases and temporal tokens when no_decay_for_1d.

    With ``solver.temporal_token_lr_scale`` other than 1 the temporal tokens get a third group of their own, whose
    learning rate is ``solver.lr`` times that scale (the schedule scales every group alike).
    """
    scale = cfg.solver.temporal_token_lr_scale
    decay, no_decay, tokens = [], [], []
    for name, p in model.trainable_parameters():
        if name == "temporal_tokens" and scale != 1.0:
            tokens.append(p)
        elif cfg.solver.no_decay_for_1d and (p.ndim < 2 or name in ("temporal_tokens", "temporal_embedding")):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.solver.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if tokens:
        groups.append({"params": tokens, "lr": cfg.solver.lr * scale,
                       "weight_decay": 0.0 if cfg.solver.no_decay_for_1d else cfg.solver.weight_decay})
    return groups


def zero_grad(model, optimizer) -> None:
    """Clear the gradients of the model and of the optimiser's parameters (fp32 copies under fp16-pure)."""
    optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config, list(args.opts) + ([f"network.compile={args.compile}"] if args.compile else []))
    check_paths(cfg, train=True)
    dist_info = distributed.setup(cfg.device)
    out = Path(cfg.output_dir)
    try:
        # Before anything is written there (the log included): a second run into a busy folder stops here.
        lock = lock_output_folder(out, "train.py", dist_info)
        try:
            setup_logging(str(out), dist_info.rank)
            if lock:
                lock.log_takeover()
            with StopSignals() as stop:  # SIGTERM / SIGUSR1: checkpoint at the next batch, then raise Preempted
                return train(cfg, args, dist_info, out, stop)
        finally:
            if lock:
                lock.release()
    finally:
        distributed.cleanup()


def train(cfg, args, dist_info, out: Path, stop: Optional[StopSignals] = None) -> dict:
    device = dist_info.device
    # Every global RNG, not only torch's: the checkpoint saves all three, and an unseeded one would make two runs of
    # the same config (or a resumed and an uninterrupted run) write different checkpoints.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    logger.info("output folder %s; device %s; world size %d", out, device, dist_info.world_size)

    # ---- data
    class_names, tokens = engine.class_tokens(cfg.data.classes, cfg.data.descriptions, cfg.data.text_mode,
                                              cfg.data.missing_descriptions)
    dataset = VideoDataset(cfg.data.train_list, root=cfg.data.root, num_frames=cfg.data.num_frames, mode="train",
                           input_size=cfg.data.input_size, image_tmpl=cfg.data.image_tmpl,
                           index_start=cfg.data.index_start, flip=cfg.data.flip, on_error=cfg.data.on_error,
                           seed=cfg.seed, class_names=class_names, classes_source=cfg.data.classes,
                           check_labels=cfg.data.check_labels, paths=engine.path_rules(cfg.data.paths),
                           train_sampling=cfg.data.train_sampling, test_rules=cfg.eval.rules,
                           allow_outside_root=cfg.data.allow_outside_root,
                           deferred=engine.transform_on_device(cfg, device, "train"))
    sampler = ResumableDistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=True)
    if len(sampler) < cfg.data.batch_size:
        raise ValueError(f"{cfg.data.train_list} has {len(dataset)} videos: fewer than one batch of "
                         f"{cfg.data.batch_size} per rank; lower data.batch_size")
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=cfg.data.num_workers > 0,
                        prefetch_factor=4 if cfg.data.num_workers > 0 else None, collate_fn=dataset.collate,
                        # Reseeded every epoch from (seed, epoch), so a resumed epoch seeds its workers alike; workers
                        # leave SIGTERM/SIGUSR1 to this process, which checkpoints on them.
                        generator=torch.Generator(), worker_init_fn=ignore_stop_signals)
    logger.info("training on %d videos of %d classes from %s (%d steps per epoch)", len(dataset),
                len(class_names), cfg.data.train_list, len(loader) // cfg.solver.grad_accum)

    # ---- model, optimiser, schedule
    resume, resume_ckpt = choose_resume(args, out, trust=cfg.network.trust_checkpoint)
    model = factory.build_model(cfg)
    if cfg.network.init_from and not resume:
        init_from_checkpoint(model, cfg.network.init_from, trust=cfg.network.trust_checkpoint)
        logger.info("T2L tensors initialised from %s (network.init_from)", cfg.network.init_from)
    fp16_weights = engine.uses_fp16_weights(device, cfg.solver.precision)
    if fp16_weights:
        convert_to_fp16_like_published(model)
    elif cfg.solver.precision == "fp16-pure":
        logger.info("solver.precision fp16-pure trains in fp32 on %s, as the published code does off a GPU", device)
    model.to(device)
    if cfg.network.compile != "off":
        engine.compile_model(model, cfg.network.compile)
    # fp16-pure: the optimiser steps fp32 copies of the fp16 parameters (utils.precision), as published.
    master = Fp16MasterStep(model.trainable_parameters()) if fp16_weights else None
    groups = param_groups(model, cfg)
    optimizer = torch.optim.AdamW(master.swap(groups) if master else groups, lr=cfg.solver.lr,
                                  betas=tuple(cfg.solver.betas), eps=cfg.solver.eps)
    steps_per_epoch = max(1, len(loader) // cfg.solver.grad_accum)
    scheduler = WarmupCosine(optimizer, total_steps=cfg.solver.epochs * steps_per_epoch,
                             warmup_steps=int(cfg.solver.warmup_epochs * steps_per_epoch), min_lr=cfg.solver.min_lr,
                             update_every=cfg.solver.lr_update_every, steps_per_epoch=steps_per_epoch)
    amp_dtype = engine.resolve_precision(device, cfg.solver.precision)
    # A gradient scaler for fp16 autocast; the published fp16-pure recipe has none.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and not fp16_weights)
    criterion = T2LLoss(tfd_weight=cfg.loss.tfd_weight)
    logger.info("precision %s; optimiser AdamW lr %g%s, weight decay %g; %d epochs", amp_dtype, cfg.solver.lr,
                "" if cfg.solver.temporal_token_lr_scale == 1.0 else
                f" (temporal tokens {cfg.solver.lr * cfg.solver.temporal_token_lr_scale:g})",
                cfg.solver.weight_decay, cfg.solver.epochs)

    # ---- resume
    start_epoch, step, best, nonfinite_total, nonfinite_run = 0, 0, {}, 0, 0
    resumes = []
    layout = data_layout(cfg, dist_info, len(dataset))
    position = None  # where a mid-epoch checkpoint stopped: {"epoch", "batches", ...}
    if resume:
        state = resume_training(resume, cfg, model, optimizer, scheduler, scaler, steps_per_epoch, layout=layout,
                                ckpt=resume_ckpt)
        start_epoch, step, best, nonfinite_total, nonfinite_run, resumes, position = (state[k] for k in (
            "start_epoch", "step", "best", "nonfinite_total", "nonfinite_run", "resumes", "position"))
        set_rng_state(state["rng"][min(dist_info.rank, len(state["rng"]) - 1)])
        if position:
            logger.info("resumed from %s: part-way through epoch %d (%d of %d batches done), step %d", resume,
                        start_epoch + 1, position["batches"], len(loader), step)
        else:
            logger.info("resumed from %s: epoch %d done, step %d", resume, start_epoch, step)

    if dist_info.is_main:
        # Only now that data, model and resume are set up: a run that stops on bad input before this point leaves
        # the folder's earlier config.yaml (the one its checkpoints were trained with) as it was.
        save_config(cfg, out / "config.yaml")
        remove_stale_tmp(out)  # partial files of a killed run are never read; free their space
    ddp_model = model
    if dist_info.enabled:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # Opened at the first epoch's end (it drops the rows this run redoes), so a run that fails during its first
    # epoch leaves the folder's metrics.csv as it was.
    metrics_csv = None
    wandb = (WandbLogger(cfg.logging.wandb_project, config=cfg.to_dict(), mode=cfg.logging.wandb_mode, dir=str(out))
             if cfg.logging.wandb and dist_info.is_main else None)

    clock = CheckpointClock(cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes)

    def serve_checkpoint(batches: int, end_of_epoch: bool = False) -> None:
        """At a batch boundary (``batches`` done): a mid-epoch checkpoint when one is due, then stop if asked to."""
        window_closed = batches % cfg.solver.grad_accum == 0  # no gradient half accumulated
        write, halt = clock.decide(step, window_closed and not end_of_epoch, stop is not None and stop.received
                                   is not None, dist_info)
        if not write:
            return
        start = time.perf_counter()
        grads = {} if window_closed else {n: p.grad for n, p in model.trainable_parameters() if p.grad is not None}
        path = save_mid_epoch(out, dist_info, lambda rngs, pos: training_checkpoint(
            model, optimizer, scheduler, scaler, rngs, cfg, epoch=epoch - 1, step=step, best=best,
            nonfinite_skipped=nonfinite_total, nonfinite_run=nonfinite_run, resumes=resumes, position=pos),
            epoch, batches, layout, view_rng, time.time() - t0,
            {"sums": sums, "counted": counted, "failed": failed, "seen": seen}, grads)
        clock.written(step)
        logger.info("mid-epoch checkpoint %s: epoch %d, %d of %d batches, step %d (%.2f s)", path, epoch + 1,
                    batches, len(loader), step, time.perf_counter() - start)
        if halt:
            distributed.barrier()  # every rank leaves only once rank 0 has written it
            raise Preempted(f"stopped on {stop_reason(stop)} part-way through epoch {epoch + 1} (step {step}); the "
                            f"state is in {path}", str(path))

    for epoch in range(start_epoch, cfg.solver.epochs):
        model.train()
        part = position if position and position["epoch"] == epoch else None  # resumed part-way through this epoch
        skip = int(part["batches"]) if part else 0
        sampler.set_epoch(epoch, skip=skip * cfg.data.batch_size)
        dataset.set_epoch(epoch)
        loader.generator.manual_seed(cfg.seed * 100_019 + epoch)
        # A random text view (template) per sample when several exist; seeded by (seed, epoch).
        view_rng = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        sums = {"loss": 0.0, "align": 0.0, "tfd": 0.0}
        counted, failed, seen = 0, 0, 0
        t0 = time.time()
        zero_grad(model, optimizer)
        if part:
            done = restore_partial_epoch(part, model, view_rng, dist_info.rank)
            sums, counted, failed, seen = done["sums"], done["counted"], done["failed"], done["seen"]
            t0 -= part["elapsed_s"]
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.solver.epochs}", disable=not dist_info.is_main,
                   dynamic_ncols=True, initial=skip)
        for i, batch in enumerate(bar, start=skip):
            if i > skip:
                serve_checkpoint(i)
            videos = dataset.finish(batch, device)  # the augmentation runs here when the loader only decodes
            labels = batch["label"].to(device, non_blocking=True)
            failed += int(batch["failed"].sum())
            views = torch.randint(tokens.shape[0], (labels.shape[0],), generator=view_rng)
            text = tokens[views, batch["label"]].to(device, non_blocking=True)
            with engine.autocast(device, cfg.solver.precision):
                video_emb, frame_emb, text_emb = ddp_model(videos, text)
            if cfg.loss.gather and dist_info.enabled:
                video_emb = distributed.all_gather_with_grad(video_emb)
                frame_emb = distributed.all_gather_with_grad(frame_emb)
                text_emb = distributed.all_gather_with_grad(text_emb)
                labels = distributed.all_gather_tensor(labels)
            loss, parts = criterion(video_emb, frame_emb, text_emb, labels, model.logit_scale)
            finite = torch.isfinite(loss.detach()).float()
            if dist_info.enabled:  # every rank must take the same decision, or DDP would hang
                finite = distributed.all_reduce_sum(finite) / dist_info.world_size
            if finite.item() < 1.0:
                nonfinite_total += 1
                nonfinite_run += 1
                zero_grad(model, optimizer)
                logger.warning("non-finite loss at epoch %d step %d (%s): step skipped (%d in a row, %d in all)",
                               epoch + 1, step, {k: float(v) for k, v in parts.items()}, nonfinite_run,
                               nonfinite_total)
                if nonfinite_run >= cfg.solver.max_nonfinite_steps:
                    last = out / "last.pt"
                    raise NonFiniteLossError(
                        f"{nonfinite_run} non-finite losses in a row, the last at epoch {epoch + 1} step {step}; "
                        f"stopping. The last good checkpoint is "
                        f"{last if last.exists() else 'none (no epoch finished yet)'}. Lower solver.lr, check the "
                        f"data, or use solver.precision=fp32")
                continue
            nonfinite_run = 0
            scaler.scale(loss / cfg.solver.grad_accum).backward()
            if (i + 1) % cfg.solver.grad_accum == 0:
                if master:
                    master.before_step()
                if cfg.solver.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                   cfg.solver.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                if master:
                    master.after_step()
                zero_grad(model, optimizer)
                scheduler.step()
                step += 1
            for k in sums:
                sums[k] += float(parts[k])
            counted += 1
            seen += videos.shape[0] * dist_info.world_size
            if dist_info.is_main and (i % max(1, cfg.logging.print_freq) == 0 or i + 1 == len(loader)):
                bar.set_postfix(loss=f"{sums['loss'] / counted:.4f}", lr=f"{scheduler.get_lr()[0]:.2e}",
                                vid_s=f"{seen / max(time.time() - t0, 1e-9):.1f}")
        serve_checkpoint(len(loader), end_of_epoch=True)  # only a stop request: last.pt follows
        bar.close()
        epoch_time = time.time() - t0
        failed = int(distributed.all_reduce_sum(torch.tensor(failed)).item())
        logger.info("epoch %d: %s", epoch + 1, failure_summary_line(failed, len(sampler) * dist_info.world_size,
                                                                     cfg.data.train_list))
        row = {"epoch": epoch + 1, "step": step, "lr": scheduler.get_lr()[0],
               **{k: v / max(counted, 1) for k, v in sums.items()}, "epoch_time_s": round(epoch_time, 2),
               "videos_per_s": round(seen / max(epoch_time, 1e-9), 2), "nonfinite_skipped": nonfinite_total,
               "unreadable_samples": failed}

        # ---- evaluate
        improved = []
        if cfg.eval.sets and cfg.eval.every and ((epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.solver.epochs):
            model.eval()
            for s in cfg.eval.sets:
                res = engine.evaluate_set(model, cfg, s, device, dist_info)
                top1 = res["aggregate"]["top1"]["mean"]
                row[f"{s.name}_top1"] = top1
                row[f"{s.name}_top5"] = res["aggregate"]["top5"]["mean"]
                logger.info("epoch %d: %s top-1 %.2f%% top-5 %.2f%% mean-class %.2f%%", epoch + 1, s.name, top1,
                            res["aggregate"]["top5"]["mean"], res["aggregate"]["mean_class_acc"]["mean"])
                if s.select_best and top1 > best.get(s.name, {"top1": -1.0})["top1"]:
                    best[s.name] = {"top1": top1, "epoch": epoch + 1}
                    improved.append(s.name)

        # ---- checkpoint (rank 0 writes; every rank's RNG state is kept for an exact resume)
        rngs = distributed.all_gather_objects(rng_state())
        if dist_info.is_main:
            ckpt = training_checkpoint(model, optimizer, scheduler, scaler, rngs, cfg, epoch=epoch, step=step,
                                       best=best, nonfinite_skipped=nonfinite_total, nonfinite_run=nonfinite_run,
                                       resumes=resumes)
            # last.pt is the commit point of the epoch, so it is written last: a run killed before it redoes the
            # epoch (and rewrites the files below identically); one killed after it has all of them.
            if metrics_csv is None:  # rows are 1-based epochs; a resumed run redoes epochs start_epoch + 1 onwards
                metrics_csv = MetricsCSV(out / "metrics.csv", start_epoch=start_epoch + 1)
            metrics_csv.log(row)
            for name in improved:
                atomic_save(ckpt, out / f"best_{name}.pt")
            if cfg.checkpoint.keep_every and (epoch + 1) % cfg.checkpoint.keep_every == 0:
                atomic_save(ckpt, out / f"epoch_{epoch + 1}.pt")
            if cfg.checkpoint.save_full:
                save_published(model, out / "last_full_published.pth", epoch=epoch)
            atomic_save(ckpt, out / LAST)
            (out / MID_EPOCH).unlink(missing_ok=True)  # older than last.pt now (a kill before this is harmless)
            plot_curves(out / "metrics.csv", out / "curves.png")
            if wandb:
                wandb.log(row, step=step)
        distributed.barrier()
        clock.written(step)
        logger.info("epoch %d done in %.1fs: loss %.4f (align %.4f, tfd %.4f)", epoch + 1, epoch_time,
                    row["loss"], row["align"], row["tfd"])
        if epoch + 1 < cfg.solver.epochs and clock.decide(step, False, stop is not None and stop.received is not None,
                                                          dist_info)[1]:  # (after the last epoch: just finish)
            raise Preempted(f"stopped on {stop_reason(stop)} after epoch {epoch + 1} (step {step}); the state is in "
                            f"{out / LAST}", str(out / LAST))
    if wandb:
        wandb.finish()
    summary = {"epochs": cfg.solver.epochs, "steps": step, "best": best, "nonfinite_skipped": nonfinite_total}
    if dist_info.is_main:
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2), what="training summary")
    return summary


if __name__ == "__main__":
    from datasets import SampleLoadError
    from utils.checkpoint import UnsafeCheckpointError

    try:
        main()
    except Preempted as e:
        logging.getLogger("train").warning("%s; exit status %d: run the same command again to continue", e,
                                           EXIT_REQUEUE)
        sys.exit(EXIT_REQUEUE)
    except KeyboardInterrupt:
        logging.getLogger("train").error("interrupted: the last finished epoch is kept in last.pt (if any); run the "
                                         "same command again to resume")
        sys.exit(130)
    except (ValueError, FileNotFoundError, NonFiniteLossError, OSError, UnsafeCheckpointError, SampleLoadError,
            FolderLockedError) as e:
        logging.getLogger("train").error("%s", e)
        sys.exit(1)
