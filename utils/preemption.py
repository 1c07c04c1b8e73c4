"""Preemption: stop signals, when to write a mid-epoch checkpoint, and the exit status that asks for a rerun.

A cluster stops a job with a signal: Slurm sends SIGTERM on preemption (and to a job step before its end) and, with
``#SBATCH --signal=B:USR1@120``, SIGUSR1 some time before the time limit; ``torchrun`` forwards SIGTERM (and the
signals named by its ``--signals-to-handle``) to its workers. :class:`StopSignals` turns SIGTERM and SIGUSR1 into a
request that the training loop serves at the next batch boundary: it writes a checkpoint there and exits with
:data:`EXIT_REQUEUE`, which a requeueing launcher (``scripts/slurm_train.sbatch``) reads as "preempted, the state is
saved: run the same command again". DataLoader workers ignore the two signals (:func:`ignore_stop_signals`): a
preempting cluster signals every process of the job, and a worker dying of it would end the run before its
checkpoint.

:class:`CheckpointClock` says when a checkpoint is due: every ``every_steps`` optimiser steps, every
``every_minutes`` minutes (both bound the work a SIGKILL can lose), or now, on a stop request. Under DDP the ranks
agree (:meth:`CheckpointClock.decide`): each rank sees its own signal and clock, and the checkpoint is a collective
(every rank's RNG states are gathered), so all ranks must take it at the same batch.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable, Optional

logger = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL, "temporary failure; the user is invited to retry": the run stopped on request after writing
# its checkpoint, and rerunning the same command continues it.
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a stop signal after writing its checkpoint; exit with :data:`EXIT_REQUEUE`."""

    def __init__(self, message: str, checkpoint: Optional[str] = None):
        super().__init__(message)
        self.checkpoint = checkpoint


def signal_name(signum: Optional[int]) -> str:
    return signal.Signals(signum).name if signum is not None else "none"


class StopSignals:
    """``with StopSignals() as stop:`` SIGTERM and SIGUSR1 set ``stop.received`` instead of ending the process.

    The previous handlers come back on exit. Outside the main thread (where Python cannot install handlers) it does
    nothing, and the signals keep their usual effect.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self._previous: dict = {}
        self._pid = os.getpid()

    def _handler(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked child (an evaluation DataLoader worker): the run is the parent's
            return
        if self.received is None:
            logger.warning("%s received: the run writes a checkpoint at the next batch and stops",
                           signal_name(signum))
        self.received = signum

    def __enter__(self) -> "StopSignals":
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the workers leave SIGTERM and SIGUSR1 to the training process.

    A worker still ends with its parent: PyTorch's workers watch the parent process and exit when it is gone. But
    the parent, on its way out, asks its remaining children to end with SIGTERM and waits for them, so a command
    line that can stop with workers alive must call :func:`end_worker_processes` first.
    """
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def end_worker_processes() -> None:
    """End this process's remaining child processes (DataLoader workers), at the end of a command line.

    Workers that ignore SIGTERM (:func:`ignore_stop_signals`) outlive an error raised while their loader was in use
    (its iterator is still referenced by the error's traceback): ``multiprocessing`` would then wait for them at exit
    forever, since its SIGTERM is ignored and they wait for their parent to go. They hold no state, so they are
    killed. PyTorch's SIGCHLD handler is reset first: it would report the workers it sees die as a failure.
    """
    import multiprocessing

    children = multiprocessing.active_children()
    if not children:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in children:
        p.kill()
    for p in children:
        p.join(timeout=10)


class CheckpointClock:
    """When a mid-epoch checkpoint is due: every ``every_steps`` optimiser steps, every ``every_minutes`` minutes,
    or at once when a stop signal came (0 turns an interval off).

    Interval checkpoints are taken only where an optimiser step has just been made (no gradient is half
    accumulated); a stop request is served at any batch boundary. ``clock`` (seconds) is for tests.
    """

    def __init__(self, every_steps: int = 0, every_minutes: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.every_steps = int(every_steps)
        self.every_seconds = float(every_minutes) * 60.0
        self.clock = clock
        self.last_time = clock()
        self.last_step: Optional[int] = None

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0 or self.every_seconds > 0

    def interval_due(self, step: int, stepped: bool) -> bool:
        """This rank's view: has an interval passed since the last checkpoint (at an optimiser-step boundary)?"""
        if not stepped or step == self.last_step:
            return False
        if self.every_steps > 0 and step % self.every_steps == 0:
            return True
        return self.every_seconds > 0 and self.clock() - self.last_time >= self.every_seconds

    def decide(self, step: int, stepped: bool, stop_requested: bool, dist_info=None) -> tuple[bool, bool]:
        """(write a checkpoint now, stop after it), the same on every rank.

        The steps are the same on every rank; the signals and the clocks are not, so under DDP the two flags are
        reduced (max) over the ranks: one collective per batch, a two-element tensor.
        """
        interval = self.interval_due(step, stepped)
        if dist_info is not None and dist_info.enabled:
            import torch

            from utils import distributed

            flags = torch.tensor([float(stop_requested), float(interval)], device=dist_info.device)
            flags = distributed.all_reduce_max(flags)
            stop_requested, interval = bool(flags[0].item()), bool(flags[1].item())
        return stop_requested or interval, stop_requested

    def written(self, step: int) -> None:
        """A checkpoint (mid-epoch or the epoch's own) holds everything up to ``step``: the intervals restart."""
        self.last_time = self.clock()
        self.last_step = step
