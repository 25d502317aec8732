"""Exports load in stock diffusers and reproduce the in-training student."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from diffdistill.adapters import ATTENTION_TARGETS, CONV_TARGETS, make_trainable
from diffdistill.backbone import load_backbone
from diffdistill.denoiser import Denoiser
from diffdistill.export import (
    KOHYA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    card_code,
    ldm_unet_module_name,
    save_full_pipeline,
    save_lora,
    save_lora_kohya,
    write_model_card,
)
from diffdistill.schedule import VESchedule


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _randomize(params, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.data.copy_(torch.randn(p.shape, generator=g) * scale)


def _base_weights(unet):
    return {k: v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}


class Student:
    """A backbone whose UNet carries a random (non-trivial) LoRA, plus a probe input."""

    def __init__(self, folder, targets, seed=0):
        self.bb = load_backbone(folder, load_vae=False)
        self.params = make_trainable(self.bb.unet, rank=4, alpha=8, target_modules=targets)
        _randomize(self.params, seed=seed)
        self.cond = self.bb.encode_prompts(["a photo of a cat", "a bag"], with_uncond=False)
        self.x, self.t = _x((2, 4, 16, 16), 1), torch.tensor([800, 40])
        self.out = self.run(self.bb.unet)

    def run(self, unet):
        with torch.no_grad():
            return unet(self.x, self.t, **self.cond.unet_kwargs()).sample


@pytest.fixture(scope="module")
def sd_student(sd_dir):
    # attention + conv + feed-forward: the LCM-LoRA target set (and a mixed-format trap, below)
    return Student(sd_dir, list(ATTENTION_TARGETS) + list(CONV_TARGETS) + ["ff.net.0.proj",
                                                                           "ff.net.2"])


@pytest.fixture(scope="module")
def sdxl_student(sdxl_dir):
    # the tiny SDXL UNet has an upsampler in an attention-free up block, which real SDXL does
    # not; diffusers' sgm-name loader cannot place that one (see test_ldm_names_of_real_sdxl)
    targets = list(ATTENTION_TARGETS) + [t for t in CONV_TARGETS if t != "upsamplers.0.conv"]
    return Student(sdxl_dir, targets, seed=1)


def _fresh_pipe(kind, folder):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(str(folder))


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lora_files_load_in_a_fresh_stock_pipeline(kind, sd_dir, sdxl_dir, sd_student,
                                                   sdxl_student, tmp_path):
    student, folder = (sd_student, sd_dir) if kind == "sd" else (sdxl_student, sdxl_dir)
    unet = student.bb.unet
    base_before = _base_weights(unet)
    with torch.no_grad():
        from diffdistill.adapters import adapters_disabled

        with adapters_disabled(unet):
            teacher_out = student.run(unet)
    assert (student.out - teacher_out).abs().max() > 0.05  # the LoRA matters

    save_lora(unet, tmp_path)  # kind (sd / sdxl) read from the UNet's config
    save_lora_kohya(unet, tmp_path)
    # export neither merged nor moved anything in the training UNet
    assert all(torch.equal(v, base_before[k]) for k, v in _base_weights(unet).items())
    assert torch.equal(student.run(unet), student.out)

    kohya = load_file(str(tmp_path / KOHYA_WEIGHT_NAME))
    prefix = "lora_unet_input_blocks_" if kind == "sdxl" else "lora_unet_down_blocks_"
    assert any(k.startswith(prefix) for k in kohya)
    assert all(k.startswith("lora_unet_") and k.endswith(
        (".lora_down.weight", ".lora_up.weight", ".alpha")) for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}

    for weight_name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        pipe = _fresh_pipe(kind, folder)
        pipe.load_lora_weights(str(tmp_path), weight_name=weight_name)
        n_lora = sum(1 for k in pipe.unet.state_dict() if "lora_A" in k)
        assert n_lora == sum(1 for k in unet.state_dict() if "lora_A" in k), weight_name
        loaded = student.run(pipe.unet)
        assert (loaded - student.out).abs().max() <= 1e-5, weight_name
        pipe.fuse_lora()
        assert (student.run(pipe.unet) - student.out).abs().max() <= 1e-4, weight_name


def test_kohya_alpha_rescales_without_changing_the_function(sd_dir, sd_student, tmp_path):
    save_lora_kohya(sd_student.bb.unet, tmp_path, kind="sd", alpha=1.0, dtype=torch.float32)
    sd = load_file(str(tmp_path / KOHYA_WEIGHT_NAME))
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {1.0}
    pipe = _fresh_pipe("sd", sd_dir)
    pipe.load_lora_weights(str(tmp_path), weight_name=KOHYA_WEIGHT_NAME)
    assert (sd_student.run(pipe.unet) - sd_student.out).abs().max() <= 1e-5


def test_ldm_names_of_real_sdxl():
    """kohya-ss' SDXL key names (sgm UNet) for the real SDXL block layout."""
    cfg = {"layers_per_block": 2,
           "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
    cases = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.proj_in": "input_blocks.8.1.proj_in",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "mid_block.attentions.0.transformer_blocks.3.ff.net.2": "middle_block.1.transformer_blocks.3.ff.net.2",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.resnets.2.conv_shortcut": "output_blocks.2.0.skip_connection",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_out.0": "output_blocks.5.1.transformer_blocks.1.attn2.to_out.0",
        "up_blocks.2.resnets.0.conv2": "output_blocks.6.0.out_layers.3",
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
    }
    for diffusers_name, ldm in cases.items():
        assert ldm_unet_module_name(diffusers_name, cfg) == ldm


def test_lora_export_errors(sd_student, tmp_path):
    with pytest.raises(ValueError, match="no LoRA loader"):
        save_lora(sd_student.bb.unet, tmp_path, kind="pixel")
    from diffdistill.tiny import tiny_cond_unet

    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_lora(tiny_cond_unet(), tmp_path, kind="sd")


# ----------------------------------------------------------------------------- full folders


def test_full_export_of_a_lora_student_merges_into_a_copy(sd_student, tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline

    unet = sd_student.bb.unet
    base_before = _base_weights(unet)
    out = save_full_pipeline(sd_student.bb, unet, tmp_path / "full", scheduler="lcm")
    assert all(torch.equal(v, base_before[k]) for k, v in _base_weights(unet).items())
    assert torch.equal(sd_student.run(unet), sd_student.out)  # adapters still active

    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe) is StableDiffusionPipeline and isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # built from the teacher's
    assert not any("lora" in k for k in pipe.unet.state_dict())
    assert (sd_student.run(pipe.unet) - sd_student.out).abs().max() <= 1e-4
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    img = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and 0 <= img.min() and img.max() <= 1 and img.std() > 0


def test_full_export_of_a_full_lcm_student_is_bit_exact(sd_dir, tmp_path):
    from diffusers import DiffusionPipeline, LatentConsistencyModelPipeline

    from diffdistill.tiny import tiny_cond_unet

    bb = load_backbone(sd_dir, load_text=False, load_vae=False)  # parts re-read from disk
    student = tiny_cond_unet(time_cond_proj_dim=32, seed=4)
    make_trainable(student, adapter="full")
    out = save_full_pipeline(bb, student, tmp_path / "lcm", scheduler="lcm")
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe) is LatentConsistencyModelPipeline
    ours, theirs = student.state_dict(), pipe.unet.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    img = pipe("a sneaker", num_inference_steps=2, guidance_scale=4.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and img.std() > 0


def test_full_sdxl_export_with_tcd(sdxl_dir, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline, TCDScheduler

    bb = load_backbone(sdxl_dir)
    student = load_backbone(sdxl_dir, load_text=False, load_vae=False).unet
    make_trainable(student, adapter="full")
    _randomize([student.conv_out.weight], scale=0.05, seed=2)
    out = save_full_pipeline(bb, student, tmp_path / "xl", scheduler="tcd",
                             scheduler_kwargs={"timestep_spacing": "trailing"})
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe) is StableDiffusionXLPipeline and isinstance(pipe.scheduler, TCDScheduler)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.config.force_zeros_for_empty_prompt
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in student.state_dict().items())
    img = pipe("a red dress", num_inference_steps=2, guidance_scale=1.0, eta=0.3,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and img.std() > 0


def test_pixel_cm_export_samples_like_our_denoiser(pixel_dir, tmp_path):
    from diffusers import ConsistencyModelPipeline, DDPMPipeline, DiffusionPipeline

    bb = load_backbone(pixel_dir)
    student = load_backbone(pixel_dir).unet
    make_trainable(student, adapter="full")
    out = save_full_pipeline(bb, student, tmp_path / "cm", scheduler="cm")
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe) is ConsistencyModelPipeline
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in student.state_dict().items())
    noise = _x((2, 3, 16, 16), 3)
    img = pipe(batch_size=2, class_labels=[1, 6], num_inference_steps=1, latents=noise,
               output_type="np").images
    sigma = float(pipe.scheduler.sigmas[0])
    assert sigma == pytest.approx(80.0)
    den = Denoiser(student, VESchedule(0.002, 80.0), "cm")
    with torch.no_grad():
        x0 = den(noise * sigma, sigma, bb.class_cond([1, 6], guidance=False)).x0
    ours = (x0.clamp(-1, 1) / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    assert abs(ours - img).max() < 1e-5 and img.std() > 0.01

    again = load_backbone(out)  # the side file keeps the null class
    assert (again.prediction_type, again.num_classes, again.null_class) == ("cm", 10, 10)

    ddpm = save_full_pipeline(bb, student, tmp_path / "ddpm", scheduler="teacher")
    assert type(DiffusionPipeline.from_pretrained(str(ddpm))) is DDPMPipeline
    with pytest.raises(ValueError, match="Euler"):
        save_full_pipeline(bb, student, tmp_path / "e", scheduler="euler")
    with pytest.raises(ValueError, match="unknown"):
        save_full_pipeline(bb, student, tmp_path / "e", scheduler="dpm")


# ----------------------------------------------------------------------------- model cards


def _run_card(readme, tmp_path, monkeypatch):
    code = card_code(readme)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(readme), "exec"), {"__name__": "__card__"})
    from PIL import Image

    return Image.open(tmp_path / "sample.png")


def test_lora_card_code_runs(sd_dir, sd_student, tmp_path, monkeypatch):
    lora_dir = tmp_path / "lora"
    save_lora(sd_student.bb.unet, lora_dir, kind="sd")
    readme = write_model_card(lora_dir, method="lcd", base_model=str(sd_dir), steps=2,
                              guidance_scale=1.0, scheduler="lcm", lora=True, kind="sd",
                              extra={"rank": 4})
    text = readme.read_text()
    assert text.startswith("---\nlibrary_name: diffusers\n") and "- lora\n" in text
    assert "base_model:" not in text.split("---")[1]  # a local path is not a hub id
    assert 'weight_name="pytorch_lora_weights.safetensors"' in text.replace("'", '"')
    assert "LCMScheduler.from_config(pipe.scheduler.config)" in text
    img = _run_card(readme, tmp_path, monkeypatch)
    assert img.size == (32, 32)

    hub = write_model_card(tmp_path / "hub", method="dmd2", base_model="org/base", steps=4,
                           guidance_scale=1.0, scheduler="tcd", lora=True, kind="sdxl")
    assert "base_model: org/base" in hub.read_text() and "eta=0.3" in hub.read_text()


def test_full_and_pixel_card_code_runs(sd_dir, pixel_dir, tmp_path, monkeypatch):
    bb = load_backbone(sd_dir, load_vae=False)
    full = save_full_pipeline(bb, bb.unet, tmp_path / "full", scheduler="ddim",
                              scheduler_kwargs={"timestep_spacing": "trailing"})
    readme = write_model_card(full, method="hypersd", base_model=str(sd_dir), steps=2,
                              guidance_scale=1.0, scheduler="ddim", lora=False, kind="sd")
    assert "load_lora_weights" not in readme.read_text()
    assert _run_card(readme, tmp_path, monkeypatch).size == (32, 32)

    px = load_backbone(pixel_dir)
    cm = save_full_pipeline(px, px.unet, tmp_path / "cm", scheduler="cm")
    readme = write_model_card(cm, method="ict", base_model=str(pixel_dir), steps=1,
                              guidance_scale=1.0, scheduler="cm", lora=False, kind="pixel")
    assert "class_labels=[0]" in readme.read_text()
    assert _run_card(readme, tmp_path, monkeypatch).size == (16, 16)
