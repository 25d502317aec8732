"""Training logs: the window of scalars between two log lines, and where the lines go.

Trainers with more than one kind of step (DMD2's two time-scale updates: one generator step
per ``fake_updates_per_generator_update`` fake-score steps; Hyper-SD's stages) return
different keys on different steps. A log line that showed only the step it fell on would hide
the generator from the log whenever the logging period is a multiple of the update ratio, so
:class:`LogWindow` averages every key over the steps since the last line that produced it:
each line carries the generator's *and* the fake score's metrics, whatever the ratio.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

from diffdistill.config import ConfigError

log = logging.getLogger("diffdistill.train")


class LogWindow:
    """Per-key means of the scalars logged since the last :meth:`pop`.

    A key present on only some steps (the generator's losses under a TTUR ratio) is averaged
    over the steps that produced it. The sums are plain floats, so :meth:`state` round-trips
    through a checkpoint's JSON exactly and a resumed run writes the same lines.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        """The means, in first-seen key order; the window starts empty again."""
        means = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return means

    def state(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load(self, state: Optional[dict]) -> None:
        state = state or {}
        self.sums = {k: float(v) for k, v in state.get("sums", {}).items()}
        self.counts = {k: int(v) for k, v in state.get("counts", {}).items()}


class Heartbeat:
    """A progress line every ``every_s`` seconds — "[DMD2] step 120/450  1.85 it/s  ETA 3m
    00s" — for runs without a progress bar (the demo's worker processes), so a person sees
    each of them move."""

    def __init__(self, label: str, total: int, every_s: float, start_step: int = 0,
                 clock=None, write=None):
        import time

        self.label, self.total, self.every_s = label, total, every_s
        self.clock = clock or time.perf_counter
        self.write = write or (lambda line: print(line, flush=True))
        self.t0 = self.last = self.clock()
        self.step0 = start_step

    def tick(self, step: int) -> Optional[str]:
        now = self.clock()
        if now - self.last < self.every_s and step < self.total:
            return None
        self.last = now
        rate = (step - self.step0) / max(now - self.t0, 1e-9)
        left = (self.total - step) / rate if rate > 0 else float("inf")
        eta = f"{int(left // 60)}m {int(left % 60):02d}s" if math.isfinite(left) else "?"
        line = f"[{self.label}] step {step}/{self.total}  {rate:.2f} it/s  ETA {eta}"
        self.write(line)
        return line


class MetricsLogger:
    """metrics.jsonl always; tensorboard when installed and enabled."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool = True, wandb: bool = False,
                 console: bool = False, run_config: Optional[dict] = None):
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.console = console
        if not enabled:
            return
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise ConfigError("log.wandb=true but the wandb package is not installed "
                                  "(pip install wandb), or set log.wandb=false") from None
            self.wandb = wandb_lib.init(project="diffdistill", dir=str(out), config=run_config)
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # tensorboard not installed: jsonl only
                self.tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.console:
            log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in values.items()))

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()
