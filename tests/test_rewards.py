"""Reward models (CLIP score, HPSv2-style, PickScore-style) and the latent proxy reward model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from standins import TINY_CLIP, TINY_CLIP_CFG, make_tiny_clip, make_tiny_imagereward

from diffdistill.rewards import (
    LatentRewardModel,
    OpenClipReward,
    RewardModel,
    clip_score_reward,
    hpsv2_reward,
    load_reward_model,
    lrm_preference_loss,
    pickscore_reward,
)

PROMPTS = ["a photo of a bag", "a photo of a sneaker", "a photo of a dress"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def _images(n=3, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _manual_cos(model, images, prompts):
    import open_clip

    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.encode_image(((images + 1) / 2 - mean) / std)
        txt = model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(prompts))
    return F.cosine_similarity(img, txt, dim=-1)


def test_clip_reward_is_the_clip_cosine_and_loads_by_path(tiny_clip):
    cfg, weights, model = tiny_clip
    r = clip_score_reward(weights, TINY_CLIP, config_path=cfg)
    assert isinstance(r, RewardModel) and isinstance(r, OpenClipReward)
    loaded = r.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert all(not p.requires_grad for p in r.parameters())
    x = _images()
    got = r(x, PROMPTS)
    ref = _manual_cos(model, x, PROMPTS)  # 32 px: the model's size, no resize
    assert torch.allclose(got, ref, atol=1e-5), (got, ref)
    assert got.std() > 1e-4  # different images / prompts give different rewards
    assert r.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    r.train()
    assert not r.training  # frozen reward stays in eval mode


def test_clip_reward_gradient_matches_finite_differences(tiny_clip):
    """Differentiable preprocessing: 24 px images are resized (bicubic) inside the graph."""
    cfg, weights, _ = tiny_clip
    r = clip_score_reward(weights, TINY_CLIP, config_path=cfg).double()
    x = (_images(2, 24, seed=1) * 0.8).double().requires_grad_(True)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (g,) = torch.autograd.grad(r(x, PROMPTS[:2]).sum(), x)
    h = 1e-5
    with torch.no_grad():
        fd = (r(x + h * v, PROMPTS[:2]).sum() - r(x - h * v, PROMPTS[:2]).sum()) / (2 * h)
    assert g.abs().sum() > 0
    assert float((g * v).sum()) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)


def test_clip_reward_from_an_open_clip_folder(tiny_clip, tmp_path):
    import shutil

    _, weights, model = tiny_clip
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG}))
    shutil.copy(weights, folder / "open_clip_model.safetensors")
    r = clip_score_reward(folder)
    x = _images(seed=3)
    assert torch.allclose(r(x, PROMPTS), _manual_cos(model, x, PROMPTS), atol=1e-5)
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="open_clip_config.json and a weights file"):
        clip_score_reward(folder)


def test_hpsv2_style_loader_reads_a_state_dict_checkpoint(tiny_clip, tmp_path):
    cfg, _, model = tiny_clip
    # HPS_v2.1_compressed.pt layout: {"state_dict": open_clip state dict}
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    r = hpsv2_reward(ckpt, model_name=TINY_CLIP, config_path=cfg)
    x = _images(seed=4)
    assert torch.allclose(r(x, PROMPTS), _manual_cos(model, x, PROMPTS), atol=1e-5)
    same = load_reward_model("hpsv2", ckpt, model_name=TINY_CLIP)
    assert torch.allclose(same(x, PROMPTS), r(x, PROMPTS))
    with pytest.raises(FileNotFoundError, match="HPSv2.*HPS_v2.1_compressed.pt"):
        hpsv2_reward(tmp_path / "missing.pt", model_name=TINY_CLIP)
    with pytest.raises(ValueError, match="config_path"):
        hpsv2_reward(ckpt, model_name="no-such-arch")


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
    import shutil

    from transformers import CLIPConfig, CLIPModel

    from diffdistill.tiny import clip_tokenizer_dir

    d = tmp_path_factory.mktemp("pickscore")
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                     "num_hidden_layers": 2, "vocab_size": 49408, "max_position_embeddings": 77,
                     "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                       "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16, logit_scale_init_value=3.0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(str(d / "model"))
    for f in clip_tokenizer_dir().iterdir():
        shutil.copy(f, d / "model" / f.name)
    return d / "model", model


def test_pickscore_style_reward_equals_the_clip_model_logits(tiny_pickscore, tmp_path):
    from diffdistill.tiny import clip_tokenizer_dir
    from diffdistill.tokenizer import load_clip_tokenizer

    folder, model = tiny_pickscore
    r = pickscore_reward(folder)
    x = _images(seed=5)
    got = r(x, PROMPTS)
    tok = load_clip_tokenizer(clip_tokenizer_dir())(PROMPTS, padding="max_length",
                                                    max_length=77, truncation=True,
                                                    return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                    pixel_values=r.preprocess(x))
    ref = out.logits_per_image.diagonal()  # PickScore: logit_scale.exp() * cos
    assert torch.allclose(got, ref, atol=1e-4), (got, ref)
    assert r.logit_scale == 1.0 and r.scale == pytest.approx(float(torch.tensor(3.0).exp()))
    with pytest.raises(FileNotFoundError, match="PickScore.*PickScore_v1"):
        pickscore_reward(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        pickscore_reward(folder, processor_path=tmp_path)


def test_unknown_reward_kind():
    with pytest.raises(ValueError, match="clip.*hpsv2.*imagereward.*pickscore"):
        load_reward_model("vqascore", "x")


def test_lrm_preference_loss_is_the_kl_of_softmaxed_scores():
    g = torch.Generator().manual_seed(0)
    lrm = torch.randn(5, 3, generator=g)
    expert = torch.randn(5, 3, generator=g) * 0.1
    p = F.softmax(expert * 100.0, dim=1)
    q = F.softmax(lrm, dim=1)
    manual = (p * (p.log() - q.log())).sum(dim=1)
    got = lrm_preference_loss(lrm, expert, 100.0)
    assert torch.allclose(got, manual, atol=1e-6)
    assert (got > 0).all()
    # minimised (zero) exactly when the proxy's logits equal the expert's up to a constant
    assert torch.allclose(lrm_preference_loss(expert * 100.0 + 3.0, expert, 100.0),
                          torch.zeros(5), atol=1e-6)


def test_pairwise_lrm_loss_sums_the_three_pairwise_kls():
    """RG-LCD reference form: Σ_{i<j} KL(σ(s·[e_i, e_j]) ‖ σ([l_i, l_j])), by hand; it differs
    from the 3-way softmax KL."""
    g = torch.Generator().manual_seed(1)
    lrm, expert = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)

    def kl2(i, j):
        p = torch.sigmoid(2.0 * (expert[:, i] - expert[:, j]))
        q = torch.sigmoid(lrm[:, i] - lrm[:, j])
        return p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()

    manual = kl2(0, 1) + kl2(0, 2) + kl2(1, 2)
    got = lrm_preference_loss(lrm, expert, 2.0, pairwise=True)
    assert torch.allclose(got, manual, atol=1e-6)
    assert not torch.allclose(got, lrm_preference_loss(lrm, expert, 2.0), atol=1e-3)


def test_lrm_loss_decreases_on_fixed_preference_data():
    g = torch.Generator().manual_seed(0)
    n = 8
    latents = torch.randn(n * 3, 4, 8, 8, generator=g)
    text = torch.randn(n, 16, generator=g).repeat_interleave(3, dim=0)
    expert = torch.randn(n, 3, generator=g)
    torch.manual_seed(0)
    lrm = LatentRewardModel(latent_channels=4, width=16, depth=2, text_dim=16)
    opt = torch.optim.Adam(lrm.parameters(), lr=3e-3)

    def loss():
        return lrm_preference_loss(lrm(latents, text).view(n, 3), expert, 2.0).mean()

    with torch.no_grad():
        first = float(loss())
    for _ in range(150):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    with torch.no_grad():
        last = float(loss())
    assert first > 0.05 and last < 0.1 * first, (first, last)
    with torch.no_grad():
        agree = (lrm(latents, text).view(n, 3).argmax(1) == expert.argmax(1)).float().mean()
    assert agree == 1.0
    with pytest.raises(ValueError, match="text"):
        lrm(latents)


# ----------------------------------------------------------------------------- ImageReward

@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    return make_tiny_imagereward(tmp_path_factory.mktemp("tiny-imagereward"))


def _refl_transform(images, size):
    """ReFL's reward preprocessing (THUDM/ImageReward ReFL.py) with torchvision itself."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize

    from diffdistill.rewards import CLIP_MEAN, CLIP_STD

    t = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                 CenterCrop(size), Normalize(CLIP_MEAN, CLIP_STD)])
    return t(((images + 1) / 2).clamp(0, 1))


def test_imagereward_is_the_mlp_on_blips_image_grounded_text_feature(tiny_imagereward):
    from diffdistill.rewards import AestheticHead, ImageRewardModel

    folder, blip, tokenizer, head = tiny_imagereward
    r = load_reward_model("imagereward", folder)
    assert isinstance(r, RewardModel) and isinstance(r, ImageRewardModel)
    assert all(not p.requires_grad for p in r.parameters())
    assert r.logit_scale == 2.0  # preference logits = raw MLP outputs = std * score + mean
    # 40x48 images: shortest side resized to the ViT's 32 px (bicubic, antialiased), centre crop
    x = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    got = r(x, PROMPTS)
    tok = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35,
                    return_tensors="pt")
    assert tok.input_ids[0, 0] == 2 and tok.input_ids.shape[1] == 35  # [CLS] first, 35 tokens
    with torch.no_grad():
        # transformers' own ITM forward runs the text encoder with cross-attention to the image
        out = blip(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                   pixel_values=_refl_transform(x, 32), use_itm_head=True)
        feature = out.question_embeds[:, 0, :]  # ImageReward: last_hidden_state[:, 0, :]
        expected = (head(feature).squeeze(-1) - 0.3) / 2.0
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    assert got.std() > 1e-3
    # the prompt matters (it is read in the same forward, not cached as a text embedding)
    swapped = r(x, PROMPTS[::-1])
    assert (swapped - got).abs().max() > 1e-4
    # the head is ImageReward's MLP layout (the LAION predictor's: layers.{0,2,4,6,7})
    assert isinstance(r.head, AestheticHead) and r.head.layers[0].in_features == 32
    r.train()
    assert not r.training


def test_imagereward_gradient_reaches_the_images(tiny_imagereward):
    folder, *_ = tiny_imagereward
    r = load_reward_model("imagereward", folder)
    x = (_images(2, 24, seed=1) * 0.8).requires_grad_(True)  # 24 px: upsampled in the graph
    (g,) = torch.autograd.grad(r(x, PROMPTS[:2]).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # … and it is the gradient of the score (float64 central differences)
    r = r.double()
    x = x.detach().double().requires_grad_(True)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (g,) = torch.autograd.grad(r(x, PROMPTS[:2]).sum(), x)
    h = 1e-5
    with torch.no_grad():
        fd = (r(x + h * v, PROMPTS[:2]).sum() - r(x - h * v, PROMPTS[:2]).sum()) / (2 * h)
    assert float((g * v).sum()) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)


def test_imagereward_missing_files_are_named(tiny_imagereward, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from diffdistill.rewards import IMAGEREWARD_HEAD, IMAGEREWARD_INFO

    folder, *_ = tiny_imagereward
    with pytest.raises(FileNotFoundError, match=f"ImageReward.*absent.*{IMAGEREWARD_HEAD}"):
        load_reward_model("imagereward", tmp_path / "absent")
    cases = [(IMAGEREWARD_HEAD, FileNotFoundError, IMAGEREWARD_HEAD),
             (IMAGEREWARD_INFO, FileNotFoundError, f"{IMAGEREWARD_INFO}.*mean.*std"),
             ("config.json", FileNotFoundError, "config.json"),
             ("model.safetensors", FileNotFoundError, "model.safetensors"),
             ("tokenizer", FileNotFoundError, "vocab.txt or tokenizer.json")]
    for name, err, match in cases:
        broken = tmp_path / f"no-{name}"
        shutil.copytree(folder, broken)
        for f in broken.iterdir():
            if f.name == name or (name == "tokenizer" and f.name.startswith(("tokenizer",
                                                                                "vocab"))):
                f.unlink()
        with pytest.raises(err, match=match):
            load_reward_model("imagereward", broken)
    # weights lacking the text encoder: a clear error, not a randomly initialised encoder
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    state = load_file(str(partial / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("text_encoder.")},
              str(partial / "model.safetensors"))
    with pytest.raises(ValueError, match="text_encoder"):
        load_reward_model("imagereward", partial)
    # the head may live elsewhere (head_path)
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    shutil.move(str(moved / IMAGEREWARD_HEAD), str(tmp_path / "head.safetensors"))
    r = load_reward_model("imagereward", moved, head_path=tmp_path / "head.safetensors")
    x = _images(seed=6)
    assert torch.equal(r(x, PROMPTS), load_reward_model("imagereward", folder)(x, PROMPTS))
