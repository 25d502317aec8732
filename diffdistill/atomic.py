"""Folders that appear complete or not at all: write under a temporary name, fsync, rename.

A checkpoint or an export written in place and cut short (a full disk, a killed process, a
power cut) would leave a folder that looks finished but is not. Here the content is written
into a hidden sibling ``.tmp-<name>``, every file and folder in it is fsynced (so the data is
on disk before the name points to it), and the folder is then renamed into place. Replacing
an existing folder takes two renames — the old one to ``.old-<name>``, the new one into its
place — and :func:`recover_folder` undoes a crash between them, so the previous version is
never lost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable

TMP_PREFIX, OLD_PREFIX = ".tmp-", ".old-"
#: files that may name the folder they were written into (a model card's loading code)
_TEXT_SUFFIXES = {".md", ".json", ".txt", ".py", ".yaml", ".yml"}


def fsync_path(path: Path) -> None:
    """Flush one file or folder (its entries) to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a folder; the files were flushed
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder (deepest first), then itself."""
    folder = Path(folder)
    dirs = []
    for p in folder.rglob("*"):
        if p.is_symlink():
            continue
        if p.is_dir():
            dirs.append(p)
        else:
            fsync_path(p)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_path(d)
    fsync_path(folder)


def replace_folder(tmp: Path, final: Path) -> None:
    """Put the complete folder ``tmp`` at ``final``; an existing ``final`` is moved to
    ``.old-<name>`` first and deleted only once the new one is in place."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(OLD_PREFIX + final.name)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(final: Path) -> None:
    """Clean up after a crash inside :func:`replace_folder` or a write: a ``.old-<name>``
    without ``<name>`` is the previous version (moved back); otherwise it and any
    ``.tmp-<name>`` are leftovers (deleted)."""
    final = Path(final)
    old, tmp = (final.with_name(p + final.name) for p in (OLD_PREFIX, TMP_PREFIX))
    if old.exists() and not final.exists():
        os.replace(old, final)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def write_folder_atomically(final: Path, write: Callable[[Path], Any]) -> Any:
    """Call ``write(tmp)`` to fill a temporary sibling of ``final``, then swap it in.

    If ``write`` raises (a full disk: ``OSError(ENOSPC)``), the temporary folder is deleted
    and ``final`` — the previous version, if any — is untouched. Text files that name the
    temporary path (a model card's loading code) are rewritten to name ``final``. A returned
    path inside the temporary folder is returned as the same path inside ``final``.
    """
    final = Path(final)
    tmp = final.with_name(TMP_PREFIX + final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        result = write(tmp)
        if result is None and not any(tmp.iterdir()):  # nothing to write: keep what is there
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        _retarget_paths(tmp, final)
        fsync_tree(tmp)
    except BaseException as e:
        with contextlib.suppress(AttributeError, TypeError):  # for describe_write_error
            e.free_bytes_at_failure = free_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, final)
    if isinstance(result, Path) and (result == tmp or tmp in result.parents):
        result = final / result.relative_to(tmp)
    return result


def _retarget_paths(tmp: Path, final: Path) -> None:
    needle, repl = str(tmp), str(final)
    for p in tmp.rglob("*"):
        if p.suffix not in _TEXT_SUFFIXES or not p.is_file() or p.stat().st_size > 4 << 20:
            continue
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            continue
        if needle in text:
            p.write_text(text.replace(needle, repl))


def describe_write_error(error: BaseException, folder: Path) -> str:
    """One line for a failed write: the error (its type unless an OSError, whose text names
    the errno) and the free space left where it wrote — a full disk often surfaces as a
    library's own message (torch: "unexpected pos ..."), not as ENOSPC."""
    first = (str(error).splitlines() or [""])[0].strip()[:300]
    text = first if isinstance(error, OSError) and first else f"{type(error).__name__}: {first}"
    free = getattr(error, "free_bytes_at_failure", None)
    free = free_bytes(folder) if free is None else free
    return text if free is None else f"{text}; {free / 1e6:.1f} MB free on that disk"


def free_bytes(folder: Path):
    """Bytes free to this user on the filesystem of ``folder`` (or its nearest parent)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
