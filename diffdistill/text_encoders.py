"""Prompt conditioning exactly as each stock diffusers pipeline builds it (diffusers 0.42).

* SD 1.5 (``StableDiffusionPipeline.encode_prompt``): CLIP's last hidden state, with the
  attention mask when the text encoder's config asks for one.
* SDXL (Podell et al. 2023, Sec. 2.1): both CLIPs' penultimate hidden states concatenated on
  features; the pooled input is encoder 2's projection.
* SD3 (Esser et al. 2024, Sec. 5.2): the penultimate hidden states of CLIP-L and CLIP-G
  concatenated on features and zero-padded to T5's width, followed on the sequence axis by
  T5-XXL's last hidden state (256 tokens) — or by zeros when the folder has no T5, which is
  how SD3 runs with T5 dropped. The pooled input is both CLIP projections concatenated.
* Flux (``FluxPipeline.encode_prompt``): T5's last hidden state (512 tokens) is the sequence;
  CLIP-L's pooled output (no projection) is the pooled input.
"""

from __future__ import annotations

from typing import Optional

import torch

#: the stock SD3 pipeline's default ``max_sequence_length`` (T5 tokens, or rows of zeros)
T5_SEQUENCE_LENGTH = 256
#: the stock Flux pipeline's default ``max_sequence_length``
FLUX_SEQUENCE_LENGTH = 512


def _tokens(tokenizer, prompts: list[str], max_length: Optional[int] = None):
    return tokenizer(prompts, padding="max_length",
                     max_length=max_length or tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")


def _clip_states(text_encoder, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = _tokens(tokenizer, prompts)
    out = text_encoder(inputs.input_ids.to(text_encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]  # (penultimate layer, pooled projection)


def _t5_last_hidden(text_encoder, tokenizer, prompts: list[str], length: int) -> torch.Tensor:
    inputs = _tokens(tokenizer, prompts, length)
    return text_encoder(inputs.input_ids.to(text_encoder.device))[0].to(text_encoder.dtype)


def encode_sd(bb, prompts: list[str]) -> tuple[torch.Tensor, None]:
    te, tok = bb.text_encoder, bb.tokenizer
    inputs = _tokens(tok, prompts)
    mask = None
    if getattr(te.config, "use_attention_mask", False):
        mask = inputs.attention_mask.to(te.device)
    return te(inputs.input_ids.to(te.device), attention_mask=mask)[0].to(te.dtype), None


def encode_sdxl(bb, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    hiddens, pooled = [], None
    for te, tok in ((bb.text_encoder, bb.tokenizer), (bb.text_encoder_2, bb.tokenizer_2)):
        out = te(_tokens(tok, prompts).input_ids.to(te.device), output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (pooled projection)
            pooled = out[0]
        hiddens.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
    if pooled is None:
        raise ValueError("SDXL text_encoder_2 must return a pooled projection "
                         "(CLIPTextModelWithProjection)")
    return torch.cat(hiddens, dim=-1).to(bb.text_encoder_2.dtype), pooled


def sequence_length(bb, default: int) -> int:
    """T5 tokens (or SD3's rows of zeros without T5) per prompt: ``bb.max_sequence_length``
    (a folder's ``diffdistill.json`` may set it; pass the same ``max_sequence_length=`` to the
    stock pipeline), else the pipeline's default."""
    return default if bb.max_sequence_length is None else int(bb.max_sequence_length)


def encode_sd3(bb, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [B, 77 + 256, joint_dim], pooled [B, P]) for ``prompts`` on SD3 backbone ``bb``
    (the CLIP tokenizer's length + :func:`sequence_length`)."""
    h1, p1 = _clip_states(bb.text_encoder, bb.tokenizer, prompts)
    h2, p2 = _clip_states(bb.text_encoder_2, bb.tokenizer_2, prompts)
    clip = torch.cat([h1.to(bb.text_encoder.dtype), h2.to(bb.text_encoder.dtype)], dim=-1)
    joint_dim = bb.unet.config.joint_attention_dim
    if bb.text_encoder_3 is None:
        t5 = torch.zeros((len(prompts), sequence_length(bb, T5_SEQUENCE_LENGTH), joint_dim),
                         dtype=bb.text_encoder.dtype, device=bb.device)
    else:
        t5 = _t5_last_hidden(bb.text_encoder_3, bb.tokenizer_3, prompts,
                             sequence_length(bb, T5_SEQUENCE_LENGTH))
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat([p1, p2], dim=-1)


def encode_flux(bb, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 hidden [B, 512, D], CLIP pooled output [B, P]) for ``prompts`` on Flux ``bb``."""
    te = bb.text_encoder
    pooled = te(_tokens(bb.tokenizer, prompts).input_ids.to(te.device),
                output_hidden_states=False).pooler_output.to(te.dtype)
    hidden = _t5_last_hidden(bb.text_encoder_2, bb.tokenizer_2, prompts,
                             sequence_length(bb, FLUX_SEQUENCE_LENGTH))
    return hidden, pooled


ENCODERS = {"sd": encode_sd, "sdxl": encode_sdxl, "sd3": encode_sd3, "flux": encode_flux}


@torch.no_grad()
def encode_prompts_like_pipeline(bb, prompts: list[str]
                                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(hidden states [B, L, D], pooled [B, P] or None) for backbone ``bb``'s kind."""
    return ENCODERS[bb.kind](bb, prompts)
