"""The training state on disk: what train.py writes to continue a run, and how a run continues from it.

``training_checkpoint`` is the dict of ``last.pt`` / ``best_*.pt`` / ``epoch_*.pt``; ``save_mid_epoch`` writes
``mid_epoch.pt`` part-way through an epoch and ``restore_partial_epoch`` puts its position back. Resuming is
``choose_resume`` (which file, if any: ``--resume``, ``--no-resume``, a launcher's restart, the later of
``last.pt`` and ``mid_epoch.pt``), then ``resume_training`` (check the file and the settings that cannot change,
load the tensors, optimiser, schedule and scaler; apply and record the settings that did change).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from utils import distributed
from utils.checkpoint import atomic_save, rng_state, safe_load

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- resuming
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
    from modules.checkpoint import check_backbone, is_published, load_t2l_tensors

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


# ---------------------------------------------------------------------------------------------- the files
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


def training_checkpoint(model, optimizer, scheduler, scaler, rngs: list, cfg, **fields) -> dict:
    """The dict train.py writes (last.pt, best_*.pt, epoch_*.pt, mid_epoch.pt): the T2L tensors, optimiser, schedule,
    scaler, every rank's RNG states, the config, and ``fields`` (epoch, step, best, counters, resumes, position)."""
    from modules.checkpoint import make_checkpoint

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
