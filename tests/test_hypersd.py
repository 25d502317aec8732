"""Hyper-SD trainer (TSCD stages, ReFL reward, one-step score distillation, unified LoRA) on
tiny stock-diffusers models (CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffdistill.trainers.checkpointing import list_checkpoints
from diffdistill.trainers.common import frozen
from diffdistill.trainers.hypersd import (
    HyperSDConfig,
    HyperSDTrainer,
    reward_chain,
    segment_edges,
    segment_index,
    segment_jump,
)
from helpers import stock_sd_pipeline  # noqa: E402
from standins import TINY_CLIP, make_tiny_clip, make_tiny_imagereward
from torch import nn

from diffdistill.config import ConfigError, build_config, deep_merge, load_yaml
from diffdistill.denoiser import Denoiser
from diffdistill.export import EXPORT_INFO
from diffdistill.losses import dmd_loss, gan_generator_loss, l2
from diffdistill.sampling import generate, tcd_timesteps
from diffdistill.schedule import VPSchedule
from diffdistill.tiny import SD_SCHEDULER

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a bag", "a photo of a coat"]
ALL_STAGES = [{"segments": 8, "steps": 1}, {"segments": 4, "steps": 1},
              {"segments": 2, "steps": 1, "reward": True}, {"segments": 1, "steps": 1},
              {"segments": 1, "score_distill": True}]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def make_cfg(model_dir, out, *, adapter="lora", steps=2, lr=1e-3, stages=None, clip=None,
             **sections):
    hs = {"stages": stages or [{"segments": 4}], "w_min": 1.0, "w_max": 4.0,
          "score_distill": {"guidance_scale": 2.0, "fake_updates_per_generator_update": 2}}
    if clip is not None:
        cfg_file, weights, _ = clip
        hs["reward"] = {"weight": 0.5, "model": {"kind": "clip", "path": str(weights),
                                                 "model_name": TINY_CLIP,
                                                 "config_path": str(cfg_file)}}
    data = {
        "method": "hypersd", "output_dir": str(out), "seed": 0,
        "model": {"path": str(model_dir)},
        "data": {"kind": "fashion_mnist", "resolution": 32, "limit": 8},
        "train": {"max_steps": steps, "batch_size": 2, "lr": lr, "checkpoint_every": 0,
                  "cpu": True},
        # adapter: "lora" / "full", or a dict over the LoRA defaults
        "adapter": {"type": "lora", "rank": 4, "conv": True,
                    **({"type": adapter} if isinstance(adapter, str) else adapter)},
        "hypersd": hs,
        "log": {"every": 1, "progress": False, "tensorboard": False},
    }
    return build_config(HyperSDConfig, deep_merge(data, sections))


def ready(cfg):
    tr = HyperSDTrainer(cfg)
    tr.setup()
    return tr, next(tr._batches())


def randomize(params, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def acp_of(model_dir):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_pretrained(str(model_dir / "scheduler")).alphas_cumprod.double()


def x0_eps(raw, x, t, acp, prediction_type):
    t = torch.as_tensor(t).reshape(-1).long().expand(x.shape[0])
    a = acp[t].sqrt().view(-1, 1, 1, 1).float()
    s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1).float()
    if prediction_type == "epsilon":
        return (x - s * raw) / a, raw
    return a * x - s * raw, s * x + a * raw  # v


def jump(x0, eps, s, acp):
    s = torch.as_tensor(s).reshape(-1).long().expand(x0.shape[0])
    return (acp[s].sqrt().view(-1, 1, 1, 1).float() * x0
            + (1 - acp[s]).sqrt().view(-1, 1, 1, 1).float() * eps)


# ----------------------------------------------------------------------------- segments


def test_segment_edges_are_where_the_stock_tcd_chain_lands():
    from diffusers import TCDScheduler

    expected = {8: [0, 139, 259, 379, 499, 639, 759, 879], 4: [0, 259, 499, 759],
                2: [0, 499], 1: [0]}
    grid = torch.arange(1, 51, dtype=torch.float64) * 20 - 1  # solver grid 19 … 999
    stock = TCDScheduler(**SD_SCHEDULER)
    for k, edges in expected.items():
        e = segment_edges(k)
        assert e.tolist() == edges
        # the k-step TCD chain (γ = 0 lands on its next timestep) walks edge to edge
        stock.set_timesteps(k)
        assert stock.timesteps.tolist() == reward_chain(k).long().tolist()
        assert stock.timesteps.tolist()[1:] == edges[1:][::-1]
        assert all(s in grid.tolist() for s in edges[1:])  # solver-grid points
        # a sample in segment i maps to edge i: s_i < t ≤ s_{i+1}
        idx = segment_index(grid, e)
        for t, i in zip(grid.tolist(), idx.tolist()):
            assert e[i] < t and (i + 1 == k or t <= e[i + 1]), (k, t)
            assert t - 20 >= e[i] or (e[i] == 0 and t == 19)  # the solver stays in it
        on_edges = e[1:]
        assert torch.equal(e[segment_index(on_edges, e)], e[:-1])  # an edge is in the one below
    assert segment_index(torch.tensor([999.0, 880.0, 879.0, 140.0, 139.0, 19.0]),
                         segment_edges(8)).tolist() == [7, 7, 6, 1, 0, 0]


class _FixedOutput(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, t, **kw):
        return (self.out,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_segment_jump_is_a_ddim_jump_and_the_identity_on_the_edge(prediction_type):
    schedule = VPSchedule.from_config(SD_SCHEDULER)
    g = torch.Generator().manual_seed(0)
    x, raw = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    model = Denoiser(_FixedOutput(raw), schedule, prediction_type)
    t = torch.tensor([999.0, 519.0, 259.0])
    pred = model(x, t)
    s = torch.tensor([759.0, 499.0, 259.0])  # the last sample sits on its edge
    out = segment_jump(pred, schedule, x, t, s)
    acp = schedule.alphas_cumprod.double()
    ref = jump(pred.x0, pred.eps, s, acp)
    assert torch.allclose(out[:2], ref[:2], atol=1e-5)
    assert torch.equal(out[2], x[2])  # f(x, s; s) = x exactly
    # … which the parameterisation satisfies algebraically too (α_t x0̂ + σ_t ε̂ = x_t)
    assert torch.allclose(jump(pred.x0, pred.eps, t, acp), x, atol=1e-4)


# ----------------------------------------------------------------------------- TSCD


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_tscd_terms_map_each_sample_to_its_segment_edge(adapter, sd_v_dir, tmp_path):
    """Student jump to the edge, guided teacher DDIM step (adapters off), EMA target's jump —
    recomputed from stock UNets of a v-prediction folder."""
    from diffusers import UNet2DConditionModel

    tr, batch = ready(make_cfg(sd_v_dir, tmp_path, adapter=adapter))
    student = tr.unwrap(tr.unet)
    if adapter == "lora":
        randomize(tr.trainable["unet"])  # a non-trivial LoRA: the teacher pass must drop it
    else:
        randomize([student.conv_out.weight], scale=0.05)
    # the target θ⁻ is the EMA copy, not the online net; with LoRA it shares the frozen base
    target_unet = tr.target.unet
    assert target_unet is not student
    shadow = tr.emas["target"][0].shadow
    for n, p in target_unet.named_parameters():
        if n in shadow:
            assert p.data_ptr() == shadow[n].data_ptr()
    if adapter == "lora":
        base = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.base_layer.weight"
        assert (dict(target_unet.named_parameters())[base].data_ptr()
                == dict(student.named_parameters())[base].data_ptr())
    # pick t: 519 (segment (499, 759]: solver lands on the edge 499) and 999 (edge 759)
    tr.randint = lambda low, high, shape: torch.tensor([24, 0])  # grid is descending
    tr.generator.manual_seed(3)
    terms = tr.tscd_terms(batch, 4)
    assert terms.t_start.tolist() == [519.0, 999.0] and terms.t_end.tolist() == [499.0, 979.0]
    assert terms.edge.tolist() == [499.0, 759.0]
    assert terms.student_edge.requires_grad and not terms.target_edge.requires_grad
    assert torch.equal(terms.target_edge[0], terms.x_end[0])  # boundary: target = solver output

    acp = acp_of(sd_v_dir)
    teacher = UNet2DConditionModel.from_pretrained(str(sd_v_dir / "unet")).eval()
    c, u = terms.cond.encoder_hidden_states, terms.cond.uncond.encoder_hidden_states
    x, t, w = terms.x_start, terms.t_start, terms.w.view(-1, 1, 1, 1)
    with torch.no_grad():
        x0c, ec = x0_eps(teacher(x, t, encoder_hidden_states=c).sample, x, t, acp, "v")
        x0u, eu = x0_eps(teacher(x, t, encoder_hidden_states=u).sample, x, t, acp, "v")
        x0g, eg = x0u + (1 + w) * (x0c - x0u), eu + (1 + w) * (ec - eu)
        x_end = jump(x0g, eg, terms.t_end, acp)
        assert torch.allclose(terms.x_end, x_end, atol=1e-4)
        s_x0, s_eps = x0_eps(student(x, t, encoder_hidden_states=c).sample, x, t, acp, "v")
        assert torch.allclose(terms.student_edge, jump(s_x0, s_eps, terms.edge, acp), atol=1e-4)
        te = terms.t_end
        t_x0, t_eps = x0_eps(target_unet(x_end, te, encoder_hidden_states=c).sample, x_end, te,
                             acp, "v")
        target = jump(t_x0, t_eps, terms.edge, acp)
    assert torch.allclose(terms.target_edge[1], target[1], atol=1e-4)
    assert torch.allclose(terms.loss, l2(terms.student_edge, terms.target_edge))


def test_stages_follow_the_step_and_resync_the_target(sd_dir, tmp_path):
    stages = [{"segments": 8, "steps": 2}, {"segments": 4, "steps": 1}, {"segments": 1}]
    tr, batch = ready(make_cfg(sd_dir, tmp_path, stages=stages, lr=1e-2, steps=6))
    assert [tr.stage_index(s) for s in range(7)] == [0, 0, 1, 2, 2, 2, 2]
    student = tr.unwrap(tr.unet)
    target = dict(tr.target.unet.named_parameters())
    names = tr.emas["target"][0].names

    def same():
        online = dict(student.named_parameters())
        return all(torch.equal(online[n], target[n]) for n in names)

    seen = []
    for step in range(4):
        if step in (2, 3):  # a stage's first step: θ⁻, lagging θ, is reset to θ; θ carries on
            tr.global_step = step
            assert tr.stage_index() == tr.state["stage"] + 1 and not same()
            online = [p.detach().clone() for p in tr.trainable["unet"]]
            tr.enter_stage()
            assert same() and tr.state["stage"] == tr.stage_index()
            assert all(torch.equal(a, b) for a, b in zip(online, tr.trainable["unet"]))
        tr.global_step = step
        seen.append(int(tr.train_step(batch)["segments"]))
        tr.update_emas()  # what fit() does after every successful step
    assert seen == [8, 8, 4, 1] and tr.state["stage"] == 2


# ----------------------------------------------------------------------------- ReFL


def test_reward_term_runs_the_chain_and_its_gradient_reaches_the_lora(sd_dir, tiny_clip,
                                                                        tmp_path):
    from diffusers import UNet2DConditionModel

    stages = [{"segments": 4, "reward": True}]
    tr, batch = ready(make_cfg(sd_dir, tmp_path, stages=stages, clip=tiny_clip,
                               hypersd={"reward": {"t_range": [400, 600]}}))
    randomize(tr.trainable["unet"])
    cond = tr.backbone.encode_prompts(PROMPTS)
    tr.generator.manual_seed(5)
    x_stop, t_stop = tr.reward_input(cond, 4)
    assert float(t_stop) == 499.0  # the only step of [999, 759, 499, 259] in the range
    assert not x_stop.requires_grad  # the chain runs without gradient
    # in training this prediction is part of the step's one batched student forward
    reward = tr.reward(tr.student_forward([(x_stop, t_stop)], cond)[0], PROMPTS)
    grads = torch.autograd.grad(reward.sum(), tr.trainable["unet"], allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0

    # recompute: pure noise at 999 → jump to 759 → jump to 499 (no grad) → x0̂ → decode → R
    tr.generator.manual_seed(5)
    tr.randint(0, 1, (1,))
    noise = tr.randn(2, 4, 16, 16)
    acp = acp_of(sd_dir)
    with torch.no_grad():
        unet, ehs = tr.unwrap(tr.unet), cond.encoder_hidden_states
        x = noise
        for t, s in ((999, 759), (759, 499)):
            x0, eps = x0_eps(unet(x, t, encoder_hidden_states=ehs).sample, x, t, acp, "epsilon")
            x = jump(x0, eps, s, acp)
        assert torch.allclose(x_stop, x, atol=1e-5)
        x0, _ = x0_eps(unet(x, 499, encoder_hidden_states=ehs).sample, x, 499, acp, "epsilon")
        expected = tr.reward_model(tr.backbone.decode_latents(x0), PROMPTS)
        # the LoRA matters: the teacher alone scores differently
        teacher = UNet2DConditionModel.from_pretrained(str(sd_dir / "unet")).eval()
        x0t, _ = x0_eps(teacher(x, 499, encoder_hidden_states=ehs).sample, x, 499, acp,
                        "epsilon")
    assert torch.allclose(reward.detach(), expected, atol=1e-5)
    assert not torch.allclose(x0t, x0, atol=1e-3)
    logs = tr.train_step(batch)
    assert float(logs["loss"]) == pytest.approx(
        float(logs["loss_tscd"]) - 0.5 * float(logs["reward"]), abs=1e-6)


def test_aesthetic_reward_is_the_laion_mlp_on_the_normalised_clip_embedding(tiny_clip, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    from diffdistill.rewards import AestheticHead, load_reward_model

    cfg_file, weights, model = tiny_clip
    torch.manual_seed(0)
    head = AestheticHead(64).eval()
    keys = {"layers.0.weight", "layers.2.weight", "layers.4.weight", "layers.6.weight",
            "layers.7.weight"}
    assert keys <= set(head.state_dict())  # the LAION checkpoint's layout
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    torch.save(head.state_dict(), tmp_path / "head.pth")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = model.encode_image(((images + 1) / 2 - mean) / std)
        expected = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    for name in ("head.safetensors", "head.pth"):
        r = load_reward_model("aesthetic", weights, model_name=TINY_CLIP, config_path=cfg_file,
                              head_path=tmp_path / name)
        assert r.logit_scale == 1.0
        x = images.clone().requires_grad_(True)
        score = r(x, PROMPTS)
        assert torch.allclose(score.detach(), expected, atol=1e-5)
        assert float(torch.autograd.grad(score.sum(), x)[0].abs().sum()) > 0
    with pytest.raises(FileNotFoundError, match="head_path"):
        load_reward_model("aesthetic", weights, model_name=TINY_CLIP, config_path=cfg_file)


def test_imagereward_from_the_reward_section_drives_the_refl_term(sd_dir, tmp_path):
    """`reward.model: {kind: imagereward, path: folder}` (the section RG-LCD shares) runs a
    ReFL step whose reward gradient reaches the LoRA through the VAE decoder and BLIP."""
    from diffdistill.trainers.lcd import RGLCDConfig

    from diffdistill.rewards import ImageRewardModel

    folder, *_ = make_tiny_imagereward(tmp_path)
    section = {"kind": "imagereward", "path": str(folder)}
    rg = build_config(RGLCDConfig, {"method": "rglcd", "model": {"path": "x"},
                                    "reward": section})
    assert rg.reward.kind == "imagereward"
    tr, batch = ready(make_cfg(sd_dir, tmp_path / "run", stages=[{"segments": 2, "reward": True}],
                               hypersd={"reward": {"weight": 0.5, "model": section}}))
    assert isinstance(tr.reward_model, ImageRewardModel)
    randomize(tr.trainable["unet"])
    cond = tr.backbone.encode_prompts(PROMPTS)
    x, t = tr.reward_input(cond, 2)
    reward = tr.reward(tr.student_forward([(x, t)], cond)[0], PROMPTS)
    grads = torch.autograd.grad(reward.sum(), tr.trainable["unet"], allow_unused=True)
    grads = [g for g in grads if g is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    logs = tr.train_step(batch)
    assert math.isfinite(float(logs["reward"]))
    assert float(logs["loss"]) == pytest.approx(
        float(logs["loss_tscd"]) - 0.5 * float(logs["reward"]), abs=1e-6)


# ----------------------------------------------------------------------------- score distill


def test_score_distillation_uses_teacher_cfg_and_a_fake_lora_on_the_shared_base(sd_dir,
                                                                                 tmp_path):
    from diffusers import UNet2DConditionModel

    stages = [{"segments": 1, "score_distill": True}]
    tr, batch = ready(make_cfg(sd_dir, tmp_path, stages=stages, lr=1e-2))
    student, fake = tr.unwrap(tr.unet), tr.unwrap(tr.fake_score)
    base = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.base_layer.weight"
    assert (dict(student.named_parameters())[base].data_ptr()
            == dict(fake.named_parameters())[base].data_ptr())  # one base UNet for all
    randomize(tr.trainable["unet"])  # the real score must not see the student's LoRA
    cond = tr.backbone.encode_prompts(PROMPTS, with_uncond=True)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    tr.generator.manual_seed(2)
    loss, _ = tr.distribution_matching_loss(x, cond)
    tr.generator.manual_seed(2)
    t = tr.sample_t(2)
    x_t = tr.backbone.schedule.add_noise(x, tr.randn(2, 4, 16, 16), t)
    acp = acp_of(sd_dir)
    teacher = UNet2DConditionModel.from_pretrained(str(sd_dir / "unet")).eval()
    with torch.no_grad():
        c, u = cond.encoder_hidden_states, cond.uncond.encoder_hidden_states
        x0c, _ = x0_eps(teacher(x_t, t, encoder_hidden_states=c).sample, x_t, t, acp, "epsilon")
        x0u, _ = x0_eps(teacher(x_t, t, encoder_hidden_states=u).sample, x_t, t, acp, "epsilon")
    # the fake LoRA starts at zero: fake score = teacher without guidance
    expected = dmd_loss(x, x0u + 2.0 * (x0c - x0u), x0c).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)

    # step 0 of the stage: DM term + fake update; step 1: TSCD + fake update only (ratio 2)
    before = {n: [p.detach().clone() for p in tr.trainable[n]] for n in ("unet", "fake_score")}
    logs = tr.train_step(batch)
    assert "loss_dm" in logs and "loss_fake" in logs
    assert float(logs["loss"]) == pytest.approx(
        float(logs["loss_tscd"]) + float(logs["loss_dm"]), rel=1e-6)
    for n in before:
        assert any(not torch.equal(a, b) for a, b in zip(before[n], tr.trainable[n])), n
    tr.global_step = 1
    logs = tr.train_step(batch)
    assert "loss_dm" not in logs and "loss_fake" in logs


# ----------------------------------------------------------------------------- adversarial


def test_adversarial_head_reads_the_teachers_bottleneck(sd_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    tr, batch = ready(make_cfg(sd_dir, tmp_path, hypersd={"adversarial_weight": 0.5}))
    randomize(tr.trainable["unet"])
    head = tr.unwrap(tr.discriminator)
    cond = tr.backbone.encode_prompts(PROMPTS)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([499.0, 0.0], dtype=torch.float64)
    logits = tr.discriminator_logits(x, t, cond)
    teacher = UNet2DConditionModel.from_pretrained(str(sd_dir / "unet")).eval()
    feats = {}
    teacher.mid_block.register_forward_hook(lambda m, i, o: feats.setdefault("f", o))
    with torch.no_grad():
        teacher(x, t.float(), encoder_hidden_states=cond.encoder_hidden_states)
        assert torch.allclose(logits, head(feats["f"]), atol=1e-5)
    # the generator's term reaches the LoRA but not the head; the head trains on its own loss
    tr.generator.manual_seed(0)
    heads_before = [p.detach().clone() for p in head.parameters()]
    lora_before = [p.detach().clone() for p in tr.trainable["unet"]]
    logs = tr.train_step(batch)
    assert float(logs["loss"]) == pytest.approx(
        float(logs["loss_tscd"]) + 0.5 * float(logs["loss_adv"]), rel=1e-6)
    assert math.isfinite(float(logs["loss_discriminator"]))
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, head.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, tr.trainable["unet"]))
    tr.optimizers["unet"].zero_grad(set_to_none=True)
    with frozen(head):
        terms = tr.tscd_terms(batch, 4)
        gan_generator_loss(tr.discriminator_logits(terms.student_edge, terms.edge,
                                                   terms.cond.replace(uncond=None))).sum().backward()
    assert all(p.grad is None for p in head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.trainable["unet"])


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def lora_runs(sd_dir, tiny_clip, tmp_path_factory):
    """Every stage for one step (8 → 4 → 2 + reward → 1 → 1 + DM), cut after the 2nd step and
    resumed, next to an uninterrupted run."""
    root = tmp_path_factory.mktemp("hypersd-runs")

    def run(out, steps, every, resume=None):
        cfg = make_cfg(sd_dir, out, steps=steps, lr=1e-2, stages=ALL_STAGES, clip=tiny_clip,
                       train={"checkpoint_every": every}, hypersd={"gamma": 0.5})
        tr = HyperSDTrainer(cfg)
        tr.fit(resume=resume)
        return tr

    a = run(root / "a", 5, every=5)
    run(root / "b", 2, every=2)  # cut at the end of the 4-segment stage
    b = run(root / "b", 5, every=2, resume="latest")
    return root, a, b


def test_resume_lands_in_the_right_stage_bit_identically(lora_runs):
    from safetensors.torch import load_file

    root, a, b = lora_runs
    ma = [json.loads(x) for x in (root / "a" / "metrics.jsonl").open()]
    mb = [json.loads(x) for x in (root / "b" / "metrics.jsonl").open()]
    assert [m["segments"] for m in ma] == [8, 4, 2, 1, 1]
    assert "reward" in ma[2] and "loss_dm" in ma[4] and "loss_fake" in ma[4]
    strip = [{k: v for k, v in m.items() if k != "it_per_s"} for m in ma]
    assert strip == [{k: v for k, v in m.items() if k != "it_per_s"} for m in mb]
    assert a.state["stage"] == b.state["stage"] == 4
    ca, cb = list_checkpoints(root / "a")[-1], list_checkpoints(root / "b")[-1]
    assert ca.name == cb.name == "checkpoint-5"
    files = sorted(p.name for p in ca.glob("*.safetensors") if "rng" not in p.name)
    assert "trainer_tensors.safetensors" in files and len(files) >= 3  # LoRA, fake, EMA
    for name in files:
        ta, tb = load_file(str(ca / name)), load_file(str(cb / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name


def _ours(tr, unet, steps, gamma, seeds=(3, 4)):
    """The trainer's sampler: generate(..., sampler="tcd") on the student, images in [0, 1]."""
    bb = tr.backbone
    img = generate(bb.denoiser(unet), seeds=list(seeds), shape=(4, 16, 16),
                   cond_fn=lambda sl: bb.encode_prompts(PROMPTS[sl]), sampler="tcd",
                   num_steps=steps, timesteps=tcd_timesteps(steps), decode=bb.decode_latents,
                   output="float", progress=False, sampler_opts={"gamma": gamma})
    return ((img + 1) / 2).clamp(0, 1)


def _stock(pipe, steps, gamma, seeds=(3, 4)):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=1.0, eta=gamma,
                    generator=gens, output_type="pt", height=32, width=32).images


@pytest.fixture(scope="module")
def sdxl_lora_run(sdxl_dir, tmp_path_factory):
    """Two Hyper-SD steps (4 then 2 segments) of a LoRA on the SDXL-structured fixture. The
    LoRA skips the tiny UNet's ``upsamplers.0.conv``: that upsampler sits in an attention-free
    up block, which real SDXL does not have and diffusers' kohya (sgm-name) loader cannot
    place (see test_export.test_ldm_names_of_real_sdxl)."""
    from diffdistill.adapters import ATTENTION_TARGETS, CONV_TARGETS

    root = tmp_path_factory.mktemp("hypersd-sdxl")
    targets = list(ATTENTION_TARGETS) + [t for t in CONV_TARGETS if t != "upsamplers.0.conv"]
    cfg = make_cfg(sdxl_dir, root, steps=2, lr=1e-2,
                   stages=[{"segments": 4, "steps": 1}, {"segments": 2}],
                   adapter={"conv": False, "target_modules": targets}, hypersd={"gamma": 0.5})
    tr = HyperSDTrainer(cfg)
    tr.fit()
    return root, tr


def _stock_pipe(kind, base_dir, lora_dir=None, weight_name=None):
    """A fresh stock SD / SDXL pipeline with ``TCDScheduler`` from its own scheduler config
    (as the export's model card does) and optionally the exported LoRA file."""
    from diffusers import StableDiffusionXLPipeline, TCDScheduler

    if kind == "sd":
        return stock_sd_pipeline(base_dir, TCDScheduler, lora_dir, weight_name)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(base_dir))
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    if weight_name:
        pipe.load_lora_weights(str(lora_dir), weight_name=weight_name)
    return pipe


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_unified_lora_loads_in_a_stock_pipeline_with_tcd_at_1_2_4_8_steps(kind, request, sd_dir,
                                                                          sdxl_dir, tmp_path):
    """The exported LoRA (diffusers and kohya files) in a stock pipeline + TCDScheduler gives
    the trainer's own TCD samples at every served step count (SD: the all-stages run, SDXL:
    a short run on the SDXL-structured fixture)."""
    from diffdistill.adapters import adapters_disabled
    from diffdistill.export import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME

    if kind == "sd":
        root, a, _ = request.getfixturevalue("lora_runs")
        out, base = root / "a" / "export", sd_dir
    else:
        root, a = request.getfixturevalue("sdxl_lora_run")
        out, base = root / "export", sdxl_dir
    assert a.backbone.kind == kind
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["sampler"] == "tcd" and info["sampler_opts"] == {"gamma": 0.5}
    assert info["served_steps"] == [1, 2, 4, 8] and info["timesteps"] == [999, 759, 499, 259]
    card = (out / "README.md").read_text()
    assert (out / KOHYA_WEIGHT_NAME).is_file() and "eta=0.5" in card
    assert "TCDScheduler.from_config(pipe.scheduler.config)" in card  # what _stock_pipe does

    pipe = _stock_pipe(kind, base, out, LORA_WEIGHT_NAME)
    unet = a.unwrap(a.unet)
    n_lora = sum(1 for k in unet.state_dict() if "lora_A" in k)
    assert n_lora and sum(1 for k in pipe.unet.state_dict() if "lora_A" in k) == n_lora
    for steps in (1, 2, 4, 8):  # images in [0, 1]
        assert (_stock(pipe, steps, 0.5) - _ours(a, unet, steps, 0.5)).abs().max() <= 1e-4, steps
    with adapters_disabled(unet):  # the LoRA matters
        assert (_ours(a, unet, 2, 0.5) - _stock(pipe, 2, 0.5)).abs().max() > 1e-3
    assert (_stock(pipe, 4, 0.0) - _stock(pipe, 4, 0.5)).abs().max() > 1e-3  # eta matters
    kohya_pipe = _stock_pipe(kind, base, out, KOHYA_WEIGHT_NAME)
    assert sum(1 for k in kohya_pipe.unet.state_dict() if "lora_A" in k) == n_lora
    assert (_stock(kohya_pipe, 2, 0.5) - _ours(a, unet, 2, 0.5)).abs().max() <= 1e-4
    # `diffdistill sample` reads the export's sampler, steps and gamma (0.5, not TCD's 0.3)
    import numpy as np
    from PIL import Image

    from diffdistill.cli import main

    png = tmp_path / "cli.png"
    args = ["sample", str(base), "--lora", str(out), "--seed", "3", "--num", "1",
            "--out", str(png)]
    for p in PROMPTS:
        args += ["--prompt", p]
    assert main(args) == 0
    grid = np.asarray(Image.open(png))
    stock4 = (_stock(pipe, 4, 0.5) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for r in range(len(PROMPTS)):
        tile = grid[2 + r * 34: 2 + r * 34 + 32, 2:34]
        assert np.abs(tile.astype(int) - stock4[r].astype(int)).max() <= 1, r


def test_full_export_is_a_stock_pipeline_with_tcd(sd_v_dir, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, TCDScheduler

    stages = [{"segments": 4, "steps": 1}, {"segments": 1, "score_distill": True}]
    tr = HyperSDTrainer(make_cfg(sd_v_dir, tmp_path / "run", adapter="full", steps=2, lr=1e-3,
                                 stages=stages, hypersd={"gamma": 0.5}))
    logs = tr.fit()
    assert "loss_dm" in logs and "loss_fake" in logs  # a full fake-score copy trained too
    assert not any(p.data_ptr() == q.data_ptr() for p, q in
                   zip(tr.unwrap(tr.fake_score).parameters(), tr.unwrap(tr.unet).parameters()))
    out = tmp_path / "run" / "export"
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, TCDScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    student = tr.unwrap(tr.unet)
    for steps in (1, 4):
        assert (_stock(pipe, steps, 0.5) - _ours(tr, student, steps, 0.5)).abs().max() <= 1e-4
    teacher = StableDiffusionPipeline.from_pretrained(str(sd_v_dir))
    teacher.scheduler = TCDScheduler.from_config(teacher.scheduler.config)
    assert (_stock(teacher, 1, 0.5) - _stock(pipe, 1, 0.5)).abs().max() > 1e-4  # it trained


def _stock_one_step_gap(tr, out, t: int) -> float:
    """Max difference between the stock SD pipeline called with timesteps=[t] (TCD, eta 0.3)
    on the export ``out`` and the trainer's own one-step TCD sampler."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    with torch.no_grad():
        stock = pipe(PROMPTS, timesteps=[t], guidance_scale=1.0, eta=0.3, generator=gens,
                     output_type="pt", height=32, width=32).images
    bb = tr.backbone
    ours = generate(bb.denoiser(tr.unwrap(tr.unet)), seeds=[3, 4], shape=(4, 16, 16),
                    cond_fn=lambda sl: bb.encode_prompts(PROMPTS[sl]), sampler="tcd",
                    num_steps=1, timesteps=torch.tensor([t]), decode=bb.decode_latents,
                    output="float", progress=False, sampler_opts={"gamma": 0.3})
    return float((stock - ((ours + 1) / 2).clamp(0, 1)).abs().max())


def test_one_step_conditioning_timestep_trains_samples_and_exports(sd_dir, tmp_path):
    """score_distill.timestep = 599: the DM sample is x0̂_θ(ε, 599), TCD's one-step grid is
    [599] (more steps unchanged), the export records it, the bench reads it back, and a stock
    pipeline called with timesteps=[599] reproduces the trainer's one-step sampler."""
    from diffdistill.eval.bench_config import BenchModel
    from diffdistill.eval.eval_model import load_eval_model

    stages = [{"segments": 1, "score_distill": True}]
    tr = HyperSDTrainer(make_cfg(sd_dir, tmp_path / "run", adapter="full", steps=2, lr=1e-3,
                                 stages=stages, hypersd={"score_distill": {"timestep": 599}}))
    tr.fit()
    cond = tr.backbone.encode_prompts(PROMPTS)
    _, t = tr.onestep_input(cond)
    assert t.tolist() == [599.0, 599.0]
    assert tr.tcd_timesteps(1).tolist() == [599] and tr.tcd_timesteps(4).tolist() == [
        999, 759, 499, 259]
    out = tmp_path / "run" / "export"
    info = json.loads((out / "diffdistill_export.json").read_text())
    assert info["timesteps_by_steps"] == {"1": [599]}
    assert load_eval_model(BenchModel(name="h", path=str(out))).grid_for(1).tolist() == [599.0]
    assert _stock_one_step_gap(tr, out, 599) <= 1e-4
    assert "599" in (out / "README.md").read_text()


def test_one_step_sample_timestep_apart_from_the_training_one(sd_dir, tmp_path):
    """score_distill.timestep = 599 trains the one-step generator; sample_timestep = 699 is
    where the unified LoRA samples one step: the trainer's grid, the export record, the bench
    and the card all say 699, and the stock pipeline called with timesteps=[699] reproduces it."""
    from diffdistill.eval.bench_config import BenchModel
    from diffdistill.eval.eval_model import load_eval_model

    from diffdistill.config import ConfigError

    stages = [{"segments": 1, "score_distill": True}]
    tr = HyperSDTrainer(make_cfg(sd_dir, tmp_path / "run", adapter="full", steps=1, lr=1e-3,
                                 stages=stages, hypersd={"score_distill": {
                                     "timestep": 599, "sample_timestep": 699}}))
    tr.fit()
    _, t = tr.onestep_input(tr.backbone.encode_prompts(PROMPTS))
    assert t.tolist() == [599.0, 599.0]  # training input: unchanged
    assert tr.tcd_timesteps(1).tolist() == [699] and tr.tcd_timesteps(2).tolist() == [999, 499]
    out = tmp_path / "run" / "export"
    info = json.loads((out / "diffdistill_export.json").read_text())
    assert info["timesteps_by_steps"] == {"1": [699]}
    assert load_eval_model(BenchModel(name="h", path=str(out))).grid_for(1).tolist() == [699.0]
    assert "| 1-step timestep (pass timesteps=[t] for one step) | 699 |" in (
        out / "README.md").read_text()
    assert _stock_one_step_gap(tr, out, 699) <= 1e-4
    with pytest.raises(ConfigError, match=r"hypersd.score_distill.sample_timestep=1000"):
        HyperSDTrainer(make_cfg(sd_dir, tmp_path / "bad", adapter="full", stages=stages,
                                hypersd={"score_distill": {"sample_timestep": 1000}})).setup()


# ----------------------------------------------------------------------------- configs


def test_config_errors_name_the_key(sd_dir, tmp_path):
    cases = [
        ({"stages": [{"segments": 4, "steps": 1}, {"segments": 8}]}, r"stages\[1\].segments"),
        ({"stages": [{"segments": 2, "score_distill": True}]}, r"stages\[0\]: score_distill"),
        ({"stages": [{"segments": 8}, {"segments": 4}]}, r"stages\[0\].steps"),
        ({"stages": [{"segments": 60}]}, r"stages\[0\].segments"),
        ({"stages": [{"segments": 2, "reward": True}]}, "hypersd.reward.model.path"),
        ({"gamma": 1.5}, "hypersd.gamma"),
        ({"served_steps": [1, 99]}, "hypersd.served_steps"),
        ({"stages": [{"segments": 2, "reward": True}],
          "reward": {"model": {"kind": "aesthetic", "path": "x"}}}, "model.head_path"),
    ]
    for hs, match in cases:
        with pytest.raises(ConfigError, match=match):
            build_config(HyperSDConfig, {"method": "hypersd", "model": {"path": "x"},
                                         "hypersd": hs})
    with pytest.raises(ConfigError, match=r"hypersd.reward.t_range.*\[999\]"):
        ready(make_cfg(sd_dir, tmp_path, stages=[{"segments": 1, "reward": True}],
                       clip=(tmp_path, tmp_path, None),
                       hypersd={"reward": {"t_range": [0, 500]}}))


@pytest.mark.parametrize("name,kind,every_stage", [("toy.yaml", "sd", True),
                                                    ("sdxl.yaml", "sdxl", True),
                                                    ("sd15.yaml", "sd", False)])
def test_config_runs_on_a_tiny_model_of_its_structure(name, kind, every_stage, sd_dir, sdxl_dir,
                                                      tiny_clip, tmp_path):
    """Every stage for one step on each structure (sd: toy, sdxl); sd15 (SD structure, like
    toy) runs its first step."""
    from diffdistill.trainers import load_run_config

    path = ROOT / "configs" / "hypersd" / name
    raw = load_yaml(path)
    stages = [{**st, "steps": 1} for st in raw["hypersd"]["stages"]]
    run = len(stages) if every_stage else 1
    cfg_file, weights, _ = tiny_clip
    overrides = [
        f"model.path={sdxl_dir if kind == 'sdxl' else sd_dir}", "model.frozen_dtype=fp32",
        "model.gradient_checkpointing=false", "data.kind=fashion_mnist", "data.path=",
        "data.resolution=32", "data.limit=4", "data.num_workers=0", f"output_dir={tmp_path}",
        f"train.max_steps={run}", "train.batch_size=2", "train.cpu=true",
        "train.mixed_precision='no'", "train.checkpoint_every=0", "log.progress=false",
        "log.tensorboard=false", "log.grid_every=0", "log.every=1", "adapter.rank=4",
        f"hypersd.stages={json.dumps(stages)}", "hypersd.reward.model.kind=clip",
        f"hypersd.reward.model.path={weights}", f"hypersd.reward.model.model_name={TINY_CLIP}",
        f"hypersd.reward.model.config_path={cfg_file}",
    ]
    cls, cfg = load_run_config(path, overrides)
    assert cls is HyperSDTrainer
    # the recipe itself is what runs: the method section is the file's (but stage lengths)
    for key in ("w_min", "w_max", "loss", "gamma", "served_steps", "target_ema_decay"):
        assert getattr(cfg.hypersd, key) == raw["hypersd"][key], key
    assert cfg.adapter.type == raw["adapter"]["type"]
    logs = cls(cfg).fit()
    assert math.isfinite(float(logs["loss"]))
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").open()]
    assert [m["segments"] for m in metrics] == [st["segments"] for st in stages[:run]]
    assert all(("reward" in m) == bool(st.get("reward")) for m, st in zip(metrics, stages))
    assert all(("loss_dm" in m) == bool(st.get("score_distill"))
               for m, st in zip(metrics, stages))
    info = json.loads((tmp_path / "export" / EXPORT_INFO).read_text())
    assert info["sampler"] == "tcd" and info["sampler_opts"] == {"gamma": raw["hypersd"]["gamma"]}
    # every config has a reward stage: the export names that network by content
    from diffdistill.fingerprint import file_sha256

    (net,) = info["reward_networks"]
    assert net["kind"] == "clip" and list(net["sha256"].values()) == [file_sha256(weights)]
