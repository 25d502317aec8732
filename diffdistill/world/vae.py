"""The latent teacher's autoencoder: a tiny ``AutoencoderKL`` trained on Fashion-MNIST.

Why a factor-4 VAE (32×32×3 images ↔ 8×8×4 latents)
----------------------------------------------------
* It is a real compression, as in Stable Diffusion (Rombach et al. 2022, sec. 3): 8×8×4 =
  256 numbers for 1,024 gray pixels. A factor-2 VAE (16×16×4 = 1,024 numbers) would store
  the pixels nearly verbatim, so "latent diffusion" would be pixel diffusion in disguise.
* It keeps the latent UNet cheap: at 8×8 the world's (32, 64) UNet with cross-attention at
  both levels costs 0.05 GFLOPs per sample and call, a quarter of the same UNet at 16×16;
  every distillation run on the latent teacher (teacher + student + fake-score calls per
  step) inherits that factor.
* The VAE itself is (16, 32, 64) channels with 16-channel group norms: 0.18 GFLOPs per image
  for encode + decode, less than half of a (32, 64, 64) one, which is what lets it train
  for ~40k images in a few CPU minutes.
* Reconstruction quality is measured, not assumed: the build records the PSNR and the
  FID-FMNIST of the test split's reconstructions (the floor under the latent teacher).

The stock diffusers ``AutoencoderKL`` is trained with the first-stage objective of LDM
(Rombach et al. 2022, App. G) minus its perceptual and adversarial terms (no pretrained
LPIPS network or discriminator is available offline, and Fashion-MNIST does not need
them): an L1 reconstruction of a posterior sample plus a weak KL term,
``L = Σ|x − D(z)| + β·KL(q(z|x) ‖ N(0, I))`` with ``β = 1e-5`` per-sample sums (LDM uses
1e-6 with its extra terms). The latent scale factor is then set as SD's 0.18215 was: one
over the standard deviation of posterior samples of training images, so that scaled
latents have unit variance for the diffusion model.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from diffdistill.world import epoch_batches, warmup_cosine


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def reconstruct(vae, images_uint8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Encode (posterior mode) and decode uint8 images; returns uint8."""
    out = []
    for i in range(0, len(images_uint8), batch_size):
        x = images_uint8[i:i + batch_size].float() / 127.5 - 1.0
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out)


def train_vae(out_dir: Union[str, os.PathLike], *, channels=(16, 32, 64), norm_groups: int = 16,
              latent_channels: int = 4, steps: int = 1200, batch_size: int = 32,
              lr: float = 1e-3, kl_weight: float = 1e-5, seed: int = 0,
              limit: Optional[int] = None, test_limit: Optional[int] = 2000,
              scale_images: int = 2048, root=None,
              log: Callable[[str], None] = print) -> dict:
    """Train the VAE, set its ``scaling_factor`` from the data and save it (fp32 diffusers
    folder) to ``out_dir``. Returns metrics: test PSNR, latent std, scaling factor."""
    from diffdistill.fmnist import fashion_mnist_uint8
    from diffdistill.tiny import tiny_vae

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    vae = tiny_vae(channels=tuple(channels), latent_channels=latent_channels, seed=seed,
                   norm_groups=norm_groups)
    train_x = fashion_mnist_uint8("train", 32, root=root, limit=limit)
    test_x = fashion_mnist_uint8("test", 32, root=root, limit=test_limit)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    pixels_per_image = train_x[0].numel()
    vae.train()
    t0 = time.perf_counter()
    for step, idx in epoch_batches(len(train_x), batch_size, steps, gen):
        x = train_x[idx].float() / 127.5 - 1.0
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = (recon - x).abs().flatten(1).sum(1)
        kl = posterior.kl()
        loss = ((rec + kl_weight * kl) / pixels_per_image).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            l1 = float(rec.detach().mean()) / pixels_per_image
            log(f"  vae step {step + 1}/{steps} L1 {l1:.4f} KL {float(kl.detach().mean()):.1f} "
                f"({time.perf_counter() - t0:.0f} s)")
    vae.eval()
    with torch.no_grad():
        # SD's recipe for the scale factor: 1 / std of posterior samples of training images.
        sample = train_x[:scale_images].float() / 127.5 - 1.0
        zs = []
        for i in range(0, len(sample), 256):
            post = vae.encode(sample[i:i + 256]).latent_dist
            zs.append(post.mean + post.std * torch.randn(post.mean.shape, generator=gen))
        z = torch.cat(zs)
        latent_std = float(z.std())
        latent_mean = float(z.mean())
    scaling = 1.0 / latent_std
    vae.register_to_config(scaling_factor=scaling)
    recon = reconstruct(vae, test_x)
    psnr = _psnr(recon.float() / 127.5 - 1, test_x.float() / 127.5 - 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(str(out), safe_serialization=True)
    params = sum(p.numel() for p in vae.parameters())
    factor = 2 ** (len(channels) - 1)
    log(f"  vae: test PSNR {psnr:.2f} dB, latent std {latent_std:.3f} -> scaling_factor "
        f"{scaling:.4f}, {params / 1e6:.2f} M params, latents {latent_channels}x"
        f"{32 // factor}x{32 // factor}")
    return {"test_psnr_db": psnr, "latent_std": latent_std, "latent_mean": latent_mean,
            "scaling_factor": scaling, "params": params, "downsampling_factor": factor,
            "latent_shape": [latent_channels, 32 // factor, 32 // factor],
            "test_images": len(test_x)}
