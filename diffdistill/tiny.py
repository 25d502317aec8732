"""Small diffusers models built from configs (no download), with the real architectures.

Used by the tests (every structure the toolkit supports: SD-style, SDXL-style with two text
encoders, pixel class-conditional) and, with larger widths, by the embedded world. Each
factory returns a stock diffusers object, so everything downstream runs the real code paths.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

SD_SCHEDULER = dict(  # Stable Diffusion 1.5's scheduler config
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)

_TOKENIZER_DIR: Optional[Path] = None


def clip_tokenizer_dir() -> Path:
    """A process-wide cached CLIP tokenizer folder built from open_clip's bundled BPE."""
    global _TOKENIZER_DIR
    if _TOKENIZER_DIR is None or not (_TOKENIZER_DIR / "vocab.json").exists():
        from .tokenizer import write_clip_tokenizer

        root = Path(os.environ.get("DIFFDISTILL_CACHE", tempfile.gettempdir()))
        final = root / "diffdistill-clip-tokenizer"
        if not (final / "tokenizer_config.json").exists():
            # written aside and renamed into place: parallel test workers never read a
            # half-written folder (a worker that loses the race drops its own copy)
            tmp = write_clip_tokenizer(root / f".diffdistill-clip-tokenizer.{os.getpid()}")
            try:
                os.replace(tmp, final)
            except OSError:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        _TOKENIZER_DIR = final
    return _TOKENIZER_DIR


def tiny_text_encoder(hidden: int = 32, layers: int = 2, with_projection: bool = False,
                      projection_dim: int = 32, seed: int = 0, vocab_size: int = 49408,
                      max_positions: int = 77):
    """A CLIP text encoder for a CLIP-style vocabulary of ``vocab_size`` ids whose last two
    are <|startoftext|> and <|endoftext|> (CLIP's 49,408, or the 514 of a character-level
    :func:`~diffdistill.tokenizer.write_clip_tokenizer`)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
        num_hidden_layers=layers, vocab_size=vocab_size, max_position_embeddings=max_positions,
        projection_dim=projection_dim, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def tiny_vae(channels=(32, 64), latent_channels: int = 4, seed: int = 0, norm_groups: int = 32,
             scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1, norm_num_groups=norm_groups, sample_size=32,
        scaling_factor=scaling_factor,
    ).eval()


def tiny_cond_unet(channels=(32, 64), cross_attention_dim: int = 32, sample_size: int = 16,
                   time_cond_proj_dim: Optional[int] = None, sdxl: bool = False,
                   text_embed_dim: int = 32, seed: int = 0,
                   down_block_types: Optional[tuple] = None,
                   up_block_types: Optional[tuple] = None, layers_per_block: int = 1):
    """SD-structured ``UNet2DConditionModel``. Default blocks: cross-attention at the first
    level only (two levels); pass ``down_block_types`` / ``up_block_types`` for others."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kw = {}
    if sdxl:
        kw = dict(
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + text_embed_dim,
        )
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4,
        block_out_channels=tuple(channels), layers_per_block=layers_per_block,
        down_block_types=tuple(down_block_types or ("CrossAttnDownBlock2D", "DownBlock2D")),
        up_block_types=tuple(up_block_types or ("UpBlock2D", "CrossAttnUpBlock2D")),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
        time_cond_proj_dim=time_cond_proj_dim, **kw,
    )


def tiny_pixel_unet(channels=(32, 64), num_classes: Optional[int] = 10, sample_size: int = 16,
                    seed: int = 0, down_block_types: Optional[tuple] = None,
                    up_block_types: Optional[tuple] = None, layers_per_block: int = 1,
                    norm_groups: int = 32):
    """Class-conditional pixel UNet2DModel (``num_class_embeds = num_classes + 1``: the last
    index is the null class used for classifier-free guidance). Default blocks: attention
    at the second level only (two levels); pass ``down_block_types`` / ``up_block_types``
    for others."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=3,
        block_out_channels=tuple(channels), layers_per_block=layers_per_block,
        down_block_types=tuple(down_block_types or ("DownBlock2D", "AttnDownBlock2D")),
        up_block_types=tuple(up_block_types or ("AttnUpBlock2D", "UpBlock2D")),
        attention_head_dim=8, norm_num_groups=norm_groups,
        num_class_embeds=(num_classes + 1) if num_classes else None,
    )


def tiny_sd_pipeline(prediction_type: str = "epsilon", seed: int = 0, sample_size: int = 16,
                     time_cond_proj_dim: Optional[int] = None):
    """A real ``StableDiffusionPipeline`` (SD1.5 structure) with tiny parts."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from .tokenizer import load_clip_tokenizer

    sched = DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    return StableDiffusionPipeline(
        vae=tiny_vae(seed=seed),
        text_encoder=tiny_text_encoder(seed=seed),
        tokenizer=load_clip_tokenizer(clip_tokenizer_dir()),
        unet=tiny_cond_unet(seed=seed, sample_size=sample_size,
                            time_cond_proj_dim=time_cond_proj_dim),
        scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(prediction_type: str = "epsilon", seed: int = 0, sample_size: int = 16):
    """A real ``StableDiffusionXLPipeline`` structure: two text encoders, pooled + time ids."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from .tokenizer import load_clip_tokenizer

    tok = load_clip_tokenizer(clip_tokenizer_dir())
    sched = EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULER.items()
                                      if k not in ("clip_sample", "set_alpha_to_one")},
                                   prediction_type=prediction_type)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed=seed),
        text_encoder=tiny_text_encoder(seed=seed),
        text_encoder_2=tiny_text_encoder(seed=seed + 1, with_projection=True),
        tokenizer=tok, tokenizer_2=tok,
        unet=tiny_cond_unet(seed=seed, sample_size=sample_size, cross_attention_dim=64,
                            sdxl=True, text_embed_dim=32),
        scheduler=sched, force_zeros_for_empty_prompt=True,
    )


def tiny_pixel_pipeline(prediction_type: str = "epsilon", seed: int = 0, sample_size: int = 16,
                        num_classes: int = 10):
    """A pixel class-conditional teacher: ``DDPMPipeline`` (UNet2DModel + DDPMScheduler)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                          prediction_type=prediction_type, clip_sample=False)
    return DDPMPipeline(unet=tiny_pixel_unet(seed=seed, sample_size=sample_size,
                                             num_classes=num_classes), scheduler=sched)


#: SD3's FlowMatchEulerDiscreteScheduler config (shift 3: Esser et al. 2024, Sec. 5.3.2)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def tiny_sd3_transformer(sample_size: int = 16, joint_attention_dim: int = 64,
                         pooled_projection_dim: int = 64, seed: int = 0, num_layers: int = 2):
    """SD3-structured ``SD3Transformer2DModel`` (MMDiT, patch 2, joint text-image attention)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4,
        num_layers=num_layers, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=joint_attention_dim, caption_projection_dim=32,
        pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=sample_size,
    ).eval()


def tiny_sd3_pipeline(seed: int = 0, sample_size: int = 16, t5: bool = False):
    """A real ``StableDiffusion3Pipeline`` structure: two CLIP encoders with projections, an
    MMDiT, a VAE with SD3's scaling and shift factors, the flow-matching Euler scheduler with
    shift 3; without T5 (``text_encoder_3`` None, as SD3 runs with it dropped) unless ``t5``
    (a tiny T5 as wide as the MMDiT's joint attention input)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from .tokenizer import load_clip_tokenizer

    tok = load_clip_tokenizer(clip_tokenizer_dir())
    t5_tok = tiny_t5_tokenizer(model_max_length=256) if t5 else None
    vae = tiny_vae(seed=seed, scaling_factor=1.5305)
    vae.register_to_config(shift_factor=0.0609)
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(sample_size=sample_size, seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=vae,
        text_encoder=tiny_text_encoder(seed=seed, with_projection=True), tokenizer=tok,
        text_encoder_2=tiny_text_encoder(seed=seed + 1, with_projection=True), tokenizer_2=tok,
        text_encoder_3=tiny_t5_encoder(len(t5_tok), d_model=64, seed=seed + 2) if t5 else None,
        tokenizer_3=t5_tok if t5 else None,
    )


#: FLUX.1-dev's FlowMatchEulerDiscreteScheduler config (resolution-dependent shift)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                      base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A ``T5TokenizerFast`` built in code (no sentencepiece file, no download): a unigram
    vocabulary of lowercase letters, digits and punctuation with T5's specials (pad 0, eos 1,
    unk 2), the ``▁`` word-boundary pre-tokenizer and "</s>" appended, as T5's tokenizer
    does. It saves and loads with ``save_pretrained`` / ``from_pretrained`` like any other."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    for c in string.ascii_lowercase + string.digits + ",.'-!?":
        pieces += [("▁" + c, -2.0), (c, -3.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(vocab_size: int, d_model: int = 32, seed: int = 0):
    """A two-layer ``T5EncoderModel`` (the text encoder Flux and SD3 read their sequence from)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8,
                                   d_ff=2 * d_model, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8)).eval()


def tiny_flux_transformer(in_channels: int = 16, joint_attention_dim: int = 32,
                          pooled_projection_dim: int = 32, guidance_embeds: bool = True,
                          seed: int = 0):
    """Flux-structured ``FluxTransformer2DModel``: one double-stream (joint) block, two
    single-stream blocks, rotary ids over (text, row, column), ``in_channels`` = 4 × the VAE's
    latent channels (2x2-packed tokens), FLUX.1-dev's guidance embedding when asked."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4)).eval()


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A real ``FluxPipeline`` structure: CLIP (pooled output) + T5 (sequence), the Flux
    transformer on 2x2-packed latents of a 4-channel VAE with Flux's scaling and shift
    factors, and FLUX.1-dev's dynamic-shift flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from .tokenizer import load_clip_tokenizer

    t5_tok = tiny_t5_tokenizer()
    vae = tiny_vae(seed=seed, scaling_factor=0.3611)
    vae.register_to_config(shift_factor=0.1159)
    return FluxPipeline(
        transformer=tiny_flux_transformer(guidance_embeds=guidance_embeds, seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
        text_encoder=tiny_text_encoder(seed=seed), tokenizer=load_clip_tokenizer(
            clip_tokenizer_dir()),
        text_encoder_2=tiny_t5_encoder(len(t5_tok), seed=seed + 1), tokenizer_2=t5_tok)
