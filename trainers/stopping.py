"""Graceful stop on SIGTERM / SIGINT: finish the step, write a checkpoint, exit 75.

Clusters preempt jobs with SIGTERM (and a grace period before SIGKILL); a person stops a run
with Ctrl-C (SIGINT). During :meth:`~diffdistill.trainers.base.Trainer.fit` the first of
either only sets a flag; the loop reads it after each optimizer step, writes a checkpoint of
that step and raises :class:`~diffdistill.errors.TrainingStopped` (the ``diffdistill``
command exits with 75, see :mod:`diffdistill.errors`). ``--resume latest`` then continues
bit-identically, because the checkpoint is the ordinary one the run would have written there.

Under a multi-process launch the flag is all-reduced every step, so all ranks stop after the
same step even when only one of them received the signal (a launcher that forwards it late,
a node-local preemption notice) — a rank that stopped alone would leave the others waiting
in the next collective. A second signal aborts at once: the default action of that signal
(the process dies with 128 + its number; nothing more is written).

Under a launcher (``accelerate launch`` / ``torchrun``: ``WORLD_SIZE`` is set) a process often
gets the same signal twice within milliseconds — Ctrl-C reaches the whole process group and
the launcher forwards its own copy; a scheduler signals every process and the launcher again.
There a repeat within :data:`REPEAT_WINDOW_S` of the first is taken as that copy, not as a
person's second signal.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: under a launcher, a repeat this soon after the first signal is the launcher's copy
REPEAT_WINDOW_S = 2.0


class StopSignals:
    """Installs the handlers for the life of a run (main thread only: Python delivers
    signals there; a run in another thread keeps the process's handlers)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
        self.repeat_window_s = REPEAT_WINDOW_S if launched else 0.0

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and \
                time.monotonic() - self._first_at < self.repeat_window_s:
            return  # the launcher's copy of the first signal
        if self.received is not None:  # the second signal: abort now, as if unhandled
            os.write(2, f"{name}: a second stop signal, aborting at once (no checkpoint)\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received, self._first_at = signum, time.monotonic()
        # os.write, not print/logging: the handler may interrupt a write to sys.stderr
        os.write(2, f"{name} received: finishing this step and writing a checkpoint "
                    f"(send {name} again to abort at once)\n".encode())

    def requested(self, accelerator) -> bool:
        """Whether any process received a stop signal (a collective under several
        processes: every rank must call it at the same point of every step)."""
        flag = 1.0 if self.received is not None else 0.0
        if accelerator.num_processes > 1:
            t = torch.tensor([flag], device=accelerator.device)
            flag = float(accelerator.reduce(t, reduction="sum"))
        return flag > 0

    def name(self) -> str:
        return (signal.Signals(self.received).name if self.received
                else "a stop signal to another process")
