"""One run per output folder, and no run silently mixed into another's files.

* :class:`RunLock` — ``OUTPUT_DIR/diffdistill.lock``, held for the life of a run: it names
  the holder (PID, host, start time, command) and carries an ``flock`` that the kernel drops
  when the process ends however it ends (even SIGKILL). A second run refuses in one line
  naming the holder; a lock left by a process that is gone (same host: the ``flock`` is free)
  is taken over with a warning. A lock naming another host is never taken over: its process
  cannot be checked from here (the message says to delete the file if that run is over).
  Where the filesystem has no ``flock`` (some network mounts), whether the named PID is alive
  decides instead.
* :func:`check_start` — a run that starts from step 0 into a folder holding another run's
  checkpoints or export refuses (continue it with ``--resume latest``, pick a new
  ``output_dir``, or ``--overwrite``); ``--overwrite`` moves the old run's files (those a run
  writes: :data:`RUN_ENTRIES`; anything else in the folder stays) into
  ``OUTPUT_DIR/previous-<UTC time>/`` rather than deleting them. Logs of a run that left no
  checkpoint (``metrics.jsonl``, sample grids) are moved there too, with a warning, so a new
  run's logs hold only its own steps.
* :func:`agree` — under a multi-process launch only the main process takes the lock and
  checks the folder; every process learns the outcome, so none goes on when it failed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from diffdistill.atomic import recover_folder
from diffdistill.config import ConfigError
from diffdistill.errors import MirroredError, RunError, TrainingStopped

from .checkpointing import list_checkpoints

log = logging.getLogger("diffdistill.train")

LOCK_NAME = "diffdistill.lock"
PREVIOUS_PREFIX = "previous-"
#: what a run writes besides checkpoints and its export (moved aside with them)
LOG_NAMES = ("metrics.jsonl", "samples", "tensorboard")
#: everything a run writes into its output_dir: what --overwrite moves aside (a folder that
#: also holds other files, e.g. output_dir=., keeps them)
RUN_ENTRIES = ("checkpoints", "export", ".old-export", ".tmp-export", "config.yaml", "wandb",
               *LOG_NAMES)


# ----------------------------------------------------------------------------- the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def describe_holder(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
            f"{holder.get('started', '?')} ({holder.get('command', '?')})")


class RunLock:
    """The lock file of one output folder (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: Optional[int] = None

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16)
        try:
            data = json.loads(raw.decode() or "{}")
        except (ValueError, UnicodeDecodeError):
            data = {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> Optional[dict]:
        """Take the lock; returns the holder of a stale lock taken over (else None). Raises
        :class:`ConfigError` (one line, naming the holder) when a live run holds it."""
        host = socket.gethostname()
        for _ in range(20):  # the file can be replaced between open and flock: retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alive = False
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                    # a filesystem without flock (some network mounts): the PID decides
                    holder = self._read(fd)
                    alive = (holder.get("host") == host and holder.get("pid") != os.getpid()
                             and isinstance(holder.get("pid"), int) and _pid_alive(holder["pid"]))
                else:
                    alive = True
            if alive:
                holder = self._read(fd)
                os.close(fd)
                raise ConfigError(
                    f"output_dir {self.folder} is in use by another run: "
                    f"{describe_holder(holder)}; wait for it to end or choose another "
                    "output_dir") from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # released (unlinked) while we opened it
                same_file = False
            if not same_file:
                os.close(fd)
                continue
            previous = self._read(fd)
            if previous and previous.get("host") not in (None, host):
                os.close(fd)
                raise ConfigError(
                    f"output_dir {self.folder} is locked by a run on another host: "
                    f"{describe_holder(previous)}; if that run is over, delete {self.path}")
            if previous and previous.get("pid") != os.getpid():
                log.warning("output_dir %s: taking over the lock of a run that is gone (%s)",
                            self.folder, describe_holder(previous))
            me = {"pid": os.getpid(), "host": host,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(me) + "\n").encode())
            os.fsync(fd)
            self.fd = fd
            return previous or None
        raise ConfigError(f"output_dir {self.folder}: could not take {self.path} (it keeps "
                          "changing); is another run starting there?")

    def release(self) -> None:
        """Delete the lock file (while still holding it) and drop the lock."""
        if self.fd is None:
            return
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


# ----------------------------------------------------------------------------- reuse


def move_aside(out: Path, entries: list[Path]) -> Path:
    """Move ``entries`` (of ``out``) into a new ``out/previous-<UTC time>/``; returns it."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest, i = out / f"{PREVIOUS_PREFIX}{stamp}", 1
    while dest.exists():
        dest, i = out / f"{PREVIOUS_PREFIX}{stamp}-{i}", i + 1
    dest.mkdir()
    for p in entries:
        os.replace(p, dest / p.name)
    return dest


def check_start(out: Path, resume: Optional[str], overwrite: bool) -> None:
    """Refuse, or make room for, a run into ``out`` (main process, lock held).

    A run that loads no checkpoint of this folder starts from step 0: if ``out`` holds
    another run's checkpoints or export, it refuses (``resume`` None) unless ``overwrite``;
    with ``--resume latest`` and no checkpoint, or with ``overwrite``, the old files are
    moved to ``previous-<time>/``.
    """
    ckpts = list_checkpoints(out)
    export = out / "export"
    has_export = export.is_dir() and any(export.iterdir())
    if resume == "latest" and ckpts:
        return
    if resume not in (None, "latest"):
        ckpt = Path(resume).resolve()
        if ckpt.parent == (out / "checkpoints").resolve() or not (ckpts or has_export):
            return
        raise ConfigError(
            f"--resume {resume}: output_dir {out} holds another run "
            f"({_what(ckpts, has_export)}); resume into the folder of that checkpoint or into "
            "a new output_dir")
    if (ckpts or has_export) and resume is None and not overwrite:
        raise ConfigError(
            f"output_dir {out} holds another run ({_what(ckpts, has_export)}); continue it "
            "with --resume latest, choose a new output_dir, or add --overwrite to move its "
            f"files into {out}/{PREVIOUS_PREFIX}<time>/")
    names = RUN_ENTRIES if overwrite else ("checkpoints", "export", *LOG_NAMES)
    old = [out / n for n in names if (out / n).exists()]
    if old:
        dest = move_aside(out, old)
        log.warning("output_dir %s: the previous run's %s moved to %s", out,
                    ", ".join(sorted(p.name for p in old)), dest)


def _what(ckpts: list[Path], has_export: bool) -> str:
    parts = [ckpts[-1].name] if ckpts else []
    return ", ".join(parts + (["export/"] if has_export else []))


# ----------------------------------------------------------------------------- processes


def exit_code_of(error: BaseException) -> int:
    if isinstance(error, (ConfigError, FileNotFoundError)):
        return 2
    return int(getattr(error, "exit_code", 1))


def agree(accelerator, error: Optional[BaseException]) -> None:
    """A collective: every process passes the error it met (or None); if any process met
    one, every process raises — its own error, or :class:`MirroredError` naming the one
    that failed — so no rank waits for a partner that has stopped. One process: re-raise."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        mine = None if error is None else (
            exit_code_of(error), accelerator.process_index,
            (str(error).splitlines() or [type(error).__name__])[0])
        failed = [f for f in gather_object([mine]) if f]
        if error is None and failed:
            code, rank, message = failed[0]
            raise MirroredError(f"process {rank}: {message}", exit_code=code)
    if error is not None:
        raise error


@contextlib.contextmanager
def guard_output_dir(accelerator, out: Path, *, resume: Optional[str] = None,
                     overwrite: bool = False, check_reuse: bool = True) -> Iterator[None]:
    """Hold the lock of ``out`` (main process) while the body runs; before it, check the
    folder (:func:`check_start`) and recover an export replacement cut short."""
    if overwrite and resume:
        raise ConfigError("--overwrite starts a new run from step 0; it cannot be combined "
                          f"with --resume {resume}")
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"output_dir {out} is not writable ({e.strerror or e}); "
                                  "choose another output_dir") from None
            lock = RunLock(out)
            lock.acquire()
            recover_folder(out / "export")
            if check_reuse:
                check_start(out, resume, overwrite)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it
            if lock is not None:
                lock.release()
            lock, error = None, e
    agree(accelerator, error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


__all__ = ["RunLock", "check_start", "agree", "guard_output_dir", "LOCK_NAME", "RunError",
           "TrainingStopped"]
