"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall
Metric for Assessing Generative Models", sec. 3, Eq. 1–3).

Each feature set Φ estimates its manifold as the union of balls around its points, the radius
of the ball at φ being the distance to φ's k-th nearest neighbour in Φ (itself excluded):

    f(φ, Φ) = 1  if  ‖φ − φ'‖₂ ≤ ‖φ' − NN_k(φ', Φ)‖₂  for at least one φ' ∈ Φ,  else 0
    precision(Φ_r, Φ_g) = mean over φ_g ∈ Φ_g of f(φ_g, Φ_r)   (samples inside the real manifold)
    recall(Φ_r, Φ_g)    = mean over φ_r ∈ Φ_r of f(φ_r, Φ_g)   (real images inside the samples')

k = 3 as in the paper. Both numbers depend on the set sizes, so the bench compares equal-sized
sets (the first N reference images against N samples). A collapsed generator scores high
precision and low recall; an over-dispersed one the reverse. Distances are computed in float64,
a block of rows at a time (memory O(block · N)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_K = 3


def _blocks(n: int, block: int):
    for start in range(0, n, block):
        yield slice(start, min(start + block, n))


def knn_radii(feats: torch.Tensor, k: int = DEFAULT_K, block: int = 1024) -> torch.Tensor:
    """Distance from every row of ``feats`` to its k-th nearest other row."""
    x = feats.to(torch.float64)
    if k < 1 or k >= len(x):
        raise ValueError(f"k={k} needs 1 <= k < the set size ({len(x)})")
    out = torch.empty(len(x), dtype=torch.float64, device=x.device)
    for sl in _blocks(len(x), block):
        d = torch.cdist(x[sl], x)
        # the row's own distance (0) is its smallest, so the k-th neighbour is the (k+1)-th
        idx = torch.arange(sl.start, sl.stop, device=x.device)
        d[torch.arange(len(idx), device=x.device), idx] = -1.0
        out[sl] = torch.kthvalue(d, k + 1, dim=1).values
    return out


def manifold_coverage(query: torch.Tensor, ref: torch.Tensor, ref_radii: torch.Tensor,
                      block: int = 1024) -> float:
    """Fraction of ``query`` rows inside at least one ball (centre ``ref[j]``, radius
    ``ref_radii[j]``): Eq. 1 averaged over the query set."""
    q, r = query.to(torch.float64), ref.to(torch.float64)
    inside = 0
    for sl in _blocks(len(q), block):
        inside += int((torch.cdist(q[sl], r) <= ref_radii[None, :]).any(dim=1).sum())
    return inside / max(len(q), 1)


@dataclass
class PrecisionRecall:
    precision: float
    recall: float
    k: int
    count: int  # rows of each set


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = DEFAULT_K,
                     block: int = 1024) -> PrecisionRecall:
    """Improved precision / recall of ``fake`` features against ``real`` (equal counts)."""
    if len(real) != len(fake):
        raise ValueError(f"precision/recall compares equal-sized sets ({len(real)} real vs "
                         f"{len(fake)} generated)")
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"feature shapes differ: {tuple(real.shape)} vs {tuple(fake.shape)}")
    device = fake.device
    real = real.to(device)
    p = manifold_coverage(fake, real, knn_radii(real, k, block), block)
    r = manifold_coverage(real, fake, knn_radii(fake, k, block), block)
    return PrecisionRecall(precision=p, recall=r, k=k, count=len(real))
