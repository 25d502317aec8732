"""Content fingerprints of weight files: which network is which, whatever its path.

The bench uses them to mark a row whose CLIP judge is the very network the student was
trained against (RG-LCD's and Hyper-SD's reward): the export records the sha256 of its reward
network's weight files (:func:`weights_sha256`), the bench hashes its judge's, and equal
hashes mean "judge = reward" — also when the same file sits under two paths.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(path: str | os.PathLike | None) -> dict[str, str]:
    """``{relative name: sha256}`` of a weight file, or of every weight file under a folder
    (recursive, sorted); ``{}`` for None or a path that does not exist."""
    if not path:
        return {}
    p = Path(path)
    if p.is_file():
        return {p.name: file_sha256(p)}
    if not p.is_dir():
        return {}
    return {str(f.relative_to(p)): file_sha256(f) for f in sorted(p.rglob("*"))
            if f.is_file() and f.suffix in WEIGHT_SUFFIXES}
