"""Stand-ins the tests share: seeded random detectors (a conv net, a tiny open_clip model)
registered as ``dd-test-conv``, ``dd-test-conv-b`` and ``dd-test-clip`` (a bench config lists
``imports: [standins]``, which also registers them in the processes ``accelerate launch``
starts), and random tiny reward networks (a CLIP, an ImageReward folder) written to a folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from diffdistill.eval.clip_detector import ClipDetector
from diffdistill.eval.features import register_detector, to_uint8_rgb
from torch import nn

# ----------------------------------------------------------------------------- detectors


class ConvStandIn(nn.Module):
    """A seeded random conv net as a detector: every process builds the same weights."""

    resize_mode = "clean"

    def __init__(self, name: str = "dd-test-conv", seed: int = 0, device=None,
                 metric_name: str | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.name = name
        self.feature_dim = 24
        if metric_name:
            self.metric_name = metric_name
        self.eval()
        if device is not None:
            self.to(device)

    @torch.no_grad()
    def forward(self, images):
        x = to_uint8_rgb(images).to(self.c1.weight.device, torch.float32) / 127.5 - 1
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)


TINY_CLIP_DETECTOR_CFG = ('{"embed_dim":32,"vision_cfg":{"image_size":32,"layers":1,"width":32,'
             '"head_width":16,"patch_size":8,"mlp_ratio":2.0},"text_cfg":{"context_length":77,'
             '"vocab_size":49408,"width":32,"heads":2,"layers":1}}')
TINY_CLIP_NAME = "dd-bench-tiny-clip"


def tiny_clip(device=None) -> ClipDetector:
    """A random tiny open_clip model (seeded) through the real ClipDetector."""
    import open_clip

    cfg = Path(tempfile.gettempdir()) / f"{TINY_CLIP_NAME}-{os.getpid()}" / f"{TINY_CLIP_NAME}.json"
    cfg.parent.mkdir(exist_ok=True)
    cfg.write_text(TINY_CLIP_DETECTOR_CFG)
    open_clip.add_model_config(str(cfg))
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=None)
    return ClipDetector(TINY_CLIP_NAME, model=model.eval(), preprocess=preprocess,
                        tokenizer=open_clip.get_tokenizer(TINY_CLIP_NAME), device=device)


def register_standins() -> None:
    register_detector("dd-test-conv", ConvStandIn, overwrite=True)
    register_detector("dd-test-conv-b", lambda device=None: ConvStandIn(
        "dd-test-conv-b", seed=1, device=device, metric_name="FID-TEST"), overwrite=True)
    register_detector("dd-test-clip", tiny_clip, overwrite=True)


register_standins()


# ----------------------------------------------------------------------------- rewards

TINY_CLIP = "diffdistill-test-clip"
TINY_CLIP_CFG = {"embed_dim": 64,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
                                "patch_size": 4, "mlp_ratio": 2.0},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64,
                              "heads": 2, "layers": 2}}


def make_tiny_clip(d):
    """(config json, safetensors weights, the open_clip model) of a random tiny CLIP in ``d``."""
    import open_clip
    from safetensors.torch import save_file

    cfg = d / f"{TINY_CLIP}.json"
    cfg.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP).eval()
    weights = d / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return cfg, weights, model


IR_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "bag", "sneaker",
            "dress", "coat", "shirt", "trouser", "[DEC]", "[ENC]"]


def make_tiny_imagereward(d, *, mean=0.3, std=2.0):
    """A random tiny ImageReward folder in ``d`` (BLIP ViT 48-d, image-grounded text encoder
    32-d, as ImageReward's 1024-d ViT / 768-d BERT differ), with its modules."""
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    from diffdistill.rewards import AestheticHead, save_imagereward

    (d / "vocab.txt").write_text("\n".join(IR_WORDS) + "\n")
    tokenizer = BertTokenizer(str(d / "vocab.txt"))
    cfg = BlipConfig(
        text_config={"vocab_size": len(IR_WORDS), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 40, "pad_token_id": 0, "bos_token_id": 14,
                     "sep_token_id": 3, "eos_token_id": 3},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                       "layer_norm_eps": 1e-6, "initializer_range": 0.02},
        image_text_hidden_size=16)
    torch.manual_seed(0)
    blip = BlipForImageTextRetrieval(cfg).eval()
    head = AestheticHead(32).eval()
    # unit-gain random weights (transformers' 0.02 init barely lets the image reach [CLS])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in [*blip.named_parameters(), *head.named_parameters()]:
            if p.ndim >= 2:
                scale = 0.5 if "embedding" in name else p[0].numel() ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    folder = save_imagereward(d / "imagereward", blip, tokenizer, head, mean=mean, std=std)
    return folder, blip, tokenizer, head
