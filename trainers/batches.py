"""Deterministic, resumable batches for every trainer (:class:`ShardedBatchSampler`) and
moving a batch to the device."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import Sampler


class ShardedBatchSampler(Sampler):
    """Deterministic, resumable batches: epoch e is ``randperm(n, seed + e)``; each global
    batch of ``batch_size * world`` indices is split so rank r takes slice r — ranks never
    overlap and the order does not depend on the number of DataLoader workers.
    ``one_epoch``: stop at the end of the epoch that holds ``start_batch``."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int,
                 start_batch: int = 0, shuffle: bool = True, one_epoch: bool = False):
        self.n, self.bs, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.start, self.shuffle, self.one_epoch = seed, start_batch, shuffle, one_epoch
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(
                f"the dataset has {n} items, fewer than one global batch "
                f"(train.batch_size={batch_size} x {world} processes); lower train.batch_size"
            )

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start
        while True:
            epoch, pos = divmod(b, self.per_epoch)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
            gb = self.bs * self.world
            for p in range(pos, self.per_epoch):
                chunk = perm[p * gb:(p + 1) * gb]
                yield chunk[self.rank * self.bs:(self.rank + 1) * self.bs].tolist()
            if self.one_epoch:  # only the rest of the epoch that holds start_batch
                return
            b = (epoch + 1) * self.per_epoch

    def __len__(self) -> int:  # infinite in practice; DataLoader only needs a number
        return 2**62


def _to_device(batch: Any, device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
