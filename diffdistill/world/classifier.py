"""The embedded world's feature network: a small Fashion-MNIST classifier and its Detector.

FID (Heusel et al. 2017) measures a Fréchet distance between Gaussians fitted to the
features of a network trained on the data's domain. ImageNet-Inception features say little
about 32×32 clothing silhouettes and the Inception weights cannot be fetched offline, so the
world uses its own network, trained here on the 60k training split, and reports the metric
as **"FID-FMNIST"** (never plain "FID"): the same formula (``diffdistill.eval.fid``) over
the 128-d penultimate features of :class:`FMNISTNet` (global-average-pooled ReLU
activations, the analogue of Inception's pool3).

Architecture: three VGG-style stages (2 × conv3×3–BN–ReLU, then 2×2 max pool) with 32, 64
and 128 channels on a 32×32 grayscale input, global average pool, dropout, a linear head:
0.29 M parameters, trained for three epochs (the test accuracy reached is recorded in
``world.json``; ≥ 90 % is required). Input: uint8 RGB (or 1-channel) images; the channels
are averaged to gray (samples from a generator may carry slight colour) and images that are
not 32×32 are resized with clean-fid's PIL bicubic convention
(``diffdistill.eval.features.resize_uint8``).

:class:`FMNISTDetector` follows the :class:`~diffdistill.eval.features.Detector` protocol
(uint8 NCHW → float32 ``[N, 128]``) and is registered as ``"fmnist-net"`` in the detector
registry when this module is imported (``get_detector("fmnist-net")`` loads the shipped
weights, ``weights_path=`` another file).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from diffdistill.eval.features import FrozenModule
from diffdistill.world import epoch_batches, warmup_cosine

DETECTOR_NAME = "fmnist-net"
FEATURE_DIM = 128
INPUT_SIZE = 32
WEIGHTS_FILE = "fmnist_net.safetensors"


class FMNISTNet(nn.Module):
    """Small VGG-style classifier on 1×32×32 inputs in [-1, 1]; ``features`` is 128-d."""

    def __init__(self, widths=(32, 64, 128), num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for w in widths:
            for _ in range(2):
                layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                           nn.ReLU(inplace=True)]
                cin = w
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)
        self.widths = tuple(widths)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def preprocess_uint8(images, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 images (NCHW 1/3/4 channels, CHW, HWC numpy, PIL) → float ``[N, 1, size, size]``
    in [-1, 1]: channels averaged to gray, resized (clean-fid PIL bicubic) if needed."""
    from diffdistill.eval.features import resize_uint8, to_uint8_rgb

    images = to_uint8_rgb(images)
    if tuple(images.shape[-2:]) != (size, size):
        x = resize_uint8(images, size, "clean")  # float32 in [0, 255], not re-quantised
    else:
        x = images.to(torch.float32)
    return x.mean(dim=1, keepdim=True) / 127.5 - 1.0


class FMNISTDetector(FrozenModule):
    """Detector ``"fmnist-net"``: uint8 NCHW images → 128-d FMNISTNet features (float32)."""

    resize_mode = "clean"
    metric_name = "FID-FMNIST"  # how reports name the Fréchet distance on these features

    def __init__(self, weights_path: Optional[Union[str, os.PathLike]] = None,
                 device: Optional[Union[str, torch.device]] = None,
                 net: Optional[FMNISTNet] = None):
        super().__init__()
        if net is None:
            net = load_fmnist_net(weights_path)
        self.net = net.eval()
        self.name = DETECTOR_NAME
        self.feature_dim = net.feature_dim
        self.requires_grad_(False)
        if device is not None:
            self.to(device)

    @torch.no_grad()
    def forward(self, images_uint8_nchw) -> torch.Tensor:
        x = preprocess_uint8(images_uint8_nchw).to(self.device)
        return self.net.features(x).to(torch.float32)

    @torch.no_grad()
    def logits(self, images_uint8_nchw) -> torch.Tensor:
        x = preprocess_uint8(images_uint8_nchw).to(self.device)
        return self.net(x).to(torch.float32)

    @torch.no_grad()
    def predict(self, images_uint8_nchw, batch_size: int = 500) -> torch.Tensor:
        """Predicted class per image (int64, CPU)."""
        from diffdistill.eval.features import to_uint8_rgb

        images = to_uint8_rgb(images_uint8_nchw)
        return torch.cat([self.logits(images[i:i + batch_size]).argmax(1).cpu()
                          for i in range(0, len(images), batch_size)])


def default_weights_path() -> Path:
    from . import asset_path

    return asset_path(WEIGHTS_FILE)


def load_fmnist_net(weights_path: Optional[Union[str, os.PathLike]] = None) -> FMNISTNet:
    """The trained network in fp32 (weights may be stored in fp16), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(weights_path) if weights_path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST feature network weights {path} do not exist: build the embedded "
            "world with `diffdistill world build` (or pass weights_path=)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    widths = tuple(int(w) for w in meta.get("widths", "32,64,128").split(","))
    net = FMNISTNet(widths=widths)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    net.load_state_dict(state, strict=True)
    return net.eval()


def save_fmnist_net(net: FMNISTNet, path: Union[str, os.PathLike], extra_meta=None) -> Path:
    """fp16 safetensors (BatchNorm counters stay int64), written atomically."""
    from . import save_safetensors_fp16

    meta = {"widths": ",".join(str(w) for w in net.widths), **(extra_meta or {})}
    return save_safetensors_fp16(net.state_dict(), path, meta)


@torch.no_grad()
def accuracy(net: FMNISTNet, images_uint8: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 500) -> float:
    was = net.training
    net.eval()
    correct = 0
    for i in range(0, len(images_uint8), batch_size):
        x = preprocess_uint8(images_uint8[i:i + batch_size])
        correct += int((net(x).argmax(1) == labels[i:i + batch_size]).sum())
    net.train(was)
    return correct / max(len(images_uint8), 1)


def _augment(x: torch.Tensor, gen: torch.Generator, translate: int = 0) -> torch.Tensor:
    """Random horizontal flip, and a random ±``translate`` px shift (background fill)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if translate <= 0:
        return x
    t = translate
    padded = F.pad(x, (t, t, t, t), value=-1.0)
    dy = torch.randint(0, 2 * t + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * t + 1, (n,), generator=gen)
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_fmnist_net(out_path: Union[str, os.PathLike], *, steps: int = 1410,
                     batch_size: int = 128, lr: float = 3e-3, weight_decay: float = 5e-4,
                     widths=(32, 64, 128), translate: int = 0, seed: int = 0,
                     limit: Optional[int] = None, test_limit: Optional[int] = None, root=None,
                     log: Callable[[str], None] = print) -> dict:
    """Train :class:`FMNISTNet` (AdamW, warmup + cosine LR, label smoothing 0.05, random
    flips, optional ±``translate`` px shifts; test images are centred, and shifts slowed
    convergence in a 2-epoch run: 90.9 % vs the flip-only recipe), save fp16
    safetensors to ``out_path`` and return ``{"test_accuracy", "train_accuracy", ...}``.

    Deterministic: the initial weights come from ``seed``, the batch order and augmentation
    from a generator seeded with it.
    """
    from diffdistill.fmnist import fashion_mnist_uint8, load_fashion_mnist

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    train_x = fashion_mnist_uint8("train", INPUT_SIZE, root=root, limit=limit)[:, :1]
    train_y = torch.from_numpy(load_fashion_mnist("train", root)[1][:len(train_x)].copy())
    test_x = fashion_mnist_uint8("test", INPUT_SIZE, root=root, limit=test_limit)
    test_y = torch.from_numpy(load_fashion_mnist("test", root)[1][:len(test_x)].copy())
    net = FMNISTNet(widths=widths)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = warmup_cosine(opt, steps)
    t0 = time.perf_counter()
    net.train()
    for step, idx in epoch_batches(len(train_x), batch_size, steps, gen):
        x = _augment(train_x[idx].float() / 127.5 - 1.0, gen, translate)
        loss = F.cross_entropy(net(x), train_y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log(f"  classifier step {step + 1}/{steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    net.eval()
    save_fmnist_net(net, out_path, {"seed": seed, "steps": steps})
    # The reported numbers are the shipped (fp16-stored) network's, loaded the public way.
    shipped = load_fmnist_net(out_path)
    test_acc = accuracy(shipped, test_x, test_y)
    train_acc = accuracy(shipped, train_x[:10000], train_y[:10000])
    params = sum(p.numel() for p in net.parameters())
    log(f"  classifier: test accuracy {test_acc:.4f} (train subset {train_acc:.4f}), "
        f"{params / 1e6:.2f} M params")
    return {"test_accuracy": test_acc, "train_accuracy_10k": train_acc, "params": params,
            "test_images": len(test_x), "train_images": len(train_x)}


def _register() -> None:
    from diffdistill.eval.features import available_detectors, register_detector

    if DETECTOR_NAME not in available_detectors():
        register_detector(DETECTOR_NAME, FMNISTDetector)


_register()
