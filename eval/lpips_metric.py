"""LPIPS fidelity (student vs teacher) and diversity (within a prompt).

LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), version 0.1, from the ``lpips`` package: unit-normalised backbone activations,
squared differences weighted by learned 1×1 "lin" layers, spatially averaged, summed over
layers. Inputs are uint8 images mapped to [-1, 1].

Offline loading: the lin layers ship inside the lpips wheel (``lpips/weights/v0.1/*.pth``)
and are loaded here explicitly with ``weights_only=True`` and checked key by key, because
``lpips.LPIPS`` loads them with ``strict=False`` (a key-name drift would silently leave
them random). The ImageNet backbone is *not* in the wheel — lpips would download it from
torchvision — so it is built random (``pnet_rand=True``) and then filled from a local file:
the torchvision ``alexnet``/``vgg16`` state dict (whole model, e.g.
``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``, or just its ``features`` part), as
``.safetensors`` or a torch file. Pass ``weights_path`` or set ``DIFFDISTILL_LPIPS_BACKBONE``.

* ``fidelity(student, teacher)``: mean LPIPS over paired images (same seed and prompt) —
  how far a few-step student drifts from its teacher.
* ``diversity(groups)``: mean pairwise LPIPS among images of the same prompt (different
  seeds), averaged over prompts — mode collapse shows up as a low value.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import torch
from diffdistill.eval.features import FrozenModule, load_state_dict_file, to_uint8_rgb
from torch import nn

__all__ = ["LPIPS_BACKBONE_ENV", "LPIPSMetric", "backbone_state_to_lpips"]

LPIPS_BACKBONE_ENV = "DIFFDISTILL_LPIPS_BACKBONE"
_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


def backbone_state_to_lpips(state: dict, lpips_net: nn.Module) -> dict:
    """Rename a torchvision ``features`` state dict ("3.weight" or "features.3.weight") to the
    keys of lpips' sliced backbone ("slice2.3.weight"). Classifier keys are ignored."""
    slice_of = {}
    for slice_name, block in lpips_net.named_children():
        for child_name, _ in block.named_children():
            slice_of[child_name] = slice_name
    out = {}
    for key, value in state.items():
        key = key.removeprefix("net.")
        if key.startswith("slice"):
            out[key] = value
            continue
        if key.startswith(("classifier.", "avgpool")):
            continue
        key = key.removeprefix("features.")
        index, _, param = key.partition(".")
        if index not in slice_of:
            raise ValueError(f"backbone key {key!r} has no counterpart in the lpips network")
        out[f"{slice_of[index]}.{index}.{param}"] = value
    return out


def _to_lpips_range(images) -> torch.Tensor:
    return to_uint8_rgb(images).to(torch.float32) / 127.5 - 1.0


class LPIPSMetric(FrozenModule):
    """LPIPS with a locally loaded backbone. ``metric(a, b)`` -> per-pair distances ``[N]``."""

    def __init__(self, net: str = "alex", weights_path: str | os.PathLike | None = None,
                 device: str | torch.device | None = None):
        super().__init__()
        import lpips

        if net not in _BACKBONE_FILES:
            raise ValueError(f"net must be one of {sorted(_BACKBONE_FILES)}, got {net!r}")
        candidate = weights_path if weights_path is not None else os.environ.get(LPIPS_BACKBONE_ENV)
        hint = (f"Supply the torchvision {net} ImageNet state dict (e.g. {_BACKBONE_FILES[net]}) "
                f"via weights_path= or {LPIPS_BACKBONE_ENV}; nothing is downloaded.")
        if not candidate:
            raise FileNotFoundError(f"LPIPS backbone ({net}): no weights file given. {hint}")
        path = Path(candidate).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS backbone ({net}): weights file {path} does not exist. {hint}")

        self.net_name = net
        with warnings.catch_warnings():
            # lpips 0.1.4 still calls torchvision's deprecated ``pretrained=False``
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
        lin_file = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        lin_state = torch.load(str(lin_file), map_location="cpu", weights_only=True)
        own = self.model.state_dict()
        missing = [k for k in lin_state if k not in own]
        if missing:
            raise RuntimeError(f"lpips lin weights {missing} do not match the installed lpips network")
        self.model.load_state_dict(lin_state, strict=False)
        self.model.net.load_state_dict(backbone_state_to_lpips(load_state_dict_file(path), self.model.net),
                                       strict=True)
        self.model.requires_grad_(False)
        self.model.eval()
        if device is not None:
            self.to(device)

    @torch.no_grad()
    def forward(self, images_a, images_b, batch_size: int = 32) -> torch.Tensor:
        a, b = to_uint8_rgb(images_a), to_uint8_rgb(images_b)
        if a.shape != b.shape:
            raise ValueError(f"paired images must have equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        out = []
        for start in range(0, a.shape[0], batch_size):
            xa = _to_lpips_range(a[start:start + batch_size]).to(self.device)
            xb = _to_lpips_range(b[start:start + batch_size]).to(self.device)
            out.append(self.model(xa, xb).reshape(-1).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def fidelity(self, student_imgs, teacher_imgs, batch_size: int = 32) -> float:
        """Mean LPIPS between paired student/teacher images (lower = closer to the teacher)."""
        return float(self(student_imgs, teacher_imgs, batch_size=batch_size).double().mean())

    def diversity_per_group(self, groups: torch.Tensor | Sequence[torch.Tensor],
                            batch_size: int = 32) -> torch.Tensor:
        """Mean pairwise LPIPS within each group (``[P, G, C, H, W]`` or a list of ``[G_i, C, H, W]``)."""
        values = []
        for index, group in enumerate(groups):
            group = to_uint8_rgb(group)
            if group.shape[0] < 2:
                raise ValueError(f"group {index} has {group.shape[0]} image(s); diversity needs >= 2")
            pairs = list(combinations(range(group.shape[0]), 2))
            first = group[[i for i, _ in pairs]]
            second = group[[j for _, j in pairs]]
            values.append(self(first, second, batch_size=batch_size).double().mean())
        return torch.stack(values).float() if values else torch.empty(0)

    def diversity(self, imgs_grouped_by_prompt, batch_size: int = 32) -> float:
        """Mean over prompts of the mean pairwise LPIPS among that prompt's images."""
        return float(self.diversity_per_group(imgs_grouped_by_prompt, batch_size).double().mean())
