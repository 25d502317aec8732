"""CLIP features ("clip:<model>"): L2-normalised open_clip image and text embeddings.

:class:`ClipDetector` preprocesses with open_clip's own evaluation transform (or a tensor
re-implementation of it) and also embeds text, for the CLIP score. Registered as ``"clip"``
in the detector registry of :mod:`diffdistill.eval.features` (``get_detector("clip:<model>")``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffdistill.eval.features import FrozenModule, to_uint8_rgb
from torch import nn

__all__ = ["CLIP_WEIGHTS_ENV", "ClipDetector"]

CLIP_WEIGHTS_ENV = "DIFFDISTILL_CLIP_WEIGHTS"


def _is_rgb_conversion(step) -> bool:
    """open_clip's ``MaybeConvertMode("RGB")`` / ``_convert_to_rgb`` transform step."""
    if type(step).__name__ == "MaybeConvertMode":
        return getattr(step, "mode", None) == "RGB"
    return getattr(step, "__name__", None) == "_convert_to_rgb"


class ClipDetector(FrozenModule):
    """L2-normalised open_clip image (and text) embeddings.

    ``resize_mode="open_clip"`` (default) applies the model's own evaluation transform to PIL
    images (resize shortest side to ``image_size`` with bicubic, centre crop, normalise
    with the model's mean/std), exactly as open_clip's ``preprocess`` does.
    ``resize_mode="tensor"`` does the same steps with ``torch.nn.functional.interpolate``
    (bicubic, antialias) on the model's device — faster on a GPU, close but not identical.

    Weights come only from a local file (``pretrained_path`` or ``DIFFDISTILL_CLIP_WEIGHTS``)
    — e.g. ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors`` of
    laion/CLIP-ViT-g-14-laion2B-s12B-b42k. ``allow_random_init=True`` builds an untrained
    model (tests only). Custom architectures: register a JSON config with
    ``open_clip.add_model_config`` or pass ``config_path``.
    """

    resize_modes = ("open_clip", "tensor")

    def __init__(self, model_name: str, pretrained_path: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, resize_mode: str = "open_clip",
                 config_path: str | os.PathLike | None = None,
                 allow_random_init: bool = False, model: nn.Module | None = None,
                 preprocess: Callable | None = None, tokenizer: Callable | None = None):
        super().__init__()
        import open_clip

        if resize_mode not in self.resize_modes:
            raise ValueError(f"resize_mode must be one of {self.resize_modes}, got {resize_mode!r}")
        if config_path is not None:
            open_clip.add_model_config(str(config_path))
        weights = None
        if model is None:
            path = pretrained_path if pretrained_path is not None else os.environ.get(CLIP_WEIGHTS_ENV)
            if path:
                path = Path(path).expanduser()
                if not path.is_file():
                    raise FileNotFoundError(
                        f"CLIP weights file {path} does not exist (open_clip model {model_name!r}). "
                        f"Pass pretrained_path= or set {CLIP_WEIGHTS_ENV} to a local open_clip "
                        "checkpoint (.bin/.pt/.safetensors); nothing is downloaded."
                    )
                path = str(path)
            elif not allow_random_init:
                raise FileNotFoundError(
                    f"CLIP model {model_name!r}: no weights file given. Pass pretrained_path= or set "
                    f"{CLIP_WEIGHTS_ENV} (e.g. open_clip_pytorch_model.bin of "
                    "laion/CLIP-ViT-g-14-laion2B-s12B-b42k); nothing is downloaded."
                )
            else:
                path = None
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=path)
            weights = path
        if tokenizer is None:
            tokenizer = open_clip.get_tokenizer(model_name)
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model_name = model_name
        # the weight file (None: a given or random model): the bench's "judge = reward" check
        self.weights_path = weights
        self.name = f"clip:{model_name}"
        self.metric_name = f"FD-CLIP-{model_name}"
        self.resize_mode = resize_mode
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        size = getattr(model.visual, "image_size", None) or cfg.get("size", 224)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.register_buffer("clip_mean", torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("clip_std", torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1),
                             persistent=False)
        model_device = next(self.model.parameters()).device
        with torch.no_grad():
            probe = self.model.encode_text(self.tokenizer(["a"]).to(model_device))
        self.feature_dim = self.num_features = int(probe.shape[-1])
        self.requires_grad_(False)
        self.eval()
        if device is not None:
            self.to(device)

    def _batched_preprocess(self, height: int, width: int):
        """``(dtype, Normalize or None)`` when ``self.preprocess`` reduces to ToTensor (+
        Normalize) for RGB images of this size, else None.

        That is the case for open_clip's evaluation transform on images already at the
        model's size: torchvision's Resize returns its input unchanged when the output size
        equals the input size, a centre crop to the full size and an RGB conversion of an
        RGB image copy it. ToTensor (``x.to(dtype).div(255)``) and Normalize
        (``x.sub_(mean).div_(std)``) are elementwise, so doing them once on the batch gives
        the per-image PIL path's values bit for bit, without its per-image overhead (which
        costs about as much as the tiny world CLIP's forward). Any other step: None.
        """
        cache = self.__dict__.setdefault("_batched_plans", {})
        key = (id(self.preprocess), height, width)
        if key in cache:
            return cache[key]
        from torchvision import transforms as T

        plan = None
        steps = getattr(self.preprocess, "transforms", None)
        if isinstance(self.preprocess, T.Compose) and steps:
            to_tensor, normalize, ok = False, None, True
            for step in steps:
                if normalize is not None:
                    ok = False  # anything after Normalize
                elif isinstance(step, T.Resize) and not to_tensor:
                    size = [step.size] if isinstance(step.size, int) else list(step.size)
                    ok = height == width and size in ([height], [height, width]) and (
                        step.max_size is None or step.max_size >= height)
                elif isinstance(step, T.CenterCrop) and not to_tensor:
                    ok = tuple(step.size) == (height, width)
                elif _is_rgb_conversion(step) and not to_tensor:
                    ok = True  # open_clip's RGB conversion: a copy for RGB input
                elif isinstance(step, T.ToTensor) and not to_tensor:
                    to_tensor = True  # open_clip's MaybeToTensor subclasses it
                elif isinstance(step, T.Normalize) and to_tensor:
                    normalize = step
                else:
                    ok = False
                if not ok:
                    break
            if ok and to_tensor:
                plan = (torch.get_default_dtype(), normalize)
        cache[key] = plan
        return plan

    def _pixels(self, images) -> torch.Tensor:
        images = to_uint8_rgb(images)
        if self.resize_mode == "open_clip" and self.preprocess is not None:
            plan = self._batched_preprocess(images.shape[-2], images.shape[-1])
            if plan is not None:
                dtype, normalize = plan
                x = images.cpu().to(dtype).div_(255)  # the same float ops as the PIL path
                if normalize is not None:
                    mean = torch.as_tensor(normalize.mean, dtype=dtype).view(-1, 1, 1)
                    std = torch.as_tensor(normalize.std, dtype=dtype).view(-1, 1, 1)
                    x = x.sub_(mean).div_(std)
                return x.to(self.device)
            from PIL import Image

            arr = images.permute(0, 2, 3, 1).cpu().numpy()
            return torch.stack([self.preprocess(Image.fromarray(a)) for a in arr]).to(self.device)
        x = images.to(self.device, torch.float32) / 255.0
        h, w = x.shape[-2:]
        th, tw = self.image_size
        scale = max(th / h, tw / w)  # shortest side to the target, as open_clip's Resize
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top:top + th, left:left + tw].clamp(0, 1)
        return (x - self.clip_mean) / self.clip_std

    @torch.no_grad()
    def forward(self, images_uint8_nchw) -> torch.Tensor:
        pixels = self._pixels(images_uint8_nchw).to(next(self.model.parameters()).dtype)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings, float32 ``[len(texts), D]``."""
        if isinstance(texts, str):
            texts = [texts]
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0, self.feature_dim)
