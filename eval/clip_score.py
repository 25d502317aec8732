"""CLIP score: image–caption agreement with an open_clip model.

Hessel et al. (2021), "CLIPScore: A Reference-free Evaluation Metric for Image Captioning",
define ``w · max(cos(E_img, E_txt), 0)`` with w = 2.5. Text-to-image papers report one of
two other conventions, and this module computes both (state which one you report):

* ``scale=1.0`` (default) — the plain cosine similarity of the L2-normalised embeddings,
  averaged over images, unclamped. This is the number distillation papers quote
  (≈0.29–0.31 for SD-class models with open_clip ViT-g-14 laion2b_s12b_b42k; DMD2 /
  f-distill tables).
* ``scale=100.0`` — torchmetrics' ``CLIPScore``: per image ``100 · cos`` (not clamped), and
  the reported mean is ``max(mean, 0)`` (torchmetrics clamps the *mean*, not each sample).

Images go through ``ClipDetector`` (open_clip's own evaluation preprocessing); captions
get ``prefix`` prepended (e.g. "a photo of ") before tokenisation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from diffdistill.eval.clip_detector import ClipDetector
from diffdistill.eval.features import to_uint8_rgb

__all__ = ["ClipScoreResult", "clip_score"]


@dataclass
class ClipScoreResult:
    per_image: torch.Tensor  # float32 [N], already multiplied by ``scale``
    mean: float              # clamped at 0 when ``clamp_mean`` (the torchmetrics ×100 convention)
    scale: float

    def __float__(self) -> float:
        return self.mean


def _as_detector(detector_or_model, tokenizer: Callable | None, preprocess: Callable | None) -> ClipDetector:
    if isinstance(detector_or_model, ClipDetector):
        return detector_or_model
    model = detector_or_model
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise TypeError("clip_score expects a ClipDetector or an open_clip model (encode_image/encode_text)")
    if tokenizer is None:
        raise ValueError("clip_score with a raw open_clip model needs tokenizer= "
                         "(open_clip.get_tokenizer(model_name)); or pass a ClipDetector")
    return ClipDetector(model_name=getattr(model, "model_name", "custom"), model=model, tokenizer=tokenizer,
                        preprocess=preprocess, resize_mode="open_clip" if preprocess is not None else "tensor")


def _batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    if torch.is_tensor(images):
        images = to_uint8_rgb(images)
        for start in range(0, images.shape[0], batch_size):
            yield images[start:start + batch_size]
    else:
        for item in images:
            yield to_uint8_rgb(item)


@torch.no_grad()
def clip_score(detector_or_model, images_uint8: torch.Tensor | Iterable[torch.Tensor],
               captions: Sequence[str], prefix: str = "", scale: float = 1.0,
               clamp_mean: bool | None = None, batch_size: int = 64,
               tokenizer: Callable | None = None, preprocess: Callable | None = None) -> ClipScoreResult:
    """Per-image ``scale · cos(image, prefix + caption)`` and their mean.

    ``images_uint8``: uint8 NCHW tensor, or an iterable of uint8 batches (in caption order).
    ``clamp_mean`` defaults to True exactly for ``scale == 100`` (torchmetrics convention).
    """
    detector = _as_detector(detector_or_model, tokenizer, preprocess)
    captions = list(captions)
    scores, done = [], 0
    for batch in _batches(images_uint8, batch_size):
        n = batch.shape[0]
        if done + n > len(captions):
            raise ValueError(f"more images than captions ({len(captions)})")
        img = detector(batch)
        txt = detector.encode_text([prefix + c for c in captions[done:done + n]]).to(img.device)
        scores.append((img * txt).sum(dim=-1).cpu() * scale)
        done += n
    if done != len(captions):
        raise ValueError(f"{done} images but {len(captions)} captions")
    per_image = torch.cat(scores) if scores else torch.empty(0)
    mean = float(per_image.double().mean()) if done else float("nan")
    if clamp_mean is None:
        clamp_mean = scale == 100.0
    if clamp_mean and done:
        mean = max(mean, 0.0)
    return ClipScoreResult(per_image=per_image, mean=mean, scale=float(scale))
