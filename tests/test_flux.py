"""Flux-class teachers (``FluxPipeline``: CLIP's pooled output + T5's sequence, a transformer
on 2x2-packed latents with rotary ids, a resolution-dependent timestep shift and FLUX.1-dev's
embedded guidance) on a tiny stock pipeline: loading, prompt conditioning bit-equal to the
stock ``encode_prompt``, the flow Euler sampler equal to the stock pipeline's images, LoRA
exports that ``FluxPipeline.load_lora_weights`` reads, and DMD2 training and export."""

from __future__ import annotations

import pytest
import torch

from diffdistill.backbone import folder_kind, load_backbone
from diffdistill.denoiser import is_flux, latent_image_ids, pack_latents, unpack_latents
from diffdistill.sampling import generate
from diffdistill.schedule import flow_shift_mu

PROMPTS = ["a photo of a bag", "a photo of a coat"]


@pytest.fixture(scope="module")
def stock(flux_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(flux_dir))


def _backbone(flux_dir, resolution=32):
    bb = load_backbone(str(flux_dir))
    bb.set_resolution(resolution)
    return bb


def test_loads_as_a_packed_flow_transformer_with_its_resolution_shift(flux_dir):
    bb = load_backbone(str(flux_dir))
    assert folder_kind(flux_dir) == bb.kind == "flux" and is_flux(bb.unet)
    assert bb.prediction_type == "flow" and bb.schedule.pipeline_sigmas == "flux"
    # 4 VAE channels (the transformer reads 16 = 4 x 2x2); FluxPipeline's default size is
    # 128 latents x the VAE factor 2
    assert bb.latent_channels == 4 and bb.resolution == 256
    assert bb.schedule.mu == pytest.approx(flow_shift_mu((256 // 2 // 2) ** 2))
    bb.set_resolution(32)  # (32 / 2 / 2)^2 = 64 tokens
    assert bb.schedule.mu == pytest.approx(0.5 + (64 - 256) * 0.65 / 3840)
    assert bb.denoiser().embedded_guidance


def test_packing_is_the_stock_pipelines_and_inverts():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    # token i is the 2x2 patch at row i // 4, column i % 4, channel-major
    assert torch.equal(packed[1, 1 * 4 + 2], x[1, :, 2:4, 4:6].reshape(-1))
    ids = latent_image_ids(6, 8)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    with pytest.raises(ValueError, match="must be even"):
        pack_latents(torch.zeros(1, 4, 5, 8))


def test_prompt_conditioning_is_bit_equal_to_the_stock_pipeline(flux_dir, stock):
    bb = _backbone(flux_dir)
    with torch.no_grad():
        pe, pooled, text_ids = stock.encode_prompt(PROMPTS, PROMPTS)
        ne, npooled, _ = stock.encode_prompt([""] * 2, [""] * 2)
    cond = bb.encode_prompts(PROMPTS)
    assert cond.encoder_hidden_states.shape == (2, 512, 32)  # T5's 512 tokens
    assert torch.equal(cond.encoder_hidden_states, pe)
    assert torch.equal(cond.pooled_projections, pooled)
    assert text_ids.abs().max() == 0  # what the denoiser passes: zeros
    torch.testing.assert_close(cond.uncond.encoder_hidden_states, ne, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.uncond.pooled_projections, npooled, rtol=0, atol=1e-6)
    assert not torch.equal(cond.encoder_hidden_states[0], cond.encoder_hidden_states[1])


def _ours(bb, net=None, steps=4, guidance=3.5, seeds=(3, 4), sampler="flow_euler",
          timesteps=None):
    out = generate(bb.denoiser(net), seeds=list(seeds), shape=(4, 16, 16),
                   cond_fn=lambda sl: bb.encode_prompts(PROMPTS[sl]), sampler=sampler,
                   num_steps=steps, guidance_scale=guidance, timesteps=timesteps,
                   decode=bb.decode_latents, output="float", progress=False)
    return ((out + 1) / 2).clamp(0, 1)


def _stock_images(pipe, steps=4, guidance=3.5, **kw):
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    if steps is not None:
        kw["num_inference_steps"] = steps
    with torch.no_grad():
        return pipe(PROMPTS, guidance_scale=guidance, generator=gens, output_type="pt",
                    height=32, width=32, **kw).images


@pytest.mark.parametrize("steps, guidance", [(1, 3.5), (4, 1.0), (8, 5.0)])
def test_flow_euler_with_embedded_guidance_reproduces_the_stock_pipeline(flux_dir, stock, steps,
                                                                         guidance):
    """FluxPipeline's sigmas linspace(1, 1/n, n), shifted by μ of 64 tokens; the guidance
    scale goes into the transformer (one pass, no CFG pair)."""
    bb = _backbone(flux_dir)
    ref = _stock_images(stock, steps, guidance)
    ours = _ours(bb, steps=steps, guidance=guidance)
    assert (ref - ours).abs().max() <= 1e-4
    assert (ours - _ours(bb, steps=steps, guidance=guidance + 2)).abs().max() > 1e-3


def test_true_cfg_on_a_flux_without_guidance_embedding(tmp_path):
    """FLUX.1-schnell's structure (no guidance embedding): classifier-free guidance against
    the empty prompt equals the stock pipeline's ``true_cfg_scale`` with ``negative_prompt=""``."""
    from diffusers import FluxPipeline

    from diffdistill.tiny import tiny_flux_pipeline

    tiny_flux_pipeline(guidance_embeds=False).save_pretrained(str(tmp_path))
    pipe = FluxPipeline.from_pretrained(str(tmp_path))
    bb = _backbone(tmp_path)
    assert not bb.denoiser().embedded_guidance
    ref = _stock_images(pipe, 4, 1.0, negative_prompt=["", ""], true_cfg_scale=2.5)
    assert (ref - _ours(bb, steps=4, guidance=2.5)).abs().max() <= 1e-4


def test_lora_on_the_flux_transformer_exports_for_stock_load_lora_weights(flux_dir, tmp_path):
    from diffusers import FluxPipeline
    from helpers import randomize_lora_b
    from peft.tuners.lora import LoraLayer

    from diffdistill.adapters import make_trainable
    from diffdistill.export import LORA_WEIGHT_NAME, load_lora_into, save_lora

    bb = _backbone(flux_dir)
    make_trainable(bb.unet, adapter="lora", rank=4, alpha=8)
    adapted = {n for n, m in bb.unet.named_modules() if isinstance(m, LoraLayer)}
    # both streams of the double block, and the single blocks' attention projections
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
            "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.attn.to_out.0",
            "single_transformer_blocks.1.attn.to_v"} <= adapted
    randomize_lora_b(bb.unet)
    bb.unet.eval()
    save_lora(bb.unet, tmp_path / "lora")
    assert not (tmp_path / "lora" / "lora_kohya.safetensors").exists()
    pipe = FluxPipeline.from_pretrained(str(flux_dir))
    base = _stock_images(pipe, 2)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=LORA_WEIGHT_NAME)
    ref = _stock_images(pipe, 2)
    assert (ref - _ours(bb, bb.unet, steps=2)).abs().max() <= 1e-4
    assert (ref - base).abs().max() > 1e-3
    other = _backbone(flux_dir)
    load_lora_into(other.unet, tmp_path / "lora")
    assert (_ours(other, other.unet, steps=2) - ref).abs().max() <= 1e-4


def _dmd2(flux_dir, out, timesteps, adapter="lora", gan=0.0):
    from diffdistill.trainers.dmd2 import DMD2Trainer
    from helpers import tiny_run_data

    from diffdistill.config import build_config

    data = tiny_run_data("dmd2", flux_dir, out, 32, adapter={"type": adapter, "rank": 4},
                         train={"lr": 1e-3, "max_steps": 2},
                         dmd2={"timesteps": timesteps, "gan_generator_weight": gan,
                               "gan_discriminator_weight": gan,
                               "fake_updates_per_generator_update": 1})
    return DMD2Trainer(build_config(DMD2Trainer.config_class, data))


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_dmd2_one_step_on_flux_exports_for_the_stock_pipeline(flux_dir, tmp_path, adapter,
                                                              monkeypatch):
    """One-step DMD2 on the tiny Flux trains, and its export — a LoRA for the stock
    ``FluxPipeline`` or a pipeline folder, FlowMatchEuler at shift 1 without the dynamic
    shift, the trained sigma, embedded guidance 1 as the generator was trained with — gives
    the trainer's own one-step samples in the stock pipeline."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from helpers import run_model_card_code

    tr = _dmd2(flux_dir, tmp_path / "run", [999], adapter)
    tr.fit()
    out = tmp_path / "run" / "export"
    assert json.loads((out / "diffdistill_export.json").read_text())["timesteps"] == [999]
    if adapter == "lora":
        pipe = FluxPipeline.from_pretrained(str(flux_dir))
        pipe.load_lora_weights(str(out))
    else:
        pipe = FluxPipeline.from_pretrained(str(out))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, shift=1.0, use_dynamic_shifting=False, stochastic_sampling=True)
    ref = _stock_images(pipe, None, 1.0, sigmas=[0.999])
    bb = tr.backbone
    ours = tr.sample_latents([3, 4], bb.encode_prompts(PROMPTS, with_uncond=False))
    assert (ref - ((bb.decode_latents(ours) + 1) / 2).clamp(0, 1)).abs().max() <= 1e-4
    teacher = _backbone(flux_dir)
    before = _ours(teacher, steps=1, sampler="lcm", timesteps=torch.tensor([999]))
    assert (before - ref).abs().max() > 1e-3  # the generator trained
    code = (out / "README.md").read_text()
    assert "FluxPipeline" in code and "guidance_scale=1.0" in code
    run_model_card_code(out, tmp_path, monkeypatch)  # the card's code as written


def test_dmd2_with_its_gan_head_trains_on_flux(flux_dir, tmp_path):
    """The GAN head reads the middle double-stream block's image tokens on the packed grid."""
    tr = _dmd2(flux_dir, tmp_path / "run", [999, 499], adapter="full", gan=0.1)
    tr.setup()
    head = tr.unwrap(tr.fake_score).head
    head0 = [p.detach().clone() for p in head.parameters()]
    batches = tr._batches()
    logs = [tr.train_iteration(batches) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(v)) for line in logs for v in line.values())
    assert any(k.startswith("loss_gan") for k in logs[-1]), logs[-1]
    assert any(not torch.equal(a, b) for a, b in zip(head0, head.parameters()))


@pytest.mark.parametrize("method", ["pretrain", "fdistill", "lcd"])
def test_every_flow_method_trains_on_flux(flux_dir, tmp_path, method):
    """Flow-matching pretraining (the transformer's velocity loss, checked by hand),
    f-distill (ratio-weighted distribution matching, R1 through the transformer) and
    LCM-LoRA (consistency along the flow ODE, the guided teacher reading the per-sample
    scale w as its embedded guidance) each run two steps on the tiny Flux and move weights."""
    from diffdistill.trainers import get_trainer_class
    from helpers import tiny_run_data

    from diffdistill.config import build_config

    sections: dict = {"train": {"lr": 1e-3, "max_steps": 2}}
    if method == "fdistill":
        sections.update(dmd2={"timesteps": [999], "fake_updates_per_generator_update": 1,
                              "gan_discriminator_weight": 0.1, "gan_generator_weight": 0.1},
                        fdistill={"r1_gamma": 0.5})
    if method == "lcd":
        sections.update(adapter={"type": "lora", "rank": 4}, lcd={"w_min": 1.0, "w_max": 3.0})
    cls = get_trainer_class(method)
    tr = cls(build_config(cls.config_class, tiny_run_data(method, flux_dir, tmp_path, 32,
                                                          **sections)))
    tr.setup()
    params = [p for group in tr.trainable.values() for p in group]
    before = [p.detach().clone() for p in params]
    batches = tr._batches()
    if method == "pretrain":
        batch = next(batches)
        state = tr.generator.get_state()
        bb = tr.backbone
        with torch.no_grad():  # the flow-matching loss by hand, through the stock transformer
            x0 = tr.encode_x0(batch)
            cond = tr.cond_for_batch(batch, drop_prob=tr.cfg.pretrain.cond_dropout)
            sigma = torch.sigmoid(tr.randn(2, dtype=torch.float64).cpu()).float()
            noise = tr.randn(*x0.shape)
            s4 = sigma.view(-1, 1, 1, 1)
            xt = (1 - s4) * x0 + s4 * noise
            v = bb.unet(pack_latents(xt), timestep=sigma, guidance=torch.ones(2),
                        encoder_hidden_states=cond.encoder_hidden_states,
                        pooled_projections=cond.pooled_projections,
                        img_ids=latent_image_ids(16, 16), txt_ids=torch.zeros(512, 3))[0]
            expected = ((unpack_latents(v, 16, 16) - (noise - x0)) ** 2).mean()
        tr.generator.set_state(state)
        logs = tr.train_step(batch)
        torch.testing.assert_close(logs["loss"], expected, rtol=1e-5, atol=1e-7)
    logs = [tr.train_iteration(batches) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(v)) for line in logs for v in line.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def test_fdistill_on_flux_resumes_bit_identically(flux_dir, tmp_path):
    """2 steps, then ``--resume latest`` to 3, ends with an uninterrupted 3-step run's
    weights (generator, fake score and GAN head) and ratio bins, tensor for tensor."""
    from helpers import assert_resume_is_bit_identical

    ref = assert_resume_is_bit_identical("fdistill", flux_dir, tmp_path, cut=2, total=3,
                                         data={"resolution": 32})
    assert {"model.safetensors", "model_1.safetensors", "trainer_tensors.safetensors"} <= {
        p.name for p in ref.glob("*.safetensors")}


def test_the_flux_dmd2_lora_config_runs_one_cycle_on_a_tiny_flux(flux_dir, tmp_path):
    import json

    from diffdistill.trainers.dmd2 import DMD2Trainer
    from helpers import shipped_config_on_tiny_model

    from diffdistill.config import build_config

    data = shipped_config_on_tiny_model("dmd2/flux_lora.yaml", flux_dir, tmp_path / "run",
                                        adapter={"rank": 4, "alpha": 4})
    logs = DMD2Trainer(build_config(DMD2Trainer.config_class, data)).fit()
    assert {"loss_dm", "loss_fake"} <= set(logs)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    out = tmp_path / "run" / "export"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "diffdistill_export.json").read_text())["timesteps"] == [
        999, 905, 760, 513]


def test_diffdistill_sample_runs_a_flux_folder_at_a_given_resolution(flux_dir, tmp_path, capsys):
    from PIL import Image

    from diffdistill.cli import main

    out = tmp_path / "grid.png"
    assert main(["sample", str(flux_dir), "--prompt", "a bag", "--steps", "2",
                 "--guidance-scale", "3.5", "--num", "2", "--resolution", "32",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * 32 + 3 * 2, 32 + 2 * 2)  # 2 images, 2-px padding
    # a size the 2x2 packing cannot take: one line, before any sampling
    assert main(["sample", str(flux_dir), "--resolution", "34", "--out",
                 str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--resolution" in err and "divisible by" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
