"""A persistent cache of tensors (VAE latents, prompt embeddings) keyed by strings.

:class:`EmbeddingCache` stores tensors in append-only safetensors shards so that an
expensive encoder runs once per input across runs; :func:`hash_key` builds keys that change
whenever any input changes.

:class:`EmbeddingCache` never rewrites a shard: each ``flush`` writes one new file (temp
file + ``os.replace``) with a unique name, so several processes can fill one cache directory
at once without locks, and a crash cannot leave a half-written shard.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# The logger the cache has always used (it lived in diffdistill.data), kept so that
# logging configuration written for that name still covers the cache's warnings.
logger = logging.getLogger("diffdistill.data")

__all__ = ["EmbeddingCache", "hash_key"]


def hash_key(*parts: object) -> str:
    """sha1 hex digest of ``parts`` (e.g. a prompt, or image path + resolution + VAE id).

    Use it to build :class:`EmbeddingCache` keys that change whenever any input changes.
    """
    return hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).hexdigest()


def tensor_digest(tensors: Sequence[torch.Tensor | None], salt: str = "") -> str:
    """sha1 hex digest of ``tensors``' dtypes, shapes and bytes (None entries skipped).

    The identity of a network as a cache namespace: the digest of what it *computes* on fixed
    probe inputs, so new weights, a new dtype or a changed preprocessing at the same path
    start a new cache instead of serving stale entries."""
    digest = hashlib.sha1(salt.encode())
    for t in tensors:
        if t is not None:
            digest.update(str((t.dtype, tuple(t.shape))).encode())
            digest.update(t.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    """Tensors keyed by strings, persisted in ``cache_dir/namespace/*.safetensors``.

    ``put`` buffers in memory; ``flush`` writes the buffer as one new shard (also done
    automatically every ``shard_size`` entries). A new instance over the same folder sees
    every flushed entry. Shards are loaded whole, lazily, and the last ``max_loaded_shards``
    are kept in memory. Choose keys that change with every input that matters, e.g.
    ``hash_key(image_path, resolution, vae_id)`` (see :func:`hash_key`).
    """

    def __init__(self, cache_dir: str | os.PathLike, namespace: str, shard_size: int = 1024,
                 max_loaded_shards: int = 8):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", namespace or ""):
            raise ValueError(f"namespace {namespace!r} must be a plain folder name "
                             "(letters, digits, '.', '_', '-')")
        self.directory = Path(cache_dir) / namespace
        self.directory.mkdir(parents=True, exist_ok=True)
        self.namespace, self.shard_size, self.max_loaded_shards = namespace, shard_size, max_loaded_shards
        self._pending: dict[str, torch.Tensor] = {}
        self._index: dict[str, Path] = {}
        self._loaded: collections.OrderedDict[Path, dict[str, torch.Tensor]] = (
            collections.OrderedDict())
        self.refresh()

    def refresh(self) -> None:
        """Re-scan the folder (picks up shards written by other processes)."""
        from safetensors import safe_open

        self._index.clear()
        # Names start with a timestamp, so sorted order is write order: later shards win.
        for shard in sorted(self.directory.glob("*.safetensors")):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                        self._index[key] = shard
            except Exception as error:  # noqa: BLE001 - a foreign file: ignore, do not crash
                logger.warning("ignoring unreadable cache shard %s: %s", shard, error)

    def __contains__(self, key: str) -> bool:
        return key in self._pending or key in self._index

    def __len__(self) -> int:
        return len(self._index.keys() | self._pending.keys())

    def keys(self) -> set[str]:
        return set(self._index) | set(self._pending)

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._pending:
            return self._pending[key]
        shard = self._index.get(key)
        if shard is None:
            return None
        if shard not in self._loaded:
            from safetensors.torch import load_file

            self._loaded[shard] = load_file(str(shard))
            while len(self._loaded) > self.max_loaded_shards:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(shard)
        return self._loaded[shard][key]

    def put(self, key: str, tensor: torch.Tensor) -> None:
        # clone(): a slice of a batch shares storage with it, which safetensors refuses
        # to save, and would keep the whole batch alive.
        self._pending[str(key)] = tensor.detach().to("cpu").contiguous().clone()
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> Path | None:
        """Write buffered entries as one new shard, atomically. Returns its path."""
        if not self._pending:
            return None
        from safetensors.torch import save_file

        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        final = self.directory / name
        temporary = self.directory / f".{name}.tmp"
        save_file(self._pending, str(temporary), metadata={"namespace": self.namespace})
        os.replace(temporary, final)
        self._loaded[final] = self._pending
        for key in self._pending:
            self._index[key] = final
        self._pending = {}
        while len(self._loaded) > self.max_loaded_shards:
            self._loaded.popitem(last=False)
        return final

    def cached_map(self, keys: Sequence[str],
                   compute_fn: Callable[[list], torch.Tensor | Sequence[torch.Tensor]],
                   batch_size: int = 64, inputs: Sequence | None = None) -> list[torch.Tensor]:
        """Tensors for ``keys``, computing only the missing ones, ``batch_size`` at a time.

        ``compute_fn`` receives a list of the missing keys' ``inputs`` (or of the keys
        themselves when ``inputs`` is None) and returns a batched tensor or a list of
        tensors, one per element. New entries are flushed before returning.
        """
        keys = [str(k) for k in keys]
        if inputs is not None and len(inputs) != len(keys):
            raise ValueError(f"cached_map: {len(keys)} keys but {len(inputs)} inputs")
        missing: dict[str, object] = {}
        for i, key in enumerate(keys):
            if key not in self and key not in missing:
                missing[key] = key if inputs is None else inputs[i]
        todo = list(missing.items())
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            outputs = compute_fn([value for _, value in chunk])
            if len(outputs) != len(chunk):
                raise ValueError(f"compute_fn returned {len(outputs)} results for "
                                 f"{len(chunk)} inputs")
            for (key, _), output in zip(chunk, outputs):
                self.put(key, output)
        self.flush()
        return [self.get(key) for key in keys]

