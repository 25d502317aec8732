"""Reward models for reward-guided distillation, and the latent proxy reward model.

RG-LCD (Li, Feng, Chen & Wang 2024, "Reward Guided Latent Consistency Distillation") adds
``−β·R(decode(x0̂), prompt)`` to the LCD loss, with R an expert reward model (HPSv2.1,
ImageReward, CLIPScore, PickScore in the paper). Every reward here follows one protocol,
:class:`RewardModel`::

    reward(images, prompts) -> Tensor[N]

with ``images`` float NCHW in [-1, 1] (what the VAE decodes) and one prompt per image. The
result is differentiable with respect to the images — the preprocessing is done with tensor
ops (``F.interpolate`` + normalisation), never PIL — so the student's loss can backpropagate
through the reward and the VAE decoder. Reward networks are frozen (``requires_grad=False``,
eval mode); gradients still flow through them to the images.

Rewards (all "CLIP-style": cosine of L2-normalised image and text embeddings):

* :func:`clip_score_reward` — CLIPScore (Hessel et al. 2021) with an open_clip model from a
  local file (architecture by name; custom ones registered from a JSON config) or an
  open_clip folder (``open_clip_config.json`` + weights, the layout open_clip's
  ``local-dir:`` reads — the embedded world ships its tiny CLIP that way).
* :func:`hpsv2_reward` — HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 with the HPS
  checkpoint (``HPS_v2.1_compressed.pt``: ``{"state_dict": ...}``); the score is the cosine,
  as HPSv2's own scorer computes it.
* :func:`pickscore_reward` — PickScore (Kirstain et al. 2023): a transformers ``CLIPModel``
  folder (yuvalkirstain/PickScore_v1), score = ``logit_scale.exp() · cos``.
* :func:`aesthetic_reward` — the LAION aesthetic predictor v2 (Schuhmann et al.,
  improved-aesthetic-predictor; used by Hyper-SD's feedback learning): an MLP on the
  L2-normalised open_clip image embedding (ViT-L-14, 768-d); prompts are ignored.

And one cross-attention reward:

* :func:`imagereward_reward` — ImageReward (Xu et al. 2023, "ImageReward: Learning and
  Evaluating Human Preferences for Text-to-Image Generation"; the reward of ReFL and of
  Hyper-SD's feedback learning): BLIP's ViT encodes the image, BLIP's image-grounded text
  encoder reads the prompt while cross-attending to the image tokens, its first ([CLS])
  output feature goes through an MLP (1024, 128, 64, 16, 1) and the score is
  ``(s − mean) / std`` with THUDM's fixed mean/std. The BLIP networks are transformers'
  own (``BlipForImageTextRetrieval``'s ``vision_model`` and ``text_encoder``), read from a
  local folder (see :func:`imagereward_reward`; :func:`save_imagereward` writes one).

Missing files raise ``FileNotFoundError`` naming what to supply; nothing is downloaded.

Each reward carries ``logit_scale``: the factor that turns its scores into the logits of the
model's own preference distribution (CLIP's learned temperature for the cosine rewards, 1 for
PickScore whose scores are already logits). RG-LCD's latent proxy reward model is trained to
match ``softmax(logit_scale · R)`` over candidate sets.

**Latent proxy reward model** (RG-LCD's LRM): :class:`LatentRewardModel`, a small conv
net on latents with pooled text conditioning, and :func:`lrm_preference_loss`, the KL
divergence ``KL(softmax(expert logits) ‖ softmax(LRM scores))`` over a candidate set (the
trainer uses the triplet {student x0̂, target x0̂, ground-truth latent}).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from diffdistill.eval.features import FrozenModule  # stays in eval mode

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]

#: CLIP's image normalisation (OpenAI), the default of open_clip and of CLIPImageProcessor
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

__all__ = [
    "RewardModel", "ClipStyleReward", "OpenClipReward", "PickScoreReward", "clip_score_reward",
    "hpsv2_reward", "pickscore_reward", "AestheticHead", "AestheticReward", "aesthetic_reward",
    "ImageRewardModel", "imagereward_reward", "save_imagereward", "IMAGEREWARD_MEAN",
    "IMAGEREWARD_STD", "IMAGEREWARD_HEAD", "IMAGEREWARD_INFO",
    "load_reward_model", "REWARD_LOADERS",
    "LatentRewardModel", "lrm_preference_loss",
]


@runtime_checkable
class RewardModel(Protocol):
    """``reward(images in [-1, 1] float NCHW, prompts) -> per-sample reward`` (differentiable)."""

    #: multiplier turning rewards into preference logits (see the module docstring)
    logit_scale: float

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


# ----------------------------------------------------------------------------- CLIP-style


class ClipStyleReward(FrozenModule):
    """``scale · cos(E_img(preprocess(images)), E_txt(prompts))`` with tensor preprocessing.

    Preprocessing mirrors CLIP's evaluation transform with differentiable ops: map [-1, 1] to
    [0, 1] (clamped, as the reference RG-LCD code does before its reward), resize the
    shortest side to the model's input size (bicubic, antialiased), centre-crop, normalise.
    Subclasses provide :meth:`encode_image` and :meth:`encode_text`.
    """

    def compile_parts(self) -> list[tuple[str, nn.Module]]:
        """What ``train.compile`` compiles: the image tower (the forward takes prompt strings,
        which a compiled graph would guard on — one recompile per batch of prompts). Default:
        nothing."""
        return []

    def __init__(self, image_size, mean=CLIP_MEAN, std=CLIP_STD, scale: float = 1.0,
                 logit_scale: float = 1.0, name: str = "clip", text_cache_size: int = 4096):
        super().__init__()
        size = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        self.image_size = (int(size[0]), int(size[1]))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.scale = float(scale)
        self.logit_scale = float(logit_scale)
        self.name = name
        self._text_cache: "OrderedDict[str, Tensor]" = OrderedDict()
        self._text_cache_size = text_cache_size

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] NCHW → normalised model input (differentiable)."""
        x = ((images.to(self.mean.dtype) + 1.0) / 2.0).clamp(0.0, 1.0)
        h, w = x.shape[-2:]
        th, tw = self.image_size
        s = max(th / h, tw / w)  # shortest side to the target size, as CLIP's Resize
        nh, nw = max(th, round(h * s)), max(tw, round(w * s))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                              antialias=True)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top:top + th, left:left + tw]
        return (x - self.mean) / self.std

    def encode_image(self, pixels: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def encode_text(self, prompts: list[str]) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings (cached per prompt; text is never differentiated)."""
        prompts = list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            feats = F.normalize(_at_least_fp32(self.encode_text(missing)), dim=-1)
            for p, f in zip(missing, feats):
                self._text_cache[p] = f
        out = torch.stack([self._text_cache[p] for p in prompts])
        for p in prompts:
            self._text_cache.move_to_end(p)
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return out.to(self.device)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        feats = self.encode_image(self.preprocess(images.to(self.device)))
        img = F.normalize(_at_least_fp32(feats), dim=-1)
        txt = self.text_features(prompts).to(img.dtype)
        return self.scale * (img * txt).sum(dim=-1)


def _at_least_fp32(x: Tensor) -> Tensor:
    """fp16/bf16 features → float32 for the cosine; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _freeze(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


class OpenClipReward(ClipStyleReward):
    """CLIP-style reward over an open_clip model (CLIPScore, HPSv2)."""

    def __init__(self, model: nn.Module, tokenizer: Callable, *, scale: float = 1.0,
                 name: str = "clip"):
        import open_clip

        visual = model.visual
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        size = getattr(visual, "image_size", None) or cfg.get("size", 224)
        logit = getattr(model, "logit_scale", None)
        super().__init__(size, mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                         std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)), scale=scale,
                         logit_scale=float(logit.detach().exp()) if logit is not None else 100.0,
                         name=name)
        self.model = _freeze(model)
        self.tokenizer = tokenizer

    def encode_image(self, pixels: Tensor) -> Tensor:
        dt = next(self.model.parameters()).dtype
        return self.model.encode_image(pixels.to(dt))

    def encode_text(self, prompts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self.device))

    def compile_parts(self) -> list[tuple[str, nn.Module]]:
        return [("model.visual", self.model.visual)]


class AestheticHead(nn.Module):
    """The LAION aesthetic predictor's MLP (keys ``layers.{0,2,4,6,7}``, as its checkpoints)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embedding: Tensor) -> Tensor:
        return self.layers(embedding)


class AestheticReward(OpenClipReward):
    """``MLP(normalize(E_img(images)))``: an image-only aesthetic score (prompts are ignored).

    Its scores are not preference logits of a softmax model, so ``logit_scale`` is 1.
    """

    def __init__(self, model: nn.Module, head: nn.Module, *, name: str = "aesthetic"):
        super().__init__(model, tokenizer=None, name=name)
        self.logit_scale = 1.0
        self.head = _freeze(head)

    def forward(self, images: Tensor, prompts: Optional[Sequence[str]] = None) -> Tensor:
        if prompts is not None and not isinstance(prompts, str) and len(prompts) != len(images):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        feats = self.encode_image(self.preprocess(images.to(self.device)))
        img = F.normalize(_at_least_fp32(feats), dim=-1)
        return self.head(img.to(next(self.head.parameters()).dtype)).squeeze(-1).float()


class PickScoreReward(ClipStyleReward):
    """PickScore-style reward over a transformers ``CLIPModel``: ``logit_scale.exp() · cos``."""

    def __init__(self, model: nn.Module, tokenizer, *, image_size=None, mean=CLIP_MEAN,
                 std=CLIP_STD, name: str = "pickscore"):
        size = image_size or model.config.vision_config.image_size
        scale = float(model.logit_scale.detach().exp())
        # scores are already logits of the model's preference distribution
        super().__init__(size, mean=mean, std=std, scale=scale, logit_scale=1.0, name=name)
        self.model = _freeze(model)
        self.tokenizer = tokenizer

    @staticmethod
    def _pooled(out) -> Tensor:
        # transformers 5 returns a model output whose pooler_output is the projection;
        # transformers 4 returns the projected tensor itself
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def encode_image(self, pixels: Tensor) -> Tensor:
        dt = next(self.model.parameters()).dtype
        return self._pooled(self.model.get_image_features(pixel_values=pixels.to(dt)))

    def encode_text(self, prompts: list[str]) -> Tensor:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=getattr(self.tokenizer, "model_max_length", 77),
                             return_tensors="pt")
        return self._pooled(self.model.get_text_features(
            input_ids=tok.input_ids.to(self.device),
            attention_mask=tok.attention_mask.to(self.device)))


#: ImageReward's score normalisation, ``(s − mean) / std`` (THUDM/ImageReward, ImageReward.py)
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
#: file names inside an ImageReward folder (besides transformers' config / weights / tokenizer)
IMAGEREWARD_HEAD = "imagereward_head.safetensors"
IMAGEREWARD_INFO = "imagereward.json"


class ImageRewardModel(ClipStyleReward):
    """ImageReward: ``(MLP(T(prompt | V(image))[:, 0]) − mean) / std``.

    ``V`` is BLIP's ViT (transformers ``BlipVisionModel``, last hidden state after its final
    LayerNorm), ``T`` BLIP's text encoder in its image-grounded mode (``BlipTextModel`` with
    cross-attention to every image token, bidirectional self-attention); the prompt is
    tokenised as ImageReward does (BERT WordPiece, ``[CLS] … [SEP]``, padded / truncated to
    ``max_length`` = 35). ``head`` is the MLP (same layout as :class:`AestheticHead`: linear
    layers 768 → 1024 → 128 → 64 → 16 → 1 with dropout, no activations). Preprocessing is
    ReFL's tensor transform: [-1, 1] → [0, 1], bicubic antialiased resize of the shortest side
    to the ViT's ``image_size`` (224), centre crop, normalise with BLIP's mean/std.

    ImageReward was trained with a cross-entropy over the *raw* MLP outputs of candidate
    images, so its preference logits are ``std · score`` (+ a constant): ``logit_scale = std``.
    """

    def __init__(self, blip: nn.Module, tokenizer, head: nn.Module, *,
                 mean: float = IMAGEREWARD_MEAN, std: float = IMAGEREWARD_STD,
                 max_length: int = 35, image_size=None, pixel_mean=CLIP_MEAN,
                 pixel_std=CLIP_STD, name: str = "imagereward"):
        text_cfg = blip.config.text_config
        if not getattr(text_cfg, "is_decoder", True):
            raise ValueError("ImageReward needs BLIP's text encoder with cross-attention layers: "
                             "its text_config must keep is_decoder: true (transformers builds "
                             "the cross-attention only then)")
        size = image_size or blip.config.vision_config.image_size
        super().__init__(size, mean=pixel_mean, std=pixel_std, logit_scale=float(std), name=name)
        self.vision_model = _freeze(blip.vision_model)
        self.text_encoder = _freeze(blip.text_encoder)
        self.head = _freeze(head)
        self.tokenizer = tokenizer
        self.score_mean, self.score_std = float(mean), float(std)
        self.max_length = int(max_length)

    def tokenize(self, prompts: list[str]):
        tok = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return tok.input_ids.to(self.device), tok.attention_mask.to(self.device)

    def features(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        """The image-grounded text encoder's first-token feature (what the MLP reads)."""
        dt = next(self.vision_model.parameters()).dtype
        image = self.vision_model(pixel_values=pixels.to(dt)).last_hidden_state
        ids, mask = self.tokenize(prompts)
        out = self.text_encoder(input_ids=ids, attention_mask=mask,
                                encoder_hidden_states=image,
                                encoder_attention_mask=torch.ones(
                                    image.shape[:-1], dtype=torch.long, device=image.device),
                                is_decoder=False)
        return out.last_hidden_state[:, 0, :]

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        feats = self.features(self.preprocess(images.to(self.device)), prompts)
        head_dt = next(self.head.parameters()).dtype
        raw = _at_least_fp32(self.head(_at_least_fp32(feats).to(head_dt)).squeeze(-1))
        return (raw - self.score_mean) / self.score_std


# ----------------------------------------------------------------------------- loaders


_OPEN_CLIP_FOLDER_HINT = (
    "a local open_clip weights file (.safetensors / .bin / .pt) with the architecture named by "
    "model_name (register a custom one with config_path), or an open_clip folder holding "
    "open_clip_config.json and its weights (e.g. open_clip_model.safetensors)")


def _has_weights(folder: Path) -> bool:
    return any(p.suffix in (".safetensors", ".bin", ".pt", ".pth") for p in folder.iterdir())


def _open_clip(path: PathLike, model_name: Optional[str], config_path: Optional[PathLike],
               what: str, hint: str):
    """(model, tokenizer) from a local file or open_clip folder; clear errors otherwise."""
    import open_clip

    if not path:
        raise FileNotFoundError(f"{what}: no weights given; supply {hint}. Nothing is downloaded.")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what}: {p} does not exist; supply {hint}. "
                                "Nothing is downloaded.")
    if config_path is not None:
        if not Path(config_path).is_file():
            raise FileNotFoundError(f"{what}: open_clip model config {config_path} does not exist")
        open_clip.add_model_config(str(config_path))
    if p.is_dir():
        if not (p / "open_clip_config.json").is_file() or not _has_weights(p):
            raise FileNotFoundError(f"{what}: folder {p} must hold open_clip_config.json and a "
                                    f"weights file; supply {hint}")
        name = f"local-dir:{p}"
        model = open_clip.create_model(name)
        return model, open_clip.get_tokenizer(name)
    if not model_name:
        raise ValueError(f"{what}: weights file {p} needs model_name (its open_clip architecture)")
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"{what}: open_clip has no architecture {model_name!r}; pass "
                         "config_path= (a model config JSON) to register it")
    model = open_clip.create_model(model_name, pretrained=str(p))
    return model, open_clip.get_tokenizer(model_name)


def clip_score_reward(path: PathLike, model_name: Optional[str] = None, *,
                      config_path: Optional[PathLike] = None, device=None) -> OpenClipReward:
    """CLIPScore reward (cosine; Hessel et al. 2021) from a local open_clip model."""
    model, tok = _open_clip(path, model_name, config_path, "CLIP-score reward",
                            _OPEN_CLIP_FOLDER_HINT)
    return OpenClipReward(model, tok, name=f"clip:{model_name or Path(path).name}").to(
        device or "cpu")


def hpsv2_reward(path: PathLike, model_name: str = "ViT-H-14", *,
                 config_path: Optional[PathLike] = None, device=None) -> OpenClipReward:
    """HPSv2-style reward: open_clip ``model_name`` (ViT-H-14) with a local HPS checkpoint."""
    hint = ("the HPSv2 checkpoint file (HPS_v2.1_compressed.pt or HPS_v2_compressed.pt from "
            "xswu/HPSv2, a {'state_dict': ...} file for open_clip ViT-H-14)")
    model, tok = _open_clip(path, model_name, config_path, "HPSv2 reward", hint)
    return OpenClipReward(model, tok, name="hpsv2").to(device or "cpu")


def pickscore_reward(path: PathLike, processor_path: Optional[PathLike] = None, *,
                     device=None) -> PickScoreReward:
    """PickScore-style reward from a local transformers ``CLIPModel`` folder.

    ``processor_path`` holds the tokenizer (and optionally ``preprocessor_config.json``);
    default: ``path`` itself. PickScore_v1 uses laion/CLIP-ViT-H-14-laion2B-s32B-b79K's.
    """
    hint = ("a local copy of yuvalkirstain/PickScore_v1 (config.json + weights) and a tokenizer "
            "folder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K: vocab.json + merges.txt) as "
            "processor_path")
    if not path or not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"PickScore reward: {path!r} is not a folder; supply {hint}. "
                                "Nothing is downloaded.")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file() or not _has_weights(folder):
        raise FileNotFoundError(f"PickScore reward: {folder} lacks config.json or weights; "
                                f"supply {hint}")
    proc = Path(processor_path).expanduser() if processor_path else folder
    if not ((proc / "tokenizer.json").is_file() or (proc / "vocab.json").is_file()):
        raise FileNotFoundError(f"PickScore reward: no tokenizer (tokenizer.json or vocab.json + "
                                f"merges.txt) in {proc}; supply {hint}")
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(folder))
    tokenizer = CLIPTokenizer.from_pretrained(str(proc))
    kw = {}
    pre = proc / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        crop = cfg.get("crop_size")
        if isinstance(crop, dict):
            crop = (crop.get("height"), crop.get("width"))
        kw = {"image_size": crop, "mean": tuple(cfg.get("image_mean", CLIP_MEAN)),
              "std": tuple(cfg.get("image_std", CLIP_STD))}
    return PickScoreReward(model, tokenizer, **kw).to(device or "cpu")


def aesthetic_reward(path: PathLike, model_name: str = "ViT-L-14", *,
                     head_path: Optional[PathLike] = None,
                     config_path: Optional[PathLike] = None, device=None) -> AestheticReward:
    """LAION aesthetic predictor v2: open_clip ``model_name`` from local weights + the MLP head.

    ``path``: the CLIP (ViT-L-14 OpenAI weights as an open_clip file or folder, e.g. a local
    copy of timm/vit_large_patch14_clip_224.openai); ``head_path``: the predictor's state dict
    (``sac+logos+ava1-l14-linearMSE.pth`` or a safetensors copy).
    """
    hint = ("the aesthetic predictor's MLP state dict (sac+logos+ava1-l14-linearMSE.pth from "
            "christophschuhmann/improved-aesthetic-predictor, or a .safetensors copy)")
    if not head_path or not Path(head_path).expanduser().is_file():
        raise FileNotFoundError(f"aesthetic reward: head_path={head_path!r} is not a file; "
                                f"supply {hint}. Nothing is downloaded.")
    model, _ = _open_clip(path, model_name, config_path, "aesthetic reward (CLIP)",
                          _OPEN_CLIP_FOLDER_HINT)
    hp = Path(head_path).expanduser()
    if hp.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(hp))
    else:
        state = torch.load(str(hp), map_location="cpu", weights_only=True)
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    head.load_state_dict(state)
    return AestheticReward(model, head).to(device or "cpu")


_IMAGEREWARD_HINT = (
    "an ImageReward folder: a transformers BLIP config (config.json, BlipConfig with the ViT at "
    "image_size 224) + its weights (model.safetensors: BlipForImageTextRetrieval's vision_model "
    "and text_encoder), BLIP's BERT tokenizer (vocab.txt or tokenizer.json; or processor_path), "
    f"the MLP head ({IMAGEREWARD_HEAD}: layers.{{0,2,4,6,7}}) and {IMAGEREWARD_INFO} "
    '({"mean": ..., "std": ...}; THUDM\'s are 0.16717362830052426 and 1.0333394966054072). '
    "diffdistill.rewards.save_imagereward writes this layout; nothing is downloaded")


def imagereward_reward(path: PathLike, processor_path: Optional[PathLike] = None, *,
                       head_path: Optional[PathLike] = None, device=None) -> ImageRewardModel:
    """ImageReward from a local folder (layout: :func:`save_imagereward`).

    ``path`` holds ``config.json`` (a transformers ``BlipConfig``), the weights
    ``BlipForImageTextRetrieval.from_pretrained`` reads (only ``vision_model.*`` and
    ``text_encoder.*`` are used and required), :data:`IMAGEREWARD_HEAD` (the MLP) and
    :data:`IMAGEREWARD_INFO` (``{"mean", "std", optional "max_length"}``). ``processor_path``
    holds the tokenizer and optionally ``preprocessor_config.json`` (its ``image_mean`` /
    ``image_std`` normalise the pixels; default BLIP's, the OpenAI CLIP values ImageReward
    uses); default ``path``. ``head_path`` overrides where the MLP is read from.

    No converter from THUDM's ``ImageReward.pt`` is provided (its key names could not be
    checked against the real checkpoint here): convert it with your own key mapping onto
    ``BlipForImageTextRetrieval`` (the ViT there uses LayerNorm eps 1e-6) and write the folder
    with :func:`save_imagereward`.
    """
    what = "ImageReward reward"
    if not path:
        raise FileNotFoundError(f"{what}: no folder given; supply {_IMAGEREWARD_HINT}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: {folder} is not a folder; supply {_IMAGEREWARD_HINT}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {folder} has no config.json (a transformers BlipConfig);"
                                f" supply {_IMAGEREWARD_HINT}")
    if not any((folder / n).is_file() for n in ("model.safetensors",
                                                 "model.safetensors.index.json")):
        raise FileNotFoundError(f"{what}: {folder} has no BLIP weights (model.safetensors); "
                                f"supply {_IMAGEREWARD_HINT}")
    head_file = Path(head_path).expanduser() if head_path else folder / IMAGEREWARD_HEAD
    if not head_file.is_file():
        raise FileNotFoundError(f"{what}: the MLP head {head_file} does not exist; supply "
                                f"{IMAGEREWARD_HEAD} (ImageReward's mlp.layers.* as "
                                "layers.* in safetensors)")
    info_file = folder / IMAGEREWARD_INFO
    if not info_file.is_file():
        raise FileNotFoundError(f"{what}: {info_file} does not exist; supply {IMAGEREWARD_INFO} "
                                f'with the score normalisation {{"mean": {IMAGEREWARD_MEAN}, '
                                f'"std": {IMAGEREWARD_STD}}} (THUDM\'s values)')
    info = json.loads(info_file.read_text())
    if "mean" not in info or "std" not in info or not float(info["std"]) > 0:
        raise ValueError(f"{what}: {info_file} must hold \"mean\" and a positive \"std\", "
                         f"got {info}")
    proc = Path(processor_path).expanduser() if processor_path else folder
    if not ((proc / "tokenizer.json").is_file() or (proc / "vocab.txt").is_file()):
        raise FileNotFoundError(f"{what}: no tokenizer (vocab.txt or tokenizer.json) in {proc}; "
                                "supply BLIP's BERT tokenizer (bert-base-uncased + [DEC], [ENC], "
                                "as in any Salesforce/blip-* folder) there or as processor_path")
    from safetensors.torch import load_file
    from transformers import BertTokenizer, BlipForImageTextRetrieval

    blip, loading = BlipForImageTextRetrieval.from_pretrained(
        str(folder), output_loading_info=True, use_safetensors=True)
    missing = sorted(k for k in loading["missing_keys"]
                     if k.startswith(("vision_model.", "text_encoder.")))
    if missing:
        raise ValueError(f"{what}: the weights in {folder} lack {len(missing)} BLIP tensors the "
                         f"reward uses, e.g. {missing[:3]}; supply {_IMAGEREWARD_HINT}")
    state = load_file(str(head_file))
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    head.load_state_dict(state)
    hidden = blip.config.text_config.hidden_size
    if head.layers[0].in_features != hidden:
        raise ValueError(f"{what}: the head reads {head.layers[0].in_features}-d features but "
                         f"the BLIP text encoder gives {hidden}-d ones")
    tokenizer = BertTokenizer.from_pretrained(str(proc))
    kw = {}
    pre = proc / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        kw = {"pixel_mean": tuple(cfg.get("image_mean", CLIP_MEAN)),
              "pixel_std": tuple(cfg.get("image_std", CLIP_STD))}
    return ImageRewardModel(blip, tokenizer, head, mean=float(info["mean"]),
                            std=float(info["std"]), max_length=int(info.get("max_length", 35)),
                            **kw).to(device or "cpu")


def save_imagereward(folder: PathLike, blip: nn.Module, tokenizer, head: nn.Module, *,
                     mean: float = IMAGEREWARD_MEAN, std: float = IMAGEREWARD_STD,
                     max_length: int = 35) -> Path:
    """Write the folder :func:`imagereward_reward` reads: ``blip`` (a transformers
    ``BlipForImageTextRetrieval``) with ``save_pretrained`` (safetensors), the tokenizer, the
    MLP ``head`` (layers.{0,2,4,6,7}) as :data:`IMAGEREWARD_HEAD`, and :data:`IMAGEREWARD_INFO`."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    blip.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()},
              str(out / IMAGEREWARD_HEAD))
    (out / IMAGEREWARD_INFO).write_text(json.dumps(
        {"mean": float(mean), "std": float(std), "max_length": int(max_length)}, indent=1))
    return out


#: reward kind → loader(path, **options)
REWARD_LOADERS: dict[str, Callable[..., ClipStyleReward]] = {
    "clip": clip_score_reward,
    "hpsv2": hpsv2_reward,
    "pickscore": pickscore_reward,
    "aesthetic": aesthetic_reward,
    "imagereward": imagereward_reward,
}


def load_reward_model(kind: str, path: PathLike, *, model_name: Optional[str] = None,
                      config_path: Optional[PathLike] = None,
                      processor_path: Optional[PathLike] = None,
                      head_path: Optional[PathLike] = None, device=None) -> ClipStyleReward:
    """Build a reward of ``kind`` ("clip", "hpsv2", "pickscore", "aesthetic", "imagereward")
    from local files (``head_path``: the aesthetic predictor's MLP, or ImageReward's when not
    in its folder; ``processor_path``: the tokenizer folder of pickscore / imagereward)."""
    if kind not in REWARD_LOADERS:
        raise ValueError(f"reward kind {kind!r} is unknown; use one of {sorted(REWARD_LOADERS)}")
    if kind == "pickscore":
        return pickscore_reward(path, processor_path, device=device)
    if kind == "imagereward":
        return imagereward_reward(path, processor_path, head_path=head_path, device=device)
    kw = {"config_path": config_path, "device": device}
    if kind == "aesthetic":
        kw["head_path"] = head_path
    if model_name:
        kw["model_name"] = model_name
    return REWARD_LOADERS[kind](path, **kw)


# ----------------------------------------------------------------------------- latent RM


def _groups(ch: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if ch % g == 0:
            return g
    return 1


class LatentRewardModel(nn.Module):
    """Latent proxy reward model (RG-LCD's LRM): latents (+ pooled text) → scalar score.

    A small conv trunk (stride-2 stages, GroupNorm, SiLU) average-pooled to a vector ``h``;
    with ``text_dim`` the pooled text embedding ``e`` enters as ``[h, h ⊙ W e]`` so the score
    can measure image–text agreement, then an MLP head. The paper uses a latent ViT; a conv
    net is the small, fast stand-in (the proxy only has to rank candidates like the expert).
    """

    def __init__(self, latent_channels: int = 4, width: int = 64, depth: int = 3,
                 text_dim: Optional[int] = None):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, width, 3, padding=1)]
        ch = width
        for i in range(depth):
            out = width * min(2 ** (i + 1), 4)
            layers += [nn.GroupNorm(_groups(ch), ch), nn.SiLU(),
                       nn.Conv2d(ch, out, 3, stride=2, padding=1)]
            ch = out
        layers += [nn.GroupNorm(_groups(ch), ch), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.text_proj = nn.Linear(text_dim, ch) if text_dim else None
        self.head = nn.Sequential(nn.Linear(ch * (2 if text_dim else 1), ch), nn.SiLU(),
                                  nn.Linear(ch, 1))

    def forward(self, latents: Tensor, text: Optional[Tensor] = None) -> Tensor:
        dt = self.head[0].weight.dtype
        h = self.trunk(latents.to(dt)).mean(dim=(2, 3))
        if self.text_proj is not None:
            if text is None:
                raise ValueError("this latent reward model is text-conditioned: pass text")
            e = self.text_proj(text.to(dt))
            h = torch.cat([h, h * e], dim=1)
        return self.head(h).squeeze(1).float()


def lrm_preference_loss(lrm_scores: Tensor, expert_scores: Tensor,
                        expert_logit_scale: float = 1.0, pairwise: bool = False) -> Tensor:
    """Per-sample ``KL(softmax(s · expert) ‖ softmax(lrm))`` over the candidate axis (dim 1).

    ``lrm_scores`` / ``expert_scores``: ``[N, K]`` scores of K candidates for N prompts;
    ``expert_logit_scale`` s turns expert rewards into logits (the reward's ``logit_scale``).
    ``pairwise``: the sum over the K(K−1)/2 candidate pairs of the same KL on each pair (a
    Bradley–Terry preference per pair), which is how RG-LCD's reference code trains its LRM on
    the triplet; the default is one K-way softmax.
    """
    if lrm_scores.shape != expert_scores.shape or lrm_scores.ndim != 2:
        raise ValueError(f"need matching [N, K] scores, got {tuple(lrm_scores.shape)} and "
                         f"{tuple(expert_scores.shape)}")
    if pairwise:
        k = lrm_scores.shape[1]
        return sum(lrm_preference_loss(lrm_scores[:, [i, j]], expert_scores[:, [i, j]],
                                       expert_logit_scale)
                   for i in range(k) for j in range(i + 1, k))
    target = F.softmax(expert_scores.detach().float() * expert_logit_scale, dim=1)
    log_q = F.log_softmax(lrm_scores.float(), dim=1)
    return F.kl_div(log_q, target, reduction="none").sum(dim=1)
