"""Atomic checkpoints and exact resume (a mixin of :class:`~diffdistill.trainers.base.Trainer`).

``OUTPUT_DIR/checkpoints/checkpoint-<step>`` is written to a temporary folder, fsynced and
renamed when complete (the rename is atomic), so "latest" is never half-written; old ones are
discarded by renaming them out of the names resume looks at first. A write that fails on any
process (a full disk) removes the temporary folder, keeps the previous checkpoint and stops
every process with one line (:class:`~diffdistill.errors.RunError`). Only trainable parameters
are saved (a LoRA checkpoint holds the adapter, not the base model). Resume refuses another
method, another value of a key that must match, another process count, and names a damaged
checkpoint with a way out.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from diffdistill.atomic import describe_write_error, fsync_path, fsync_tree
from diffdistill.config import ConfigError, config_to_dict
from diffdistill.errors import RunError

log = logging.getLogger("diffdistill.train")

CKPT_PREFIX = "checkpoint-"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.exists():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(CKPT_PREFIX) and p.name[len(CKPT_PREFIX):].isdigit():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


class CheckpointMixin:
    def _register_checkpoint_hooks(self) -> None:
        if self._ckpt_hooks_registered:
            return
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            self._ckpt_hooks_registered = True  # accelerate saves sharded states itself
            return

        def keep_trainable(models, weights, output_dir):
            # Save only trainable tensors: a LoRA checkpoint holds the adapter, not the base.
            for i, model in enumerate(models):
                keep = {n for n, p in model.named_parameters() if p.requires_grad}
                weights[i] = {k: v for k, v in weights[i].items() if k in keep}

        self.accelerator.register_save_state_pre_hook(keep_trainable)
        self._ckpt_hooks_registered = True

    def _trainer_state(self) -> dict:
        return {
            "method": self.method,
            "global_step": self.global_step,
            "batches_consumed": self.batches_consumed,
            "nonfinite_total": self.nonfinite_total,
            "log_window": self.log_window.state(),
            "train_wall_s": self.train_wall_s,
            "state": self.state,
            "config": config_to_dict(self.cfg),
        }

    def checkpoint(self) -> Path:
        """Write ``checkpoints/checkpoint-<step>`` atomically; keep the newest N."""
        from safetensors.torch import save_file

        acc = self.accelerator
        root = self.out / "checkpoints"
        final = root / f"{CKPT_PREFIX}{self.global_step}"
        tmp = root / f".tmp-{CKPT_PREFIX}{self.global_step}"
        error = None
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
            except OSError as e:
                error = e
        acc.wait_for_everyone()
        try:
            if error is not None:
                raise error
            acc.save_state(str(tmp))
            save_file({"generator": self.generator.get_state(),
                       "torch_rng": torch.get_rng_state(),
                       "data_position": torch.tensor([self.data_epoch, self.epoch_batches])},
                      str(tmp / f"trainer_rng_{self.rank}.safetensors"))
            if acc.is_main_process:
                tensors = dict(self.state_tensors)
                for name, (ema, _) in self.emas.items():
                    tensors.update(ema.state_tensors(f"ema.{name}."))
                if tensors:
                    save_file({k: v.contiguous() for k, v in tensors.items()},
                              str(tmp / "trainer_tensors.safetensors"))
                (tmp / "trainer_state.json").write_text(json.dumps(self._trainer_state(), indent=1))
        except Exception as e:  # noqa: BLE001 - a full disk, an I/O error: every rank must know
            error = e
        if self.world > 1:
            acc.wait_for_everyone()  # every rank's files written (or failed)
        if acc.is_main_process and error is None:
            try:  # the data on disk before the name points to it
                fsync_tree(tmp)
            except OSError as e:
                error = e
        self._agree_on_write(error, tmp, final)
        if acc.is_main_process:
            if final.exists():  # re-writing a step (resumed from an older checkpoint)
                _discard(final)
            os.replace(tmp, final)  # atomic: "latest" is always complete
            fsync_path(root)
            for old in list_checkpoints(self.out)[:-self.cfg.train.keep_checkpoints]:
                _discard(old)
        acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

    def _agree_on_write(self, error: Optional[BaseException], tmp: Path, final: Path) -> None:
        """Every rank learns whether any rank's write failed; if so the temporary folder is
        removed and every rank raises (the failing one with the reason)."""
        from .run_guard import agree

        prev = self.last_checkpoint or "none"
        if error is not None and not isinstance(error, RunError):
            cause, error = error, RunError(
                f"writing checkpoint {final} failed ({describe_write_error(error, tmp)}); the "
                f"previous checkpoint {prev} "
                "is intact; the run stopped (free space, then continue with --resume latest)")
            error.__cause__ = cause
        try:
            agree(self.accelerator, error)
        except BaseException:
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def resolve_checkpoint(self, resume: str) -> Optional[Path]:
        if resume == "latest":
            ckpts = list_checkpoints(self.out)
            return ckpts[-1] if ckpts else None
        p = Path(resume)
        if not (p / "trainer_state.json").exists():
            raise FileNotFoundError(f"--resume {resume}: not a diffdistill checkpoint folder "
                                    "(no trainer_state.json)")
        return p

    def resume(self, resume: str) -> None:
        from safetensors.torch import load_file

        path = self.resolve_checkpoint(resume)
        if path is None:
            log.info("--resume latest: no checkpoint in %s, starting fresh", self.out)
            return
        try:
            meta = json.loads((path / "trainer_state.json").read_text())
        except ValueError as e:
            raise self._damaged(path, e) from e
        self._check_compatible(meta, path)
        rng_file = path / f"trainer_rng_{self.rank}.safetensors"
        writers = len(list(path.glob("trainer_rng_*.safetensors")))
        if writers != self.world or not rng_file.exists():
            # each rank's generator and data position are in the checkpoint: another process
            # count would silently change the noise and the data order
            raise ConfigError(f"checkpoint {path} was written by {writers} process(es), this "
                              f"run has {self.world}; resume with {writers} process(es) for an "
                              "exact resume")
        tfile = path / "trainer_tensors.safetensors"
        try:
            self.accelerator.load_state(str(path), strict=False)
            rng = load_file(str(rng_file))
            tensors = load_file(str(tfile)) if tfile.exists() else {}
        except Exception as e:  # truncated / overwritten files: name the folder and a way out
            raise self._damaged(path, e) from e
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch_rng"])
        for name, (ema, _) in self.emas.items():
            ema.load_tensors(tensors, f"ema.{name}.")
        for k in list(self.state_tensors):
            self.state_tensors[k] = tensors[k].to(self.state_tensors[k].device)
        self.global_step = meta["global_step"]
        self.batches_consumed = meta["batches_consumed"]
        if "data_position" in rng:  # (older checkpoints: map-style data recomputes it)
            self.data_epoch, self.epoch_batches = (int(v) for v in rng["data_position"])
        self.nonfinite_total = meta.get("nonfinite_total", 0)
        self.log_window.load(meta.get("log_window"))
        self.train_wall_s = float(meta.get("train_wall_s", 0.0))
        self.state.update(meta.get("state", {}))
        self.last_checkpoint = path
        self.on_resume()
        log.info("resumed from %s at step %d", path, self.global_step)

    def _damaged(self, path: Path, err: Exception) -> RunError:
        others = [p for p in list_checkpoints(self.out) if p.name != path.name]
        hint = f", e.g. --resume {others[-1]}" if others else ""
        first = (str(err).splitlines() or [""])[0][:200]
        return RunError(f"checkpoint {path} cannot be read ({type(err).__name__}: {first}); "
                            f"it is damaged or incomplete: resume from another checkpoint{hint}")

    def on_resume(self) -> None:
        """Hook for methods whose structure depends on restored state (e.g. stages)."""

    def _check_compatible(self, meta: dict, path: Path) -> None:
        if meta.get("method") != self.method:
            raise ConfigError(f"checkpoint {path} is from method {meta.get('method')!r}, "
                              f"not {self.method!r}")
        mine, theirs = config_to_dict(self.cfg), meta.get("config", {})
        defaults = None
        for key in self.resume_must_match:
            a, b = _dig(theirs, key, _ABSENT), _dig(mine, key)
            if a is _ABSENT:  # a key newer than the checkpoint: it ran with the default
                defaults = defaults or config_to_dict(type(self.cfg)())
                a = _dig(defaults, key)
            if a != b:
                raise ConfigError(f"checkpoint {path} was trained with {key}={a!r}, but this "
                                  f"run has {key}={b!r}; use the same value to resume")


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder without ever exposing it half-deleted: it is first renamed
    (atomically) out of the ``checkpoint-<step>`` names that "latest" and resume look at."""
    trash = folder.with_name(f".old-{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


_ABSENT = object()


def _dig(d: dict, dotted: str, absent=None):
    """``d[a][b]...`` for ``dotted`` = "a.b...", or ``absent`` where a key is missing."""
    for p in dotted.split("."):
        if not isinstance(d, dict) or p not in d:
            return absent
        d = d[p]
    return d
