"""DMD2 on tiny models of every supported structure (CPU): the loss against its formula, the
update schedule, the GAN head's hook, backward simulation, few-step runs and exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffdistill.trainers.checkpointing import list_checkpoints
from diffdistill.trainers.dmd2 import DMD2Config, DMD2Trainer, lcm_original_steps
from safetensors.torch import load_file

from diffdistill.config import ConfigError, build_config, deep_merge, load_yaml

ROOT = Path(__file__).resolve().parents[1]
from helpers import tiny_run_data  # noqa: E402

FOUR = [999, 749, 499, 249]


def make_cfg(model_dir, out, res, cls=DMD2Config, method="dmd2", **over):
    data = tiny_run_data(method, model_dir, out, res,
                         dmd2={"fake_updates_per_generator_update": 2})
    return build_config(cls, deep_merge(data, over))


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def fit(model_dir, out, res, trainer=DMD2Trainer, **over):
    tr = trainer(make_cfg(model_dir, out, res, cls=trainer.config_class, method=trainer.method,
                          **over))
    tr.fit()
    return tr


def ready(model_dir, out, res, trainer=DMD2Trainer, **over):
    tr = trainer(make_cfg(model_dir, out, res, cls=trainer.config_class, method=trainer.method,
                          **over))
    tr.setup()
    return tr, next(tr._batches())


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ----------------------------------------------------------------------------- the DM loss


def test_dm_loss_gradient_is_the_normalised_score_difference(sd_v_dir, tmp_path):
    """v-prediction teacher, CFG 1.75: autograd's dL/dx equals −(x0̂_real − x0̂_fake) /
    mean|x − x0̂_real| / (B·D), with x0̂ computed here from bare UNet calls."""
    tr, batch = ready(sd_v_dir, tmp_path / "g", 32, dmd2={
        "guidance_scale": 1.75, "gan_generator_weight": 0.0, "gan_discriminator_weight": 0.0})
    fake_unet = tr.unwrap(tr.fake_score).unet
    with torch.no_grad():  # make the fake score differ from the teacher
        for p in fake_unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    cond = tr.cond_for_batch(batch, with_uncond=True)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
    tr.generator.manual_seed(42)
    loss, _ = tr.distribution_matching_loss(x, cond)
    loss.backward()

    # the same draws, made here
    g = torch.Generator().manual_seed(42)
    t = torch.randint(20, 981, (2,), generator=g)
    noise = torch.randn(2, 4, 16, 16, generator=g)
    acp = tr.backbone.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    a, s = acp.sqrt().float(), (1 - acp).sqrt().float()
    x_t = a * x.detach() + s * noise

    def x0_of(unet, ehs):
        with torch.no_grad():
            v = unet(x_t, t.float(), encoder_hidden_states=ehs).sample
        return a * x_t - s * v

    ehs, uehs = cond.encoder_hidden_states, cond.uncond.encoder_hidden_states
    x0_c, x0_u = x0_of(tr.real_unet, ehs), x0_of(tr.real_unet, uehs)
    x0_real = x0_u + 1.75 * (x0_c - x0_u)
    x0_fake = x0_of(fake_unet, ehs)
    norm = (x.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = -(x0_real - x0_fake) / norm / x[0].numel() / 2
    assert float(expected.abs().max()) > 0
    assert rel_err(x.grad, expected) < 1e-4
    assert 20 <= int(t.min()) and int(t.max()) <= 980  # t ~ U[0.02T, 0.98T]


@pytest.mark.parametrize("fake_timesteps, t_range", [("dm", (20, 981)), ("all", (0, 1000))])
def test_fake_score_trains_on_the_teachers_own_target(fake_timesteps, t_range, sd_v_dir,
                                                      tmp_path):
    """The fake score's loss is the plain v-prediction MSE on detached generator samples, at
    t from the DM range or, with fake_timesteps=all, from U{0..T−1} (DMD2's code)."""
    tr, batch = ready(sd_v_dir, tmp_path / "f", 32, dmd2={
        "gan_generator_weight": 0.0, "gan_discriminator_weight": 0.0,
        "fake_timesteps": fake_timesteps})
    cond = tr.cond_for_batch(batch)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    tr.generator.manual_seed(5)
    loss, _ = tr.fake_score_loss(x, cond, None)
    g = torch.Generator().manual_seed(5)
    t = torch.randint(*t_range, (2,), generator=g)
    noise = torch.randn(2, 4, 16, 16, generator=g)
    acp = tr.backbone.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    a, s = acp.sqrt().float(), (1 - acp).sqrt().float()
    with torch.no_grad():
        v_hat = tr.unwrap(tr.fake_score).unet(a * x + s * noise, t.float(),
                                              encoder_hidden_states=cond.encoder_hidden_states
                                              ).sample
    expected = (v_hat - (a * noise - s * x)).pow(2).mean()
    assert abs(float(loss.detach()) - float(expected)) < 1e-5 * float(expected)


def test_discriminator_sees_real_as_real_and_generated_as_fake(pixel_dir, tmp_path):
    """The batched fake-score forward's halves: loss_D = softplus(−D(x_real,t)) +
    softplus(D(x_gen,t)), checked against two separate forwards of UNet + head (swapped halves
    would give softplus(−D(x_gen)) + softplus(D(x_real)), a different number here)."""
    import torch.nn.functional as F

    tr, batch = ready(pixel_dir, tmp_path / "d", 16)
    cond = tr.cond_for_batch(batch)
    x_gen = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    x_real = tr.encode_x0(batch)
    tr.generator.manual_seed(11)
    _, logs = tr.fake_score_loss(x_gen, cond, x_real)
    g = torch.Generator().manual_seed(11)
    t = torch.randint(20, 981, (2,), generator=g)
    n_gen, n_real = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    sched = tr.backbone.schedule
    fake = tr.unwrap(tr.fake_score)

    def logits(x0, noise):
        with torch.no_grad():
            fake(sched.add_noise(x0, noise, t), t.float(), class_labels=cond.class_labels)
        return fake.logits

    d_gen, d_real = logits(x_gen, n_gen), logits(x_real, n_real)
    expected = F.softplus(-d_real).mean() + F.softplus(d_gen).mean()
    swapped = F.softplus(-d_gen).mean() + F.softplus(d_real).mean()
    assert abs(float(expected - swapped)) > 1e-4
    assert float(logs["loss_gan_discriminator"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(logs["d_real"]) == pytest.approx(float(d_real.mean()), rel=1e-5, abs=1e-6)


def test_roc_auc_is_the_mann_whitney_statistic():
    from diffdistill.gan import roc_auc

    # by hand: of the 9 (real, fake) pairs, 3>0, 3>2, 1>0, 2>0 win and 2=2 ties: 4.5 / 9
    assert roc_auc(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0.0, 2.0, 5.0])) == 0.5
    assert roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0, 1.5])) == 1.0
    assert roc_auc(torch.tensor([0.0]), torch.tensor([1.0, 2.0])) == 0.0
    # 1 beats 0; 4 beats 2, 3 and 0: 4 of 6 pairs
    assert roc_auc(torch.tensor([1.0, 4.0]), torch.tensor([2.0, 3.0, 0.0])) == 4 / 6
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randint(0, 5, (40,), generator=g), torch.randint(0, 5, (30,), generator=g)
    wins = sum((r > f) + 0.5 * (r == f) for r in real.tolist() for f in fake.tolist())
    assert roc_auc(real.float(), fake.float()) == pytest.approx(wins / 1200, abs=1e-12)
    with pytest.raises(ValueError):
        roc_auc(torch.tensor([]), torch.tensor([1.0]))


def test_discriminator_probe_is_the_heads_auc_and_leaves_training_unchanged(pixel_dir,
                                                                           tmp_path):
    """eval/d_auc: the head's logits on the fixed probe (the dataset's last items vs the online
    generator's samples from fixed seeds, pair i noised at the same t_i) recomputed by two
    separate forwards; a run that logs it trains bit-identically to one that does not."""
    from diffdistill.gan import roc_auc
    from diffdistill.sampling import generate

    class NoQuickEval(DMD2Trainer):
        def eval_spec(self, unet=None):
            return None if unet is None else super().eval_spec(unet)

    probe = {"dmd2": {"d_probe_samples": 6}, "eval": {"every": 1}}
    tr = fit(pixel_dir, tmp_path / "probe", 16, trainer=NoQuickEval, **probe)
    rows = [r for r in metrics(tmp_path / "probe") if "eval/d_auc" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0.0 <= r["eval/d_auc"] <= 1.0 for r in rows)
    # the number, by hand
    p = tr._d_probe
    ds = tr.dataset
    assert torch.equal(p["x_real"], torch.stack([ds[i]["pixel_values"]
                                                 for i in range(len(ds) - 6, len(ds))]))
    x_fake = generate(tr.generator_denoiser(tr.student), seeds=p["seeds"], shape=tr.shape,
                      cond_fn=p["cond"].index, sampler="lcm",
                      timesteps=torch.tensor(tr.timesteps), output="latents", progress=False)
    sched, fake, t = tr.backbone.schedule, tr.unwrap(tr.fake_score), p["t"]

    def logits(x0, noise):
        with torch.no_grad():
            fake(sched.add_noise(x0, noise, t), t.float(), class_labels=p["cond"].class_labels)
        return fake.logits

    d_real, d_fake = logits(p["x_real"], p["noise_real"]), logits(x_fake, p["noise_fake"])
    got = tr.eval_diagnostics()
    assert got["eval/d_auc"] == pytest.approx(roc_auc(d_real, d_fake), abs=1e-12)
    assert got["eval/d_logit_real"] == pytest.approx(float(d_real.mean()), rel=1e-5, abs=1e-6)
    assert got["eval/d_auc"] == pytest.approx(rows[-1]["eval/d_auc"], abs=1e-12)
    # logging the probe draws nothing from the run's randomness
    plain = fit(pixel_dir, tmp_path / "plain", 16, trainer=NoQuickEval,
                dmd2={"d_probe_samples": 0}, eval={"every": 1})
    assert not any("eval/d_auc" in r for r in metrics(tmp_path / "plain"))
    for a, b in zip(tr.unwrap(tr.student).parameters(), plain.unwrap(plain.student).parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="d_probe_samples"):
        make_cfg(pixel_dir, tmp_path / "bad", 16, dmd2={"d_probe_samples": 1})


# ----------------------------------------------------------------------------- update order


def _adam_steps(tr, name):
    opt = tr.optimizers[name]
    return {int(st["step"]) for st in opt.state.values()}


def test_ttur_schedule_and_resume_phase(pixel_dir, tmp_path):
    over = dict(train={"max_steps": 5, "checkpoint_every": 3},
                dmd2={"fake_updates_per_generator_update": 2})
    a = fit(pixel_dir, tmp_path / "a", 16, **over)
    assert _adam_steps(a, "generator") == {3}  # global steps 0, 2, 4
    assert _adam_steps(a, "fake_score") == {5}  # every step
    gen_rows = [r["step"] for r in metrics(tmp_path / "a") if "loss_dm" in r]
    assert gen_rows == [1, 3, 5]
    # cut at 3 and resume: the generator phase follows the global step, not the restart
    b_out = tmp_path / "b"
    fit(pixel_dir, b_out, 16, **deep_merge(over, {"train": {"max_steps": 3}}))
    b = DMD2Trainer(make_cfg(pixel_dir, b_out, 16, **over))
    b.fit(resume="latest")
    assert _adam_steps(b, "generator") == {3} and _adam_steps(b, "fake_score") == {5}
    assert [r["step"] for r in metrics(b_out) if "loss_dm" in r] == [1, 3, 5]
    assert [r.get("loss_fake") for r in metrics(b_out)] == [r.get("loss_fake")
                                                             for r in metrics(tmp_path / "a")]
    ca, cb = list_checkpoints(tmp_path / "a")[-1], list_checkpoints(b_out)[-1]
    for f in ("model.safetensors", "model_1.safetensors"):  # generator, fake score + head
        wa, wb = load_file(str(ca / f)), load_file(str(cb / f))
        assert len(wa) > 10 and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_generator_weights_move_only_on_generator_steps(pixel_dir, tmp_path):
    tr, batch = ready(pixel_dir, tmp_path / "o", 16,
                      dmd2={"fake_updates_per_generator_update": 3})
    gen = [p.detach().clone() for p in tr.trainable["generator"]]
    fake = [p.detach().clone() for p in tr.trainable["fake_score"]]
    for step in range(3):
        tr.global_step = step
        tr.train_step(batch)
        gen_moved = any(not torch.equal(a, b) for a, b in zip(gen, tr.trainable["generator"]))
        fake_moved = any(not torch.equal(a, b) for a, b in zip(fake, tr.trainable["fake_score"]))
        assert gen_moved == (step == 0) and fake_moved
        gen = [p.detach().clone() for p in tr.trainable["generator"]]
        fake = [p.detach().clone() for p in tr.trainable["fake_score"]]


# ----------------------------------------------------------------------------- GAN head


def _mid_block_by_hand(unet, x, t, labels):
    """UNet2DModel's bottleneck computed step by step from its parts (no hooks)."""
    temb = unet.time_embedding(unet.time_proj(t * torch.ones(x.shape[0])).to(x.dtype))
    emb = temb + unet.class_embedding(labels)
    h = unet.conv_in(x)
    for block in unet.down_blocks:
        h, _ = block(hidden_states=h, temb=emb)
    return unet.mid_block(h, emb)


def test_gan_head_sees_the_hooked_bottleneck(pixel_dir):
    from diffdistill.backbone import load_backbone
    from diffdistill.gan import DiscriminatorHead, UNetWithHead, bottleneck_channels

    unet = load_backbone(pixel_dir).unet
    torch.manual_seed(0)
    net = UNetWithHead(unet, DiscriminatorHead(bottleneck_channels(unet)))
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([10.0, 500.0, 990.0]), torch.tensor([1, 4, 10])
    seen = []
    net.head.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        out = net(x, t, class_labels=labels)
        by_hand = _mid_block_by_hand(unet, x, t, labels)
        plain = unet(x, t, class_labels=labels).sample
    assert torch.allclose(seen[0], by_hand, atol=1e-6) and float(by_hand.abs().max()) > 0
    assert torch.allclose(out.logits, net.head(by_hand), atol=1e-6)
    assert torch.equal(out.sample, plain)  # the hook does not change the UNet's output
    assert out.logits.shape == (3,) and net.logits is out.logits
    net.remove_hooks()
    assert len(unet.mid_block._forward_hooks) == 0 and not net.tap.active


def test_gan_gradients_reach_generator_not_fake_weights(pixel_dir, tmp_path):
    tr, batch = ready(pixel_dir, tmp_path / "gg", 16)
    cond = tr.cond_for_batch(batch, with_uncond=True)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    loss, logs = tr.distribution_matching_loss(x, cond)
    loss.backward()
    assert "loss_gan_generator" in logs and float(x.grad.abs().sum()) > 0
    # in the trainer's generator update the fake score (UNet + head) collects no gradient
    seen, step = {}, tr.step

    def spy(name, loss):
        if name == "generator":
            seen["fake_grads"] = [p.grad for p in tr.trainable["fake_score"]]
            seen["head_requires_grad"] = [p.requires_grad for p in
                                          tr.unwrap(tr.fake_score).head.parameters()]
        return step(name, loss)

    tr.step = spy
    for p in tr.trainable["fake_score"]:
        p.grad = None
    tr.train_step(batch)
    assert seen["fake_grads"] and all(g is None for g in seen["fake_grads"])
    assert not any(seen["head_requires_grad"])
    head = tr.unwrap(tr.fake_score).head
    assert all(p.requires_grad for p in head.parameters())  # trainable again afterwards


def _dm_and_gan_by_hand(tr, x, cond, seed):
    """(x', L_DM, L_G) on a fresh leaf x' = x with the trainer's draws from ``seed``: the DM
    loss from bare real / fake score passes and the head's generator loss on the same x_t."""
    from diffdistill.losses import dmd_loss, gan_generator_loss

    x2 = x.detach().clone().requires_grad_()
    tr.generator.manual_seed(seed)
    t = tr.sample_t(x.shape[0])
    x_t = tr.add_noise(x2, tr.randn(*x.shape), t)
    with torch.no_grad(), tr.real_score() as real:
        x0_real = tr.denoiser(real).guided(x_t.detach(), t, cond, tr.cfg.dmd2.guidance_scale).x0
    x0_fake = tr.denoiser(tr.fake_score)(x_t, t, cond).x0
    loss_gan = gan_generator_loss(tr.unwrap(tr.fake_score).logits).mean()
    return x2, dmd_loss(x2, x0_real, x0_fake).mean(), loss_gan


def test_gan_gradient_balance_sets_the_ratio_of_gradient_norms(pixel_dir, tmp_path):
    """dmd2.gan_balance=b: ‖∇ₓ(GAN term)‖ = b‖∇ₓL_DM‖, and x's gradient is ∇L_DM + scale·∇L_G
    with scale = b‖∇L_DM‖/‖∇L_G‖ (the two gradients recomputed here from fresh graphs)."""
    tr, batch = ready(pixel_dir, tmp_path / "gb", 16, dmd2={"gan_balance": 0.25})
    cond = tr.cond_for_batch(batch, with_uncond=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)).requires_grad_()
    tr.generator.manual_seed(9)
    loss, logs = tr.distribution_matching_loss(x, cond)
    loss.backward()
    assert abs(float(logs["grad_norm_gan"] / logs["grad_norm_dm"]) - 0.25) < 1e-5
    # by hand: the same draws, the two terms' gradients separately
    x2, loss_dm, loss_gan = _dm_and_gan_by_hand(tr, x, cond, seed=9)
    (g_dm,) = torch.autograd.grad(loss_dm, x2, retain_graph=True)
    (g_gan,) = torch.autograd.grad(loss_gan, x2)
    expected = g_dm + 0.25 * g_dm.norm() / g_gan.norm() * g_gan
    assert rel_err(x.grad, expected) < 1e-5
    assert float(logs["gan_scale"]) == pytest.approx(float(0.25 * g_dm.norm() / g_gan.norm()),
                                                     rel=1e-5)


def test_fixed_gan_weight_is_the_plain_weighted_sum(pixel_dir, tmp_path):
    """Without balancing, x's gradient equals autograd's for L_DM + w·L_G (weight 1e-3)."""
    tr, batch = ready(pixel_dir, tmp_path / "gw", 16)
    cond = tr.cond_for_batch(batch, with_uncond=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)).requires_grad_()
    tr.generator.manual_seed(9)
    loss, logs = tr.distribution_matching_loss(x, cond)
    loss.backward()
    x2, loss_dm, loss_gan = _dm_and_gan_by_hand(tr, x, cond, seed=9)
    (loss_dm + 1e-3 * loss_gan).backward()
    assert rel_err(x.grad, x2.grad) < 1e-5 and float(logs["gan_scale"]) == pytest.approx(1e-3)


def test_every_log_line_shows_generator_and_fake_score(pixel_dir, tmp_path):
    """TTUR ratio 3 with log.every 3: each line falls on a fake-only step, yet carries the
    generator's metrics (the window's mean), and each key's value is its window mean."""
    out = tmp_path / "w"
    fit(pixel_dir, out, 16, train={"max_steps": 6}, log={"every": 3},
        dmd2={"fake_updates_per_generator_update": 3})
    rows = metrics(out)
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:
        assert {"loss_dm", "grad_norm_dm", "grad_norm_gan", "loss_gan_generator",
                "loss_fake", "loss_fake_denoise", "d_real", "d_fake"} <= set(r)
        assert r["grad_norm_dm"] > 0 and r["grad_norm_gan"] > 0


def test_gan_balance_needs_the_gan_term():
    with pytest.raises(ConfigError, match="gan_balance"):
        build_config(DMD2Config, {"dmd2": {"gan_balance": 0.5, "gan_generator_weight": 0.0}})


# ----------------------------------------------------------------------------- multi-step


def test_backward_simulation_feeds_every_training_timestep(pixel_dir, tmp_path):
    tr, batch = ready(pixel_dir, tmp_path / "bs", 16, dmd2={"timesteps": FOUR})
    unet = tr.unwrap(tr.student)
    with torch.no_grad():  # a generator that is not the teacher
        for p in unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    calls = []
    h = unet.register_forward_pre_hook(lambda m, args, kw: calls.append(
        (args[0].detach().clone(), args[1].detach().clone())), with_kwargs=True)
    cond = tr.cond_for_batch({"class_label": torch.tensor([0, 1, 2, 3])})
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    steps = torch.tensor([0, 1, 2, 3])
    tr.generator.manual_seed(9)
    x_in = tr.simulate_inputs(noise, steps, cond)
    h.remove()
    assert [c[1].unique().tolist() for c in calls] == [[999.0], [749.0], [499.0]]

    # the chain by hand: x0 = (x - sqrt(1-acp) eps) / sqrt(acp), re-noised with fresh noise
    acp = tr.backbone.schedule.alphas_cumprod.float()
    g = torch.Generator().manual_seed(9)
    x, expected = noise, [noise]
    for j in range(3):
        t = FOUR[j]
        with torch.no_grad():
            eps = unet(x, torch.full((4,), float(t)), class_labels=cond.class_labels).sample
        x0 = (x - (1 - acp[t]).sqrt() * eps) / acp[t].sqrt()
        tn = FOUR[j + 1]
        x = acp[tn].sqrt() * x0 + (1 - acp[tn]).sqrt() * torch.randn(x.shape, generator=g)
        expected.append(x)
    for i in range(4):
        assert rel_err(x_in[i], expected[i][i]) < 1e-5
    # generator_inputs draws one step per sample and pairs it with its timestep
    tr.generator.manual_seed(0)
    seen_t = set()
    for _ in range(6):
        _, t_in = tr.generator_inputs(noise, cond, None)
        seen_t |= set(t_in.tolist())
    assert seen_t == {float(t) for t in FOUR}
    # without backward simulation the later steps take noised real images instead
    tr.cfg.dmd2.backward_simulation = False
    x_real = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    tr.generator.manual_seed(3)
    x_in, t_in = tr.generator_inputs(noise, cond, x_real)
    g = torch.Generator().manual_seed(3)
    k = torch.randint(0, 4, (4,), generator=g)
    fresh = torch.randn(4, 3, 16, 16, generator=g)
    assert t_in.tolist() == [float(FOUR[i]) for i in k]
    for i in range(4):
        a = acp[FOUR[k[i]]]
        want = noise[i] if k[i] == 0 else a.sqrt() * x_real[i] + (1 - a).sqrt() * fresh[i]
        assert rel_err(x_in[i], want) < 1e-6


# ----------------------------------------------------------------------------- runs


RUNS = {
    "pixel-1step-full": ("pixel_dir", 16, [999], "full"),
    "pixel-4step-lora": ("pixel_dir", 16, FOUR, "lora"),
    "sd-1step-lora": ("sd_dir", 32, [999], "lora"),
    "sd-4step-full": ("sd_dir", 32, FOUR, "full"),
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    done = {}

    def get(name):
        if name not in done:
            fixture, res, ts, adapter = RUNS[name]
            out = tmp_path_factory.mktemp(name)
            done[name] = fit(request.getfixturevalue(fixture), out, res,
                             adapter={"type": adapter}, dmd2={"timesteps": ts})
        return done[name]

    return get


@pytest.mark.parametrize("name", list(RUNS))
def test_few_step_runs(name, runs):
    from diffdistill.backbone import load_backbone

    tr = runs(name)
    rows = metrics(tr.out)
    assert [("loss_dm" in r) for r in rows] == [True, False]  # TTUR 2: generator at step 0
    assert all(v is None or abs(v) < 1e3 for r in rows for v in r.values())
    teacher = load_backbone(tr.cfg.model.path).unet.state_dict()
    gen = tr.unwrap(tr.student)
    if tr.lora:
        # the real score (adapters off) is still exactly the teacher
        base = {k.replace(".base_layer", ""): v for k, v in gen.state_dict().items()
                if "lora_" not in k}
        assert all(torch.equal(base[k], teacher[k]) for k in teacher)
        assert any(float(p.detach().abs().sum()) > 0 for n, p in gen.named_parameters()
                   if "lora_B" in n)  # the adapter moved off its zero init
    else:
        real = tr.real_unet.state_dict()
        assert all(torch.equal(real[k], teacher[k]) for k in teacher)
        moved = [k for k, v in gen.state_dict().items() if not torch.equal(v, teacher[k])]
        assert len(moved) > 10
    fake = tr.unwrap(tr.fake_score)
    assert fake.head is not None and fake.tap.active


def test_lora_real_and_fake_share_one_base(runs):
    tr = runs("sd-1step-lora")
    gen, fake = tr.unwrap(tr.student), tr.unwrap(tr.fake_score).unet
    gen_base = {n: p for n, p in gen.named_parameters() if "lora_" not in n}
    fake_base = {n: p for n, p in fake.named_parameters() if "lora_" not in n}
    assert gen_base.keys() == fake_base.keys()
    assert all(gen_base[n] is fake_base[n] for n in gen_base)  # the same tensors
    assert not any(p.requires_grad for p in gen_base.values())
    names_g = {n for n, _ in gen.named_parameters() if "lora_" in n}
    assert names_g and all(".generator." in n for n in names_g)
    assert all(".fake_score." in n for n, _ in fake.named_parameters() if "lora_" in n)


def _unique_bytes(modules):
    seen = {}
    for m in modules:
        for p in m.parameters():
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def test_lora_holds_one_base_unet_full_holds_three(runs):
    full, lora = runs("sd-4step-full"), runs("sd-1step-lora")
    unet_bytes = _unique_bytes([full.real_unet])
    b_full = _unique_bytes([full.unwrap(full.student), full.unwrap(full.fake_score),
                            full.real_unet])
    b_lora = _unique_bytes([lora.unwrap(lora.student), lora.unwrap(lora.fake_score)])
    head = _unique_bytes([full.unwrap(full.fake_score).head])
    assert b_full == 3 * unet_bytes + head
    adapters = sum(p.numel() * 4 for p in lora.trainable["generator"] + lora.trainable[
        "fake_score"])
    assert b_lora == unet_bytes + adapters  # head included in the fake-score trainables


# ----------------------------------------------------------------------------- exports


def test_lcm_boundary_is_negligible_at_training_timesteps():
    from diffdistill.denoiser import lcm_boundary

    c_skip, c_out = lcm_boundary(torch.tensor([999.0, 749.0, 499.0, 249.0, 399.0]))
    assert float(c_skip.max()) < 5e-8 and float((1 - c_out).abs().max()) < 3e-8
    assert lcm_original_steps(FOUR, 1000) == 4 and lcm_original_steps([999], 1000) == 1
    assert lcm_original_steps([399], 1000) is None


def _pipe_latents(pipe, prompts, seeds, steps, **kw):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, height=32, width=32,
                    generator=gens, output_type="latent", **kw).images


PROMPTS = ["a photo of a bag", "a photo of a sneaker"]


def test_full_export_is_a_stock_pipeline_matching_the_sampler(runs):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    tr = runs("sd-4step-full")
    pipe = StableDiffusionPipeline.from_pretrained(str(tr.out / "export"))
    assert isinstance(pipe.scheduler, LCMScheduler)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == FOUR
    ours = tr.sample_latents([3, 4], tr.backbone.encode_prompts(PROMPTS, with_uncond=False))
    stock = _pipe_latents(pipe, PROMPTS, [3, 4], 4)
    assert rel_err(stock, ours) < 1e-4 and float(ours.std()) > 0.1
    card = (tr.out / "export" / "README.md").read_text()
    assert "dmd2" in card
    # the card's example prompt is a caption of the run's own training data
    assert tr.card_prompt() == tr.dataset[0]["caption"] != "a photo of a cat"
    assert f'pipe("{tr.card_prompt()}"' in card and "a photo of a cat" not in card
    # diffdistill sample / bench read the recorded grid, not LCM's default 50-step one
    from diffdistill.eval.bench_config import BenchModel
    from diffdistill.eval.eval_model import load_eval_model

    model = load_eval_model(BenchModel(name="s", path=str(tr.out / "export")))
    assert model.sampler == "lcm" and model.grid_for(4).tolist() == FOUR


@pytest.mark.parametrize("prediction", ["sample", "v_prediction"])
def test_generator_prediction_is_the_output_and_the_export_reads_it(prediction, sd_dir,
                                                                     tmp_path):
    """dmd2.generator_prediction: x0̂ at the conditioning time is the raw output ("sample") or
    α x − σ v̂ ("v_prediction"); the full export's LCMScheduler carries the type, so a stock
    pipeline called with the trained timestep reproduces the trainer's samples."""
    from diffusers import StableDiffusionPipeline

    tr = fit(sd_dir, tmp_path / prediction, 32,
             dmd2={"timesteps": [599], "generator_prediction": prediction})
    cond = tr.backbone.encode_prompts(PROMPTS, with_uncond=False)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = tr.generate(x, torch.full((2,), 599.0, dtype=torch.float64), cond)
        raw = tr.unwrap(tr.student)(x, torch.tensor(599.0),
                                    encoder_hidden_states=cond.encoder_hidden_states).sample
    if prediction == "sample":
        expected = raw
    else:
        acp = tr.backbone.schedule.alphas_cumprod[599]
        expected = acp.sqrt().float() * x - (1 - acp).sqrt().float() * raw
    assert rel_err(x0, expected) < 1e-5
    pipe = StableDiffusionPipeline.from_pretrained(str(tr.out / "export"))
    assert pipe.scheduler.config.prediction_type == prediction
    ours = tr.sample_latents([3, 4], cond)
    stock = _pipe_latents(pipe, PROMPTS, [3, 4], None, timesteps=[599])
    assert rel_err(stock, ours) < 1e-4 and float(ours.std()) > 0.1


def test_generator_prediction_is_refused_for_lora():
    with pytest.raises(ConfigError, match="generator_prediction"):
        build_config(DMD2Config, {"adapter": {"type": "lora"},
                                  "dmd2": {"generator_prediction": "sample"}})


def test_lora_exports_load_in_a_stock_pipeline(runs, sd_dir, tmp_path, monkeypatch):
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from helpers import run_model_card_code

    from diffdistill.export import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME

    tr = runs("sd-1step-lora")
    export = tr.out / "export"
    ours = tr.sample_latents([5, 6], tr.backbone.encode_prompts(PROMPTS, with_uncond=False))
    teacher = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    base = _pipe_latents(teacher, PROMPTS, [5, 6], 1)
    for weight in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir))
        pipe.load_lora_weights(str(export), weight_name=weight)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config,
                                                  original_inference_steps=1)
        stock = _pipe_latents(pipe, PROMPTS, [5, 6], 1)
        assert rel_err(stock, ours) < 1e-4, weight
        assert rel_err(stock, base) > 1e-3  # the LoRA changes the base model's output
    run_model_card_code(export, tmp_path, monkeypatch)  # the card's code as written


def test_pixel_export_loads_as_unet_and_lcm_scheduler(runs, tmp_path, monkeypatch):
    from diffusers import LCMScheduler, UNet2DModel

    from diffdistill.export import card_code

    for name, steps in (("pixel-4step-lora", 4), ("pixel-1step-full", 1)):
        tr = runs(name)
        export = tr.out / "export"
        unet = UNet2DModel.from_pretrained(str(export), subfolder="unet").eval()
        sched = LCMScheduler.from_pretrained(str(export), subfolder="scheduler")
        sched.set_timesteps(steps)
        assert sched.timesteps.tolist() == tr.timesteps
        labels = torch.tensor([3, 7])
        ours = tr.sample_latents([1, 2], tr.backbone.class_cond(labels, guidance=False))
        outs = []
        for i, seed in enumerate([1, 2]):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn((1, 3, 16, 16), generator=g)
            sched.set_timesteps(steps)
            with torch.no_grad():
                for t in sched.timesteps:
                    eps = unet(x, t, class_labels=labels[i:i + 1]).sample
                    x = sched.step(eps, t, x, generator=g).prev_sample
            outs.append(x)
        assert rel_err(torch.cat(outs), ours) < 1e-4, name
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(card_code(export / "README.md"), scope)
    mine = tr.sample_latents([0], tr.backbone.class_cond(torch.tensor([0]), guidance=False))
    expected = ((mine.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert (scope["image"].int() - expected.int()).abs().max() <= 1


# ----------------------------------------------------------------------------- configs


CONFIG_MODELS = {"toy": ("sd_dir", 32), "sd15": ("sd_dir", 32), "sdxl_4step": ("sdxl_dir", 32),
                 "toy_pixel": ("pixel_dir", 16), "imagenet64": ("pixel_dir", 16)}


def config_for_tiny(path, model_dir, res, out):
    data = load_yaml(path)
    data = deep_merge(data, {
        "output_dir": str(out), "model": {"path": str(model_dir), "frozen_dtype": "fp32"},
        "data": {"kind": "fashion_mnist", "path": "", "resolution": res, "limit": 8},
        "train": {"max_steps": 1, "batch_size": 2, "checkpoint_every": 0, "cpu": True,
                  "mixed_precision": "no"},
        "log": {"progress": False, "tensorboard": False, "grid_every": 0},
    })
    return data


@pytest.mark.parametrize("name", list(CONFIG_MODELS))
def test_config_runs_one_cycle_on_a_tiny_model(name, request, tmp_path):
    from diffdistill.trainers import get_trainer_class

    fixture, res = CONFIG_MODELS[name]
    data = config_for_tiny(ROOT / "configs" / "dmd2" / f"{name}.yaml",
                           request.getfixturevalue(fixture), res, tmp_path / name)
    cls = get_trainer_class(data["method"])
    cfg = build_config(cls.config_class, data)
    assert cfg.dmd2.gan_discriminator_weight > 0
    tr = cls(cfg)
    logs = tr.fit()
    # step 0 is a generator step whatever the TTUR ratio: one full generator + fake cycle
    assert {"loss_dm", "loss_gan_generator", "loss_fake", "loss_gan_discriminator"} <= set(logs)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert (tmp_path / name / "export" / "README.md").exists()


def test_prompts_only_data_with_gan_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"dmd2\.gan_generator_weight.*|data\.kind"):
        make_cfg("x", tmp_path, 32, data={"kind": "prompts", "path": "p.txt"})
    cfg = make_cfg("x", tmp_path, 32, data={"kind": "prompts", "path": "p.txt"},
                   dmd2={"gan_generator_weight": 0.0, "gan_discriminator_weight": 0.0})
    assert cfg.dmd2.gan_discriminator_weight == 0.0
    with pytest.raises(ConfigError, match="dmd2.timesteps"):
        make_cfg("x", tmp_path, 32, dmd2={"timesteps": [249, 999]})


def test_regression_warmup_fits_the_teachers_ddim_solution(sd_dir, tmp_path):
    """The warm-up target is stock DDIMScheduler (trailing, CFG) from the same noise."""
    from diffusers import DDIMScheduler

    tr, batch = ready(sd_dir, tmp_path / "r", 32, dmd2={
        "regression_steps": 1, "regression_ode_steps": 4, "guidance_scale": 2.0})
    cond = tr.cond_for_batch(batch, with_uncond=True)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    sched = DDIMScheduler.from_config(tr.backbone.scheduler_config, timestep_spacing="trailing")
    sched.set_timesteps(4)
    x, unet = noise, tr.real_unet
    ehs = torch.cat([cond.uncond.encoder_hidden_states, cond.encoder_hidden_states])
    with torch.no_grad():
        for t in sched.timesteps:
            e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=ehs).sample.chunk(2)
            x = sched.step(e_u + 2.0 * (e_c - e_u), t, x).prev_sample
    assert float(tr.regression_loss(noise, x, cond)) < 1e-10
    assert float(tr.regression_loss(noise, noise, cond)) > 1e-2
    logs = tr.train_step(batch)  # step 0 < regression_steps: a regression generator step
    assert "loss_regression" in logs and "loss_dm" not in logs and "loss_fake" in logs


def test_regression_term_is_added_to_every_generator_update(sd_dir, tmp_path):
    """dmd2.regression_weight: the generator's loss is L_DM + λ·‖G(z) − ODE_teacher(z)‖²,
    with z the generator's own noise (checked with the DM term stubbed to 0), on generator
    updates after the warm-up; multi-step generators are refused."""
    tr, batch = ready(sd_dir, tmp_path / "rw", 32, dmd2={
        "timesteps": [599], "regression_weight": 0.25, "regression_ode_steps": 3,
        "gan_generator_weight": 0.0, "gan_discriminator_weight": 0.0})
    assert tr.is_generator_step()
    tr.distribution_matching_loss = lambda x, cond: (x.sum() * 0, {})
    gen_state = tr.generator.get_state()
    seen = {}
    step = tr.step

    def spy(name, loss):
        if name == "generator":
            g = torch.Generator().set_state(gen_state)
            noise = torch.randn(2, *tr.shape, generator=g)
            cond = tr.cond_for_batch(batch, with_uncond=True)
            with torch.no_grad():
                x = tr.generate(noise, torch.full((2,), 599.0, dtype=torch.float64), cond)
                seen["want"] = 0.25 * float(tr.regression_loss(noise, x, cond))
            seen["got"] = float(loss.detach())
        return step(name, loss)

    tr.step = spy
    logs = tr.train_step(batch)
    assert seen["want"] > 1e-4
    assert seen["got"] == pytest.approx(seen["want"], rel=1e-5)
    assert float(logs["loss_regression"]) == pytest.approx(seen["want"] / 0.25, rel=1e-5)
    with pytest.raises(ConfigError, match="one-step"):
        make_cfg(sd_dir, tmp_path / "bad", 32, dmd2={"timesteps": FOUR, "regression_weight": 1.0})


def test_regression_warmup_with_lpips_on_decoded_images(sd_dir, tmp_path):
    import torchvision
    from safetensors.torch import save_file

    weights = tmp_path / "alexnet_features.safetensors"  # random: only the code path matters
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in torchvision.models.alexnet().features
               .state_dict().items()}, str(weights))
    tr, batch = ready(sd_dir, tmp_path / "lp", 32, dmd2={
        "regression_steps": 1, "regression_ode_steps": 2, "regression_loss": "lpips",
        "lpips_weights": str(weights)})
    cond = tr.cond_for_batch(batch, with_uncond=True)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    loss = tr.regression_loss(noise, x, cond)
    loss.backward()
    assert float(loss.detach()) > 0 and float(x.grad.abs().sum()) > 0  # VAE decoder + LPIPS
    before = [p.detach().clone() for p in tr.trainable["generator"]]
    logs = tr.train_step(batch)
    assert logs["loss_regression"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.trainable["generator"]))
