"""The failures a user can act on, and how a run that was asked to stop ends.

The ``diffdistill`` command prints each of these as one line without a traceback (``-v``
adds the traceback) and exits with the status named here, so scripts and job schedulers can
tell the cases apart:

* 0 — the run finished;
* 1 — :class:`RunError`: the run failed in a way the message explains (a damaged
  checkpoint, a full disk, non-finite losses);
* 2 — :class:`~diffdistill.config.ConfigError` and missing files: nothing was trained
  (a bad key, an ``output_dir`` in use or holding another run);
* 75 — :class:`TrainingStopped`: SIGTERM / SIGINT stopped the run cleanly after a checkpoint;
  ``--resume latest`` continues it exactly. 75 is ``EX_TEMPFAIL`` of ``sysexits.h``
  ("temporary failure; retry"), distinct from a finished run (0), a failure (1, 2) and a
  process killed outright (128 + signal number, e.g. 143), so a scheduler can requeue it.
"""

from __future__ import annotations

from typing import Optional

#: exit status of a run stopped cleanly by SIGTERM / SIGINT (``EX_TEMPFAIL``)
STOPPED_EXIT_CODE = 75


class RunError(RuntimeError):
    """A run failed in a way its one-line message explains, with what to do next."""

    exit_code = 1


class MirroredError(RunError):
    """Raised on the processes of a multi-process run that did not fail themselves when
    another one did (so every rank stops at the same point); the failing process prints
    the message, these print nothing."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class TrainingStopped(Exception):
    """SIGTERM / SIGINT stopped training after finishing the current step and writing a
    checkpoint. Not an error of the run: its message says where to continue from."""

    exit_code = STOPPED_EXIT_CODE

    def __init__(self, message: str, checkpoint: Optional[str] = None, step: int = 0,
                 main_process: bool = True):
        super().__init__(message)
        self.checkpoint, self.step, self.main_process = checkpoint, step, main_process
