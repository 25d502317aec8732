"""How a trainer runs under accelerate's FSDP and DeepSpeed: what is refused before any model
loads, gathering full weights for the export, DeepSpeed's micro-batch size (a mixin of
:class:`~diffdistill.trainers.base.Trainer`)."""

from __future__ import annotations

from typing import Optional

from diffdistill.config import ConfigError


class ShardingMixin:
    def _is_deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return getattr(self.accelerator, "distributed_type", None) == DistributedType.DEEPSPEED

    def _is_fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return getattr(self.accelerator, "distributed_type", None) == DistributedType.FSDP

    def _enable_cpu_fsdp(self) -> None:
        """FSDP2 on CPU processes. accelerate (1.15) shards only on accelerators: launched with an
        FSDP config on CPU it silently runs plain data parallelism. PyTorch's FSDP2
        (``fully_shard``) itself runs on CPU over gloo, so when ``accelerate launch`` asked for
        FSDP (``ACCELERATE_USE_FSDP``) and the processes are CPU ones, accelerate's shared state
        is switched to FSDP with the launch's plugin — what makes sharded training testable
        without a GPU (``configs/accelerate/cpu_fsdp2.yaml``). FSDP1 needs CUDA: refused."""
        import os

        from accelerate import FullyShardedDataParallelPlugin
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType

        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
            return
        if getattr(self.accelerator, "distributed_type", None) != DistributedType.MULTI_CPU:
            return
        plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* variables
        if plugin.fsdp_version != 2:
            raise ConfigError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate "
                              "config (FSDP1 is CUDA-only); see configs/accelerate/cpu_fsdp2.yaml")
        PartialState().distributed_type = DistributedType.FSDP
        state = AcceleratorState()
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin

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
