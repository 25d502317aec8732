"""Improved precision / recall (Kynkäänniemi et al. 2019) against a direct computation with
explicit loops, and on constructed cases whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
from diffdistill.eval.precision_recall import knn_radii, manifold_coverage, precision_recall


def _direct(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    """Eq. 1-3 of the paper, one pair of points at a time."""
    def dist(a, b):
        return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))

    def radii(points):
        out = []
        for i, p in enumerate(points):
            ds = sorted(dist(p, q) for j, q in enumerate(points) if j != i)
            out.append(ds[k - 1])
        return out

    def inside(q, points, rad):
        return any(dist(q, p) <= r for p, r in zip(points, rad))

    r_real, r_fake = radii(real), radii(fake)
    precision = sum(inside(f, real, r_real) for f in fake) / len(fake)
    recall = sum(inside(r, fake, r_fake) for r in real) / len(real)
    return precision, recall


@pytest.mark.parametrize("k", [1, 3])
def test_matches_a_direct_computation(k):
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 5, generator=g)
    fake = torch.randn(40, 5, generator=g) * 1.3 + 0.4
    pr = precision_recall(real, fake, k=k, block=7)  # blocks that do not divide 40
    p, r = _direct(real.tolist(), fake.tolist(), k)
    assert (pr.precision, pr.recall) == (p, r)
    assert 0 < pr.precision < 1 and 0 < pr.recall < 1  # a case that tests something
    direct_radii = sorted(torch.cdist(real.double(), real.double())[0])[k]
    assert float(knn_radii(real, k)[0]) == pytest.approx(float(direct_radii), rel=1e-12)


def test_identical_sets_score_one():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    pr = precision_recall(x, x.clone())
    assert (pr.precision, pr.recall, pr.k, pr.count) == (1.0, 1.0, 3, 50)


def test_a_collapsed_generator_has_high_precision_and_low_recall():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(200, 4, generator=g)
    collapsed = real[:1] + 0.01 * torch.randn(200, 4, generator=g)  # one mode, tiny spread
    pr = precision_recall(real, collapsed)
    assert pr.precision == 1.0 and pr.recall < 0.05


def test_an_overdispersed_generator_has_low_precision_and_high_recall():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(200, 2, generator=g)
    wide = torch.randn(200, 2, generator=g) * 6.0
    pr = precision_recall(real, wide)
    assert pr.precision < 0.3 and pr.recall > 0.9


def test_disjoint_sets_score_zero():
    g = torch.Generator().manual_seed(4)
    real = torch.randn(30, 3, generator=g)
    pr = precision_recall(real, real + 100.0)
    assert (pr.precision, pr.recall) == (0.0, 0.0)


def test_boundary_point_counts_as_inside():
    # ref points 0, 1, 3 on a line, k = 1: radii 1, 1, 2; the ball of 3 reaches 1 and 5
    ref = torch.tensor([[0.0], [1.0], [3.0]])
    radii = knn_radii(ref, 1)
    assert radii.tolist() == [1.0, 1.0, 2.0]
    assert manifold_coverage(torch.tensor([[5.0], [5.001], [-1.0]]), ref, radii) == 2 / 3


def test_bad_inputs():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="equal-sized"):
        precision_recall(x, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="feature shapes"):
        precision_recall(x, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="k=4"):
        knn_radii(x, 4)
