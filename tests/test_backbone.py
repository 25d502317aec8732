"""Backbone loading, conditioning and trainability against stock diffusers on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from diffdistill.adapters import (
    adapters_disabled,
    clone_unet,
    make_trainable,
    set_attention_backend,
)
from diffdistill.backbone import PIPELINE_KINDS, load_backbone
from diffdistill.schedule import VESchedule, VPSchedule


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- validation


def test_missing_path_names_what_to_supply(tmp_path):
    with pytest.raises(FileNotFoundError, match="local diffusers pipeline folder"):
        load_backbone(tmp_path / "nope")


def test_hub_id_is_refused_with_download_hint():
    with pytest.raises(FileNotFoundError) as e:
        load_backbone("stabilityai/sdxl-turbo")
    msg = str(e.value)
    assert "never downloads" in msg
    assert "hf download stabilityai/sdxl-turbo --local-dir DIR" in msg


def test_folder_without_model_index_is_not_a_pipeline(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        load_backbone(tmp_path)
    with pytest.raises(NotADirectoryError):
        load_backbone(tmp_path / "weights.bin")


def test_unknown_pipeline_class_lists_supported(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ValueError) as e:
        load_backbone(tmp_path)
    for name in PIPELINE_KINDS:
        assert name in str(e.value)


# ----------------------------------------------------------------------------- kinds


def test_sd_backbone_reads_structure_and_schedule(sd_dir, sd_v_dir):
    from diffusers import DDIMScheduler

    bb = load_backbone(sd_dir)
    assert (bb.kind, bb.prediction_type) == ("sd", "epsilon")
    assert (bb.vae_scale_factor, bb.latent_channels, bb.resolution) == (2, 4, 32)
    assert isinstance(bb.schedule, VPSchedule)
    ref = DDIMScheduler.from_pretrained(str(sd_dir), subfolder="scheduler").alphas_cumprod
    assert torch.equal(bb.schedule.alphas_cumprod.float(), ref)
    assert not any(p.requires_grad for p in bb.unet.parameters())
    assert load_backbone(sd_v_dir, load_text=False, load_vae=False).prediction_type == "v_prediction"


def test_teacher_denoiser_matches_stock_scheduler_x0(sd_v_dir):
    """Backbone.denoiser's x0 equals DDIMScheduler's pred_original_sample (v-prediction)."""
    from diffusers import DDIMScheduler

    bb = load_backbone(sd_v_dir, load_vae=False)
    cond = bb.encode_prompts(["a photo of a cat", "a sneaker"], with_uncond=False)
    x, t = _x((2, 4, 16, 16)), torch.tensor([700, 120])
    with torch.no_grad():
        pred = bb.denoiser()(x, t, cond)
        v = bb.unet(x, t, encoder_hidden_states=cond.encoder_hidden_states).sample
    sched = DDIMScheduler.from_pretrained(str(sd_v_dir), subfolder="scheduler")
    sched.set_timesteps(10)
    for i in range(2):
        ref = sched.step(v[i:i + 1], int(t[i]), x[i:i + 1]).pred_original_sample
        assert torch.allclose(pred.x0[i:i + 1], ref, atol=1e-5)


def test_pixel_kinds_and_null_class(pixel_dir, tmp_path):
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, DDPMPipeline

    bb = load_backbone(pixel_dir)
    assert (bb.kind, bb.prediction_type, bb.resolution) == ("pixel", "epsilon", 16)
    assert (bb.num_classes, bb.null_class) == (10, 10)
    cond = bb.class_cond([3, 7])
    assert cond.class_labels.tolist() == [3, 7]
    assert cond.uncond.class_labels.tolist() == [10, 10]
    x = _x((2, 3, 16, 16))
    assert torch.equal(bb.encode_images(x), x) and torch.equal(bb.decode_latents(x), x)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        bb.class_cond([10])

    # bare UNet2DModel folder with a scheduler config next to it
    pipe = DDPMPipeline.from_pretrained(str(pixel_dir))
    pipe.unet.save_pretrained(str(tmp_path / "bare"))
    pipe.scheduler.save_pretrained(str(tmp_path / "bare"))
    bare = load_backbone(tmp_path / "bare")
    assert bare.kind == "pixel" and bare.null_class == 10
    assert torch.equal(bare.unet.conv_in.weight, bb.unet.conv_in.weight)

    # a ConsistencyModelPipeline: VE schedule, "cm" prediction, every embedding a class
    ConsistencyModelPipeline(unet=pipe.unet, scheduler=CMStochasticIterativeScheduler()) \
        .save_pretrained(str(tmp_path / "cm"))
    cm = load_backbone(tmp_path / "cm")
    assert cm.prediction_type == "cm" and isinstance(cm.schedule, VESchedule)
    assert (cm.num_classes, cm.null_class) == (11, None)
    with pytest.raises(ValueError, match="guidance=False"):
        cm.class_cond([0])
    assert cm.class_cond([0], guidance=False).uncond is None
    assert load_backbone(tmp_path / "cm", num_classes=10).null_class == 10


# ----------------------------------------------------------------------------- prompts


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls


def test_sd_prompt_encoding_equals_pipeline_and_caches(sd_dir):
    from diffusers import StableDiffusionPipeline

    bb = load_backbone(sd_dir, load_vae=False)
    calls = _count_calls(bb.text_encoder)
    prompts = ["a photo of a cat", "a sneaker", "a photo of a cat"]
    cond = bb.encode_prompts(prompts)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(prompts, "cpu", 1, True)
    assert torch.equal(cond.encoder_hidden_states, pe)
    assert torch.equal(cond.uncond.encoder_hidden_states, ne)
    assert cond.encoder_hidden_states.abs().max() > 0.1
    assert calls == [2, 1]  # two distinct prompts in one batch, then the empty prompt
    again = bb.encode_prompts(["a sneaker", "a photo of a cat", "a bag"])
    assert calls == [2, 1, 1]  # only "a bag" is new
    assert torch.equal(again.encoder_hidden_states[0], pe[1])
    bb.prompt_cache_size = 2  # least recently used entries go; a batch larger still works
    big = bb.encode_prompts(["p1", "p2", "p3", "a sneaker"], with_uncond=False)
    assert len(bb._prompt_cache) == 2 and torch.equal(big.encoder_hidden_states[3], pe[1])
    with pytest.raises(ValueError, match="load_text=True"):
        load_backbone(sd_dir, load_text=False, load_vae=False).encode_prompts(["x"])


def test_sdxl_prompt_encoding_equals_pipeline(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    bb = load_backbone(sdxl_dir, load_vae=False)
    assert bb.kind == "sdxl" and bb.resolution == 32
    prompts = ["a photo of a cat", "a red dress"]
    cond = bb.encode_prompts(prompts, original_size=(64, 48), crops_coords_top_left=(4, 2))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir))
    with torch.no_grad():
        pe, ne, pp, npp = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                             do_classifier_free_guidance=True)
    assert torch.equal(cond.encoder_hidden_states, pe)
    assert torch.equal(cond.added_cond_kwargs["text_embeds"], pp)
    assert torch.equal(cond.uncond.encoder_hidden_states, ne)  # zeros: force_zeros_for_empty_prompt
    assert torch.equal(cond.uncond.added_cond_kwargs["text_embeds"], npp)
    assert float(ne.abs().max()) == 0.0 and pp.abs().max() > 0.01
    ids = pipe._get_add_time_ids((64, 48), (4, 2), (32, 32), dtype=pe.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(cond.added_cond_kwargs["time_ids"], ids.repeat(2, 1))
    assert torch.equal(cond.uncond.added_cond_kwargs["time_ids"], ids.repeat(2, 1))
    with torch.no_grad():  # the whole Cond feeds the stock UNet
        out = bb.denoiser()(_x((2, 4, 16, 16)), 500, cond)
    assert torch.isfinite(out.x0).all()


# ----------------------------------------------------------------------------- VAE


def test_vae_encode_decode_match_stock_paths(sd_dir):
    from diffusers import StableDiffusionPipeline

    bb = load_backbone(sd_dir)
    vae, sf = bb.vae, bb.vae.config.scaling_factor
    img = _x((3, 3, 32, 32)).clamp(-1, 1)
    with torch.no_grad():
        lat = bb.encode_images(img, sample=False)
        assert torch.equal(lat, vae.encode(img).latent_dist.mode() * sf)
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert torch.equal(bb.encode_images(img, generator=g1),
                           vae.encode(img).latent_dist.sample(g2) * sf)
        dec = bb.decode_latents(lat, chunk_size=2)  # chunked == unchunked
        assert torch.allclose(dec, vae.decode(lat / sf).sample, atol=1e-5)

    # the stock pipeline's own decode path: output_type="latent" vs "np"
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    kw = dict(prompt="a photo of a cat", num_inference_steps=2, guidance_scale=1.0)
    latents = pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    ref = pipe(**kw, output_type="np", generator=torch.Generator().manual_seed(0)).images
    with torch.no_grad():
        ours = (bb.decode_latents(latents) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - ref).max() < 1e-5 and ref.std() > 0.01


def test_vae_shift_factor_is_applied(sd_dir):
    from diffdistill.tiny import tiny_vae

    bb = load_backbone(sd_dir, load_text=False)
    vae = tiny_vae(seed=3)
    vae.register_to_config(shift_factor=0.25)
    bb.vae = vae
    img = _x((2, 3, 32, 32), 1).clamp(-1, 1)
    with torch.no_grad():
        lat = bb.encode_images(img, sample=False)
        z = vae.encode(img).latent_dist.mode()
        assert torch.allclose(lat, (z - 0.25) * 0.18215, atol=1e-6)
        assert torch.allclose(bb.decode_latents(lat), vae.decode(z).sample, atol=1e-5)


# ----------------------------------------------------------------------------- training


def test_lora_training_leaves_base_untouched(sd_dir):
    bb = load_backbone(sd_dir, load_vae=False)
    unet = bb.unet
    cond = bb.encode_prompts(["a photo of a cat", "a sneaker"], with_uncond=False)
    kw = cond.unet_kwargs()
    x, t = _x((2, 4, 16, 16)), torch.tensor([900, 30])
    with torch.no_grad():
        before = unet(x, t, **kw).sample
    base = {k: v.clone() for k, v in unet.state_dict().items()}

    params = make_trainable(unet, rank=4, alpha=8, conv=True, ff=True)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in unet.named_parameters()
            if p.requires_grad} >= {"to_q", "conv1", "proj_in", "time_emb_proj", "2"}
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(3):
        loss = (unet(x, t, **kw).sample - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad():
        after = unet(x, t, **kw).sample
        with adapters_disabled(unet):
            teacher = unet(x, t, **kw).sample
    assert (after - before).abs().max() > 1e-3  # the LoRA learned something
    assert torch.equal(teacher, before)  # ... and the teacher pass ignores it exactly
    for name, p in unet.named_parameters():
        if not p.requires_grad:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, base[key]), name
    with torch.no_grad():  # adapters are back on after the block
        assert torch.equal(unet(x, t, **kw).sample, after)


def test_make_trainable_modes_and_errors(sd_dir):
    from diffdistill.tiny import tiny_cond_unet

    unet = tiny_cond_unet()
    with pytest.raises(ValueError, match="rank"):
        make_trainable(unet, rank=0)
    with pytest.raises(ValueError, match="adapter='dora'"):
        make_trainable(unet, adapter="dora")

    params = make_trainable(unet, rank=2, frozen_dtype=torch.bfloat16)
    lora = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert len(params) == len(lora) == 2 * 4 * 2 * 4  # 4 attn blocks x 2 attn x 4 proj x A,B
    assert all(p.dtype == torch.float32 for p in params)
    assert unet.conv_in.weight.dtype == torch.bfloat16 and not unet.conv_in.weight.requires_grad
    x = _x((1, 4, 16, 16)).bfloat16()  # inputs in the frozen dtype, as Denoiser.raw casts them
    out = unet(x, torch.tensor([10]), encoder_hidden_states=_x((1, 77, 32)).bfloat16()).sample
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)

    full = tiny_cond_unet().half()
    params = make_trainable(full, adapter="full", gradient_checkpointing=True)
    assert len(params) == len(list(full.parameters()))
    assert all(p.dtype == torch.float32 for p in params) and full.is_gradient_checkpointing
    with pytest.raises(ValueError, match="no LoRA adapters"):
        with adapters_disabled(full):
            pass


def test_gradient_checkpointing_gives_same_gradients():
    from diffdistill.tiny import tiny_cond_unet

    grads = []
    for ckpt in (False, True):
        unet = tiny_cond_unet(seed=1)
        params = make_trainable(unet, rank=2, gradient_checkpointing=ckpt)
        for i, p in enumerate(params):
            p.data.copy_(_x(p.shape, i) * 0.1)
        out = unet(_x((2, 4, 16, 16)), torch.tensor([5, 500]),
                   encoder_hidden_states=_x((2, 77, 32), 1)).sample
        out.pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_attention_backend_and_clone():
    from diffusers.models.attention_processor import AttnProcessor2_0

    from diffdistill.tiny import tiny_cond_unet

    unet = tiny_cond_unet()
    assert set_attention_backend(unet, "auto") == "sdpa"  # CPU
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    with pytest.raises(ValueError, match="CUDA"):
        set_attention_backend(unet, "xformers")
    with pytest.raises(ValueError, match="unknown"):
        set_attention_backend(unet, "flash")

    x, t, e = _x((1, 4, 16, 16)), torch.tensor([50]), _x((1, 77, 32))
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=e).sample
    params = make_trainable(unet, rank=2)
    for p in params:
        p.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    fake = clone_unet(unet, requires_grad=True)
    teacher = clone_unet(unet, drop_adapters=True, requires_grad=False)
    half = clone_unet(unet, dtype=torch.bfloat16)
    with torch.no_grad():
        student = unet(x, t, encoder_hidden_states=e).sample
        assert torch.equal(fake(x, t, encoder_hidden_states=e).sample, student)
        assert torch.equal(teacher(x, t, encoder_hidden_states=e).sample, base)
    assert (student - base).abs().max() > 1e-3
    assert half.conv_in.weight.dtype == torch.bfloat16
    fake.conv_in.weight.data.add_(1.0)  # a deep copy: the original does not move
    assert not torch.equal(fake.conv_in.weight, unet.conv_in.weight)


@pytest.mark.parametrize("fixture", ["sd_dir", "sdxl_dir"])
def test_prompt_disk_cache_skips_the_encoders_in_a_second_run(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    first = load_backbone(folder)
    first.attach_prompt_disk_cache(tmp_path)
    a = first.encode_prompts(["a photo of a bag", "a coat"], with_uncond=False)
    second = load_backbone(folder)
    second.attach_prompt_disk_cache(tmp_path)
    calls = []
    second._encode_uncached = lambda prompts: calls.append(prompts) or []
    b = second.encode_prompts(["a coat", "a photo of a bag"], with_uncond=False)
    assert calls == []  # served from disk
    assert torch.equal(b.encoder_hidden_states, a.encoder_hidden_states.flip(0))
    if a.added_cond_kwargs:
        assert torch.equal(b.added_cond_kwargs["text_embeds"],
                           a.added_cond_kwargs["text_embeds"].flip(0))


def test_prompt_disk_cache_is_keyed_by_what_the_encoders_compute(sd3_dir, tmp_path):
    """Same folder path, different text encoding (weights changed in place, or a shorter T5
    sequence): a new cache, never the stale embeddings. (A world build once trained a teacher
    on the cached embeddings of the folder's previous text encoders.)"""
    prompts = ["a photo of a bag"]
    first = load_backbone(sd3_dir)
    first.attach_prompt_disk_cache(tmp_path)
    a = first.encode_prompts(prompts, with_uncond=False).encoder_hidden_states
    same = load_backbone(sd3_dir)
    same.attach_prompt_disk_cache(tmp_path)
    assert same.prompt_disk_cache.directory == first.prompt_disk_cache.directory

    changed = load_backbone(sd3_dir)
    with torch.no_grad():
        changed.text_encoder.text_model.embeddings.token_embedding.weight.add_(0.05)
    changed.attach_prompt_disk_cache(tmp_path)
    assert changed.prompt_disk_cache.directory != first.prompt_disk_cache.directory
    b = changed.encode_prompts(prompts, with_uncond=False).encoder_hidden_states
    assert (a - b).abs().max() > 1e-3  # encoded afresh, not read from the first cache

    shorter = load_backbone(sd3_dir)
    shorter.max_sequence_length = 8  # what a diffdistill.json would set
    shorter.attach_prompt_disk_cache(tmp_path)
    assert shorter.prompt_disk_cache.directory not in (first.prompt_disk_cache.directory,
                                                       changed.prompt_disk_cache.directory)
    c = shorter.encode_prompts(prompts, with_uncond=False).encoder_hidden_states
    assert c.shape[1] == 77 + 8 and a.shape[1] == 77 + 256


def test_empty_fp32_module_warning_is_dropped_but_real_ones_pass(caplog):
    import logging

    from diffdistill.quiet import install_log_filters

    install_log_filters()  # what every model load calls first (test order must not matter)

    lg = logging.getLogger("diffusers.models.modeling_utils")
    with caplog.at_level(logging.WARNING, logger=lg.name):
        lg.warning("There are modules in UNet2DModel that should be kept in float32: []. x")
        lg.warning("There are modules in UNet2DModel that should be kept in float32: ['a']. x")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "['a']" in msgs[0]


def test_pixel_scheduler_clip_sample_reaches_the_shared_samplers(pixel_dir, tmp_path):
    """A pixel model whose scheduler clips x0̂ (DDPM/ADM convention) is sampled with
    clip_denoised by bench / sample — the same images as the stock clipping DDIMScheduler."""
    import json
    import shutil

    from diffdistill.eval.bench_config import BenchModel
    from diffdistill.eval.eval_model import load_eval_model
    from diffdistill.eval.generation import generate_for_eval
    from diffusers import DDIMScheduler

    folder = tmp_path / "px"
    shutil.copytree(pixel_dir, folder)
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    assert cfg["clip_sample"] is False
    assert load_backbone(str(folder)).sampler_options("ddim") == {}
    cfg_file.write_text(json.dumps({**cfg, "clip_sample": True}))
    bb = load_backbone(str(folder))
    assert bb.sampler_options("ddim") == {"clip_denoised": True}
    assert bb.sampler_options("euler") == {}  # no clipping option there
    model = load_eval_model(BenchModel(name="px", path=str(folder), sampler="ddim"))
    assert model.sampler_opts == {"clip_denoised": True}
    gen = generate_for_eval(model, [0, 1], num_steps=3, batch_size=2, grid_samples=2)
    # the stock scheduler loop, same noise (seeded per sample) and class labels 0, 1
    sched = DDIMScheduler.from_config(bb.scheduler_config)
    sched.set_timesteps(3)
    x = torch.cat([torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(s))
                   for s in (0, 1)])
    with torch.no_grad():
        for t in sched.timesteps:
            eps = bb.unet(x, t, class_labels=torch.tensor([0, 1])).sample
            x = sched.step(eps, t, x).prev_sample
    stock = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert (gen.grid.int() - stock.int()).abs().max() <= 1
