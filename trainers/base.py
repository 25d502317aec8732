"""The Trainer every method subclasses: accelerate, named optimizers, EMA, checkpoints, logging.

A method defines :meth:`Trainer.build` (load networks, register optimizers / EMAs) and
:meth:`Trainer.train_step` (one micro-batch → a dict of logged scalars), calling
``self.step("generator", loss)`` for each named optimizer it updates. Everything else —
mixed precision, gradient accumulation and clipping, non-finite-loss handling, atomic
checkpoints with exact resume, logging, sample grids and the final export — lives here.

Exact resume: all randomness a method draws goes through ``self.generator`` (one CPU
``torch.Generator`` per process, saved in the checkpoint), the data order is a pure function
of (seed, epoch, position) and the position is saved, and accelerate saves optimizer and
scheduler states. A run cut at step k and resumed continues bit-identically on CPU.

Checkpoints: ``OUTPUT_DIR/checkpoints/checkpoint-<step>`` written to a temporary folder and
renamed when complete (the rename is atomic), so "latest" is never half-written. Only
trainable parameters are saved (a LoRA checkpoint holds the adapter, not the base model).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from diffdistill.config import BaseConfig, ConfigError, config_to_dict, save_config

from .metrics_log import Heartbeat, LogWindow, MetricsLogger

log = logging.getLogger("diffdistill.train")

CKPT_PREFIX = "checkpoint-"


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- helpers


class EMA:
    """Exponential moving average of a module's trainable parameters (fp32 shadow)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = {n: params[n].detach().float().clone() for n in self.names}

    @torch.no_grad()
    def update(self, module: nn.Module, decay: Optional[float] = None) -> None:
        if not self.names:
            return
        d = self.decay if decay is None else decay
        params = dict(module.named_parameters())
        # One multi-tensor lerp (the arithmetic of a per-tensor ``lerp_``, as
        # torch.optim.swa_utils' EMA does it), not one Python call and kernel per tensor.
        torch._foreach_lerp_([self.shadow[n] for n in self.names],
                             [params[n].detach().float() for n in self.names], 1.0 - d)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        for n in self.names:
            params[n].copy_(self.shadow[n].to(params[n].dtype))

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}{n}": t for n, t in self.shadow.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        for n in self.names:
            self.shadow[n].copy_(tensors[f"{prefix}{n}"])


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


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.exists():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(CKPT_PREFIX) and p.name[len(CKPT_PREFIX):].isdigit():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Base class. Subclasses set ``method`` and ``config_class`` and implement
    :meth:`build`, :meth:`train_step` and usually :meth:`export` / :meth:`sample_images`."""

    method = "base"
    config_class = BaseConfig
    #: config keys that must match between a checkpoint and the resuming run
    resume_must_match = ("method", "model.path", "adapter.type", "adapter.rank")
    #: whether the periodic eval samples with ``eval.guidance_scale`` (a teacher does; a
    #: distilled student is evaluated exactly as it is exported, its guidance included)
    eval_uses_guidance = False

    def __init__(self, cfg: BaseConfig, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        if cfg.eval.guidance_scale != 1.0 and not self.eval_uses_guidance:
            raise ConfigError(
                f"eval.guidance_scale={cfg.eval.guidance_scale}: the {self.method} student is "
                "evaluated as it is exported (its own sampler, steps and guidance); remove the "
                "key or set it to 1")
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        cpu = cfg.train.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        self.accelerator = accelerator or Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            cpu=cpu,
            project_config=ProjectConfiguration(project_dir=str(self.out)),
        )
        acc = self.accelerator
        self._configure_deepspeed()
        self._check_fsdp()
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        # Identical initial weights on every rank; per-rank stream for the method's noise.
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.rank)
        self.networks: dict[str, nn.Module] = {}
        self.optimizers: dict[str, Any] = {}
        self.lr_schedulers: dict[str, Any] = {}
        self.trainable: dict[str, list[nn.Parameter]] = {}
        self.emas: dict[str, tuple[EMA, nn.Module]] = {}
        self.state: dict[str, Any] = {}  # JSON-serialisable method state (saved)
        self.state_tensors: dict[str, torch.Tensor] = {}  # tensor method state (saved)
        self.global_step = 0
        self.batches_consumed = 0
        # where this rank is in its data: the epoch (random crops / flips, shard order depend
        # on it) and how many batches of it were consumed (a resumed iterable dataset skips
        # them; a map-style one starts its sampler there)
        self.data_epoch = 0
        self.epoch_batches = 0
        # FSDP: id(prepared network) -> its gathered full state dict, for the final export
        self._full_states: dict[int, dict] = {}
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.log_window = LogWindow()  # scalars since the last log line (saved)
        self.train_wall_s = 0.0  # seconds in training iterations, evals excluded (saved)
        self._micro = 0
        self._skip_update = False
        self._ckpt_hooks_registered = False
        self.last_checkpoint: Optional[Path] = None
        self.dataset = None

    # -- to implement ---------------------------------------------------------------
    def build(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement build()")

    def train_step(self, batch: dict) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement train_step()")

    def export(self, out_dir: Path) -> Optional[Path]:
        """Write the final generator (LoRA or full) into ``out_dir``; None if nothing to do."""
        return None

    def sample_images(self, seeds: list[int]) -> Optional[torch.Tensor]:
        """uint8 NCHW samples from fixed seeds for the periodic grid (None: no grid)."""
        return None

    def eval_spec(self):
        """The generator as the evaluation harness samples it for the periodic quick metric
        (``cfg.eval``): a :class:`diffdistill.eval.eval_model.EvalModel`, or None (no metric)."""
        return None

    def make_dataset(self):
        from diffdistill.data import build_dataset

        d = self.cfg.data
        kw: dict[str, Any] = {"resolution": d.resolution}
        if d.kind == "fashion_mnist":
            kw.update(split="train", root=d.path or None, seed=self.cfg.seed, limit=d.limit)
        elif d.kind in ("imagefolder", "classfolder"):
            kw.update(root=d.path, center_crop=d.center_crop, random_flip=d.random_flip,
                      seed=self.cfg.seed)
            if d.kind == "imagefolder":
                kw["caption_key"] = d.caption_key
        elif d.kind == "prompts":
            kw = {"path": d.path}
        else:
            kw.update(urls_or_paths=d.path, center_crop=d.center_crop, random_flip=d.random_flip,
                      seed=self.cfg.seed, shuffle_shards=d.shuffle_shards,
                      process_index=self.rank, num_processes=self.world)
        try:
            return build_dataset(d.kind, **kw)
        except (ValueError, OSError) as e:  # a missing / empty / unreadable source: one line
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"data.kind={d.kind} data.path={d.path!r}: {first}") from None

    def _is_deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return getattr(self.accelerator, "distributed_type", None) == DistributedType.DEEPSPEED

    def _is_fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return getattr(self.accelerator, "distributed_type", None) == DistributedType.FSDP

    def fsdp_unsupported(self) -> Optional[str]:
        """Why this method's configuration cannot run under FSDP (None: it can). Methods
        that build a module-level copy of a trained network (a θ⁻ target) override this."""
        return None

    def _check_fsdp(self) -> None:
        """FSDP shards the trained networks: every rank holds only its slice of the weights,
        and a prepared network runs only as a collective, inside its FSDP wrapper. What reads
        a trained network outside that wrapper is refused here, before any model loads: a
        module copy of it (the evaluation EMA, a θ⁻ target), a LoRA export read from the
        unwrapped module, and the main-process sample grids / quick metric. The final export
        gathers the full weights instead (:meth:`_gather_full_weights`)."""
        if not self._is_fsdp():
            return
        cfg = self.cfg
        why = None
        if cfg.adapter.type == "lora":
            why = ("adapter.type=lora: a LoRA's trainable state is small; train it with "
                   "configs/accelerate/multi_gpu.yaml (DDP) — FSDP is for full weights")
        elif cfg.train.ema_decay > 0:
            why = (f"train.ema_decay={cfg.train.ema_decay}: the evaluation EMA is a module "
                   "copy of the sharded network; set train.ema_decay=0")
        elif cfg.log.grid_every or cfg.eval.every:
            key = "log.grid_every" if cfg.log.grid_every else "eval.every"
            why = (f"{key}: periodic samples run the network outside its FSDP wrapper; "
                   f"set {key}=0 and evaluate the export with `diffdistill bench`")
        else:
            why = self.fsdp_unsupported()
        if why:
            raise ConfigError(f"not supported under FSDP (configs/accelerate/fsdp.yaml): {why}")

    def _gather_full_weights(self) -> None:
        """Under FSDP, every rank takes part in gathering each trained network's full state
        dict (accelerate's ``get_state_dict``: FULL_STATE_DICT, offloaded to the main
        process's CPU); :meth:`ema_or_online` then exports an unsharded rebuild of it."""
        if not self._is_fsdp():
            return
        for module in self.networks.values():
            self._full_states[id(module)] = self.accelerator.get_state_dict(module)

    def _configure_deepspeed(self) -> None:
        """accelerate + DeepSpeed: the engine's micro-batch size normally comes from a
        DataLoader passed to ``prepare()``; the trainers feed their own, so set it to
        ``train.batch_size``. The engine steps on every ``accelerator.backward`` (accelerate
        never marks a micro-batch as non-final here), so the loop's own gradient
        accumulation cannot run under it: only ``train.grad_accum: 1`` with DeepSpeed
        ``gradient_accumulation_steps`` 1 (or auto)."""
        if not self._is_deepspeed():
            return
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = self.cfg.train.batch_size
        gas = ds.get("gradient_accumulation_steps", "auto")
        if self.cfg.train.grad_accum != 1 or gas not in ("auto", 1):
            raise ConfigError(
                f"train.grad_accum={self.cfg.train.grad_accum} (DeepSpeed config "
                f"gradient_accumulation_steps={gas}): under "
                "DeepSpeed the engine steps on every backward, so gradient accumulation is "
                "not supported; use train.grad_accum=1 and gradient_accumulation_steps: 1")

    # -- registration ---------------------------------------------------------------
    def add_network(self, name: str, module: nn.Module) -> nn.Module:
        """Register a trainable network; it is prepared (DDP/FSDP) by :meth:`add_optimizer`."""
        self.networks[name] = module
        return module

    def add_optimizer(self, name: str, module: nn.Module, lr: Optional[float] = None,
                      params: Optional[list] = None, betas: Optional[tuple] = None,
                      weight_decay: Optional[float] = None) -> nn.Module:
        """AdamW + LR schedule over ``module``'s trainable params; returns the prepared module."""
        from diffusers.optimization import get_scheduler

        t = self.cfg.train
        if self.optimizers and self._is_deepspeed():
            # accelerator.backward() drives the first DeepSpeed engine only: a second one
            # would silently never step (accelerate docs, "Using multiple models with
            # DeepSpeed"; huggingface/accelerate#2496).
            raise ConfigError(
                f"method {self.method!r} trains several networks "
                f"({', '.join([*self.optimizers, name])}); accelerate runs one DeepSpeed "
                "engine per Accelerator, so this method cannot run under DeepSpeed: use "
                "configs/accelerate/multi_gpu.yaml (DDP)")
        params = params if params is not None else [p for p in module.parameters()
                                                    if p.requires_grad]
        if not params:
            raise ValueError(f"optimizer {name!r}: the network has no trainable parameters")
        opt = torch.optim.AdamW(
            params, lr=lr or t.lr, betas=betas or (t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
            weight_decay=t.weight_decay if weight_decay is None else weight_decay,
        )
        sched = get_scheduler(t.lr_schedule, opt, num_warmup_steps=t.lr_warmup_steps,
                              num_training_steps=t.max_steps)
        module, opt, sched = self.accelerator.prepare(module, opt, sched)
        self.networks[name] = module
        self.optimizers[name] = opt
        self.lr_schedulers[name] = sched
        self.trainable[name] = params
        return module

    def add_ema(self, name: str, module: nn.Module, decay: float) -> EMA:
        ema = EMA(self.unwrap(module), decay)
        self.emas[name] = (ema, module)
        return ema

    def unwrap(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module)

    def side_pass(self, module: nn.Module) -> nn.Module:
        """What to run a prepared network through outside its own update (no-grad passes, a
        frozen pass that only routes gradient to its input): the bare module under DDP /
        DeepSpeed ZeRO-2, whose wrapper would expect a gradient reduction that such a pass
        never makes, and the prepared module under FSDP, whose wrapper must run to gather and
        cast the shards (calling the inner module skips the root unit's initialisation and
        stream synchronisation)."""
        return module if self._is_fsdp() else self.unwrap(module)

    # -- randomness (all of it resumable) ----------------------------------------------
    def randn(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, dtype=dtype).to(self.device)

    def rand(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, dtype=dtype).to(self.device)

    def randint(self, low: int, high: int, shape) -> torch.Tensor:
        return torch.randint(low, high, tuple(shape), generator=self.generator).to(self.device)

    # -- the update -----------------------------------------------------------------
    @property
    def is_final_micro(self) -> bool:
        return self._micro == self.cfg.train.grad_accum - 1

    def step(self, name: str, loss: torch.Tensor) -> Optional[torch.Tensor]:
        """Backward ``loss`` into optimizer ``name``; step it on the last micro-batch.

        A non-finite loss (on any rank) skips the whole update and is counted.
        """
        acc = self.accelerator
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.world > 1:
            finite = acc.reduce(finite, reduction="sum") / self.world
        if float(finite) < 1.0:
            self._skip_update = True
            self.optimizers[name].zero_grad(set_to_none=True)
            return None
        acc.backward(loss / self.cfg.train.grad_accum)
        grad_norm = None
        if self.is_final_micro:
            if self._skip_update:
                self.optimizers[name].zero_grad(set_to_none=True)
                return None
            if self.cfg.train.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(self.trainable[name], self.cfg.train.max_grad_norm)
            self.optimizers[name].step()
            self.lr_schedulers[name].step()
            self.optimizers[name].zero_grad(set_to_none=True)
        return grad_norm

    def update_emas(self) -> None:
        for ema, module in self.emas.values():
            ema.update(self.unwrap(module))

    # -- data -----------------------------------------------------------------------
    def _dataloader(self) -> DataLoader:
        """A loader over the rest of the current data epoch (map-style datasets: from the
        saved position; iterable ones: a whole pass, see :meth:`_batches`)."""
        from diffdistill.data import collate

        ds = self.dataset
        # Its own generator: starting a DataLoader iterator draws worker seeds, which would
        # otherwise come from the global RNG at a different point of a resumed run than of an
        # uninterrupted one (and shift every later global draw, e.g. dropout masks).
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.rank)
        if isinstance(ds, torch.utils.data.IterableDataset):
            return DataLoader(ds, batch_size=self.cfg.train.batch_size, collate_fn=collate,
                              num_workers=self.cfg.data.num_workers, drop_last=True,
                              generator=gen)
        sampler = ShardedBatchSampler(len(ds), self.cfg.train.batch_size, self.rank, self.world,
                                      self.cfg.seed, start_batch=self.batches_consumed,
                                      one_epoch=True)
        self.data_epoch, self.epoch_batches = divmod(self.batches_consumed, sampler.per_epoch)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=collate,
                          num_workers=self.cfg.data.num_workers, generator=gen)

    def _batches(self) -> Iterator[dict]:
        """Training batches forever, epoch by epoch. Each epoch gets a fresh loader after
        ``dataset.set_epoch(epoch)`` (random crops and flips, shard order), so DataLoader
        workers see it too. A resumed iterable dataset (webdataset shards: no random access)
        replays the current epoch and drops the batches it had already given, so the run
        continues with exactly the batches an uninterrupted one would see."""
        ds = self.dataset
        iterable = isinstance(ds, torch.utils.data.IterableDataset)
        while True:
            loader = self._dataloader()  # map-style: sets data_epoch / epoch_batches
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(self.data_epoch)
            skip = self.epoch_batches if iterable else 0
            given = 0
            for i, batch in enumerate(loader):
                given += 1
                if i < skip:
                    continue
                self.batches_consumed += 1
                self.epoch_batches += 1
                yield _to_device(batch, self.device)
            if given == 0:
                raise RuntimeError(
                    f"a whole pass over the dataset ({type(ds).__name__}, epoch "
                    f"{self.data_epoch}) gave no batch of train.batch_size="
                    f"{self.cfg.train.batch_size} on process {self.rank}: add data or lower "
                    "train.batch_size")
            self.data_epoch += 1
            self.epoch_batches = 0

    # -- the loop -------------------------------------------------------------------
    def setup(self, resume: Optional[str] = None) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                probe = self.out / ".write-test"
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                raise ConfigError(f"output_dir {self.out} is not writable ({e.strerror or e}); "
                                  "choose another output_dir") from None
            save_config(self.cfg, self.out / "config.yaml")
        acc.wait_for_everyone()
        self.dataset = self.make_dataset()
        self.build()
        self._register_checkpoint_hooks()
        if resume:
            self.resume(resume)

    def fit(self, resume: Optional[str] = None) -> dict[str, float]:
        """Run training to ``train.max_steps``; returns the last logged line (each key's mean
        over the steps since the line before, see :class:`~.metrics_log.LogWindow`)."""
        from tqdm.auto import tqdm

        self.setup(resume)
        acc, t = self.accelerator, self.cfg.train
        logger = MetricsLogger(self.out, enabled=acc.is_main_process,
                               tensorboard=self.cfg.log.tensorboard, wandb=self.cfg.log.wandb,
                               console=not self.cfg.log.progress,
                               run_config=config_to_dict(self.cfg))
        bar = tqdm(total=t.max_steps, initial=self.global_step, desc=self.method,
                   disable=not (acc.is_main_process and self.cfg.log.progress), dynamic_ncols=True)
        batches = self._batches()
        beat = (Heartbeat(self.cfg.log.name or self.method, t.max_steps, self.cfg.log.heartbeat_s,
                          start_step=self.global_step)
                if self.cfg.log.heartbeat_s > 0 and acc.is_main_process else None)
        last: dict[str, float] = {}
        t0, steps0 = time.perf_counter(), self.global_step
        while self.global_step < t.max_steps:
            tick = time.perf_counter()
            self.log_window.add(self.train_iteration(batches))
            self.train_wall_s += time.perf_counter() - tick
            bar.update(1)
            if beat is not None:
                beat.tick(self.global_step)
            if self.global_step % self.cfg.log.every == 0 or self.global_step == t.max_steps:
                rate = (self.global_step - steps0) / max(time.perf_counter() - t0, 1e-9)
                last = {**self.log_window.pop(), "it_per_s": rate,
                        "nonfinite_total": self.nonfinite_total, "world_size": self.world}
                logger.log(self.global_step, last)
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(last.items())[:4]})
            if self.cfg.log.grid_every and self.global_step % self.cfg.log.grid_every == 0:
                self.save_grid()
            if self.cfg.eval.every and self.global_step % self.cfg.eval.every == 0:
                self.periodic_eval(logger)
            # No checkpoint inside a non-finite streak: "last good" must predate the trouble.
            if (t.checkpoint_every and self.global_step % t.checkpoint_every == 0
                    and self.nonfinite_in_row == 0):
                self.checkpoint()
        bar.close()
        self.verify_replicas()
        if t.checkpoint_every and (self.last_checkpoint is None or
                                   not self.last_checkpoint.name.endswith(f"-{self.global_step}")):
            self.checkpoint()
        acc.wait_for_everyone()
        self._gather_full_weights()  # a collective under FSDP: before the main-only export
        if acc.is_main_process:
            path = self.export(self.out / "export")
            if path:
                log.info("exported to %s", path)
        acc.wait_for_everyone()
        logger.close()
        return last

    def train_iteration(self, batches: Iterator[dict]) -> dict[str, float]:
        """One optimizer step of :meth:`fit`: ``train.grad_accum`` micro-batches through
        :meth:`train_step`, the step counter, the non-finite streak and the EMAs; returns the
        step's logs as floats. (``benchmarks/train_step.py`` times exactly this.)"""
        acc, t = self.accelerator, self.cfg.train
        self._skip_update = False
        logs: dict[str, float] = {}
        for self._micro in range(t.grad_accum):
            batch = next(batches)
            with self._sync_context(), acc.autocast():
                logs = self.train_step(batch)
        self.global_step += 1
        if self._skip_update:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            log.warning("non-finite loss at step %d (skipped; %d in a row)",
                        self.global_step, self.nonfinite_in_row)
            if self.nonfinite_in_row >= t.max_nonfinite_steps:
                good = self.last_checkpoint or "none (no checkpoint was written yet)"
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_row} consecutive non-finite losses at step "
                    f"{self.global_step}; stopping. Last good checkpoint: {good}. Lower "
                    "train.lr or use train.mixed_precision=bf16/no."
                )
        else:
            self.nonfinite_in_row = 0
            self.update_emas()
        return {k: float(v) for k, v in logs.items()}

    @torch.no_grad()
    def verify_replicas(self) -> None:
        """Every rank must hold identical trainable weights (DDP invariant); fail loudly if not.
        Not under FSDP, where each rank holds a different shard by design."""
        if self.world == 1 or self._is_fsdp():
            return
        for name, params in self.trainable.items():
            sig = torch.stack([p.detach().float().double().sum() for p in params]).sum()
            sig = torch.stack([sig, (torch.stack([p.detach().double().abs().sum()
                                                  for p in params]).sum())]).to(self.device)
            allsig = self.accelerator.gather(sig.reshape(1, 2))
            if not torch.equal(allsig, allsig[:1].expand_as(allsig)):
                raise RuntimeError(f"network {name!r} differs across processes: {allsig.tolist()}")

    def _sync_context(self):
        """Skip DDP gradient all-reduce on all but the last micro-batch."""
        if self.is_final_micro or self.world == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for name in self.optimizers:
            stack.enter_context(self.accelerator.no_sync(self.networks[name]))
        return stack

    def periodic_eval(self, logger: Optional["MetricsLogger"] = None) -> dict[str, float]:
        """The quick metric through the evaluation harness (every rank must call it)."""
        spec = self.eval_spec()
        if spec is None:
            return {}
        from diffdistill.eval.harness import quick_eval

        values = quick_eval(self, spec)
        if logger is not None:  # with the training time so far: convergence vs wall time
            logger.log(self.global_step, {**values, "train_wall_s": self.train_wall_s})
        return values

    def save_grid(self) -> Optional[Path]:
        from diffdistill.images import save_grid

        seeds = list(range(self.cfg.log.grid_size))
        imgs = self.sample_images(seeds)
        if imgs is None or not self.accelerator.is_main_process:
            return None
        path = self.out / "samples" / f"step-{self.global_step:07d}.png"
        save_grid(imgs, path)
        return path

    # -- checkpoints ----------------------------------------------------------------
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
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
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
        except OSError as e:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            prev = self.last_checkpoint or "none"
            raise OSError(f"writing checkpoint {final} failed ({e}); the previous checkpoint "
                          f"{prev} is intact") from e
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():  # re-writing a step (resumed from an older checkpoint)
                _discard(final)
            os.replace(tmp, final)  # atomic: "latest" is always complete
            for old in list_checkpoints(self.out)[:-self.cfg.train.keep_checkpoints]:
                _discard(old)
        acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

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

    def _damaged(self, path: Path, err: Exception) -> RuntimeError:
        others = [p for p in list_checkpoints(self.out) if p.name != path.name]
        hint = f", e.g. --resume {others[-1]}" if others else ""
        first = (str(err).splitlines() or [""])[0][:200]
        return RuntimeError(f"checkpoint {path} cannot be read ({type(err).__name__}: {first}); "
                            f"it is damaged or incomplete: resume from another checkpoint{hint}")

    def on_resume(self) -> None:
        """Hook for methods whose structure depends on restored state (e.g. stages)."""

    def _check_compatible(self, meta: dict, path: Path) -> None:
        if meta.get("method") != self.method:
            raise ConfigError(f"checkpoint {path} is from method {meta.get('method')!r}, "
                              f"not {self.method!r}")
        mine = config_to_dict(self.cfg)
        for key in self.resume_must_match:
            a, b = _dig(meta.get("config", {}), key), _dig(mine, key)
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


def _dig(d: dict, dotted: str):
    for p in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d
