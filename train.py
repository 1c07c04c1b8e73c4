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

import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

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
from modules import T2LLoss, convert_to_fp16_like_published, factory, save_published
from utils import distributed
from utils.checkpoint import atomic_save, rng_state, set_rng_state
from utils.io import atomic_write_text, remove_stale_tmp
from utils.config import check_paths, load_config, save_config, script_parser
from utils.logger import MetricsCSV, WandbLogger, plot_curves, setup_logging
from utils.precision import Fp16MasterStep
from utils.preemption import (EXIT_REQUEUE, CheckpointClock, Preempted, StopSignals, end_worker_processes,
                              ignore_stop_signals, signal_name)
from utils.schedule import WarmupCosine
from utils.training_state import (LAST, MID_EPOCH, choose_resume, data_layout, restore_partial_epoch, resume_training,
                                  save_mid_epoch, training_checkpoint)

logger = logging.getLogger("train")


def parse_args(argv=None):
    p = script_parser(__doc__, ["python train.py --config configs/K-400/k400_train.yaml",
                                "python train.py --config configs/demo/demo_train.yaml "
                                "--opts solver.epochs=2 data.batch_size=8",
                                "torchrun --nproc_per_node 4 train.py --config configs/K-400/k400_train.yaml"],
                      "data.batch_size=8")
    p.add_argument("--resume", default=None,
                   help="checkpoint to resume from (default: the later of output_dir/last.pt and mid_epoch.pt)")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh even if output_dir holds a checkpoint (a launcher's restart of this run still "
                        "continues from it: TORCHELASTIC_RESTART_COUNT / SLURM_RESTART_COUNT > 0)")
    return p.parse_args(argv)


class NonFiniteLossError(RuntimeError):
    pass


def stop_reason(stop: Optional[StopSignals]) -> str:
    """What stopped the run, for its last log line: this rank's signal, or another rank's."""
    return signal_name(stop.received) if stop is not None and stop.received is not None else "another rank's signal"


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


@dataclass
class Run:
    """What the phases of a run share: made by :func:`build_data` and :func:`build_solver`, read by the others."""
    cfg: Any
    dist_info: Any
    out: Path
    dataset: Any = None
    sampler: Any = None
    loader: Any = None
    tokens: Any = None                   # (views, classes, context) class-text token ids
    model: Any = None
    ddp_model: Any = None                # the model, wrapped in DistributedDataParallel under torchrun
    master: Optional[Fp16MasterStep] = None
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    criterion: Any = None
    steps_per_epoch: int = 0
    layout: dict = field(default_factory=dict)  # what fixes an epoch's batches (a mid-epoch checkpoint's check)

    @property
    def device(self) -> torch.device:
        return self.dist_info.device


@dataclass
class Progress:
    """Where the run stands; every checkpoint saves it, a resume restores it."""
    start_epoch: int = 0
    step: int = 0                        # optimiser steps done
    best: dict = field(default_factory=dict)  # {eval set: {"top1", "epoch"}} of the select_best sets
    nonfinite_total: int = 0             # skipped steps over the whole run (metrics.csv)
    nonfinite_run: int = 0               # in a row, across a resume too (solver.max_nonfinite_steps)
    resumes: list = field(default_factory=list)
    position: Optional[dict] = None      # where a mid-epoch checkpoint stopped: {"epoch", "batches", ...}

    def checkpoint_fields(self, epoch: int) -> dict:
        """The fields of :func:`training_checkpoint` for a checkpoint whose last finished epoch is ``epoch``."""
        return {"epoch": epoch, "step": self.step, "best": self.best, "nonfinite_skipped": self.nonfinite_total,
                "nonfinite_run": self.nonfinite_run, "resumes": self.resumes}


def train(cfg, args, dist_info, out: Path, stop: Optional[StopSignals] = None) -> dict:
    """A training run, phase by phase: build, resume, open the outputs, then per epoch train, evaluate, save."""
    # Every global RNG, not only torch's: the checkpoint saves all three, and an unseeded one would make two runs of
    # the same config (or a resumed and an uninterrupted run) write different checkpoints.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    logger.info("output folder %s; device %s; world size %d", out, dist_info.device, dist_info.world_size)
    run = Run(cfg, dist_info, out)
    build_data(run)
    resume, resume_ckpt = build_solver(run, args)
    progress = resume_run(run, resume, resume_ckpt) if resume else Progress()
    open_outputs(run)
    clock = CheckpointClock(cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes)
    metrics_csv = None  # opened at the first epoch's end: a run failing in its first epoch leaves metrics.csv as is
    wandb = (WandbLogger(cfg.logging.wandb_project, config=cfg.to_dict(), mode=cfg.logging.wandb_mode, dir=str(out))
             if cfg.logging.wandb and dist_info.is_main else None)
    for epoch in range(progress.start_epoch, cfg.solver.epochs):
        row = train_one_epoch(run, progress, epoch, clock, stop)
        improved = evaluate(run, progress, epoch, row)
        metrics_csv = save_epoch(run, progress, epoch, row, improved, metrics_csv, wandb)
        clock.written(progress.step)
        logger.info("epoch %d done in %.1fs: loss %.4f (align %.4f, tfd %.4f)", epoch + 1, row["epoch_time_s"],
                    row["loss"], row["align"], row["tfd"])
        if epoch + 1 < cfg.solver.epochs and clock.decide(progress.step, False, stop is not None and stop.received
                                                          is not None, dist_info)[1]:  # (after the last: just finish)
            raise Preempted(f"stopped on {stop_reason(stop)} after epoch {epoch + 1} (step {progress.step}); the state "
                            f"is in {out / LAST}", str(out / LAST))
    if wandb:
        wandb.finish()
    summary = {"epochs": cfg.solver.epochs, "steps": progress.step, "best": progress.best,
               "nonfinite_skipped": progress.nonfinite_total}
    if dist_info.is_main:
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2), what="training summary")
    return summary


# ---------------------------------------------------------------------------------------------- build
def build_data(run: Run) -> None:
    """The class texts, the training set, its sampler (resumable part-way through an epoch) and its loader."""
    cfg, dist_info, device = run.cfg, run.dist_info, run.device
    class_names, run.tokens = engine.class_tokens(cfg.data.classes, cfg.data.descriptions, cfg.data.text_mode,
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
    run.dataset, run.sampler, run.loader = dataset, sampler, loader
    run.layout = data_layout(cfg, dist_info, len(dataset))


def build_solver(run: Run, args) -> tuple[Optional[Path], Optional[dict]]:
    """The model (fresh, or from network.init_from on a first start), optimiser, lr schedule, loss scaler and loss;
    returns the checkpoint to resume from (:func:`choose_resume`) and its content if already read."""
    cfg, device, out = run.cfg, run.device, run.out
    resume, resume_ckpt = choose_resume(args, out, trust=cfg.network.trust_checkpoint)
    model = factory.build_model(cfg, init_from=None if resume else cfg.network.init_from)
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
    steps_per_epoch = max(1, len(run.loader) // cfg.solver.grad_accum)
    scheduler = WarmupCosine(optimizer, total_steps=cfg.solver.epochs * steps_per_epoch,
                             warmup_steps=int(cfg.solver.warmup_epochs * steps_per_epoch), min_lr=cfg.solver.min_lr,
                             update_every=cfg.solver.lr_update_every, steps_per_epoch=steps_per_epoch)
    amp_dtype = engine.resolve_precision(device, cfg.solver.precision)
    # A gradient scaler for fp16 autocast; the published fp16-pure recipe has none.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and not fp16_weights)
    logger.info("precision %s; optimiser AdamW lr %g%s, weight decay %g; %d epochs", amp_dtype, cfg.solver.lr,
                "" if cfg.solver.temporal_token_lr_scale == 1.0 else
                f" (temporal tokens {cfg.solver.lr * cfg.solver.temporal_token_lr_scale:g})",
                cfg.solver.weight_decay, cfg.solver.epochs)
    run.model = run.ddp_model = model
    run.master, run.optimizer, run.scheduler, run.scaler = master, optimizer, scheduler, scaler
    run.criterion = T2LLoss(tfd_weight=cfg.loss.tfd_weight)
    run.steps_per_epoch = steps_per_epoch
    return resume, resume_ckpt


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


# ---------------------------------------------------------------------------------------------- resume
def resume_run(run: Run, resume: Path, resume_ckpt: Optional[dict]) -> Progress:
    """Continue from ``resume`` (:func:`resume_training`): the built model, optimiser, schedule and scaler get its
    state, this rank its RNG states; returns where the run stands."""
    state = resume_training(resume, run.cfg, run.model, run.optimizer, run.scheduler, run.scaler,
                            run.steps_per_epoch, layout=run.layout, ckpt=resume_ckpt)
    progress = Progress(start_epoch=state["start_epoch"], step=state["step"], best=state["best"],
                        nonfinite_total=state["nonfinite_total"], nonfinite_run=state["nonfinite_run"],
                        resumes=state["resumes"], position=state["position"])
    set_rng_state(state["rng"][min(run.dist_info.rank, len(state["rng"]) - 1)])
    if progress.position:
        logger.info("resumed from %s: part-way through epoch %d (%d of %d batches done), step %d", resume,
                    progress.start_epoch + 1, progress.position["batches"], len(run.loader), progress.step)
    else:
        logger.info("resumed from %s: epoch %d done, step %d", resume, progress.start_epoch, progress.step)
    return progress


def open_outputs(run: Run) -> None:
    """Record the config in the output folder and wrap the model for DDP: only once set-up and resume are done."""
    if run.dist_info.is_main:
        # A run that stops on bad input before this point leaves the folder's earlier config.yaml (the one its
        # checkpoints were trained with) as it was.
        save_config(run.cfg, run.out / "config.yaml")
        remove_stale_tmp(run.out)  # partial files of a killed run are never read; free their space
    if run.dist_info.enabled:
        device = run.device
        run.ddp_model = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)


# ---------------------------------------------------------------------------------------------- one epoch
def train_one_epoch(run: Run, progress: Progress, epoch: int, clock: CheckpointClock,
                    stop: Optional[StopSignals]) -> dict:
    """Train ``epoch`` (its rest, when resumed part-way through it), writing mid-epoch checkpoints when due and
    stopping (``Preempted``) after one on a stop signal; returns the epoch's metrics.csv row."""
    cfg, dist_info, device, model, loader = run.cfg, run.dist_info, run.device, run.model, run.loader
    model.train()
    part = progress.position if progress.position and progress.position["epoch"] == epoch else None
    skip = int(part["batches"]) if part else 0
    run.sampler.set_epoch(epoch, skip=skip * cfg.data.batch_size)
    run.dataset.set_epoch(epoch)
    loader.generator.manual_seed(cfg.seed * 100_019 + epoch)
    # A random text view (template) per sample when several exist; seeded by (seed, epoch).
    view_rng = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    tally = {"sums": {"loss": 0.0, "align": 0.0, "tfd": 0.0}, "counted": 0, "failed": 0, "seen": 0}
    t0 = time.time()
    zero_grad(model, run.optimizer)
    if part:
        tally = restore_partial_epoch(part, model, view_rng, dist_info.rank)
        t0 -= part["elapsed_s"]

    def serve_checkpoint(batches: int, end_of_epoch: bool = False) -> None:
        """At a batch boundary (``batches`` done): a mid-epoch checkpoint when one is due, then stop if asked to."""
        window_closed = batches % cfg.solver.grad_accum == 0  # no gradient half accumulated
        write, halt = clock.decide(progress.step, window_closed and not end_of_epoch,
                                   stop is not None and stop.received is not None, dist_info)
        if not write:
            return
        start = time.perf_counter()
        grads = {} if window_closed else {n: p.grad for n, p in model.trainable_parameters() if p.grad is not None}
        path = save_mid_epoch(run.out, dist_info, lambda rngs, pos: training_checkpoint(
            model, run.optimizer, run.scheduler, run.scaler, rngs, cfg, **progress.checkpoint_fields(epoch - 1),
            position=pos), epoch, batches, run.layout, view_rng, time.time() - t0, tally, grads)
        clock.written(progress.step)
        logger.info("mid-epoch checkpoint %s: epoch %d, %d of %d batches, step %d (%.2f s)", path, epoch + 1,
                    batches, len(loader), progress.step, time.perf_counter() - start)
        if halt:
            distributed.barrier()  # every rank leaves only once rank 0 has written it
            raise Preempted(f"stopped on {stop_reason(stop)} part-way through epoch {epoch + 1} (step "
                            f"{progress.step}); the state is in {path}", str(path))

    sums = tally["sums"]
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.solver.epochs}", disable=not dist_info.is_main,
               dynamic_ncols=True, initial=skip)
    for i, batch in enumerate(bar, start=skip):
        if i > skip:
            serve_checkpoint(i)
        videos = run.dataset.finish(batch, device)  # the augmentation runs here when the loader only decodes
        labels = batch["label"].to(device, non_blocking=True)
        tally["failed"] += int(batch["failed"].sum())
        views = torch.randint(run.tokens.shape[0], (labels.shape[0],), generator=view_rng)
        text = run.tokens[views, batch["label"]].to(device, non_blocking=True)
        loss, parts = batch_loss(run, videos, text, labels)
        if not finite_on_every_rank(loss, dist_info):
            skip_nonfinite_step(run, progress, epoch, parts)
            continue
        progress.nonfinite_run = 0
        run.scaler.scale(loss / cfg.solver.grad_accum).backward()
        if (i + 1) % cfg.solver.grad_accum == 0:
            optimiser_step(run)
            progress.step += 1
        for k in sums:
            sums[k] += float(parts[k])
        tally["counted"] += 1
        tally["seen"] += videos.shape[0] * dist_info.world_size
        if dist_info.is_main and (i % max(1, cfg.logging.print_freq) == 0 or i + 1 == len(loader)):
            bar.set_postfix(loss=f"{sums['loss'] / tally['counted']:.4f}", lr=f"{run.scheduler.get_lr()[0]:.2e}",
                            vid_s=f"{tally['seen'] / max(time.time() - t0, 1e-9):.1f}")
    serve_checkpoint(len(loader), end_of_epoch=True)  # only a stop request: last.pt follows
    bar.close()
    epoch_time = time.time() - t0
    failed = int(distributed.all_reduce_sum(torch.tensor(tally["failed"])).item())
    logger.info("epoch %d: %s", epoch + 1, failure_summary_line(failed, len(run.sampler) * dist_info.world_size,
                                                                 cfg.data.train_list))
    counted = tally["counted"]
    return {"epoch": epoch + 1, "step": progress.step, "lr": run.scheduler.get_lr()[0],
            **{k: v / max(counted, 1) for k, v in sums.items()}, "epoch_time_s": round(epoch_time, 2),
            "videos_per_s": round(tally["seen"] / max(epoch_time, 1e-9), 2),
            "nonfinite_skipped": progress.nonfinite_total, "unreadable_samples": failed}


def batch_loss(run: Run, videos, text, labels):
    """The loss of one batch (under autocast), over every rank's embeddings when loss.gather; (loss, its parts)."""
    with engine.autocast(run.device, run.cfg.solver.precision):
        video_emb, frame_emb, text_emb = run.ddp_model(videos, text)
    if run.cfg.loss.gather and run.dist_info.enabled:
        video_emb = distributed.all_gather_with_grad(video_emb)
        frame_emb = distributed.all_gather_with_grad(frame_emb)
        text_emb = distributed.all_gather_with_grad(text_emb)
        labels = distributed.all_gather_tensor(labels)
    return run.criterion(video_emb, frame_emb, text_emb, labels, run.model.logit_scale)


def finite_on_every_rank(loss, dist_info) -> bool:
    """Whether the loss is finite on every rank: all ranks take the same decision, or DDP would hang."""
    finite = torch.isfinite(loss.detach()).float()
    if dist_info.enabled:
        finite = distributed.all_reduce_sum(finite) / dist_info.world_size
    return finite.item() >= 1.0


def skip_nonfinite_step(run: Run, progress: Progress, epoch: int, parts: dict) -> None:
    """Drop the batch's gradients and count it; raise after solver.max_nonfinite_steps in a row."""
    progress.nonfinite_total += 1
    progress.nonfinite_run += 1
    zero_grad(run.model, run.optimizer)
    logger.warning("non-finite loss at epoch %d step %d (%s): step skipped (%d in a row, %d in all)",
                   epoch + 1, progress.step, {k: float(v) for k, v in parts.items()}, progress.nonfinite_run,
                   progress.nonfinite_total)
    if progress.nonfinite_run >= run.cfg.solver.max_nonfinite_steps:
        last = run.out / "last.pt"
        raise NonFiniteLossError(
            f"{progress.nonfinite_run} non-finite losses in a row, the last at epoch {epoch + 1} step "
            f"{progress.step}; stopping. The last good checkpoint is "
            f"{last if last.exists() else 'none (no epoch finished yet)'}. Lower solver.lr, check the "
            f"data, or use solver.precision=fp32")


def optimiser_step(run: Run) -> None:
    """One optimiser step on the accumulated gradients (clipped when solver.grad_clip), then the lr schedule's."""
    optimizer, scaler = run.optimizer, run.scaler
    if run.master:
        run.master.before_step()
    if run.cfg.solver.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                       run.cfg.solver.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if run.master:
        run.master.after_step()
    zero_grad(run.model, optimizer)
    run.scheduler.step()


def zero_grad(model, optimizer) -> None:
    """Clear the gradients of the model and of the optimiser's parameters (fp32 copies under fp16-pure)."""
    optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- evaluate and save
def evaluate(run: Run, progress: Progress, epoch: int, row: dict) -> list:
    """Evaluate every eval set when due (eval.every, and after the last epoch), adding its top-1/top-5 to ``row``;
    returns the select_best sets whose top-1 improved (``progress.best`` is updated)."""
    cfg = run.cfg
    improved = []
    if not (cfg.eval.sets and cfg.eval.every and ((epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.solver.epochs)):
        return improved
    run.model.eval()
    for s in cfg.eval.sets:
        res = engine.evaluate_set(run.model, cfg, s, run.device, run.dist_info)
        top1 = res["aggregate"]["top1"]["mean"]
        row[f"{s.name}_top1"] = top1
        row[f"{s.name}_top5"] = res["aggregate"]["top5"]["mean"]
        logger.info("epoch %d: %s top-1 %.2f%% top-5 %.2f%% mean-class %.2f%%", epoch + 1, s.name, top1,
                    res["aggregate"]["top5"]["mean"], res["aggregate"]["mean_class_acc"]["mean"])
        if s.select_best and top1 > progress.best.get(s.name, {"top1": -1.0})["top1"]:
            progress.best[s.name] = {"top1": top1, "epoch": epoch + 1}
            improved.append(s.name)
    return improved


def save_epoch(run: Run, progress: Progress, epoch: int, row: dict, improved: list, metrics_csv: Optional[MetricsCSV],
               wandb: Optional[WandbLogger]) -> Optional[MetricsCSV]:
    """The epoch's files (rank 0 writes; every rank's RNG state is kept for an exact resume): its metrics.csv row,
    best_*.pt / epoch_*.pt / the full checkpoint when due, then last.pt; returns the open metrics.csv."""
    cfg, out = run.cfg, run.out
    rngs = distributed.all_gather_objects(rng_state())
    if run.dist_info.is_main:
        ckpt = training_checkpoint(run.model, run.optimizer, run.scheduler, run.scaler, rngs, cfg,
                                   **progress.checkpoint_fields(epoch))
        # last.pt is the commit point of the epoch, so it is written last: a run killed before it redoes the
        # epoch (and rewrites the files below identically); one killed after it has all of them.
        if metrics_csv is None:  # rows are 1-based epochs; a resumed run redoes epochs start_epoch + 1 onwards
            metrics_csv = MetricsCSV(out / "metrics.csv", start_epoch=progress.start_epoch + 1)
        metrics_csv.log(row)
        for name in improved:
            atomic_save(ckpt, out / f"best_{name}.pt")
        if cfg.checkpoint.keep_every and (epoch + 1) % cfg.checkpoint.keep_every == 0:
            atomic_save(ckpt, out / f"epoch_{epoch + 1}.pt")
        if cfg.checkpoint.save_full:
            save_published(run.model, out / "last_full_published.pth", epoch=epoch)
        atomic_save(ckpt, out / LAST)
        (out / MID_EPOCH).unlink(missing_ok=True)  # older than last.pt now (a kill before this is harmless)
        plot_curves(out / "metrics.csv", out / "curves.png")
        if wandb:
            wandb.log(row, step=progress.step)
    distributed.barrier()
    return metrics_csv


if __name__ == "__main__":
    from datasets import SampleLoadError
    from utils.checkpoint import UnsafeCheckpointError

    try:
        try:
            main()
        finally:
            end_worker_processes()  # workers left by an error would keep the exit waiting (utils.preemption)
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
