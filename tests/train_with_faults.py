"""``train.py`` with faults injected at chosen points, for tests that launch it like train.py (``torchrun``, Python).

``T2L_TEST_FAULTS="<attempt>:<rank>:<call>:<SIGNAL>,..."``: in launcher attempt ``<attempt>`` (torchrun's
``TORCHELASTIC_RESTART_COUNT``, 0 for the first), rank ``<rank>`` sends itself ``<SIGNAL>`` (``SIGTERM``,
``SIGUSR1``, ``SIGKILL``) during its ``<call>``-th loss computation (1-based, counted in that process), i.e. in the
middle of a training step. Before it does, it appends ``{"attempt", "rank", "signal", "steps_done"}`` to the JSON-lines
file ``T2L_TEST_FAULT_LOG``: ``steps_done`` is the optimiser steps the run had finished (the lr schedule's position),
which the test compares with the step of the checkpoint the next attempt resumes from, to measure the work lost.

Everything else is train.py's command line and behaviour, exit status included (75 after a stop signal).
"""
import json
import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modules import losses  # noqa: E402
from utils import schedule  # noqa: E402


def arm() -> None:
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ.get("RANK", "0"))
    plan = {}
    for item in filter(None, os.environ.get("T2L_TEST_FAULTS", "").split(",")):
        a, r, call, sig = item.split(":")
        if int(a) == attempt and int(r) == rank:
            plan[int(call)] = getattr(signal, sig)
    if not plan:
        return
    schedules = []
    init = schedule.WarmupCosine.__init__

    def remembering_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        schedules.append(self)
    schedule.WarmupCosine.__init__ = remembering_init
    forward = losses.T2LLoss.forward
    calls = [0]

    def faulty_forward(self, *args, **kwargs):
        calls[0] += 1
        sig = plan.get(calls[0])
        if sig is not None:
            with open(os.environ["T2L_TEST_FAULT_LOG"], "a") as f:
                f.write(json.dumps({"attempt": attempt, "rank": rank, "signal": sig.name,
                                    "steps_done": schedules[-1].last_step}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), sig)
        return forward(self, *args, **kwargs)
    losses.T2LLoss.forward = faulty_forward


if __name__ == "__main__":
    arm()
    sys.argv[0] = str(ROOT / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")  # train.py's own command line, exit statuses included
