"""The ways real runs end, on the pixel pretraining run (the cheapest trainer; every trainer
shares this code): a stop signal, a second run into the same folder, a fresh run into a
folder holding another run, a write that fails on a full disk, a damaged checkpoint. Each
failure is one line on stderr without a traceback (``-v`` adds the traceback).

Signals and the lock are exercised with real processes of the ``diffdistill`` command; the
rest runs the same entry point in this process. The SIGTERM / SIGKILL bit-identity of every
trainer is in ``test_crash_resume.py``, the 2-process stop in ``test_multiprocess.py``.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from diffdistill.trainers.checkpointing import list_checkpoints
from diffdistill.trainers.run_guard import LOCK_NAME, RunLock
from helpers import method_run_data

from diffdistill.cli import main as cli
from diffdistill.config import ConfigError
from diffdistill.errors import STOPPED_EXIT_CODE


def write_cfg(tmp_path: Path, model_dir, out: Path, steps: int, **train) -> Path:
    data = method_run_data("pretrain", model_dir, out, steps=steps,
                           train={"checkpoint_every": 1, **train})
    cfg = tmp_path / f"{out.name}-{steps}.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def error_lines(text: str) -> list[str]:
    """stderr without the toolkit's own INFO / WARNING log lines."""
    return [line for line in text.splitlines()
            if line.strip() and not line.startswith(("INFO ", "WARNING "))]


def start(cfg: Path, err: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "diffdistill.cli", "train", str(cfg), *args],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=err.open("w"))


def wait_until(check, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not check():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def rows(out: Path) -> int:
    f = out / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


# ----------------------------------------------------------------------------- signals, lock


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_one_run_holds_a_folder(
        pixel_dir, tmp_path, caplog):
    out = tmp_path / "run"
    # many steps, no periodic checkpoint: whatever is saved, the stop saved
    cfg = write_cfg(tmp_path, pixel_dir, out, 100_000, checkpoint_every=0, batch_size=8)
    first = start(cfg, tmp_path / "first.err")
    try:
        wait_until(lambda: rows(out) >= 2, first, "two logged steps")
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        assert {"started", "command"} <= holder.keys()

        # a second run into the same folder refuses in one line naming the holder
        second = subprocess.run([sys.executable, "-m", "diffdistill.cli", "train", str(cfg)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                capture_output=True, text=True, timeout=240, check=False)
        assert second.returncode == 2, second.stderr
        assert error_lines(second.stderr) == [
            f"error: output_dir {out} is in use by another run: pid {first.pid} on host "
            f"{socket.gethostname()} since {holder['started']} ({holder['command']}); wait for "
            "it to end or choose another output_dir"]
        assert first.poll() is None  # the first run is untouched and still training

        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == STOPPED_EXIT_CODE
    finally:
        if first.poll() is None:
            first.kill()
    err = (tmp_path / "first.err").read_text()
    assert "Traceback" not in err
    stop_step = steps_logged(out)[-1]
    ckpt = out / "checkpoints" / f"checkpoint-{stop_step}"
    assert error_lines(err) == [
        "SIGTERM received: finishing this step and writing a checkpoint (send SIGTERM again "
        "to abort at once)",
        f"stopped by SIGTERM after step {stop_step} of 100000: checkpoint {ckpt}; continue "
        "with --resume latest"]
    assert list_checkpoints(out) == [ckpt]
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == stop_step
    assert not (out / LOCK_NAME).exists() and not (out / "export").exists()

    # a second signal aborts at once: the process dies of it, the lock stays behind
    again = start(cfg, tmp_path / "again.err", "--resume", "latest")
    try:
        wait_until(lambda: rows(out) >= stop_step + 2, again, "resumed steps")
        again.send_signal(signal.SIGTERM)
        wait_until(lambda: "SIGTERM received" in (tmp_path / "again.err").read_text(), again,
                   "the first signal's notice")
        again.send_signal(signal.SIGINT)
        assert again.wait(timeout=60) == -signal.SIGINT
    finally:
        if again.poll() is None:
            again.kill()
    err = (tmp_path / "again.err").read_text()
    assert "SIGINT: a second stop signal, aborting at once" in err and "stopped by" not in err
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == again.pid

    # the stale lock (its process is gone, same host) is taken over with a warning
    last = int(list_checkpoints(out)[-1].name.split("-")[1])
    caplog.clear()
    # (an override may also follow the options)
    assert cli(["train", str(cfg), "--resume", "latest", f"train.max_steps={last + 1}"]) == 0
    assert f"taking over the lock of a run that is gone (pid {again.pid} on host" in caplog.text
    assert not (out / LOCK_NAME).exists() and (out / "export" / "model_index.json").is_file()


def test_the_lock_refuses_a_live_holder_and_another_hosts_lock(tmp_path):
    lock = RunLock(tmp_path)
    assert lock.acquire() is None
    with pytest.raises(ConfigError, match=f"in use by another run: pid {os.getpid()} on host "):
        RunLock(tmp_path).acquire()  # a second open file of the same process: still refused
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    # a lock written on another host: its process cannot be checked from here
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00Z", "command": "x"}))
    with pytest.raises(ConfigError, match=f"locked by a run on another host: pid 1 on host "
                       f"elsewhere.*if that run is over, delete {tmp_path / LOCK_NAME}"):
        RunLock(tmp_path).acquire()


# ----------------------------------------------------------------------------- reuse


def test_a_fresh_run_into_a_used_folder_refuses_and_overwrite_moves_it_aside(
        pixel_dir, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path, pixel_dir, out, 2)
    assert cli(["train", str(cfg)]) == 0
    (out / "notes.txt").write_text("not the run's")  # a file of the user's
    before = digest(out)
    capsys.readouterr()

    assert cli(["train", str(cfg)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: output_dir {out} holds another run (checkpoint-2, export/); continue it with "
        "--resume latest, choose a new output_dir, or add --overwrite to move its files into "
        f"{out}/previous-<time>/"]
    assert digest(out) == before  # not a byte changed: no metrics appended, no config

    assert cli(["train", str(cfg), "--overwrite", "--resume", "latest"]) == 2
    assert "cannot be combined with --resume latest" in capsys.readouterr().err

    caplog.clear()
    assert cli(["train", str(cfg), "--overwrite"]) == 0
    (previous,) = out.glob("previous-*")
    run_files = {k: v for k, v in before.items() if k != "notes.txt"}
    assert digest(previous) == run_files  # the run moved aside whole, nothing deleted
    assert (out / "notes.txt").read_text() == "not the run's"  # the user's file stays
    assert f"moved to {previous}" in caplog.text
    assert steps_logged(out) == [1, 2]  # the new run's own log only
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    # "latest" is this run's, never the moved one's
    assert cli(["train", str(cfg), "train.max_steps=3", "--resume", "latest"]) == 0
    assert steps_logged(out) == [1, 2, 3] and digest(previous) == run_files

    # --resume latest with no checkpoint (a run that never wrote one) starts over, moving the
    # old export and logs aside instead of writing into them
    other = tmp_path / "nockpt"
    cfg0 = write_cfg(tmp_path, pixel_dir, other, 1, checkpoint_every=0)
    assert cli(["train", str(cfg0)]) == 0
    old_export = digest(other / "export")
    assert cli(["train", str(cfg0), "--resume", "latest"]) == 0
    (moved,) = other.glob("previous-*")
    assert digest(moved / "export") == old_export and steps_logged(other) == [1]


# ----------------------------------------------------------------------------- full disk


def enospc_writer(after_bytes_of, when):
    """A stand-in for ``safetensors.torch.save_file`` that, for files where ``when(path)``,
    writes part of the real serialization and then fails as a full disk does."""
    import safetensors.torch

    real_save, real_save_file = safetensors.torch.save, safetensors.torch.save_file
    failed = []

    def save_file(tensors, filename, metadata=None):
        if not when(str(filename)):
            return real_save_file(tensors, filename, metadata=metadata)
        data = real_save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[:after_bytes_of(len(data))])
        failed.append(str(filename))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    return save_file, failed


def stderr_lines(capsys) -> list[str]:
    """stderr's lines with the free space a write error reports (it varies) as N."""
    import re

    return [re.sub(r"; [0-9.]+ MB free on that disk\)", "; N MB free on that disk)", line)
            for line in capsys.readouterr().err.splitlines()]


def patch_writers(monkeypatch, save_file) -> None:
    import accelerate.utils.other
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", save_file)


def test_a_write_that_fails_partway_keeps_the_previous_checkpoint_and_export(
        pixel_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert cli(["train", str(write_cfg(tmp_path, pixel_dir, out, 2))]) == 0
    cfg = write_cfg(tmp_path, pixel_dir, out, 3)
    ck1, ck2 = list_checkpoints(out)
    kept, export = digest(ck2), digest(out / "export")
    capsys.readouterr()

    # the checkpoint of step 3 fails half-way through its weights
    save_file, failed = enospc_writer(lambda n: n // 2, lambda p: "checkpoint-3" in p)
    with monkeypatch.context() as m:
        patch_writers(m, save_file)
        assert cli(["train", str(cfg), "--resume", "latest"]) == 1
    assert failed and failed[0].endswith("model.safetensors")
    assert stderr_lines(capsys) == [
        f"error: writing checkpoint {out / 'checkpoints' / 'checkpoint-3'} failed ([Errno 28] "
        f"No space left on device: '{failed[0]}'; N MB free on that disk); the "
        f"previous checkpoint {ck2} is intact; the run stopped (free space, then continue "
        "with --resume latest)"]
    assert list_checkpoints(out) == [ck1, ck2] and digest(ck2) == kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [ck1.name, ck2.name]
    assert digest(out / "export") == export and not (out / LOCK_NAME).exists()

    # step 3's checkpoint is written, the export fails half-way: the old export stays
    save_file, failed = enospc_writer(lambda n: n // 3, lambda p: "/.tmp-export/" in p)
    with monkeypatch.context() as m:
        patch_writers(m, save_file)
        assert cli(["train", str(cfg), "--resume", "latest"]) == 1
    ck3 = out / "checkpoints" / "checkpoint-3"
    assert failed and ".tmp-export" in failed[0]
    assert stderr_lines(capsys) == [
        f"error: writing the export {out / 'export'} failed ([Errno 28] No space left on "
        f"device: '{failed[0]}'; N MB free on that disk); the previous export, "
        f"if any, is intact; the trained weights are in {ck3}: export them again with "
        f"'diffdistill export {out}'"]
    assert list_checkpoints(out)[-1] == ck3 and digest(out / "export") == export
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "export",
                                                     "metrics.jsonl"]
    # the advice works: the export of step 3 replaces the old one whole
    assert cli(["export", str(out)]) == 0
    new = digest(out / "export")
    assert new.keys() == export.keys() and new != export
    card = (out / "export" / "README.md").read_text()
    assert str(out / "export") in card and ".tmp-export" not in card


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of a few MB (root only), resized by ``remount(bytes)``."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip("mounting a small tmpfs is not permitted on this machine (needs root / "
                    f"CAP_SYS_ADMIN): {r.stderr.strip() or r.returncode}; the patched-writer "
                    "test covers the same path")

    def remount(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    try:
        yield mnt, remount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_reported(line: str) -> float:
    """The "<x> MB free on that disk" of an error line."""
    import re

    return float(re.search(r"; ([0-9.]+) MB free on that disk\)", line).group(1))


def used_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_a_full_filesystem_keeps_the_previous_checkpoint_and_export(pixel_dir, tmp_path,
                                                                     small_disk, capsys):
    mnt, remount = small_disk
    out = mnt / "run"
    assert cli(["train", str(write_cfg(tmp_path, pixel_dir, out, 1))]) == 0
    (ck1,) = list_checkpoints(out)
    kept, export = digest(ck1), digest(out / "export")
    ckpt_size = sum((ck1 / f).stat().st_size for f in kept)
    export_size = sum((out / "export" / f).stat().st_size for f in export)
    cfg = write_cfg(tmp_path, pixel_dir, out, 2, keep_checkpoints=2)
    capsys.readouterr()

    # room for half a checkpoint more: step 2's checkpoint cannot be written
    remount(used_bytes(mnt) + ckpt_size // 2)
    assert cli(["train", str(cfg), "--resume", "latest"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: writing checkpoint {out / 'checkpoints' / 'checkpoint-2'} failed ("), err
    assert f"previous checkpoint {ck1} is intact" in err[0]
    # torch reports a full disk as "unexpected pos ...": the free space says what happened
    assert free_reported(err[0]) < ckpt_size / 1e6, err[0]
    assert list_checkpoints(out) == [ck1] and digest(ck1) == kept
    assert [p.name for p in (out / "checkpoints").iterdir()] == [ck1.name]
    assert digest(out / "export") == export and not (out / LOCK_NAME).exists()

    # room for the checkpoint but not for a second export beside the first (the failed
    # writer's file, deleted but still open until collected, would hold space otherwise)
    gc.collect()
    remount(used_bytes(mnt) + ckpt_size + export_size // 2 + (256 << 10))
    assert cli(["train", str(cfg), "--resume", "latest"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: writing the export {out / 'export'} failed ("), err
    assert free_reported(err[0]) < export_size / 1e6, err[0]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert digest(out / "export") == export and not (out / ".tmp-export").exists()


# ----------------------------------------------------------------------------- one line


def test_a_damaged_checkpoint_is_one_line_and_v_shows_the_traceback(pixel_dir, tmp_path,
                                                                     capsys):
    out = tmp_path / "run"
    assert cli(["train", str(write_cfg(tmp_path, pixel_dir, out, 2))]) == 0
    ck1, ck2 = list_checkpoints(out)
    weights = ck2 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cfg = write_cfg(tmp_path, pixel_dir, out, 3)
    capsys.readouterr()
    assert cli(["train", str(cfg), "--resume", "latest"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: checkpoint {ck2} cannot be read (SafetensorError: ")
    assert line.endswith("it is damaged or incomplete: resume from another checkpoint, e.g. "
                         f"--resume {ck1}")
    for argv in (["-v", "train", str(cfg), "--resume", "latest"],
                 ["train", str(cfg), "--resume", "latest", "-v"]):
        assert cli(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.splitlines()[-1] == line
    assert not (out / LOCK_NAME).exists()


def test_an_export_replacement_cut_short_is_recovered(tmp_path):
    """The export is swapped in by two renames (old one aside, new one in); a crash between
    them leaves only ``.old-export``, which the next run's start moves back."""
    from diffdistill.atomic import recover_folder, write_folder_atomically

    final = tmp_path / "export"
    write_folder_atomically(final, lambda d: (d / "README.md").write_text(f"load {d}"))
    assert (final / "README.md").read_text() == f"load {final}"  # names its final place
    os.replace(final, tmp_path / ".old-export")  # the crash: the new one never arrived
    (tmp_path / ".tmp-export").mkdir()
    recover_folder(final)
    assert (final / "README.md").read_text() == f"load {final}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    def fails(d):
        (d / "README.md").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space left"):
        write_folder_atomically(final, fails)
    assert (final / "README.md").read_text() == f"load {final}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_without_flock_the_pid_decides(tmp_path, monkeypatch, caplog):
    """On a filesystem without flock (ENOLCK), a lock whose process is alive on this host is
    refused and one whose process is gone is taken over with a warning."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for pid, refused in ((os.getppid(), True), (gone.pid, False)):
        (tmp_path / LOCK_NAME).write_text(json.dumps(
            {"pid": pid, "host": socket.gethostname(), "started": "t", "command": "c"}))
        lock = RunLock(tmp_path)
        if refused:
            with pytest.raises(ConfigError, match=f"in use by another run: pid {pid} "):
                lock.acquire()
        else:
            caplog.clear()
            assert lock.acquire()["pid"] == pid
            assert f"taking over the lock of a run that is gone (pid {pid} " in caplog.text
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
            lock.release()
