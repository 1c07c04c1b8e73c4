"""Per-iteration learning-rate schedule: linear warm-up, then cosine decay (the T2L / X-CLIP recipe).

Stepping per optimiser step rather than per epoch keeps the warm-up smooth when an epoch has few steps
(a 16-shot run) and makes the schedule independent of how many epochs the steps are grouped into.
"""
from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)


class WarmupCosine:
    """Linear warm-up from ``warmup_start_lr`` to each group's base lr over ``warmup_steps``, then cosine decay
    to ``min_lr`` at ``total_steps``; ``min_lr`` after that.

    For step s (the number of ``step()`` calls so far) and base lr b:

    - s < warmup_steps: ``warmup_start_lr + (b - warmup_start_lr) * s / warmup_steps``
    - warmup_steps <= s <= total_steps: ``min_lr + (b - min_lr) * (1 + cos(pi * p)) / 2`` with
      ``p = (s - warmup_steps) / (total_steps - warmup_steps)``
    - s > total_steps: ``min_lr``

    With ``update_every`` N > 1 the lr is held for N steps, as the published T2L code updates it: at the first
    step of every epoch and then after every N-th (steps 0, N-1, 2N-1, ... of the epoch; ``steps_per_epoch`` is
    needed to know where an epoch starts), each time to the value of that step.

    The base lr of each parameter group is the ``lr`` it has when the scheduler is built; the constructor sets
    the groups to the step-0 value at once, so the first optimiser step already uses the warm-up lr.
    Usage: ``optimizer.step(); scheduler.step()`` once per optimiser step (after every accumulated step, and
    also when a ``GradScaler`` skipped the step, so the schedule stays tied to the iteration count).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 min_lr: float = 0.0, warmup_start_lr: float = 0.0, update_every: int = 1,
                 steps_per_epoch: int = 0):
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be an int in 0..total_steps ({total_steps}), got {warmup_steps!r}")
        if min_lr < 0 or warmup_start_lr < 0:
            raise ValueError(f"min_lr and warmup_start_lr must be >= 0, got {min_lr} and {warmup_start_lr}")
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive int, got {update_every!r}")
        if update_every > 1 and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ValueError(f"update_every {update_every} needs steps_per_epoch (a positive int), got "
                             f"{steps_per_epoch!r}")
        self.update_every = int(update_every)
        self.steps_per_epoch = int(steps_per_epoch)
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr = float(min_lr)
        self.warmup_start_lr = float(warmup_start_lr)
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        for i, base in enumerate(self.base_lrs):
            if base < self.min_lr:
                logger.warning("parameter group %d has base lr %g below min_lr %g: its cosine phase will rise",
                               i, base, self.min_lr)
        self.last_step = 0
        self._apply()

    def held_step(self, step: int) -> int:
        """The step whose lr is in force at ``step``: itself, or the last update point with ``update_every``."""
        if self.update_every == 1:
            return step
        epoch, i = divmod(step, self.steps_per_epoch)
        last = 0 if i + 1 < self.update_every else ((i + 1) // self.update_every) * self.update_every - 1
        return epoch * self.steps_per_epoch + last

    def lr_at(self, step: int) -> list[float]:
        """Learning rate of every parameter group after ``step`` calls of ``step()``."""
        step = self.held_step(step)
        lrs = []
        for base in self.base_lrs:
            if step < self.warmup_steps:
                lr = self.warmup_start_lr + (base - self.warmup_start_lr) * step / self.warmup_steps
            elif step <= self.total_steps:
                decay_steps = self.total_steps - self.warmup_steps
                progress = (step - self.warmup_steps) / decay_steps if decay_steps > 0 else 0.0
                lr = self.min_lr + (base - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
            else:
                lr = self.min_lr
            lrs.append(lr)
        return lrs

    def get_lr(self) -> list[float]:
        """Learning rates the next optimiser step will use (one per parameter group)."""
        return self.lr_at(self.last_step)

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr

    def step(self) -> None:
        """Advance one optimiser step and set the lr for the next one."""
        self.last_step += 1
        self._apply()

    def set_step(self, step: int) -> None:
        """Continue this schedule (its own settings and base lrs) from ``step``: a resume with a changed schedule."""
        self.last_step = int(step)
        self._apply()

    def settings(self) -> dict:
        """What defines the schedule, in :meth:`state_dict`'s keys, without the position."""
        return {k: v for k, v in self.state_dict().items() if k != "last_step"}

    def state_dict(self) -> dict:
        """Plain ints, floats and a list of floats: loadable with ``torch.load(weights_only=True)``."""
        return dict(last_step=self.last_step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                    min_lr=self.min_lr, warmup_start_lr=self.warmup_start_lr, base_lrs=list(self.base_lrs),
                    update_every=self.update_every, steps_per_epoch=self.steps_per_epoch)

    def load_state_dict(self, state: dict) -> None:
        """Restore the saved schedule and position exactly, then set the optimiser's lrs for the next step.

        The saved base lrs win over the ones read at construction (those may already be a warm-up value if
        the optimiser's state was loaded first). Saved schedule settings that differ from this scheduler's
        are restored too, with a warning, so a resumed run continues the run it came from.
        """
        required = {"last_step", "total_steps", "warmup_steps", "min_lr", "warmup_start_lr", "base_lrs"}
        missing = required - set(state)
        if missing:
            raise KeyError(f"scheduler state lacks {sorted(missing)}; keys present: {sorted(state)}")
        if len(state["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(f"scheduler state has {len(state['base_lrs'])} parameter groups, the optimiser has "
                             f"{len(self.optimizer.param_groups)}: was the parameter grouping changed?")
        state = {"update_every": 1, "steps_per_epoch": 0, **state}  # states written before these existed
        for key in ("total_steps", "warmup_steps", "min_lr", "warmup_start_lr", "update_every", "steps_per_epoch"):
            if float(state[key]) != float(getattr(self, key)):
                logger.warning("resumed lr schedule keeps the saved %s=%s (this run's config says %s)",
                               key, state[key], getattr(self, key))
        self.total_steps = int(state["total_steps"])
        self.warmup_steps = int(state["warmup_steps"])
        self.min_lr = float(state["min_lr"])
        self.warmup_start_lr = float(state["warmup_start_lr"])
        self.update_every = int(state["update_every"])
        self.steps_per_epoch = int(state["steps_per_epoch"])
        self.base_lrs = [float(b) for b in state["base_lrs"]]
        self.last_step = int(state["last_step"])
        self._apply()
