"""Run train.py or extract_features.py with signals sent at chosen points: for tests, launched as those scripts are.

``python tests/with_faults.py train.py ARGS...`` (or under ``torchrun``, or ``extract_features.py ARGS...``) runs the
script as its own command line would, exit statuses included (train.py: 75 after a stop signal), after arming
``T2L_TEST_FAULTS="<attempt>:<rank>:<n>:<SIGNAL>[:group|:via=VAR],..."``: in launcher attempt ``<attempt>`` (torchrun's
``TORCHELASTIC_RESTART_COUNT``, 0 for the first), rank ``<rank>`` sends ``<SIGNAL>`` (``SIGTERM``, ``SIGUSR1``,
``SIGKILL``) to itself, with ``:group`` to its process group (its DataLoader workers too, as a cluster does), or
with ``:via=VAR`` to the process whose pid is in ``$VAR`` (a launcher, which should pass it on: the process waits
until it has), at its ``<n>``-th event (1-based, counted in that process): train.py's
n-th loss computation, i.e. in the middle of a training step; extract_features.py's n-th shard written with its
manifest lines. First it appends
``{"attempt", "rank", "signal", "call", "steps_done"}`` to the JSON-lines file ``T2L_TEST_FAULT_LOG`` (train.py:
``steps_done`` is the optimiser steps finished so far, the lr schedule's position, which a test compares with the
step the next run resumes from, to measure the work lost). Tests in the same process use :func:`arm` directly.
"""
from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modules import losses  # noqa: E402
from utils import schedule  # noqa: E402


def _fire(plan: dict, n: int, record: dict, log: Optional[str], records: Optional[list]) -> None:
    sig, to = plan[n]
    record = {**record, "signal": sig.name, "call": n}
    if records is not None:
        records.append(record)
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    if to == "group":
        os.killpg(os.getpgid(0), sig)
    elif to:  # "via=VAR": to the process whose pid is in $VAR (a launcher), then wait until it passes it back here
        _signal_through(int(os.environ[to[len("via="):]]), sig)
    else:
        os.kill(os.getpid(), sig)


def _signal_through(pid: int, sig, timeout: float = 60.0) -> None:
    arrived = []
    previous = signal.getsignal(sig)

    def noting(signum, frame):
        arrived.append(signum)
        if callable(previous):
            previous(signum, frame)
    signal.signal(sig, noting)
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while not arrived and time.monotonic() < deadline:
        time.sleep(0.01)
    signal.signal(sig, previous)


def arm(plan: dict, log: Optional[str] = None, records: Optional[list] = None,
        who: Optional[dict] = None) -> Callable[[], None]:
    """train.py: send ``plan[n] = (signal, to)`` during the n-th loss computation from now on; returns the
    undo. Each firing is appended to ``records`` and to the file ``log`` (``who`` is merged into the record)."""
    schedules = []
    init, forward = schedule.WarmupCosine.__init__, losses.T2LLoss.forward
    calls = [0]

    def remembering_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        schedules.append(self)

    def faulty_forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] in plan:
            _fire(plan, calls[0], {**(who or {}), "steps_done": schedules[-1].last_step if schedules else None},
                  log, records)
        return forward(self, *args, **kwargs)

    schedule.WarmupCosine.__init__ = remembering_init
    losses.T2LLoss.forward = faulty_forward

    def undo() -> None:
        schedule.WarmupCosine.__init__, losses.T2LLoss.forward = init, forward
    return undo


def arm_export(module, plan: dict, log: Optional[str] = None, who: Optional[dict] = None) -> None:
    """extract_features.py (``module``): send ``plan[n]`` right after the n-th shard and its manifest lines."""
    flush = module.ShardStore.flush
    calls = [0]

    def faulty_flush(self):
        wrote = bool(self._rows)
        flush(self)
        if wrote:
            calls[0] += 1
            if calls[0] in plan:
                _fire(plan, calls[0], dict(who or {}), log, None)
    module.ShardStore.flush = faulty_flush


def plan_from_env() -> tuple[dict, dict]:
    """(plan for :func:`arm`, who this process is) from ``T2L_TEST_FAULTS`` and torchrun's variables."""
    who = {"attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), "rank": int(os.environ.get("RANK", "0"))}
    plan = {}
    for item in filter(None, os.environ.get("T2L_TEST_FAULTS", "").split(",")):
        attempt, rank, call, sig, *to = item.split(":")
        if (int(attempt), int(rank)) == (who["attempt"], who["rank"]):
            plan[int(call)] = (getattr(signal, sig), to[0] if to else "")
    return plan, who


if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    plan, who = plan_from_env()
    log = os.environ.get("T2L_TEST_FAULT_LOG")
    if Path(script).name == "extract_features.py":
        import extract_features

        if plan:
            arm_export(extract_features, plan, log, who)
        sys.exit(extract_features.main())
    if plan:
        arm(plan, log=log, who=who)
    sys.argv[0] = str(ROOT / script)
    runpy.run_path(sys.argv[0], run_name="__main__")  # train.py's own command line, exit statuses included
