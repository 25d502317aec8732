"""The FID network: Inception-v3 pool3 features ("inception-v3", 2048-d).

The FID network of Heusel et al. (2017): TensorFlow's Inception-v3 graph of 2015-12-05 as
ported to PyTorch by pytorch-fid / torch-fidelity (weights file
``pt_inception-2015-12-05-6726825d.pth``; torch-fidelity ships the identical file as
``weights-inception-2015-12-05-6726825d.pth``, same sha256 prefix, same keys). The TF graph
differs from torchvision's Inception-v3 in three places that this module reproduces: 1008
output classes, average pools that do not count zero padding, and a max pool in the
branch-pool of the last block. Input scaling is ``(x - 128) / 128`` on 0..255 values, after
resizing to 299 px with ``resize_mode`` (see :mod:`diffdistill.eval.features`). The weights
are never downloaded: pass ``weights_path`` or set ``DIFFDISTILL_INCEPTION_WEIGHTS``.

Registered as ``"inception"`` / ``"inception-v3"`` in the detector registry of
:mod:`diffdistill.eval.features`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from diffdistill.eval.features import (
    RESIZE_MODES,
    FrozenModule,
    _load_strict,
    _resolve_weights,
    load_state_dict_file,
    prepare_uint8,
)
from torch import nn

__all__ = ["INCEPTION_WEIGHTS_ENV", "INCEPTION_WEIGHTS_FILE", "InceptionV3FID"]

INCEPTION_WEIGHTS_ENV = "DIFFDISTILL_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class _ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)  # TF's batch-norm epsilon

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    # TF's SAME average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):
    def __init__(self, cin: int, pool_ch: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_ch, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_tf(x)),
        ], dim=1)


class _MixedB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class _MixedC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = layer(dbl)
        return torch.cat([self.branch1x1(x), seven, dbl, self.branch_pool(_avg_pool_tf(x))], dim=1)


class _MixedD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        seven = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = layer(seven)
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class _MixedE(nn.Module):
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The 2015 TF graph's last block pools with max, not average (a quirk FID inherits).
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _avg_pool_tf(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], dim=1)


class InceptionV3FID(FrozenModule):
    """FID Inception-v3 (pool3, 2048-d); submodule names follow the standard weights file."""

    input_size = 299
    mean = 128.0  # (x - 128) / 128 on 0..255 values, as in the TF graph
    std = 128.0

    def __init__(self, weights_path: str | os.PathLike | None = None,
                 resize_mode: str = "clean", device: str | torch.device | None = None,
                 load_weights: bool = True):
        super().__init__()
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.name = "inception-v3"
        self.metric_name = "FID"
        self.feature_dim = self.num_features = 2048  # num_features: torchmetrics skips its probe
        self.resize_mode = resize_mode
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _MixedA(192, 32)
        self.Mixed_5c = _MixedA(256, 64)
        self.Mixed_5d = _MixedA(288, 64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b = _MixedC(768, 128)
        self.Mixed_6c = _MixedC(768, 160)
        self.Mixed_6d = _MixedC(768, 160)
        self.Mixed_6e = _MixedC(768, 192)
        self.Mixed_7a = _MixedD(768)
        self.Mixed_7b = _MixedE(1280, pool="avg")
        self.Mixed_7c = _MixedE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # the 2015 graph has 1008 classes; unused for FID
        if load_weights:
            path = _resolve_weights(
                weights_path, INCEPTION_WEIGHTS_ENV, "FID Inception-v3",
                f"Supply {INCEPTION_WEIGHTS_FILE} (pytorch-fid / torch-fidelity release; "
                "torch-fidelity names it weights-inception-2015-12-05-6726825d.pth) "
                "or a .safetensors conversion of it.",
            )
            _load_strict(self, load_state_dict_file(path), str(path))
        self.requires_grad_(False)
        self.eval()
        if device is not None:
            self.to(device)

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))

    def _prepare(self, images) -> torch.Tensor:
        return prepare_uint8(images, self.input_size, self.resize_mode, self.device,
                             self.mean, self.std)

    @torch.no_grad()
    def forward(self, images_uint8_nchw) -> torch.Tensor:
        x = self._prepare(images_uint8_nchw).to(self.fc.weight.dtype)
        return self._trunk(x).to(torch.float32)

    @torch.no_grad()
    def logits(self, images_uint8_nchw) -> torch.Tensor:
        """1008-way logits (for Inception Score-style checks)."""
        x = self._prepare(images_uint8_nchw).to(self.fc.weight.dtype)
        return self.fc(self._trunk(x)).to(torch.float32)
