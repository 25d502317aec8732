"""Peak memory of generation only (the bench's peak-memory column)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        return None


def release_freed_memory() -> bool:
    """Hand memory the allocator has freed back to the OS (glibc ``malloc_trim``), so that the
    resident set measures what is in use now, not what an earlier, larger step left cached.
    Without it every row after the first reads ~0 growth: it reuses the freed heap. False
    where there is no glibc (then CPU readings are "not measured")."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_bytes(modules) -> int:
    """Bytes of the parameters and buffers of ``modules`` that live on a GPU."""
    total = 0
    for m in modules:
        if isinstance(m, torch.nn.Module):
            for t in list(m.parameters()) + list(m.buffers()):
                if t.is_cuda:
                    total += t.numel() * t.element_size()
    return total


class PeakMemory:
    """Peak memory of generation only (``with memory: generate...``; feature extraction is
    outside). CUDA: ``max_memory_allocated`` during generation (the generator's weights
    included) minus the resident evaluation networks (``exclude``). CPU: how far the resident
    set grew above its size when generation started — freed heap returned to the OS first
    (:func:`release_freed_memory`), then sampled every few ms from ``/proc/self/statm``, and
    never less than the growth of ``getrusage``'s lifetime peak (which catches spikes between
    samples but reads 0 whenever an earlier peak was higher). Where the heap cannot be trimmed
    or ``statm`` does not exist (not Linux/glibc), :attr:`measured` is False: the bench then
    prints "n/a" rather than a growth figure that means nothing."""

    def __init__(self, device: torch.device, exclude: Sequence = (), interval: float = 0.005):
        import threading

        self.device = device
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_peak_rss_delta"
        self.peak = 0
        self.exclude = _cuda_bytes(exclude) if self.cuda else 0
        self.measured = self.cuda or (_current_rss_bytes() is not None and release_freed_memory())
        self._active = False
        self._stop = threading.Event()
        self._thread = None
        if not self.cuda and _current_rss_bytes() is not None:
            def poll():
                while not self._stop.wait(interval):
                    if self._active:
                        self.highest = max(self.highest, _current_rss_bytes() or 0)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_freed_memory()
            self.start_peak = _peak_rss_bytes()
            self.start = self.highest = _current_rss_bytes() or 0
            self._active = True
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            used = torch.cuda.max_memory_allocated(self.device) - self.exclude
        else:
            self._active = False
            self.highest = max(self.highest, _current_rss_bytes() or 0)
            used = max(self.highest - self.start, _peak_rss_bytes() - self.start_peak)
        self.peak = max(self.peak, int(used))
        return False

    def close(self) -> int:
        """Stop the sampling thread; the peak over every ``with`` block, in bytes."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return max(self.peak, 0)

