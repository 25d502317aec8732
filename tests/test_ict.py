"""iCT trainer (Song & Dhariwal 2023): formulas, dropout-mask sharing, training, exact resume,
stock-diffusers exports and the shipped configs — tiny models on CPU."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffdistill.trainers.checkpointing import list_checkpoints
from diffdistill.trainers.ict import (
    ICTConfig,
    ICTTrainer,
    cm_grid_sigmas,
    ect_r,
    ect_stage,
    ict_loss_weight,
    ict_num_scales,
)
from safetensors.torch import load_file

from diffdistill.config import ConfigError, build_config

ROOT = Path(__file__).resolve().parents[1]


def ict_cfg(model_dir, out, *, res=16, ict=None, log=None, **train):
    return build_config(ICTConfig, {
        "method": "ict", "output_dir": str(out), "seed": 1,
        "model": {"path": str(model_dir)},
        "data": {"kind": "fashion_mnist", "resolution": res, "limit": 32},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 0,
                  "cpu": True, **train},
        "ict": dict(ict or {}),
        "log": {"every": 1, "progress": False, "tensorboard": False, **(log or {})},
    })


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def erf_probs(sigmas_ascending, p_mean=-1.1, p_std=2.0):
    """The discretized lognormal written out with math.erf (iCT Sec. 3.5)."""
    cdf = [math.erf((math.log(s) - p_mean) / (math.sqrt(2) * p_std)) for s in sigmas_ascending]
    mass = [b - a for a, b in itertools.pairwise(cdf)]
    return torch.tensor([m / sum(mass) for m in mass], dtype=torch.float64)


def karras_ascending(n, smin=0.002, smax=80.0, rho=7.0):
    lo, hi = smin ** (1 / rho), smax ** (1 / rho)
    return torch.tensor([(lo + j / (n - 1) * (hi - lo)) ** rho for j in range(n)],
                        dtype=torch.float64)


# ----------------------------------------------------------------------------- formulas


def test_curriculum_is_the_papers_doubling_schedule():
    # K = 400k (CIFAR-10): K' = floor(400000 / (log2(128) + 1)) = 50000
    assert [ict_num_scales(k, 400_000) for k in
            (0, 49_999, 50_000, 99_999, 100_000, 300_000, 349_999, 350_000, 399_999)] == \
        [11, 11, 21, 21, 41, 641, 641, 1281, 1281]
    for K, s0, s1 in [(1000, 10, 1280), (777, 10, 1280), (50, 2, 150), (4, 2, 8), (3, 10, 1280)]:
        kp = max(1, math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)))
        seq = [ict_num_scales(k, K, s0, s1) for k in range(K + 5)]
        assert seq == [min(s0 * 2 ** (k // kp), s1) + 1 for k in range(K + 5)]
        assert seq == sorted(seq) and seq[0] == s0 + 1
    assert ict_num_scales(10**9, 100) == 1281  # capped, no overflow
    with pytest.raises(ValueError):
        ict_num_scales(-1, 10)


def test_weighting_density_and_distance_match_their_formulas(pixel_dir, tmp_path):
    t = ICTTrainer(ict_cfg(pixel_dir, tmp_path / "f", max_steps=400_000))
    # the grid of step k has N(k) Karras points, ascending, from sigma_min to sigma_max
    for step, n in [(0, 11), (60_000, 21), (399_999, 1281)]:
        grid = t.grid(step)
        assert len(grid) == n
        assert torch.allclose(grid, karras_ascending(n), rtol=1e-12)
        # density: erf mass between adjacent log-sigmas, normalised (Sec. 3.5)
        assert torch.allclose(t.index_probs(grid), erf_probs(grid.tolist()), atol=1e-12)
        # lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i)
        lam = ict_loss_weight(grid[:-1], grid[1:])
        assert torch.allclose(lam, torch.tensor([1 / (b - a) for a, b in
                                                 zip(grid[:-1].tolist(), grid[1:].tolist())],
                                                dtype=torch.float64), rtol=1e-12)
    # the sign of P_mean: half the mass lies below sigma = exp(-1.1) (the +1.1 bug puts ~13%)
    grid = t.grid(399_999)
    below = t.index_probs(grid)[grid[1:] <= math.exp(-1.1)].sum()
    assert abs(float(below) - 0.5) < 0.01
    # draws follow the density and are adjacent grid pairs
    grid = t.grid(60_000)
    cur, nxt = t.draw_sigmas(40_000, step=60_000)
    idx = torch.searchsorted(grid, cur)
    assert torch.equal(grid[idx], cur) and torch.equal(grid[idx + 1], nxt)
    freq = torch.bincount(idx, minlength=len(grid) - 1).double() / len(idx)
    assert (freq - t.index_probs(grid)).abs().max() < 0.01

    # pseudo-Huber with c = 0.00054 sqrt(d), d = 3*16*16, and the L2 alternative
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g) * 0.1
    c = 0.00054 * math.sqrt(3 * 16 * 16)
    want = torch.tensor([math.sqrt(float(((a - b) ** 2).sum()) + c * c) - c for a, b in zip(x, y)])
    assert torch.allclose(t.distance(x, y), want, rtol=1e-5)
    t.cfg.ict.huber_c = 0.5
    assert torch.allclose(t.distance(x, y), torch.sqrt(((x - y) ** 2).sum((1, 2, 3)) + 0.25) - 0.5)
    t.cfg.ict.loss = "l2"
    assert torch.allclose(t.distance(x, y), ((x - y) ** 2).mean((1, 2, 3)))


def test_cm_grid_matches_stock_scheduler():
    from diffusers import CMStochasticIterativeScheduler

    s = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0)
    s.set_timesteps(timesteps=[24, 0])
    assert torch.allclose(s.sigmas[:2].double(), cm_grid_sigmas([0, 24]), rtol=1e-6)
    assert float(cm_grid_sigmas([0, 24])[1]) == pytest.approx(0.821, abs=0.005)  # paper σ_mid


def test_train_step_loss_is_the_ict_objective(pixel_dir, tmp_path):
    """train_step's loss, recomputed by hand: CM boundary, grid, density, noise, λ, Huber."""
    t = ICTTrainer(ict_cfg(pixel_dir, tmp_path / "o", batch_size=4, ict={"init": "pretrained"}))
    t.setup()
    batch = next(t._batches())
    unet0 = copy.deepcopy(t.unwrap(t.unet))
    state = t.generator.get_state()
    loss = float(t.train_step(batch)["loss"])

    g = torch.Generator().set_state(state)
    x0, labels = batch["pixel_values"].float(), batch["class_label"]
    grid = karras_ascending(11)  # N(0) = s0 + 1
    i = torch.multinomial(erf_probs(grid.tolist()).float(), 4, replacement=True, generator=g)
    noise = torch.randn(x0.shape, generator=g)

    def f(sigma, x):  # Song et al. 2023 App. C with sigma_min 0.002, sigma_data 0.5
        s = sigma.float().reshape(-1, 1, 1, 1)
        out = unet0(x / torch.sqrt(s**2 + 0.25), (250 * torch.log(sigma)).float(),
                    class_labels=labels).sample
        c_skip = 0.25 / ((s - 0.002) ** 2 + 0.25)
        c_out = 0.5 * (s - 0.002) / torch.sqrt(s**2 + 0.25)
        return c_skip * x + c_out * out

    with torch.no_grad():
        s_cur, s_next = grid[i], grid[i + 1]
        a = f(s_next, x0 + s_next.float().reshape(-1, 1, 1, 1) * noise)
        b = f(s_cur, x0 + s_cur.float().reshape(-1, 1, 1, 1) * noise)
    c = 0.00054 * math.sqrt(3 * 16 * 16)
    d = torch.sqrt(((a - b) ** 2).sum((1, 2, 3)) + c * c) - c
    want = float((d / (s_next - s_cur).float()).mean())
    assert loss == pytest.approx(want, rel=1e-4)
    # the boundary condition: f(x, sigma_min) = x
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = t.student(x, 0.002, t.backbone.class_cond([1, 2], guidance=False)).x0
    assert torch.allclose(out, x, atol=1e-6)


def test_ect_mapping_and_stages_match_their_formulas():
    """ECT (Geng et al. 2024, Sec. 3): r = max(0, t(1 − n(t)/q^(s+1))), n = 1 + k·sigmoid(−bt)."""
    assert [ect_stage(k, 16, 8) for k in range(0, 20, 2)] == [0, 1, 2, 3, 4, 5, 6, 7, 7, 7]
    assert [ect_stage(k, 3, 8) for k in range(4)] == [0, 2, 5, 7]  # more stages than steps
    with pytest.raises(ValueError):
        ect_stage(0, 10, 0)
    for t in (0.01, 0.5, 1.0, 3.0, 20.0, 80.0):
        for stage, q, k, b in [(0, 2.0, 8.0, 1.0), (3, 2.0, 8.0, 1.0), (1, 4.0, 4.0, 2.0)]:
            n = 1 + k / (1 + math.exp(b * t))
            want = max(0.0, t * (1 - n / q ** (stage + 1)))
            got = float(ect_r(torch.tensor(t, dtype=torch.float64), stage, q, k, b))
            assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    t = torch.tensor([0.1, 1.0, 1.9, 2.0, 10.0, 80.0], dtype=torch.float64)
    # stage 0 is denoising wherever n(t) >= q = 2, i.e. t <= ln 7
    assert ((ect_r(t, 0) == 0) == (t <= math.log(7))).all()
    # every stage halves Δt once r is off the clamp (large t: n ≈ 1, Δt ≈ t / 2^(s+1))
    gaps = [float(80 - ect_r(torch.tensor(80.0, dtype=torch.float64), s)) for s in range(4)]
    assert gaps == pytest.approx([80 / 2 ** (s + 1) for s in range(4)], rel=1e-6)


def test_ect_train_step_loss_is_the_ect_objective(pixel_dir, tmp_path):
    """The ECT curriculum's loss by hand: lognormal t, r(t), x0 target below σ_min, 1/(t−r)."""
    cfg = ict_cfg(pixel_dir, tmp_path / "e", batch_size=8, max_steps=4,
                  ict={"init": "pretrained", "curriculum": "ect"})
    t = ICTTrainer(cfg)
    t.setup()
    t.global_step = 1  # stage ⌊1·8/4⌋ = 2
    assert t.ect_stage() == 2
    batch = next(t._batches())
    unet0 = copy.deepcopy(t.unwrap(t.unet))
    state = t.generator.get_state()
    out = t.train_step(batch)
    assert out["ect_stage"] == 2 and "num_scales" not in out

    g = torch.Generator().set_state(state)
    x0, labels = batch["pixel_values"].float(), batch["class_label"]
    ts = (-1.1 + 2.0 * torch.randn(8, generator=g, dtype=torch.float64)).exp().clamp(0.002, 80)
    rs = torch.tensor([max(0.0, v * (1 - (1 + 8 / (1 + math.exp(v))) / 8)) for v in ts.tolist()],
                      dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g)
    boundary = rs <= 0.002
    assert boundary.any() and not boundary.all()  # both kinds of target in this batch

    def f(sigma, x):  # Song et al. 2023 App. C with sigma_min 0.002, sigma_data 0.5
        s = sigma.float().reshape(-1, 1, 1, 1)
        raw = unet0(x / torch.sqrt(s**2 + 0.25), (250 * torch.log(sigma)).float(),
                    class_labels=labels).sample
        return 0.25 / ((s - 0.002) ** 2 + 0.25) * x + 0.5 * (s - 0.002) / torch.sqrt(
            s**2 + 0.25) * raw

    with torch.no_grad():
        a = f(ts, x0 + ts.float().reshape(-1, 1, 1, 1) * noise)
        r_net = rs.clamp(min=0.002)
        b = f(r_net, x0 + rs.float().reshape(-1, 1, 1, 1) * noise)
        b = torch.where(boundary.reshape(-1, 1, 1, 1), x0, b)
    c = 0.00054 * math.sqrt(3 * 16 * 16)
    d = torch.sqrt(((a - b) ** 2).sum((1, 2, 3)) + c * c) - c
    want = float((d / (ts - rs).float()).mean())
    assert float(out["loss"]) == pytest.approx(want, rel=1e-4)


def _full_run_and_a_run_killed_at_step_2(pixel_dir, tmp_path, kw):
    """Run ``kw`` to the end in tmp_path/a, and in tmp_path/b until a crash at step 2."""
    a, b = tmp_path / "a", tmp_path / "b"
    ICTTrainer(ict_cfg(pixel_dir, a, **kw)).fit()

    class Crash(ICTTrainer):
        def train_step(self, batch):
            if self.global_step == 2:
                raise KeyboardInterrupt
            return super().train_step(batch)

    with pytest.raises(KeyboardInterrupt):
        Crash(ict_cfg(pixel_dir, b, **kw)).fit()
    return a, b


def test_ect_resume_is_bit_identical_and_resume_refuses_a_changed_curriculum(pixel_dir,
                                                                              tmp_path):
    kw = {"checkpoint_every": 2, "ict": {"curriculum": "ect", "dropout": 0.1}}
    a, b = _full_run_and_a_run_killed_at_step_2(pixel_dir, tmp_path, kw)
    for change, key in [({"curriculum": "discrete"}, "ict.curriculum"),
                        ({"curriculum": "ect", "ect_q": 4.0}, "ict.ect_q"),
                        ({"curriculum": "ect", "block_out_channels": [32, 64]},
                         "ict.block_out_channels")]:
        with pytest.raises(ConfigError, match=f"was trained with {key.replace('.', '[.]')}="):
            ICTTrainer(ict_cfg(pixel_dir, b, checkpoint_every=2, ict=change)).fit(
                resume="latest")
    ICTTrainer(ict_cfg(pixel_dir, b, **kw)).fit(resume="latest")
    ma, mb = metrics(a), metrics(b)
    assert [m["ect_stage"] for m in ma] == [0, 2, 4, 6]  # K = 4 steps, 8 stages
    assert [m["loss"] for m in mb] == [m["loss"] for m in ma]
    wa = load_file(str(list_checkpoints(a)[-1] / "model.safetensors"))
    wb = load_file(str(list_checkpoints(b)[-1] / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_checkpoint_older_than_a_must_match_key_resumes_at_its_default(pixel_dir, tmp_path):
    """A checkpoint written before ict.curriculum existed ran the discrete curriculum: it
    resumes under the default, and refuses a run that sets the key otherwise."""
    out = tmp_path / "old"
    ICTTrainer(ict_cfg(pixel_dir, out, max_steps=2, checkpoint_every=2)).fit()
    state = list_checkpoints(out)[-1] / "trainer_state.json"
    meta = json.loads(state.read_text())
    for key in ("curriculum", "ect_stages", "ect_q", "ect_k", "ect_b"):
        del meta["config"]["ict"][key]
    state.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="ict.curriculum='discrete'.*'ect'"):
        ICTTrainer(ict_cfg(pixel_dir, out, max_steps=3, ict={"curriculum": "ect"})).fit(
            resume="latest")
    ICTTrainer(ict_cfg(pixel_dir, out, max_steps=3)).fit(resume="latest")
    assert [m["step"] for m in metrics(out)][-1] == 3


def test_online_and_target_share_the_dropout_mask(pixel_dir, tmp_path):
    t = ICTTrainer(ict_cfg(pixel_dir, tmp_path / "d", ict={"init": "pretrained", "dropout": 0.1}))
    t.setup()
    unet = t.unwrap(t.unet)
    assert unet.config.dropout == 0.1 and unet.training
    from diffdistill.backbone import load_backbone

    teacher = load_backbone(pixel_dir).unet  # "pretrained" keeps the folder's weights
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in teacher.state_dict().items())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([1.0, 3.0], dtype=torch.float64)
    cond = t.backbone.class_cond([3, 4], guidance=False)
    online, target = t.online_and_target(x, sigma, x, sigma, cond)
    assert online.requires_grad and not target.requires_grad
    assert torch.equal(online.detach(), target)  # equal weights + same mask = equal outputs
    with torch.no_grad():  # without the shared mask, two forwards differ: dropout is live
        a, b = t.student(x, sigma, cond).x0, t.student(x, sigma, cond).x0
    assert (a - b).abs().max() > 1e-4


# ----------------------------------------------------------------------------- training


def _fixed_batch_decrease(t, steps):
    batch = next(t._batches())

    def evaluate():
        t.generator.manual_seed(123)
        with torch.no_grad():
            return sum(float(t.consistency_loss(batch)) for _ in range(4))

    before = evaluate()
    for k in range(steps):
        t.generator.manual_seed(1000 + k)
        t.train_step(batch)
    return before, evaluate()


def test_loss_decreases_on_fixed_batch_pixel(pixel_dir, tmp_path):
    from diffusers import UNet2DModel

    from diffdistill.backbone import load_backbone

    t = ICTTrainer(ict_cfg(pixel_dir, tmp_path / "p", batch_size=4, lr=3e-3, max_steps=30,
                           ict={"init": "scratch"}))
    t.setup()
    # scratch: the folder's architecture, a fresh init seeded by cfg.seed (not its weights)
    folder = load_backbone(pixel_dir).unet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        fresh = UNet2DModel.from_config(folder.config).state_dict()
    mine = t.unwrap(t.unet).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in mine.items())
    assert not torch.equal(folder.state_dict()["conv_in.weight"], mine["conv_in.weight"])
    before, after = _fixed_batch_decrease(t, 20)
    assert after < 0.9 * before, (before, after)


def test_scratch_can_widen_and_deepen_the_folders_architecture(pixel_dir, tmp_path):
    """ict.block_out_channels / layers_per_block: the folder's UNet config with exactly those
    keys changed, initialised like any scratch run (seeded by cfg.seed)."""
    from diffusers import UNet2DModel

    from diffdistill.backbone import load_backbone

    t = ICTTrainer(ict_cfg(pixel_dir, tmp_path / "w", ict={
        "init": "scratch", "block_out_channels": [64, 96], "layers_per_block": 2}))
    t.setup()
    folder = dict(load_backbone(pixel_dir).unet.config)
    assert list(folder["block_out_channels"]) != [64, 96] and folder["layers_per_block"] == 1
    mine = t.unwrap(t.unet)
    changed = {k for k in folder if k[0] != "_" and mine.config[k] != folder[k]
               and not (isinstance(folder[k], (list, tuple))
                        and list(mine.config[k]) == list(folder[k]))}
    assert changed == {"block_out_channels", "layers_per_block"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        expected = UNet2DModel.from_config(
            dict(folder, block_out_channels=[64, 96], layers_per_block=2)).state_dict()
    got = mine.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(expected[k], v) for k, v in got.items())
    assert got["conv_in.weight"].shape[0] == 64
    # the wider net trains (one step) and its export records the new widths
    t.fit()
    exported = json.loads((tmp_path / "w" / "export" / "unet" / "config.json").read_text())
    assert (exported["block_out_channels"], exported["layers_per_block"]) == ([64, 96], 2)


def test_loss_decreases_on_fixed_batch_latent(sd_dir, tmp_path):
    t = ICTTrainer(ict_cfg(sd_dir, tmp_path / "l", res=32, batch_size=4, lr=3e-3, max_steps=30,
                           ict={"init": "pretrained"}))
    t.setup()
    before, after = _fixed_batch_decrease(t, 15)
    assert after < 0.9 * before, (before, after)


def test_resume_continues_curriculum_and_ema_bit_identically(pixel_dir, tmp_path):
    # s0=2, s1=8, K=4: K' = 1 and N(k) = 3, 5, 9, 9; dropout makes the global RNG matter too
    kw = {"ema_decay": 0.9, "checkpoint_every": 2,
          "ict": {"init": "pretrained", "s0": 2, "s1": 8, "dropout": 0.1}}
    a, b = _full_run_and_a_run_killed_at_step_2(pixel_dir, tmp_path, kw)
    assert [p.name for p in list_checkpoints(b)] == ["checkpoint-2"]
    ICTTrainer(ict_cfg(pixel_dir, b, **kw)).fit(resume="latest")
    ma, mb = metrics(a), metrics(b)
    assert [m["num_scales"] for m in ma] == [3, 5, 9, 9]
    assert [m["num_scales"] for m in mb] == [3, 5, 9, 9]
    assert [m["loss"] for m in mb] == [m["loss"] for m in ma]
    pinned = ICTTrainer(ict_cfg(pixel_dir, tmp_path / "c", max_steps=8,
                                ict={"s0": 2, "s1": 8, "total_steps": 4}))
    assert [pinned.num_scales(k) for k in range(5)] == [3, 5, 9, 9, 9]  # K pinned at 4
    for name in ("model.safetensors", "trainer_tensors.safetensors"):  # weights, then EMA
        wa = load_file(str(list_checkpoints(a)[-1] / name))
        wb = load_file(str(list_checkpoints(b)[-1] / name))
        assert wa.keys() == wb.keys() and len(wa) > 10
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------- exports


def _as_pt(x):
    return (x / 2 + 0.5).clamp(0, 1)


def test_pixel_export_is_a_stock_cm_pipeline_sampling_like_ours(pixel_dir, tmp_path):
    from diffusers import ConsistencyModelPipeline, DiffusionPipeline

    from diffdistill.sampling import cm_timesteps, sample_lcm, sample_onestep

    out = tmp_path / "px"
    t = ICTTrainer(ict_cfg(pixel_dir, out, max_steps=3, ema_decay=0.5, lr=3e-3,
                           ict={"init": "pretrained", "two_step_index": 24}))
    t.fit()
    pipe = DiffusionPipeline.from_pretrained(str(out / "export"))
    assert type(pipe) is ConsistencyModelPipeline
    assert pipe.scheduler.config.clip_denoised and pipe.scheduler.config.sigma_max == 80.0
    ema = t.generator_unet()
    exported = pipe.unet.state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in ema.state_dict().items())
    online = t.unwrap(t.unet).state_dict()
    assert not all(torch.equal(v, exported[k]) for k, v in online.items())  # the EMA, not θ
    card = (out / "export" / "README.md").read_text()
    assert "timesteps=[24, 0]" in card and "class_labels=[0]" in card

    den = t.backbone.denoiser(ema.eval())
    cond = t.backbone.class_cond([1, 6], guidance=False)
    runs = [({"num_inference_steps": 1}, None),
            ({"num_inference_steps": None, "timesteps": [24, 0]}, t.two_step_sigmas()),
            ({"num_inference_steps": 2}, cm_timesteps(2))]
    for kwargs, sigmas in runs:
        img = pipe(batch_size=2, class_labels=[1, 6], generator=torch.Generator().manual_seed(5),
                   output_type="pt", **kwargs).images
        g = torch.Generator().manual_seed(5)  # the pipeline: randn(shape, g) * sigma_max
        x = torch.randn((2, 3, 16, 16), generator=g) * 80.0
        with torch.no_grad():
            if sigmas is None:
                ours = sample_onestep(den, x, [80.0], cond, clip_denoised=True)
            else:
                ours = sample_lcm(den, x, sigmas, cond, generators=g, clip_denoised=True)
        assert float(img.std()) > 0.01
        assert (img - _as_pt(ours)).abs().max() < 1e-4, kwargs
    # the trainer's grid: 1-step then 2-step rows, same images as the stock pipeline per seed
    grid = t.sample_images([0, 1])
    assert grid.shape == (4, 3, 16, 16) and grid.dtype == torch.uint8
    for row, kwargs in ((0, {"num_inference_steps": 1}),
                        (2, {"num_inference_steps": None, "timesteps": [24, 0]})):
        for seed in (0, 1):
            img = pipe(batch_size=1, class_labels=[seed], output_type="pt",
                       generator=torch.Generator().manual_seed(seed), **kwargs).images
            stock = (img * 255).round().to(torch.uint8)[0]
            assert (stock.int() - grid[row + seed].int()).abs().max() <= 1
    # bench / `diffdistill sample` read the export info: the trained 2-step grid, clipping
    from diffdistill.eval.bench_config import BenchModel
    from diffdistill.eval.eval_model import load_eval_model
    from diffdistill.eval.generation import generate_for_eval

    info = json.loads((out / "export" / "diffdistill_export.json").read_text())
    assert info["sampler"] == "cm" and info["timesteps"] == [80.0]
    assert info["timesteps_by_steps"]["2"] == pytest.approx(t.two_step_sigmas().tolist())
    model = load_eval_model(BenchModel(name="ict", path=str(out / "export")))
    assert model.sampler_opts == {"clip_denoised": True}
    assert torch.equal(model.grid_for(2), torch.as_tensor(info["timesteps_by_steps"]["2"],
                                                          dtype=model.grid_for(2).dtype))
    for steps, row in ((1, 0), (2, 2)):
        gen = generate_for_eval(model, [0, 1], num_steps=steps, batch_size=2, grid_samples=2)
        assert (gen.grid.int() - grid[row:row + 2].int()).abs().max() <= 1, steps


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_latent_export_is_a_stock_sd_pipeline_sampling_like_ours(kind, request, tmp_path):
    from diffusers import (
        CMStochasticIterativeScheduler,
        DiffusionPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from diffdistill.backbone import load_backbone
    from diffdistill.sampling import cm_timesteps, sample_lcm

    out = tmp_path / kind
    model_dir = request.getfixturevalue(f"{kind}_dir")
    t = ICTTrainer(ict_cfg(model_dir, out, res=32, max_steps=2, lr=3e-3,
                           ict={"init": "pretrained"}))
    t.fit()
    export = out / "export"
    pipe = DiffusionPipeline.from_pretrained(str(export))
    assert type(pipe) is (StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline)
    assert isinstance(pipe.scheduler, CMStochasticIterativeScheduler)
    assert not pipe.scheduler.config.clip_denoised
    trained = t.unwrap(t.unet).state_dict()
    unet = UNet2DConditionModel.from_pretrained(str(export), subfolder="unet")
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in trained.items())
    assert "guidance_scale=1.0" in (export / "README.md").read_text()

    bb = load_backbone(str(export))  # what `diffdistill sample` uses
    assert bb.prediction_type == "cm" and bb.schedule.kind == "ve"
    den = bb.denoiser()
    cond = bb.encode_prompts(["a photo of a bag"], with_uncond=False)
    for n in (1, 2):
        img = pipe("a photo of a bag", num_inference_steps=n, guidance_scale=1.0, height=32,
                   width=32, generator=torch.Generator().manual_seed(3), output_type="pt").images
        g = torch.Generator().manual_seed(3)
        x = torch.randn((1, 4, 16, 16), generator=g) * 80.0
        with torch.no_grad():
            lat = sample_lcm(den, x, cm_timesteps(n), cond, generators=g)
            ours = _as_pt(bb.decode_latents(lat))
        assert float(img.std()) > 0.01
        assert (img - ours).abs().max() < 1e-4, n
    assert torch.allclose(t.two_step_sigmas(), cm_timesteps(2), rtol=1e-12)  # = stock spacing


def test_lora_consistency_tuning_exports_merged_weights(sd_dir, tmp_path):
    from diffusers import DiffusionPipeline

    from diffdistill.backbone import load_backbone
    from diffdistill.export import merged_unet

    out = tmp_path / "lora"
    cfg = ict_cfg(sd_dir, out, res=32, max_steps=1, lr=1e-2, ict={"init": "pretrained"})
    cfg.adapter.type, cfg.adapter.rank = "lora", 4
    t = ICTTrainer(cfg)
    t.fit()
    trainable = {n for n, p in t.unwrap(t.unet).named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    merged = merged_unet(t.unwrap(t.unet)).state_dict()
    exported = DiffusionPipeline.from_pretrained(str(out / "export")).unet.state_dict()
    assert exported.keys() == merged.keys()
    assert all(torch.equal(merged[k], exported[k]) for k in merged)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    base = load_backbone(sd_dir, load_text=False, load_vae=False).unet.state_dict()
    assert not torch.equal(base[key], merged[key])  # the trained LoRA is in the export


# ----------------------------------------------------------------------------- LPIPS, configs


def test_lpips_loss_from_local_backbone_weights(pixel_dir, sd_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFDISTILL_LPIPS_BACKBONE", raising=False)
    # a stand-in for torchvision's alexnet-owt file: its `features` keys and shapes, random
    g = torch.Generator().manual_seed(0)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3),
              8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    state = {}
    for i, shp in shapes.items():
        state[f"features.{i}.weight"] = torch.randn(shp, generator=g) * (2 / math.prod(shp[1:])) ** 0.5
        state[f"features.{i}.bias"] = torch.zeros(shp[0])
    weights = tmp_path / "alexnet.pth"
    torch.save(state, weights)
    ict = {"init": "pretrained", "loss": "lpips", "lpips_net": "alex",
           "lpips_weights": str(weights), "lpips_resize": 64}
    t = ICTTrainer(ict_cfg(pixel_dir, tmp_path / "lp", ict=ict))
    t.setup()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    up = {"size": (64, 64), "mode": "bilinear"}
    want = t.lpips(F.interpolate(x, **up), F.interpolate(y, **up)).reshape(2)
    assert torch.allclose(t.distance(x, y), want) and float(want.min()) > 0
    assert float(t.distance(x, x).abs().max()) < 1e-6
    # the backbone is the file's: its first conv equals the saved alexnet's
    saved = torch.load(weights, weights_only=True)
    assert torch.equal(t.lpips.net.slice1[0].weight, saved["features.0.weight"])
    batch = next(t._batches())
    before = [p.detach().clone() for p in t.trainable["unet"]]
    loss = t.train_step(batch)["loss"]
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, t.trainable["unet"]))
    assert not any(p.requires_grad for p in t.lpips.parameters())

    with pytest.raises(ConfigError, match="ict.lpips_weights"):
        ICTTrainer(ict_cfg(pixel_dir, tmp_path / "m",
                           ict={**ict, "lpips_weights": str(tmp_path / "nope.pth")})).setup()
    with pytest.raises(ConfigError, match="ict.lpips_weights"):
        ict_cfg(pixel_dir, tmp_path / "n", ict={"loss": "lpips"})
    with pytest.raises(ConfigError, match="latent"):
        ICTTrainer(ict_cfg(sd_dir, tmp_path / "s", res=32, ict=ict)).setup()


def test_config_validation_names_the_key(pixel_dir, tmp_path):
    for ict, key in [({"two_step_index": 40}, "ict.two_step_index"),
                     ({"p_std": 0.0}, "ict.p_std"), ({"s0": 20, "s1": 10}, "ict.s0"),
                     ({"dropout": 1.0}, "ict.dropout"), ({"huber_c": -1.0}, "ict.huber_c"),
                     ({"sigma_min": 90.0}, "ict.sigma_min"),
                     ({"total_steps": 0}, "ict.total_steps"),
                     ({"init": "pretrained", "layers_per_block": 2}, "ict.block_out_channels"),
                     ({"block_out_channels": [32, 0]}, "ict.block_out_channels"),
                     ({"layers_per_block": 0}, "ict.layers_per_block"),
                     ({"ect_q": 1.0}, "ict.ect_"), ({"ect_stages": 0}, "ict.ect_"),
                     ({"curriculum": "ecm"}, "ict.curriculum")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            ict_cfg(pixel_dir, tmp_path, ict=ict)
    for widths, why in [([32, 64, 64], "has 2 blocks, got 3 widths"),
                        ([32, 40], "multiple of the UNet's norm_num_groups")]:
        t = ICTTrainer(ict_cfg(pixel_dir, tmp_path / "bad", ict={"block_out_channels": widths}))
        with pytest.raises(ConfigError, match=why):
            t.setup()
    with pytest.raises(ConfigError, match="adapter.type=lora"):
        build_config(ICTConfig, {"method": "ict", "model": {"path": "x"},
                                 "adapter": {"type": "lora"}, "ict": {"init": "scratch"}})


@pytest.fixture(scope="module")
def uncond_pixel_dir(tmp_path_factory):
    """CIFAR-10 structure: an unconditional pixel UNet2DModel (DDPMPipeline)."""
    from diffdistill.tiny import tiny_pixel_pipeline

    folder = tmp_path_factory.mktemp("tiny-pixel-uncond")
    tiny_pixel_pipeline(num_classes=None).save_pretrained(str(folder), safe_serialization=True)
    return folder


WORLD = ROOT / "diffdistill" / "world" / "assets"


@pytest.mark.parametrize("name", ["toy", "toy_scratch", "toy_scratch_wide", "cifar10",
                                  "imagenet64"])
def test_shipped_configs_run_one_step(name, pixel_dir, uncond_pixel_dir, tmp_path):
    from diffdistill.trainers import load_run_config

    # the wide config names widths for the world teacher's four levels: its real folder
    model = {"cifar10": uncond_pixel_dir, "toy_scratch_wide": WORLD / "teacher_pixel"}.get(
        name, pixel_dir)
    out = tmp_path / name
    cls, cfg = load_run_config(ROOT / "configs" / "ict" / f"{name}.yaml", [
        f"model.path={model}", f"output_dir={out}", "data.kind=fashion_mnist", "data.path=",
        "data.resolution=16", "data.limit=8", "data.num_workers=0", "train.max_steps=1",
        "train.batch_size=2", "train.checkpoint_every=0", "train.cpu=true",
        "train.mixed_precision='no'", "log.grid_every=0", "log.progress=false",
        "log.tensorboard=false"])
    assert cls is ICTTrainer
    c = cfg.ict
    assert (c.p_mean, c.p_std, c.s0, c.s1, c.sigma_min, c.sigma_max, c.rho, c.loss) == \
        (-1.1, 2.0, 10, 1280, 0.002, 80.0, 7.0, "pseudo_huber")
    paper = {"toy_scratch": ("scratch", None, 0.999, 1e-3, 24),  # the pixel teacher's EMA
             "toy_scratch_wide": ("scratch", None, 0.999, 5e-4, 24),
             "cifar10": ("scratch", 0.3, 0.99993, 1e-4, 24),
             "imagenet64": ("scratch", 0.2, 0.99997, 1e-4, 22)}
    if name in paper:
        assert (c.init, c.dropout, cfg.train.ema_decay, cfg.train.lr, c.two_step_index) == \
            paper[name]
    t = cls(cfg)
    last = t.fit()
    assert math.isfinite(last["loss"]) and last["num_scales"] == 11
    if c.dropout is not None:
        assert t.unwrap(t.unet).config.dropout == c.dropout
    if name == "toy_scratch_wide":  # twice the teacher's widths (world.json), same depth
        world = json.loads((WORLD / "world.json").read_text())["stages"]["teacher_pixel"]
        teacher = world["settings"]["unet"]
        unet = t.unwrap(t.unet).config
        assert list(unet.block_out_channels) == [2 * w for w in teacher["channels"]]
        assert unet.layers_per_block == teacher["layers_per_block"]
    assert (out / "export" / "model_index.json").exists()


def test_scratch_config_gets_the_pixel_teachers_budget():
    """configs/ict/toy_scratch.yaml trains with what the shipped pixel teacher got (world.json):
    its step count (an iCT step at half the batch costs about one pretraining step), its
    learning rate and its export EMA — the comparison the iCT-from-scratch goal is about."""
    from diffdistill.trainers import load_run_config

    world = json.loads((WORLD / "world.json").read_text())
    teacher = world["stages"]["teacher_pixel"]["metrics"]
    _, cfg = load_run_config(ROOT / "configs" / "ict" / "toy_scratch.yaml", [])
    t = cfg.train
    assert (t.max_steps, t.batch_size * 2, t.lr, t.ema_decay) == (
        teacher["max_steps"], teacher["batch_size"], teacher["lr"], teacher["ema_decay"])


def test_gpu_ict_scratch_script_parses_and_its_overrides_validate():
    """benchmarks/gpu_ict_scratch.sh (run only on a GPU) stays in step with the config: valid
    bash, and the train command's overrides, with its defaults filled in, validate."""
    import re
    import subprocess

    from diffdistill.trainers import load_run_config

    script = ROOT / "benchmarks" / "gpu_ict_scratch.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    train = text[text.index("diffdistill.app.cli train"):text.index("${ICT_DEVICE_ARGS")]
    train = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", train.replace("\\\n", " "))
    keys = re.findall(r"([a-z_]+\.[a-z_.]+=\S+)", train.replace('"', "").replace("'", ""))
    assert len(keys) >= 10 and any(k.startswith("train.batch_size=1024") for k in keys)
    cls, cfg = load_run_config(ROOT / "configs" / "ict" / "toy_scratch_wide.yaml",
                               keys)
    assert cls is ICTTrainer and cfg.train.batch_size == 1024 and cfg.ict.init == "scratch"
