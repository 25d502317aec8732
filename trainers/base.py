"""The Trainer every method subclasses: accelerate, named optimizers, EMA, checkpoints, logging.

A method defines :meth:`Trainer.build` (load networks, register optimizers / EMAs) and
:meth:`Trainer.train_step` (one micro-batch → a dict of logged scalars), calling
``self.step("generator", loss)`` for each named optimizer it updates. Everything else —
mixed precision, gradient accumulation and clipping, non-finite-loss handling, atomic
checkpoints with exact resume (:mod:`.checkpointing`), FSDP / DeepSpeed policy (:mod:`.sharding`),
logging, sample grids and the final export — lives here.

Exact resume: all randomness a method draws goes through ``self.generator`` (one CPU
``torch.Generator`` per process, saved in the checkpoint), the data order is a pure function
of (seed, epoch, position) and the position is saved, and accelerate saves optimizer and
scheduler states. A run cut at step k and resumed continues bit-identically on CPU.

Checkpoints: ``OUTPUT_DIR/checkpoints/checkpoint-<step>`` written to a temporary folder,
fsynced and renamed when complete (the rename is atomic), so "latest" is never half-written;
the export is replaced the same way. Only trainable parameters are saved (a LoRA checkpoint
holds the adapter, not the base model).

The ways real runs end (``docs/reliability.md``): :meth:`Trainer.fit` holds the folder's lock
and refuses to mix into another run's files (:mod:`.run_guard`); SIGTERM / SIGINT stop it
after the current step with a checkpoint (:mod:`.stopping`); a failed checkpoint or export
write (a full disk) leaves the previous one intact and stops every rank with one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from diffdistill.config import BaseConfig, ConfigError, config_to_dict, save_config
from diffdistill.errors import RunError, TrainingStopped

from .batches import ShardedBatchSampler, _to_device
from .checkpointing import CheckpointMixin
from .ema import EMA
from .metrics_log import Heartbeat, LogWindow, MetricsLogger
from .run_guard import agree, guard_output_dir
from .sharding import ShardingMixin
from .stopping import StopSignals

log = logging.getLogger("diffdistill.train")

class NonFiniteLossError(RunError):
    """Too many non-finite losses in a row: the run stops, naming the last good checkpoint."""


# ----------------------------------------------------------------------------- helpers


# ----------------------------------------------------------------------------- trainer


class Trainer(ShardingMixin, CheckpointMixin):
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
        self._enable_cpu_fsdp()
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
        self.compiled_networks: list[str] = []  # train.compile: the attribute paths compiled

    # -- to implement ---------------------------------------------------------------
    def build(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement build()")

    def train_step(self, batch: dict) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement train_step()")

    def export(self, out_dir: Path) -> Optional[Path]:
        """Write the final generator (LoRA or full) into ``out_dir``; None if nothing to do."""
        return None

    def eval_spec(self, unet: Optional[nn.Module] = None):
        """The generator as the evaluation harness samples it — sampler, step grid, guidance:
        a :class:`diffdistill.eval.eval_model.EvalModel`, or None (nothing to sample). The
        periodic metric, the sample grid (:meth:`sample_images`) and the export's sampling
        record all describe this one generator. ``unet``: the generator network when the
        caller already holds it (an export: under FSDP a rebuild gathers full weights)."""
        return None

    def grid_step_counts(self) -> list[int]:
        """The step counts of the sample grid's rows (``log.grid_steps``)."""
        return [self.cfg.log.grid_steps]

    def grid_spec(self):
        """What the sample grid draws: :meth:`eval_spec` (pretraining: its own guidance)."""
        return self.eval_spec()

    def sample_images(self, seeds: list[int]) -> Optional[torch.Tensor]:
        """uint8 NCHW samples for the periodic grid: :meth:`grid_spec` at each of
        :meth:`grid_step_counts`, sample i from seed ``seeds[i]`` with prompt i, the rows one
        after another (None: no grid)."""
        spec = self.grid_spec()
        if spec is None:
            return None
        unet = self.generator_unet()
        was_training = unet.training
        unet.eval()
        try:
            return torch.cat([spec.sample(seeds, n, resolution=self.cfg.data.resolution)
                              for n in self.grid_step_counts()])
        finally:
            unet.train(was_training)

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
        # the optimizer's own parameters: FSDP2 replaces the module's with sharded DTensors
        # (and accelerate moves the optimizer onto them); elsewhere these are ``params``
        self.trainable[name] = [p for group in opt.param_groups for p in group["params"]]
        return module

    def add_ema(self, name: str, module: nn.Module, decay: float, warmup: bool = False) -> EMA:
        ema = EMA(self.unwrap(module), decay, warmup=warmup)
        self.emas[name] = (ema, module)
        return ema

    def add_eval_ema(self, name: str, module: nn.Module) -> Optional[EMA]:
        """The evaluation / export EMA of ``module`` (``train.ema_decay``, with
        ``train.ema_warmup``); None when ``train.ema_decay`` is 0."""
        t = self.cfg.train
        if t.ema_decay <= 0:
            return None
        return self.add_ema(name, module, t.ema_decay, warmup=t.ema_warmup)

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
            ema.update(self.unwrap(module), ema.decay_at(self.global_step))

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
                raise RunError(
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
        if self.cfg.train.compile and (self._is_fsdp() or self._is_deepspeed()):
            raise ConfigError("train.compile=true under FSDP / DeepSpeed has not run in this "
                              "toolkit yet: use configs/accelerate/multi_gpu.yaml (DDP) or "
                              "train.compile=false")
        self.dataset = self.make_dataset()
        self.build()
        if self.cfg.train.compile:
            from .compiling import compile_networks

            self.compiled_networks = compile_networks(self, self.unwrap)
            log.info("train.compile: compiled %s", ", ".join(self.compiled_networks))
        self._register_checkpoint_hooks()
        if resume:
            self.resume(resume)

    def fit(self, resume: Optional[str] = None, overwrite: bool = False) -> dict[str, float]:
        """Run training to ``train.max_steps``; returns the last logged line (each key's mean
        over the steps since the line before, see :class:`~.metrics_log.LogWindow`).

        ``resume``: "latest" or a checkpoint folder. The run holds ``output_dir``'s lock and
        refuses a folder holding another run unless ``overwrite`` (old files moved to
        ``previous-<time>/``), see :mod:`.run_guard`. A first SIGTERM / SIGINT ends it after
        the current step with a checkpoint and :class:`~diffdistill.errors.TrainingStopped`.
        """
        stop = StopSignals().install()
        try:
            with guard_output_dir(self.accelerator, self.out, resume=resume,
                                  overwrite=overwrite):
                self.setup(resume)
                return self._train(stop)
        except TrainingStopped:
            self.accelerator.wait_for_everyone()  # no rank exits before the lock is released
            raise
        finally:
            stop.restore()

    def _train(self, stop: StopSignals) -> dict[str, float]:
        from tqdm.auto import tqdm

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
        if stop.requested(acc):  # during start-up: nothing new to save
            self._stop(stop, logger, bar)
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
            if self.global_step < t.max_steps and stop.requested(acc):
                self._stop(stop, logger, bar)
        bar.close()
        self.verify_replicas()
        if t.checkpoint_every and (self.last_checkpoint is None or
                                   not self.last_checkpoint.name.endswith(f"-{self.global_step}")):
            self.checkpoint()
        acc.wait_for_everyone()
        self._gather_full_weights()  # a collective under FSDP: before the main-only export
        error = None
        if acc.is_main_process:
            try:
                path = self.write_export(self.out / "export")
                if path:
                    log.info("exported to %s", path)
            except Exception as e:  # noqa: BLE001 - every rank must hear of it
                error = e
        logger.close()
        agree(acc, error)
        return last

    def write_export(self, out_dir: Path) -> Optional[Path]:
        """:meth:`export` into a temporary folder swapped in when complete: a failed write (a
        full disk) leaves the previous export intact and raises a one-line RunError."""
        from diffdistill.atomic import describe_write_error, write_folder_atomically

        try:
            return write_folder_atomically(Path(out_dir), self.export)
        except (ConfigError, RunError):
            raise
        except Exception as e:
            ckpt = self.last_checkpoint
            redo = (f"; the trained weights are in {ckpt}: export them again with "
                    f"'diffdistill export {self.out}'" if ckpt else "")
            raise RunError(f"writing the export {out_dir} failed "
                           f"({describe_write_error(e, Path(out_dir))}); the previous export, "
                           f"if any, is intact{redo}") from e

    def _stop(self, stop: StopSignals, logger: MetricsLogger, bar) -> None:
        """A stop signal reached some process: checkpoint this step (unless it is already,
        or a non-finite streak is under way) and raise TrainingStopped on every rank."""
        bar.close()
        saved = self.last_checkpoint is not None and \
            self.last_checkpoint.name.endswith(f"-{self.global_step}")
        if not saved and self.global_step > 0 and self.nonfinite_in_row == 0:
            self.checkpoint()
        logger.close()
        ckpt = self.last_checkpoint
        where = (f"checkpoint {ckpt}; continue with --resume latest" if ckpt else
                 "no checkpoint (nothing trained yet); start again to train")
        raise TrainingStopped(
            f"stopped by {stop.name()} after step {self.global_step} of "
            f"{self.cfg.train.max_steps}: {where}",
            checkpoint=str(ckpt) if ckpt else None, step=self.global_step,
            main_process=self.accelerator.is_main_process)

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
        values: dict[str, float] = {}
        if spec is not None:
            from diffdistill.eval.harness import quick_eval

            values.update(quick_eval(self, spec))
        values.update(self.eval_diagnostics())
        if not values:
            return {}
        if logger is not None:  # with the training time so far: convergence vs wall time
            logger.log(self.global_step, {**values, "train_wall_s": self.train_wall_s})
        return values

    def eval_diagnostics(self) -> dict[str, float]:
        """Method-specific measures logged with the periodic metric (e.g. a discriminator's
        held-out AUC); they must not draw from ``self.generator``. Default: none."""
        return {}

    def save_grid(self) -> Optional[Path]:
        from diffdistill.images import save_grid

        seeds = list(range(self.cfg.log.grid_size))
        imgs = self.sample_images(seeds)
        if imgs is None or not self.accelerator.is_main_process:
            return None
        path = self.out / "samples" / f"step-{self.global_step:07d}.png"
        save_grid(imgs, path)
        return path
