"""Trajectory segments of TSCD (Hyper-SD, Ren et al. 2024, Sec. 3.1): the segment edges, which
segment a time falls in, the within-segment DDIM jump and the k-step reward chain."""

from __future__ import annotations

import torch

from diffdistill.denoiser import Prediction

Tensor = torch.Tensor


def segment_edges(num_segments: int, num_ddim_timesteps: int = 50,
                  num_train_timesteps: int = 1000) -> Tensor:
    """Lower segment edges s_0 = 0 < … < s_{k−1} (ascending float64; see the module doc).

    s_1 … s_{k−1} are the stock k-step TCD grid without its first entry: the solver-grid
    points nearest below the multiples of T/k, and where a k-step TCD chain lands.
    """
    from diffdistill.sampling import tcd_timesteps

    tops = tcd_timesteps(num_segments, num_ddim_timesteps, num_train_timesteps=num_train_timesteps)
    return torch.cat([torch.zeros(1, dtype=torch.float64), tops[1:].flip(0).double()])


def segment_index(t: Tensor, edges: Tensor) -> Tensor:
    """i with s_i < t ≤ s_{i+1} (s_k = ∞); t ≤ 0 → 0. A time on an edge is in the segment below."""
    t = torch.as_tensor(t, dtype=torch.float64).cpu()
    return (torch.searchsorted(edges, t, right=False) - 1).clamp(min=0)


def segment_jump(pred: Prediction, schedule, x: Tensor, t, s) -> Tensor:
    """f(x_t, t; s) = α_s x0̂ + σ_s ε̂ (DDIM jump t → s), exactly x where t = s."""
    from diffdistill.sampling import ddim_solver_step

    out = ddim_solver_step(pred, schedule, t, s)
    t = torch.as_tensor(t, dtype=torch.float64).cpu().flatten()
    s = torch.as_tensor(s, dtype=torch.float64).cpu().flatten()
    same = (t == s).expand(out.shape[0]).to(out.device).reshape((-1,) + (1,) * (out.ndim - 1))
    return torch.where(same, x.to(out.dtype), out)


def reward_chain(num_segments: int, num_ddim_timesteps: int = 50,
                 num_train_timesteps: int = 1000) -> Tensor:
    """The k-step chain c_0 = T−1 > s_{k−1} > … > s_1 (the k-step TCD grid; float64)."""
    from diffdistill.sampling import tcd_timesteps

    return tcd_timesteps(num_segments, num_ddim_timesteps,
                         num_train_timesteps=num_train_timesteps).double()
