"""SD3-class teachers (rectified-flow MMDiT, two CLIP encoders, no T5) on a tiny stock
``StableDiffusion3Pipeline``: loading, prompt conditioning bit-equal to the stock pipeline's
``encode_prompt``, the flow Euler sampler equal to the stock pipeline's images, and trainers
refusing them in one line until they are wired."""

from __future__ import annotations

import pytest
import torch

from diffdistill.backbone import folder_kind, load_backbone
from diffdistill.denoiser import is_transformer
from diffdistill.sampling import generate

PROMPTS = ["a photo of a bag", "a photo of a coat"]


@pytest.fixture(scope="module")
def stock(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    # a folder without T5 loads in stock diffusers with the T5 parts passed as None
    return StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), text_encoder_3=None,
                                                    tokenizer_3=None)


def test_loads_as_a_flow_transformer_without_t5(sd3_dir):
    bb = load_backbone(str(sd3_dir))
    assert folder_kind(sd3_dir) == bb.kind == "sd3"
    assert bb.prediction_type == "flow" and bb.schedule.kind == "flow"
    assert type(bb.unet).__name__ == "SD3Transformer2DModel" and is_transformer(bb.unet)
    assert bb.text_encoder_3 is None and bb.latent_channels == 4 and bb.resolution == 32
    assert bb.vae.config.shift_factor == pytest.approx(0.0609)


def test_prompt_conditioning_is_bit_equal_to_the_stock_pipeline(sd3_dir, stock):
    bb = load_backbone(str(sd3_dir))
    with torch.no_grad():
        pe, ne, pp, npp = stock.encode_prompt(PROMPTS, PROMPTS, PROMPTS,
                                              do_classifier_free_guidance=True)
    cond = bb.encode_prompts(PROMPTS)
    # 77 CLIP tokens, then 256 rows of zeros standing in for T5
    assert cond.encoder_hidden_states.shape == (2, 77 + 256, 64)
    assert torch.equal(cond.encoder_hidden_states, pe)
    assert torch.equal(cond.pooled_projections, pp)
    assert torch.equal(cond.uncond.encoder_hidden_states, ne)
    # the empty prompt is encoded once and repeated, the stock pipeline encodes it once per
    # sample: the pooled projection (a Linear) then runs as a matrix-vector rather than a
    # matrix-matrix product, whose rounding differs; the hidden states above are bit-equal
    torch.testing.assert_close(cond.uncond.pooled_projections, npp, rtol=0, atol=1e-6)
    with torch.no_grad():
        _, ne1, _, npp1 = stock.encode_prompt(PROMPTS[:1], None, None,
                                              do_classifier_free_guidance=True)
    assert torch.equal(cond.uncond.pooled_projections[:1], npp1)  # batch 1: bit-equal
    assert cond.encoder_hidden_states[:, 77:].abs().max() == 0


@pytest.mark.parametrize("steps, guidance", [(1, 1.0), (4, 2.0), (8, 4.5)])
def test_flow_euler_reproduces_the_stock_pipeline(sd3_dir, stock, steps, guidance):
    bb = load_backbone(str(sd3_dir))
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    with torch.no_grad():
        ref = stock(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                    output_type="pt", height=32, width=32).images
    ours = generate(bb.denoiser(), seeds=[3, 4], shape=(4, 16, 16),
                    cond_fn=lambda sl: bb.encode_prompts(PROMPTS[sl],
                                                         with_uncond=guidance != 1.0),
                    sampler="flow_euler", num_steps=steps, guidance_scale=guidance,
                    decode=bb.decode_latents, output="float", progress=False)
    assert (ref - ((ours + 1) / 2).clamp(0, 1)).abs().max() <= 1e-4
    other = generate(bb.denoiser(), seeds=[5, 6], shape=(4, 16, 16),
                     cond_fn=lambda sl: bb.encode_prompts(PROMPTS[sl], with_uncond=False),
                     sampler="flow_euler", num_steps=steps, decode=bb.decode_latents,
                     output="float", progress=False)
    assert (ours - other).abs().max() > 1e-3  # other seeds, other images: the check can fail


def test_trainers_without_flow_support_refuse_an_sd3_teacher_in_one_line(sd3_dir, tmp_path):
    from diffdistill.trainers.ict import ICTTrainer
    from helpers import tiny_run_data

    from diffdistill.config import ConfigError, build_config

    tr = ICTTrainer(build_config(ICTTrainer.config_class,
                                 tiny_run_data("ict", sd3_dir, tmp_path / "run", 32)))
    with pytest.raises(ConfigError, match="SD3/Flux-class flow-matching transformer: it loads and "
                                          "samples .* pretrain, dmd2, fdistill and lcd "
                                          "methods; ict "
                                          "does not run on one yet"):
        tr.setup()


def test_diffdistill_sample_runs_an_sd3_folder(sd3_dir, tmp_path):
    from PIL import Image

    from diffdistill.cli import main

    out = tmp_path / "grid.png"
    assert main(["sample", str(sd3_dir), "--prompt", "a bag", "--steps", "4",
                 "--guidance-scale", "3", "--num", "2", "--out", str(out)]) == 0
    assert Image.open(out).size[0] >= 64  # two 32-px images side by side


def test_logit_normal_density_matches_its_formula():
    from diffdistill.trainers.pretrain import logit_normal_sigmas
    from scipy import stats

    normal = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = logit_normal_sigmas(normal, 0.5, 0.8)
    assert torch.allclose(torch.logit(sigma), 0.5 + 0.8 * normal)
    # against the logit-normal CDF: P(σ ≤ x) = Φ((logit x − m) / s)
    ks = stats.kstest(sigma.numpy(), lambda x: stats.norm.cdf((stats.logistic.ppf(x) - 0.5) / 0.8))
    assert ks.pvalue > 0.01


def test_flow_pretraining_trains_exports_and_loads_in_stock_diffusers(sd3_dir, tmp_path):
    """Two flow-matching steps on the tiny SD3: the loss is the velocity MSE at the
    logit-normal σ, the transformer changes, and the export is a stock SD3 pipeline folder
    whose images equal the trainer's own sampler."""
    from diffdistill.trainers.pretrain import PretrainTrainer
    from diffusers import StableDiffusion3Pipeline
    from helpers import tiny_run_data

    from diffdistill.config import build_config

    cfg = build_config(PretrainTrainer.config_class, tiny_run_data(
        "pretrain", sd3_dir, tmp_path / "run", 32, train={"lr": 1e-2},
        pretrain={"sample_steps": 4, "guidance_scale": 2.0}))
    tr = PretrainTrainer(cfg)
    tr.setup()
    batch = next(tr._batches())
    gen_state = tr.generator.get_state()
    # the step by hand: σ from the trainer's stream, x_t on the flow path, v = ε − x0
    bb = tr.backbone
    with torch.no_grad():
        x0 = tr.encode_x0(batch)
        cond = tr.cond_for_batch(batch, drop_prob=cfg.pretrain.cond_dropout)
        sigma = torch.sigmoid(tr.randn(2, dtype=torch.float64).cpu())  # m = 0, s = 1
        noise = tr.randn(*x0.shape)
        s4 = sigma.float().view(-1, 1, 1, 1)
        xt = (1 - s4) * x0 + s4 * noise
        assert torch.allclose(bb.schedule.add_noise(x0, noise, sigma * 1000), xt, atol=1e-6)
        v = bb.unet(xt, timestep=(sigma * 1000).float(), encoder_hidden_states=(
            cond.encoder_hidden_states), pooled_projections=cond.pooled_projections)[0]
        expected = ((v - (noise - x0)) ** 2).mean()
    tr.generator.set_state(gen_state)
    logs = tr.train_step(batch)
    assert torch.isfinite(logs["loss"]) and logs["loss"] > 0
    torch.testing.assert_close(logs["loss"], expected, rtol=1e-5, atol=1e-7)
    tr.fit()
    out = tmp_path / "run" / "export"
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out), text_encoder_3=None,
                                                    tokenizer_3=None)
    teacher = load_backbone(str(sd3_dir)).unet.state_dict()
    trained = pipe.transformer.state_dict()
    assert any(not torch.equal(teacher[k], trained[k]) for k in teacher)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=2.0, generator=gens,
                   output_type="pt", height=32, width=32).images
    spec = tr.grid_spec()
    assert spec.sampler == "flow_euler"
    ours = generate(spec.denoiser, seeds=[3, 4], shape=(4, 16, 16),
                    cond_fn=lambda sl: bb.encode_prompts(PROMPTS[sl]), sampler="flow_euler",
                    num_steps=4, guidance_scale=2.0, decode=bb.decode_latents,
                    output="float", progress=False)
    assert (ref - ((ours + 1) / 2).clamp(0, 1)).abs().max() <= 1e-4


def test_lora_on_the_mmdit_exports_for_stock_load_lora_weights(sd3_dir, tmp_path):
    """LoRA on both attention streams of the MMDiT; the export loads with the stock
    ``StableDiffusion3Pipeline.load_lora_weights`` and with ``diffdistill sample --lora``
    (load_lora_into), giving the images of the LoRA-carrying transformer."""
    from diffusers import StableDiffusion3Pipeline
    from helpers import randomize_lora_b
    from peft.tuners.lora import LoraLayer

    from diffdistill.adapters import make_trainable
    from diffdistill.export import LORA_WEIGHT_NAME, load_lora_into, save_lora

    bb = load_backbone(str(sd3_dir))
    make_trainable(bb.unet, adapter="lora", rank=4, alpha=8)
    adapted = {n.rsplit(".", 1)[-1] for n, m in bb.unet.named_modules()
               if isinstance(m, LoraLayer)}
    assert adapted == {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                       "to_add_out"} | {"0"}  # to_out.0
    randomize_lora_b(bb.unet)
    bb.unet.eval()
    save_lora(bb.unet, tmp_path / "lora")
    assert not (tmp_path / "lora" / "lora_kohya.safetensors").exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), text_encoder_3=None,
                                                    tokenizer_3=None)
    base = _images(pipe)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=LORA_WEIGHT_NAME)
    ref = _images(pipe)
    ours = _ours(bb, bb.unet)
    assert (ref - ours).abs().max() <= 1e-4 and (ref - base).abs().max() > 1e-3
    other = load_backbone(str(sd3_dir))
    load_lora_into(other.unet, tmp_path / "lora")
    assert (_ours(other, other.unet) - ref).abs().max() <= 1e-4


def _images(pipe):
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, generator=gens,
                    output_type="pt", height=32, width=32).images


def _ours(bb, net):
    out = generate(bb.denoiser(net), seeds=[3, 4], shape=(4, 16, 16),
                   cond_fn=lambda sl: bb.encode_prompts(PROMPTS[sl], with_uncond=False),
                   sampler="flow_euler", num_steps=2, decode=bb.decode_latents,
                   output="float", progress=False)
    return ((out + 1) / 2).clamp(0, 1)


def _dmd2(sd3_dir, out, timesteps, adapter="full"):
    from diffdistill.trainers.dmd2 import DMD2Trainer
    from helpers import tiny_run_data

    from diffdistill.config import build_config

    data = tiny_run_data("dmd2", sd3_dir, out, 32, adapter={"type": adapter, "rank": 4},
                         train={"lr": 1e-3, "max_steps": 2},
                         dmd2={"timesteps": timesteps, "gan_generator_weight": 0.0,
                               "gan_discriminator_weight": 0.0,
                               "fake_updates_per_generator_update": 1})
    return DMD2Trainer(build_config(DMD2Trainer.config_class, data))


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_dmd2_one_step_on_a_flow_teacher_exports_for_the_stock_pipeline(sd3_dir, tmp_path,
                                                                       adapter, monkeypatch):
    """One-step DMD2 (distribution matching, no GAN) on the tiny SD3: it trains, and the export
    — a pipeline folder or a LoRA, with FlowMatchEuler at shift 1 and the trained sigma —
    gives the trainer's own one-step samples in the stock StableDiffusion3Pipeline."""
    import json

    from diffusers import StableDiffusion3Pipeline
    from helpers import run_model_card_code

    tr = _dmd2(sd3_dir, tmp_path / "run", [999], adapter)
    tr.fit()
    out = tmp_path / "run" / "export"
    info = json.loads((out / "diffdistill_export.json").read_text())
    assert info["sampler"] == "lcm" and info["timesteps"] == [999]
    if adapter == "lora":
        pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), text_encoder_3=None,
                                                        tokenizer_3=None)
        pipe.load_lora_weights(str(out))
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(str(out), text_encoder_3=None,
                                                        tokenizer_3=None)
        assert pipe.scheduler.config.shift == 1.0 and pipe.scheduler.config.stochastic_sampling
    ref = _stock_one_step(pipe)
    bb = tr.backbone
    ours = tr.sample_latents([3, 4], bb.encode_prompts(PROMPTS, with_uncond=False))
    ours = ((bb.decode_latents(ours) + 1) / 2).clamp(0, 1)
    assert (ref - ours).abs().max() <= 1e-4
    teacher = load_backbone(str(sd3_dir))
    with torch.no_grad():
        before = generate(teacher.denoiser(), seeds=[3, 4], shape=(4, 16, 16),
                          cond_fn=lambda sl: teacher.encode_prompts(PROMPTS[sl],
                                                                    with_uncond=False),
                          sampler="lcm", num_steps=1, timesteps=torch.tensor([999]),
                          decode=teacher.decode_latents, output="float", progress=False)
    assert (((before + 1) / 2).clamp(0, 1) - ref).abs().max() > 1e-3  # the generator trained
    code = (out / "README.md").read_text()
    assert "stochastic_sampling=True" in code and "sigmas=[0.999]" in code
    run_model_card_code(out, tmp_path, monkeypatch)  # the card's code as written


def test_dmd2_multistep_on_a_flow_teacher_renoises_along_the_flow_path(sd3_dir, tmp_path):
    """Two-step DMD2 with backward simulation trains on the flow teacher; the stock scheduler
    its export names takes the same multistep step as the trainer's sampler (x0̂ = x − σ v̂,
    then (1 − σ') x0̂ + σ' ε) given the same ε."""
    from diffdistill.export import make_scheduler

    tr = _dmd2(sd3_dir, tmp_path / "run", [999, 499])
    tr.fit()
    assert (tmp_path / "run" / "export" / "model_index.json").is_file()
    sched = make_scheduler("flow_stochastic", tr.backbone.scheduler_config)
    sched.set_timesteps(sigmas=[0.999, 0.499])
    assert sched.timesteps.tolist() == pytest.approx([999.0, 499.0])
    g = torch.Generator().manual_seed(0)
    x, v, eps = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    import diffusers.schedulers.scheduling_flow_match_euler_discrete as stock

    real = stock.randn_tensor
    stock.randn_tensor = lambda *a, **k: eps
    try:
        nxt = sched.step(v, sched.timesteps[0], x).prev_sample
    finally:
        stock.randn_tensor = real
    x0 = x - 0.999 * v
    torch.testing.assert_close(nxt, 0.501 * x0 + 0.499 * eps, rtol=1e-5, atol=1e-5)


def test_the_gan_head_reads_the_middle_joint_blocks_image_tokens_on_their_grid(sd3_dir):
    """The discriminator's features on an MMDiT: the image tokens that the middle joint block
    outputs, laid back on the (H/2, W/2) patch grid — token i at row i // (W/2), column
    i % (W/2) (diffusers' patch order) — here on a non-square latent."""
    from diffdistill.gan import DiscriminatorHead, UNetWithHead, bottleneck_channels

    net = load_backbone(str(sd3_dir)).unet
    assert bottleneck_channels(net) == 32  # 4 heads x 8
    seen = {}
    block = net.transformer_blocks[len(net.transformer_blocks) // 2]
    hook = block.register_forward_hook(lambda m, a, o: seen.update(tokens=o[1]))
    model = UNetWithHead(net, DiscriminatorHead(32))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 12, generator=g)
    cond = dict(encoder_hidden_states=torch.randn(2, 5, 64, generator=g),
                pooled_projections=torch.randn(2, 64, generator=g))
    feats = {}
    head_in = model.head.register_forward_pre_hook(lambda m, a: feats.update(f=a[0]))
    out = model(x, timestep=torch.tensor([500.0, 250.0]), **cond)
    hook.remove(), head_in.remove()
    assert out.sample.shape == x.shape and out.logits.shape == (2,)
    f, tokens = feats["f"], seen["tokens"]
    assert f.shape == (2, 32, 4, 6) and tokens.shape == (2, 24, 32)
    assert torch.equal(f[1, :, 2, 5], tokens[1, 2 * 6 + 5])
    assert torch.equal(f[0, :, 3, 0], tokens[0, 3 * 6])


@pytest.mark.parametrize("method", ["dmd2", "fdistill"])
def test_gan_dmd2_and_fdistill_train_on_a_flow_teacher(sd3_dir, tmp_path, method):
    """DMD2 with its GAN term and f-distill (the discriminator's density ratio, R1 through the
    transformer) train on the tiny SD3: the fake score's head updates, the generator moves."""
    from diffdistill.trainers import get_trainer_class
    from helpers import tiny_run_data

    from diffdistill.config import build_config

    cls = get_trainer_class(method)
    sections = {"train": {"lr": 1e-3, "max_steps": 2},
                "dmd2": {"timesteps": [999], "fake_updates_per_generator_update": 1,
                         "gan_discriminator_weight": 0.1, "gan_generator_weight": 0.1}}
    if method == "fdistill":
        sections["fdistill"] = {"r1_gamma": 0.5}
    tr = cls(build_config(cls.config_class, tiny_run_data(method, sd3_dir, tmp_path, 32,
                                                          **sections)))
    tr.setup()
    head = tr.unwrap(tr.fake_score).head
    head0 = [p.detach().clone() for p in head.parameters()]
    gen0 = [p.detach().clone() for p in tr.trainable["generator"]]
    batches = tr._batches()
    logs = [tr.train_iteration(batches) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(v)) for line in logs for v in line.values())
    assert any(k.startswith("loss_gan") for k in logs[-1]), logs[-1]
    if method == "fdistill":
        assert logs[0]["loss_d_penalty"] > 0  # R1: a double backward through the MMDiT
        assert 0 < logs[0]["h_min"] <= logs[0]["h_max"]
    assert any(not torch.equal(a, b) for a, b in zip(head0, head.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(gen0, tr.trainable["generator"]))


def test_the_sd3_dmd2_config_runs_one_cycle_on_a_tiny_sd3(sd3_dir, tmp_path):
    import json

    from diffdistill.trainers.dmd2 import DMD2Trainer
    from helpers import shipped_config_on_tiny_model

    from diffdistill.config import build_config

    data = shipped_config_on_tiny_model("dmd2/sd3.yaml", sd3_dir, tmp_path / "run")
    logs = DMD2Trainer(build_config(DMD2Trainer.config_class, data)).fit()
    assert {"loss_dm", "loss_fake"} <= set(logs)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    info = json.loads((tmp_path / "run" / "export" / "diffdistill_export.json").read_text())
    assert info["timesteps"] == [999, 900, 750, 500]


def test_lcm_lora_on_a_flow_teacher_follows_the_flow_ode_and_exports(sd3_dir, tmp_path,
                                                                     monkeypatch):
    """LCD (LCM-LoRA) on the tiny SD3: the solver step is Euler along the flow ODE with the
    guided teacher velocity (x_end = x_start + (σ_end − σ_start) v̂_w), the consistency
    function is x0̂ = x − σ v̂ itself, and the LoRA export samples one step in the stock
    StableDiffusion3Pipeline exactly as the trainer does."""
    from diffdistill.trainers.lcd import LCDTrainer
    from diffusers import StableDiffusion3Pipeline
    from helpers import run_model_card_code, tiny_run_data

    from diffdistill.config import build_config

    def cfg(adapter, out):
        return build_config(LCDTrainer.config_class, tiny_run_data(
            "lcd", sd3_dir, out, 32, adapter={"type": adapter, "rank": 4},
            train={"lr": 1e-2}, lcd={"w_min": 1.0, "w_max": 3.0}))

    tr = LCDTrainer(cfg("lora", tmp_path / "run"))
    tr.setup()
    batch = next(tr._batches())
    state = tr.generator.get_state()
    terms = tr.consistency_terms(batch)
    tr.generator.set_state(state)
    raw = tr.unwrap(tr.unet)
    from diffdistill.adapters import adapters_disabled

    with torch.no_grad(), adapters_disabled(raw):
        s0, s1 = terms.t_start / 1000, terms.t_end.clamp(min=0) / 1000
        kw = {"timestep": terms.t_start.float()}
        c, u = terms.cond, terms.cond.uncond
        v_c = raw(terms.x_start, encoder_hidden_states=c.encoder_hidden_states,
                  pooled_projections=c.pooled_projections, **kw)[0]
        v_u = raw(terms.x_start, encoder_hidden_states=u.encoder_hidden_states,
                  pooled_projections=u.pooled_projections, **kw)[0]
        w = (1 + terms.w).view(-1, 1, 1, 1)
        v = v_u + w * (v_c - v_u)
        expected = terms.x_start + (s1 - s0).float().view(-1, 1, 1, 1) * v
    torch.testing.assert_close(terms.x_end, expected, rtol=1e-4, atol=1e-5)
    tr.fit()
    out = tmp_path / "run" / "export"
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), text_encoder_3=None,
                                                    tokenizer_3=None)
    pipe.load_lora_weights(str(out))
    ref = _stock_one_step(pipe)
    spec = tr.eval_spec()
    assert spec.grid_for(1).tolist() == [999.0] and spec.grid_for(4).tolist() == [
        999.0, 759.0, 499.0, 259.0]
    assert (ref - _trainer_one_step(tr)).abs().max() <= 1e-4
    assert "sigmas=[0.999, 0.759, 0.499, 0.259]" in (out / "README.md").read_text()
    run_model_card_code(out, tmp_path, monkeypatch)  # the card's code as written


def test_full_weight_lcd_on_a_flow_teacher_exports_a_stock_pipeline_folder(sd3_dir, tmp_path):
    """Full-weight LCD on the tiny SD3: the student is a copy of the MMDiT (no w input: the
    CFG range is distilled into it, as LCM-LoRA does), θ⁻ its EMA; the export is a stock
    StableDiffusion3Pipeline folder whose one-step images are the trainer's own."""
    from diffdistill.trainers.lcd import LCDTrainer
    from diffusers import StableDiffusion3Pipeline
    from helpers import tiny_run_data

    from diffdistill.config import build_config

    tr = LCDTrainer(build_config(LCDTrainer.config_class, tiny_run_data(
        "lcd", sd3_dir, tmp_path / "run", 32, adapter={"type": "full"},
        train={"lr": 1e-3}, lcd={"w_min": 1.0, "w_max": 3.0})))
    tr.fit()
    assert tr.w_dim is None and type(tr.unwrap(tr.unet)).__name__ == "SD3Transformer2DModel"
    out = tmp_path / "run" / "export"
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out), text_encoder_3=None,
                                                    tokenizer_3=None)
    teacher = load_backbone(str(sd3_dir)).unet.state_dict()
    assert any(not torch.equal(teacher[k], v) for k, v in pipe.transformer.state_dict().items())
    ref = _stock_one_step(pipe)
    assert (ref - _trainer_one_step(tr)).abs().max() <= 1e-4
    assert "StableDiffusion3Pipeline.from_pretrained" in (out / "README.md").read_text()


def test_the_sd3_lcm_lora_config_runs_one_step_on_a_tiny_sd3(sd3_dir, tmp_path):
    from diffdistill.trainers.lcd import LCDTrainer
    from helpers import shipped_config_on_tiny_model

    from diffdistill.config import build_config

    data = shipped_config_on_tiny_model("lcd/sd3_lora.yaml", sd3_dir, tmp_path / "run",
                                        adapter={"rank": 4, "alpha": 4})
    logs = LCDTrainer(build_config(LCDTrainer.config_class, data)).fit()
    assert torch.isfinite(torch.tensor(logs["loss"]))
    assert (tmp_path / "run" / "export" / "pytorch_lora_weights.safetensors").is_file()


def _trainer_one_step(tr):
    """The trainer's own one-step images (its eval spec: sampler, grid) for seeds 3, 4."""
    bb, spec = tr.backbone, tr.eval_spec()
    ours = generate(spec.denoiser, seeds=[3, 4], shape=(4, 16, 16),
                    cond_fn=lambda sl: bb.encode_prompts(PROMPTS[sl], with_uncond=False),
                    sampler="lcm", num_steps=1, timesteps=spec.grid_for(1),
                    decode=bb.decode_latents, output="float", progress=False)
    return ((ours + 1) / 2).clamp(0, 1)


def _stock_one_step(pipe, **call):
    """One step from σ = 0.999 with the scheduler a flow student's card names."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, shift=1.0, use_dynamic_shifting=False, stochastic_sampling=True)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    with torch.no_grad():
        return pipe(PROMPTS, sigmas=[0.999], guidance_scale=1.0, generator=gens,
                    output_type="pt", height=32, width=32, **call).images


def test_fdistill_on_a_flow_teacher_resumes_bit_identically(sd3_dir, tmp_path):
    """f-distill on the tiny SD3 (GAN head on the MMDiT, R1, ratio bins, two time-scale rule):
    2 steps, then ``--resume latest`` to 4, ends with the checkpoint of an uninterrupted
    4-step run, tensor for tensor (weights, optimizer states, bins, RNG)."""
    from helpers import assert_resume_is_bit_identical

    ref = assert_resume_is_bit_identical("fdistill", sd3_dir, tmp_path, cut=2, total=4,
                                         data={"resolution": 32})
    assert {"model.safetensors", "model_1.safetensors", "trainer_tensors.safetensors",
            "trainer_rng_0.safetensors"} <= {p.name for p in ref.glob("*.safetensors")}
    assert sorted(p.name for p in ref.glob("optimizer*.bin")) == ["optimizer.bin",
                                                                  "optimizer_1.bin"]


def test_an_sd3_folder_with_t5_conditions_and_samples_as_the_stock_pipeline(tmp_path):
    """With T5 (``text_encoder_3``), the sequence is the CLIP states padded to T5's width
    followed by T5's 256 token states, bit-equal to the stock ``encode_prompt``; the flow
    Euler sampler with CFG gives the stock pipeline's images."""
    from diffusers import StableDiffusion3Pipeline

    from diffdistill.tiny import tiny_sd3_pipeline

    tiny_sd3_pipeline(t5=True).save_pretrained(str(tmp_path))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path))
    bb = load_backbone(str(tmp_path))
    assert type(bb.text_encoder_3).__name__ == "T5EncoderModel"
    with torch.no_grad():
        pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS,
                                             do_classifier_free_guidance=True)
    cond = bb.encode_prompts(PROMPTS)
    assert cond.encoder_hidden_states.shape == (2, 77 + 256, 64)
    assert torch.equal(cond.encoder_hidden_states, pe) and torch.equal(cond.pooled_projections,
                                                                       pp)
    assert cond.encoder_hidden_states[:, 77:].abs().max() > 0  # T5's states, not zeros
    torch.testing.assert_close(cond.uncond.encoder_hidden_states, ne, rtol=0, atol=1e-6)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, generator=gens,
                   output_type="pt", height=32, width=32).images
    ours = generate(bb.denoiser(), seeds=[3, 4], shape=(4, 16, 16),
                    cond_fn=lambda sl: bb.encode_prompts(PROMPTS[sl]), sampler="flow_euler",
                    num_steps=4, guidance_scale=3.0, decode=bb.decode_latents,
                    output="float", progress=False)
    assert (ref - ((ours + 1) / 2).clamp(0, 1)).abs().max() <= 1e-4


def test_a_folders_max_sequence_length_reaches_encoding_exports_and_the_card(
        sd3_dir, tmp_path, monkeypatch):
    """``diffdistill.json``'s ``max_sequence_length`` (the world's flow teacher sets 0): the
    rows of T5 zeros per prompt, as the stock pipeline's ``max_sequence_length=`` argument
    makes them; a DMD2 export carries it on, and its model card passes it to the stock
    pipeline, whose one-step images equal the trainer's."""
    import json
    import shutil

    from diffusers import StableDiffusion3Pipeline
    from helpers import run_model_card_code

    folder = tmp_path / "sd3-len8"
    shutil.copytree(sd3_dir, folder)
    (folder / "diffdistill.json").write_text(json.dumps({"max_sequence_length": 8}))
    bb = load_backbone(str(folder))
    stock = StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None,
                                                     tokenizer_3=None)
    with torch.no_grad():
        pe, *_ = stock.encode_prompt(PROMPTS, PROMPTS, PROMPTS, max_sequence_length=8,
                                     do_classifier_free_guidance=False)
    cond = bb.encode_prompts(PROMPTS, with_uncond=False)
    assert cond.encoder_hidden_states.shape == (2, 77 + 8, 64)
    assert torch.equal(cond.encoder_hidden_states, pe)
    tr = _dmd2(folder, tmp_path / "run", [999])
    tr.fit()
    out = tmp_path / "run" / "export"
    assert json.loads((out / "diffdistill.json").read_text()) == {"max_sequence_length": 8}
    assert load_backbone(str(out)).max_sequence_length == 8
    card = (out / "README.md").read_text()
    assert "max_sequence_length=8" in card
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out), text_encoder_3=None,
                                                    tokenizer_3=None)
    ref = _stock_one_step(pipe, max_sequence_length=8)
    ours = tr.sample_latents([3, 4], tr.backbone.encode_prompts(PROMPTS, with_uncond=False))
    ours = ((tr.backbone.decode_latents(ours) + 1) / 2).clamp(0, 1)
    assert (ref - ours).abs().max() <= 1e-4
    assert (_stock_one_step(pipe) - ref).abs().max() > 1e-3  # the length matters
    run_model_card_code(out, tmp_path, monkeypatch)
