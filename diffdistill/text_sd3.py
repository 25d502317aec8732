"""SD3's prompt conditioning, as the stock ``StableDiffusion3Pipeline.encode_prompt`` builds it
(Esser et al. 2024, Sec. 5.2; diffusers 0.42): the penultimate hidden states of CLIP-L and
CLIP-G concatenated on features and zero-padded to T5's width, followed on the sequence axis
by T5-XXL's last hidden state (256 tokens) — or by zeros when the folder has no T5, which is
how SD3 runs with T5 dropped. The pooled input is both CLIP projections concatenated.
"""

from __future__ import annotations

import torch

#: the stock pipeline's default ``max_sequence_length`` (T5 tokens, or rows of zeros)
T5_SEQUENCE_LENGTH = 256


def _clip_states(text_encoder, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    out = text_encoder(inputs.input_ids.to(text_encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]  # (penultimate layer, pooled projection)


def _t5_states(bb, prompts: list[str], joint_dim: int, dtype) -> torch.Tensor:
    te, tok = bb.text_encoder_3, bb.tokenizer_3
    if te is None:
        return torch.zeros((len(prompts), T5_SEQUENCE_LENGTH, joint_dim), dtype=dtype,
                           device=bb.device)
    inputs = tok(prompts, padding="max_length", max_length=T5_SEQUENCE_LENGTH, truncation=True,
                 add_special_tokens=True, return_tensors="pt")
    return te(inputs.input_ids.to(te.device))[0].to(te.dtype)


@torch.no_grad()
def encode_sd3(bb, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [B, 77 + 256, joint_dim], pooled [B, P]) for ``prompts`` on SD3 backbone ``bb``."""
    h1, p1 = _clip_states(bb.text_encoder, bb.tokenizer, prompts)
    h2, p2 = _clip_states(bb.text_encoder_2, bb.tokenizer_2, prompts)
    clip = torch.cat([h1.to(bb.text_encoder.dtype), h2.to(bb.text_encoder.dtype)], dim=-1)
    t5 = _t5_states(bb, prompts, bb.unet.config.joint_attention_dim, bb.text_encoder.dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat([p1, p2], dim=-1)
