import math

import pytest
import torch

from diffdistill import losses as L


def test_pseudo_huber_formula_and_limits():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    c = L.ict_huber_c(x)
    assert c == pytest.approx(0.00054 * math.sqrt(192))
    expect = torch.sqrt(((x - y) ** 2).sum(dim=(1, 2, 3)) + c * c) - c
    assert torch.allclose(L.pseudo_huber(x, y), expect)
    assert torch.allclose(L.pseudo_huber(x, x), torch.zeros(3))
    # far from 0 it is ~ the L2 norm; near 0 ~ squared / (2c)
    assert float(L.pseudo_huber(x * 100, y * 0)[0]) == pytest.approx(
        float((x[0] * 100).norm()), rel=1e-4)
    small = y + 1e-2
    assert float(L.pseudo_huber(small, y, c=1.0)[0]) == pytest.approx(
        (1e-2) ** 2 * 192 / 2, rel=1e-2)


def test_elementwise_huber_and_l2():
    x, y = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    assert float(L.elementwise_huber(x, y, c=1.0)) == pytest.approx(
        ((math.sqrt(10) - 1) + 0) / 2)
    assert float(L.l2(x, y)) == pytest.approx(4.5)


def test_dmd_gradient_by_autograd_equals_normalised_direction():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 4, generator=g, requires_grad=True)
    real, fake = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    loss = L.dmd_loss(x, real, fake).mean()
    loss.backward()
    p_real, p_fake = x.detach() - real, x.detach() - fake
    norm = p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    expect = (p_real - p_fake) / norm / (x[0].numel() * 2)  # d/dx of mean over B*D, ½·2
    assert torch.allclose(x.grad, expect, atol=1e-7)
    # weighting scales each sample's gradient
    x.grad = None
    w = torch.tensor([2.0, 0.5])
    L.dmd_loss(x, real, fake, weight=w).mean().backward()
    assert torch.allclose(x.grad, expect * w.reshape(-1, 1, 1, 1), atol=1e-7)


def test_gan_losses():
    lr, lf = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -2.0])
    gen = L.gan_generator_loss(lf)
    assert torch.allclose(gen, torch.log1p(torch.exp(-lf)))
    dr, df = L.gan_discriminator_loss(lr, lf)
    assert torch.allclose(dr, torch.log1p(torch.exp(-lr)))
    assert torch.allclose(df, torch.log1p(torch.exp(lf)))
    assert float(dr[0]) == pytest.approx(math.log(2))


@pytest.mark.parametrize("name, fn", [
    ("rkl", lambda r: 1.0), ("kl", lambda r: r), ("js", lambda r: r / (1 + r)),
    ("srkl", lambda r: 1 / (1 + r)), ("sh", lambda r: math.sqrt(r)),
    ("jeffreys", lambda r: 1 + r), ("neyman", lambda r: 1 / r),
])
def test_f_weights(name, fn):
    r = torch.tensor([0.1, 0.5, 1.0, 3.0, 20.0])
    got = L.f_weight(name, r)
    assert torch.allclose(got, torch.tensor([fn(float(v)) for v in r]), atol=1e-6)


def test_density_ratio_clamps():
    r = L.density_ratio(torch.tensor([-50.0, -1.0, 0.0, 1.0, 50.0]))
    assert torch.allclose(r, torch.tensor([0.1, math.exp(-1), 1.0, math.e, 20.0]))
    with pytest.raises(ValueError, match="js"):
        L.f_weight("wasserstein", r)
