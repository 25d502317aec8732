"""Exponential moving average of a module's trainable parameters (the evaluation EMA and
EMA targets of every trainer), and θ⁻ as a module backed by an EMA's shadow tensors."""

from __future__ import annotations

import copy
import itertools
from typing import Optional

import torch
from torch import nn


def warmed_up_decay(decay: float, step: int) -> float:
    """The EMA decay used at the ``step``-th update (1-based) with warm-up:
    min(decay, step / (step + 9)), i.e. (1 + s) / (10 + s) for s = step − 1 — the warm-up
    diffusers' ``EMAModel`` applies by default (0.1 at the first update, 0.5 at the ninth,
    0.99 at the 891st). Without it, a run shorter than ~1 / (1 − decay) steps exports an
    average still dominated by its initial weights."""
    if step < 1:
        raise ValueError(f"EMA updates count from 1, got {step}")
    return min(decay, step / (step + 9.0))


class EMA:
    """Exponential moving average of a module's trainable parameters (fp32 shadow).

    ``warmup``: the decay of the n-th update is :func:`warmed_up_decay` (decay, n) instead of
    ``decay`` (``train.ema_warmup``; only for evaluation / export EMAs — an EMA *target*'s
    rate is part of its method and keeps its configured value)."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = {n: params[n].detach().float().clone() for n in self.names}

    def decay_at(self, step: int) -> float:
        """The decay of the ``step``-th update (1-based)."""
        return warmed_up_decay(self.decay, step) if self.warmup else self.decay

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


def ema_backed_copy(module: nn.Module, ema: EMA, share_frozen: bool = False) -> nn.Module:
    """θ⁻ as a module whose parameters *are* the EMA shadow tensors: no extra copy, and the
    EMA's in-place updates (and its restore on resume) move θ⁻ with it.

    ``share_frozen``: the frozen parameters and the buffers are the module's own tensors, not
    copies (a LoRA student's θ⁻ then costs only its adapter; used by Hyper-SD)."""
    memo = {}
    if share_frozen:
        memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())
                if not t.requires_grad}
    target = copy.deepcopy(module, memo).requires_grad_(False)
    params = dict(target.named_parameters())
    for name in ema.names:
        params[name].data = ema.shadow[name]  # shares storage: EMA updates move θ⁻ in place
    return target
