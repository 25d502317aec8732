"""The GAN discriminator of DMD2 / f-distill / Hyper-SD: a classification head on the bottleneck
features of the fake-score network (a UNet, or an SD3-class MMDiT).

DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis",
Sec. 4.3) adds a small classifier on top of the fake diffusion model's encoder bottleneck and
trains it with the non-saturating GAN loss on noised real vs noised generated images; the
fake-score UNet is thus a shared feature extractor for the denoising (score) loss and the
discriminator. f-distill (Xu, Nie & Vahdat 2025, Sec. 4) reads the same classifier's logit as a
log density ratio, r = exp(D(x_t, t)).

The features are taken with a *forward hook*, never by patching the network's ``forward``:
on ``unet.mid_block`` (the bottleneck of both ``UNet2DConditionModel`` and ``UNet2DModel``),
and on a flow transformer (``SD3Transformer2DModel``, ``FluxTransformer2DModel``) on its middle
joint block — the image tokens at half depth, the transformer's counterpart of a bottleneck —
laid back on their patch grid (B, C, H/p, W/p), the grid read by a second hook (SD3: on the
patch embedding's input; Flux: on the rotary embedding's position ids):

* :class:`BottleneckTap` — registers the hooks, keeps the features of the most recent forward
  (with their autograd graph), and removes the hooks on :meth:`BottleneckTap.remove`.
* :class:`DiscriminatorHead` — conv 4×4 stride 2 → GroupNorm → SiLU → conv 3×3 → GroupNorm →
  SiLU → global mean → linear → one logit per sample (the layout of DMD2's ``cls_pred_branch``,
  with a global mean instead of a final 4×4 conv so any bottleneck size ≥ 2×2 works).
* :class:`UNetWithHead` — the fake score as one module: ``forward`` runs the UNet and, when a
  head is attached, the head on the tapped features. It returns the UNet output (``.sample``),
  so :class:`~diffdistill.denoiser.Denoiser` wraps it like any UNet; the logits of that same
  forward are kept on ``.logits``. One module (one optimizer, one DDP wrapper) holds the UNet
  and the head: the discriminator loss trains both, as in DMD2, and every parameter is used in
  every forward, which distributed data parallel needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

Tensor = torch.Tensor


def _groups(channels: int, preferred: int = 32) -> int:
    return math.gcd(channels, preferred) or 1


def feature_block(net: nn.Module) -> nn.Module:
    """The block whose output the head reads: a UNet's ``mid_block``, a flow transformer's
    middle joint block (``transformer_blocks[len // 2]``)."""
    if getattr(net, "mid_block", None) is not None:
        return net.mid_block
    blocks = getattr(net, "transformer_blocks", None)
    if blocks is not None and getattr(net, "pos_embed", None) is not None:
        return blocks[len(blocks) // 2]
    raise ValueError(f"{type(net).__name__} has neither a mid_block nor joint transformer "
                     "blocks: the GAN head reads a UNet's bottleneck (UNet2DConditionModel / "
                     "UNet2DModel) or an SD3-class transformer's middle block")


class BottleneckTap:
    """Forward hooks that keep the latest features of :func:`feature_block` as (B, C, H, W)."""

    def __init__(self, net: nn.Module):
        self.module = feature_block(net)
        self.tokens = not hasattr(net, "mid_block")  # a transformer block: (B, N, C) tokens
        self.features: Optional[Tensor] = None
        self.grid: Optional[tuple[int, int]] = None
        self._handles = [self.module.register_forward_hook(self._capture)]
        if self.tokens and hasattr(net.config, "axes_dims_rope"):
            # Flux: the rotary embedding reads (0, row, column) ids of the packed tokens (the
            # text ids are zeros), so the grid is the largest row and column plus one
            self._handles.append(net.pos_embed.register_forward_pre_hook(
                lambda m, args: self._set_grid(int(args[0][:, 1].max()) + 1,
                                               int(args[0][:, 2].max()) + 1)))
        elif self.tokens:  # SD3: the patch embedding sees the latent (B, C, H, W)
            p = int(net.config.patch_size)
            self._handles.append(net.pos_embed.register_forward_pre_hook(
                lambda m, args: self._set_grid(args[0].shape[-2] // p, args[0].shape[-1] // p)))

    def _set_grid(self, h: int, w: int) -> None:
        self.grid = (h, w)

    def _capture(self, module, inputs, output) -> None:
        if not self.tokens:
            self.features = output[0] if isinstance(output, (tuple, list)) else output
            return
        # JointTransformerBlock and FluxTransformerBlock return (text states, image states)
        x = output[1]
        h, w = self.grid
        self.features = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)

    def pop(self) -> Tensor:
        """The features of the last forward (cleared, so a stale tensor is never reused)."""
        if self.features is None:
            raise RuntimeError("the network's feature block has not run since the last read")
        f, self.features = self.features, None
        return f

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.features = None


class DiscriminatorHead(nn.Module):
    """Bottleneck features [B, C, H, W] (H, W ≥ 2) → one logit per sample."""

    def __init__(self, in_channels: int, hidden: Optional[int] = None):
        super().__init__()
        h = hidden or in_channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, h, kernel_size=4, stride=2, padding=1),
            nn.GroupNorm(_groups(h), h),
            nn.SiLU(),
            nn.Conv2d(h, h, kernel_size=3, stride=1, padding=1),
            nn.GroupNorm(_groups(h), h),
            nn.SiLU(),
        )
        self.out = nn.Linear(h, 1)

    def forward(self, features: Tensor) -> Tensor:
        if features.shape[-1] < 2 or features.shape[-2] < 2:
            raise ValueError(f"bottleneck features of size {tuple(features.shape[-2:])} are too "
                             "small for the GAN head (needs at least 2x2)")
        x = self.net(features.to(self.out.weight.dtype))
        return self.out(x.mean(dim=(2, 3))).squeeze(1).float()


def bottleneck_channels(net: nn.Module) -> int:
    """Channels of the features the head reads: a UNet's last ``block_out_channels``, a
    transformer's width (heads × head dimension)."""
    c = net.config
    if "block_out_channels" in c:
        return int(c.block_out_channels[-1])
    return int(c.num_attention_heads * c.attention_head_dim)


@dataclass
class UNetWithHeadOutput:
    sample: Tensor
    logits: Optional[Tensor] = None


class UNetWithHead(nn.Module):
    """The fake-score network (UNet or flow transformer) plus the optional GAN head reading
    its bottleneck (see the module docstring)."""

    def __init__(self, unet: nn.Module, head: Optional[DiscriminatorHead] = None):
        super().__init__()
        self.unet = unet
        self.head = head
        self.tap = BottleneckTap(unet) if head is not None else None
        #: logits of the most recent forward (None without a head)
        self.logits: Optional[Tensor] = None

    @property
    def config(self):  # lets code that reads ``unet.config`` treat this like the UNet
        return self.unet.config

    def forward(self, sample: Tensor, timestep: Tensor, **kwargs) -> UNetWithHeadOutput:
        out = self.unet(sample, timestep=timestep, **kwargs)  # keyword: UNets and MMDiTs
        out = out.sample if hasattr(out, "sample") else out[0]
        self.logits = self.head(self.tap.pop()) if self.head is not None else None
        return UNetWithHeadOutput(sample=out, logits=self.logits)

    def remove_hooks(self) -> None:
        if self.tap is not None:
            self.tap.remove()


def roc_auc(scores_real: Tensor, scores_fake: Tensor) -> float:
    """Area under the ROC curve of a discriminator that calls "real" above a threshold:
    P(score of a random real sample > score of a random generated one), ties counted as one
    half (the Mann–Whitney U statistic divided by n_real · n_fake). 0.5 is chance, 1 a perfect
    separation, below 0.5 a discriminator that has it backwards."""
    r = scores_real.detach().double().flatten().cpu()
    f = scores_fake.detach().double().flatten().cpu()
    if r.numel() == 0 or f.numel() == 0:
        raise ValueError("roc_auc needs at least one real and one generated score")
    greater = (r[:, None] > f[None, :]).double().sum()
    ties = (r[:, None] == f[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (r.numel() * f.numel()))

