"""The embedded world's CLIP: a tiny open_clip model trained contrastively on Fashion-MNIST.

CLIP score (Hessel et al. 2021) and the reward of RG-LCD (Li et al. 2024) need an image-text
model. No CLIP weights exist offline, so the world trains one with the CLIP objective
(Radford et al. 2021, Eq. / Fig. 3: symmetric InfoNCE over the image-caption similarity
matrix with a learned temperature, ``open_clip.ClipLoss``) on the 60k training images and
their template captions ("a photo of a sneaker", "a black and white photo of a coat", …).

The architecture is a custom open_clip model config (:data:`MODEL_CONFIG`, model name
:data:`MODEL_NAME`), so every use goes through the real open_clip code path:
``open_clip.add_model_config(<assets>/clip/fmnist-clip.json)`` then
``open_clip.create_model_and_transforms("fmnist-clip", pretrained=<assets>/clip/
open_clip_model.safetensors)`` — or ``create_model_and_transforms("local-dir:<assets>/clip")``
(the folder also holds the hub-style ``open_clip_config.json``). Towers: open_clip's
ModifiedResNet (layers [1, 1, 1, 1], width 16; a tiny ResNet learns much faster than a tiny
ViT) on 32×32 images and a 2-layer, 32-wide text transformer with a 32-token context;
64-d joint embedding. Most of the 2.9 M parameters are the 49,408-token embedding table the
real CLIP BPE vocabulary needs.

Caveat, stated where the numbers are reported: with 10 classes, a batch holds many
captions of the same class, which InfoNCE treats as negatives. That caps how peaked the
similarities get, not the ranking of classes: the sanity check is zero-shot accuracy on
the 10k test split (class text embeddings = mean over the caption templates), recorded in
``world.json``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from diffdistill.world import epoch_batches, warmup_cosine

MODEL_NAME = "fmnist-clip"
JUDGE_MODEL_NAME = "fmnist-clip-judge"
WEIGHTS_FILE = "open_clip_model.safetensors"  # the name open_clip's local-dir: loader looks for
MODEL_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 2},
}
#: The judge (``clip_judge/``): another architecture (a ViT image tower on 4×4 patches, a
#: 3-layer text tower), another seed, and other images (the 10k test split, where the reward
#: model saw the 60k training images), so a student trained against the reward CLIP is not
#: scored by the network it exploited.
JUDGE_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16,
                   "patch_size": 4, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 4,
                 "layers": 3},
}


def default_clip_dir() -> Path:
    from . import asset_path

    return asset_path("clip")


def write_clip_config(folder: Union[str, os.PathLike], config: Optional[dict] = None,
                      name: str = MODEL_NAME) -> Path:
    """Write ``<name>.json`` (for ``open_clip.add_model_config``) and the hub-style
    ``open_clip_config.json`` (for ``local-dir:``) into ``folder``; returns the former."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(config or MODEL_CONFIG)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg,
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                           "std": list(open_clip.OPENAI_DATASET_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }, indent=1))
    return path


def model_name_in(folder: Union[str, os.PathLike]) -> str:
    """The open_clip model name a world CLIP folder defines: its ``<name>.json``."""
    folder = Path(folder)
    names = sorted(p.stem for p in folder.glob("*.json") if p.name != "open_clip_config.json")
    if len(names) != 1:
        raise FileNotFoundError(f"{folder} holds no single open_clip model config "
                                f"(<name>.json; found {names or 'none'}): build the embedded "
                                "world with `diffdistill world build`")
    return names[0]


def register_clip_config(folder: Union[str, os.PathLike, None] = None) -> str:
    """Register a world CLIP folder's config with open_clip (every process must); returns
    the model name."""
    import open_clip

    folder = Path(folder or default_clip_dir())
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP folder {folder} does not exist: build the embedded "
                                "world with `diffdistill world build`")
    name = model_name_in(folder)
    path = folder / f"{name}.json"
    if name not in open_clip.list_models() or \
            open_clip.get_model_config(name) != json.loads(path.read_text()):
        open_clip.add_model_config(str(path))
    return name


def load_clip_model(folder: Union[str, os.PathLike, None] = None, device="cpu"):
    """``(model, preprocess, tokenizer)`` of a trained world CLIP, fp32, eval mode."""
    import open_clip

    folder = Path(folder or default_clip_dir())
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"CLIP weights {weights} do not exist: build the embedded "
                                "world with `diffdistill world build`")
    name = register_clip_config(folder)
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=str(weights), device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def clip_detector(folder: Union[str, os.PathLike, None] = None, device=None, **kw):
    """A world CLIP folder as a :class:`diffdistill.eval.features.ClipDetector` (CLIP score)."""
    from diffdistill.eval.clip_detector import ClipDetector

    folder = Path(folder or default_clip_dir())
    name = register_clip_config(folder)
    return ClipDetector(name, pretrained_path=folder / WEIGHTS_FILE,
                        config_path=folder / f"{name}.json", device=device, **kw)


def _normalize_images(model, images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 32×32 → the model's normalised input (open_clip's eval transform is the
    identity resize/crop at 32 px, then ToTensor + Normalize)."""
    import open_clip

    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - mean) / std


@torch.no_grad()
def class_text_embeddings(model, tokenizer, templates=None) -> torch.Tensor:
    """``[10, D]`` L2-normalised class embeddings: mean over caption templates (CLIP's
    prompt ensembling, Radford et al. 2021 sec. 3.1.4)."""
    from diffdistill.fmnist import CAPTION_TEMPLATES, caption_for_class

    templates = tuple(templates or CAPTION_TEMPLATES)
    rows = []
    for label in range(10):
        caps = [caption_for_class(label, t, templates) for t in range(len(templates))]
        emb = F.normalize(model.encode_text(tokenizer(caps)).float(), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images_uint8: torch.Tensor, labels: torch.Tensor,
                       batch_size: int = 500) -> float:
    """Top-1 zero-shot accuracy of ``model`` on uint8 32×32 images with class labels."""
    was = model.training
    model.eval()
    text = class_text_embeddings(model, tokenizer)
    correct = 0
    for i in range(0, len(images_uint8), batch_size):
        img = F.normalize(model.encode_image(
            _normalize_images(model, images_uint8[i:i + batch_size])).float(), dim=-1)
        correct += int(((img @ text.T).argmax(1) == labels[i:i + batch_size]).sum())
    model.train(was)
    return correct / max(len(images_uint8), 1)


def save_clip_weights(model, path: Union[str, os.PathLike], name: str = MODEL_NAME) -> Path:
    from . import save_safetensors_fp16

    return save_safetensors_fp16(model.state_dict(), path, {"open_clip_model": name})


def train_clip(out_dir: Union[str, os.PathLike], *, steps: int = 800, batch_size: int = 256,
               lr: float = 2e-3, weight_decay: float = 0.1, seed: int = 0,
               config: Optional[dict] = None, limit: Optional[int] = None,
               test_limit: Optional[int] = None, root=None, name: str = MODEL_NAME,
               split: str = "train", eval_split: str = "test",
               log: Callable[[str], None] = print) -> dict:
    """Train a world CLIP (open_clip model ``name``) with ``open_clip.ClipLoss`` on the
    ``split`` images (``limit``: the first N); write config + fp16 weights into ``out_dir``;
    return ``{"zero_shot_accuracy", ...}``, measured on the saved fp16 weights with the first
    ``test_limit`` images of ``eval_split``."""
    import open_clip

    from diffdistill.fmnist import (
        CAPTION_TEMPLATES,
        caption_for_class,
        fashion_mnist_uint8,
        load_fashion_mnist,
    )

    out = Path(out_dir)
    if split == eval_split:
        raise ValueError(f"train_clip: split and eval_split are both {split!r}")
    write_clip_config(out, config, name)
    register_clip_config(out)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = open_clip.create_model(name, pretrained=None, output_dict=True)
    tokenizer = open_clip.get_tokenizer(name)
    train_x = fashion_mnist_uint8(split, 32, root=root, limit=limit)
    train_y = torch.from_numpy(load_fashion_mnist(split, root)[1][:len(train_x)].copy())
    n_t = len(CAPTION_TEMPLATES)
    # every (class, template) caption tokenised once; row = label * n_t + template
    captions = [caption_for_class(c, t) for c in range(10) for t in range(n_t)]
    tokens = tokenizer(captions)
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in pname or "embedding" in pname
         else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    sched = warmup_cosine(opt, steps)
    loss_fn = open_clip.ClipLoss()
    model.train()
    t0 = time.perf_counter()
    for step, idx in epoch_batches(len(train_x), batch_size, steps, gen):
        images = train_x[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        template = torch.randint(0, n_t, (len(idx),), generator=gen)
        text = tokens[train_y[idx] * n_t + template]
        out_d = model(_normalize_images(model, images), text)
        loss = loss_fn(out_d["image_features"], out_d["text_features"], out_d["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # as open_clip's trainer: temperature at most 100
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log(f"  clip step {step + 1}/{steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    model.eval()
    save_clip_weights(model, out / WEIGHTS_FILE, name)
    # The number that is reported is the shipped (fp16-stored) model's, loaded the public way.
    shipped, _, tok = load_clip_model(out)
    test_x = fashion_mnist_uint8(eval_split, 32, root=root, limit=test_limit)
    test_y = torch.from_numpy(load_fashion_mnist(eval_split, root)[1][:len(test_x)].copy())
    acc = zero_shot_accuracy(shipped, tok, test_x, test_y)
    params = sum(p.numel() for p in model.parameters())
    log(f"  {name}: zero-shot accuracy on {len(test_x)} {eval_split} images {acc:.4f}, "
        f"{params / 1e6:.2f} M params, logit scale "
        f"{float(model.logit_scale.detach().exp()):.1f}")
    return {"zero_shot_accuracy": acc, "params": params, "model_name": name,
            "logit_scale": float(model.logit_scale.detach().exp()), "test_images": len(test_x),
            "train_split": split, "train_images": len(train_x), "eval_split": eval_split}
