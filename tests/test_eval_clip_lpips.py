"""CLIP score (formula, conventions, torchmetrics parity) and LPIPS fidelity / diversity."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffdistill.eval.clip_detector import ClipDetector
from diffdistill.eval.clip_score import clip_score
from diffdistill.eval.lpips_metric import LPIPS_BACKBONE_ENV, LPIPSMetric
from PIL import Image
from torch import nn

TINY_CLIP = ('{"embed_dim":64,"vision_cfg":{"image_size":32,"layers":2,"width":64,"head_width":32,'
             '"patch_size":4,"mlp_ratio":2.0},"text_cfg":{"context_length":77,"vocab_size":49408,'
             '"width":64,"heads":2,"layers":2}}')
# lpips 0.1.4 builds its reference nets with torchvision's deprecated ``pretrained=`` argument
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torchvision")

CAPTIONS = ["a sneaker", "a red dress", "an ankle boot", "a bag", "a shirt"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    cfg = tmp_path_factory.mktemp("clipcfg") / "dd-tiny-clip-score.json"
    cfg.write_text(TINY_CLIP)
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(1)
    model, _, preprocess = open_clip.create_model_and_transforms("dd-tiny-clip-score", pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer("dd-tiny-clip-score")
    detector = ClipDetector("dd-tiny-clip-score", model=model, preprocess=preprocess, tokenizer=tokenizer)
    images = torch.randint(0, 256, (5, 3, 32, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(model=model, preprocess=preprocess, tokenizer=tokenizer, detector=detector,
                           images=images)


def _cosine_by_hand(clip, images, texts):
    pixels = torch.stack([clip.preprocess(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])
    with torch.no_grad():
        img = clip.model.encode_image(pixels)
        txt = clip.model.encode_text(clip.tokenizer(texts))
    return F.cosine_similarity(img, txt, dim=-1)


def test_clip_score_cosine_by_hand(clip):
    expected = _cosine_by_hand(clip, clip.images, ["a photo of " + c for c in CAPTIONS])
    got = clip_score(clip.detector, clip.images, CAPTIONS, prefix="a photo of ", batch_size=2)
    assert got.scale == 1.0
    assert torch.allclose(got.per_image, expected, atol=1e-6)
    assert got.mean == pytest.approx(float(expected.double().mean()), abs=1e-6)
    # the prefix really reaches the text tower
    plain = clip_score(clip.detector, clip.images, CAPTIONS)
    assert (plain.per_image - got.per_image).abs().max() > 1e-4
    assert torch.allclose(plain.per_image, _cosine_by_hand(clip, clip.images, CAPTIONS), atol=1e-6)
    # a raw open_clip model (+ tokenizer/preprocess) and batches as an iterable give the same
    raw = clip_score(clip.model, clip.images.split(3), CAPTIONS, prefix="a photo of ",
                     tokenizer=clip.tokenizer, preprocess=clip.preprocess)
    assert torch.allclose(raw.per_image, got.per_image, atol=1e-6)
    with pytest.raises(ValueError, match="captions"):
        clip_score(clip.detector, clip.images, CAPTIONS[:4])


def test_clip_score_x100_equals_torchmetrics(clip):
    from torchmetrics.multimodal.clip_score import CLIPScore

    class _HFStyleModel(nn.Module):
        """The two calls torchmetrics makes on a transformers CLIPModel, over open_clip."""

        def __init__(self, model):
            super().__init__()
            self.inner = model
            self.config = SimpleNamespace()

        def get_image_features(self, pixel_values):
            return self.inner.encode_image(pixel_values)

        def get_text_features(self, input_ids, attention_mask=None):
            return self.inner.encode_text(input_ids)

    def processor(text=None, images=None, **_):
        if images is not None:
            pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
            return {"pixel_values": torch.stack([clip.preprocess(p) for p in pil])}
        tokens = clip.tokenizer(text)
        return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}

    metric = CLIPScore(model_name_or_path=lambda: (_HFStyleModel(clip.model), processor))
    metric.update(list(clip.images), CAPTIONS)
    expected = float(metric.compute())
    ours = clip_score(clip.detector, clip.images, CAPTIONS, scale=100.0)
    cosine = clip_score(clip.detector, clip.images, CAPTIONS)
    assert torch.allclose(ours.per_image, 100 * cosine.per_image, atol=1e-4)
    assert ours.mean == pytest.approx(expected, abs=1e-3)
    # torchmetrics clamps the mean (not each image) at 0
    assert ours.mean == pytest.approx(max(float(ours.per_image.double().mean()), 0.0), abs=1e-9)
    negative = clip_score(clip.detector, clip.images, CAPTIONS, scale=-100.0, clamp_mean=True)
    assert negative.mean >= 0.0 and (negative.mean == 0.0) == (cosine.mean > 0)


# ---------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------

def _torchvision_features_state(lpips_net: nn.Module) -> dict:
    """lpips' sliced backbone back to torchvision ``features`` keys ("3.weight")."""
    state = {}
    for block in lpips_net.children():
        for index, layer in block.named_children():
            for pname, value in layer.state_dict().items():
                state[f"{index}.{pname}"] = value.clone()
    return state


@pytest.fixture(scope="module")
def alex(tmp_path_factory):
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    reference = lpips.LPIPS(pretrained=True, net="alex", pnet_rand=True, verbose=False).eval()
    path = tmp_path_factory.mktemp("lpips") / "alexnet-random.pth"
    torch.save(_torchvision_features_state(reference.net), path)
    return SimpleNamespace(reference=reference, path=path, metric=LPIPSMetric("alex", weights_path=path))


def _images(n, seed, size=64):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_lpips_loaded_backbone_reproduces_in_memory_net(alex, tmp_path):
    import lpips
    from safetensors.torch import save_file

    a, b = _images(3, 1), _images(3, 2)
    ours = alex.metric(a, b)
    with torch.no_grad():
        ref = alex.reference(a.float() / 127.5 - 1, b.float() / 127.5 - 1).flatten()
    assert ref.min() > 1e-4
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-7)
    # the calibrated lin layers came from the wheel, not a random init
    lin = torch.load(f"{lpips.__path__[0]}/weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    assert torch.equal(alex.metric.model.lin0.model[1].weight, lin["lin0.model.1.weight"])
    # a whole-model state dict ("features.N.*" + classifier) as safetensors loads the same
    full = {f"features.{k}": v.contiguous() for k, v in torch.load(alex.path, weights_only=True).items()}
    full["classifier.1.weight"] = torch.zeros(4, 4)
    save_file(full, str(tmp_path / "alexnet.safetensors"))
    again = LPIPSMetric("alex", weights_path=tmp_path / "alexnet.safetensors")
    assert torch.allclose(again(a, b), ours, rtol=1e-6, atol=0)
    # a truncated file is refused, not half-loaded
    full.pop("features.10.weight")
    save_file(full, str(tmp_path / "partial.safetensors"))
    with pytest.raises(RuntimeError, match="10.weight"):
        LPIPSMetric("alex", weights_path=tmp_path / "partial.safetensors")


def test_lpips_identity_symmetry_fidelity_diversity(alex):
    a, b = _images(4, 3), _images(4, 4)
    metric = alex.metric
    assert torch.equal(metric(a, a), torch.zeros(4))
    ab, ba = metric(a, b), metric(b, a)
    assert torch.allclose(ab, ba, atol=1e-7) and ab.min() > 0
    assert metric.fidelity(a, b, batch_size=3) == pytest.approx(float(ab.double().mean()), rel=1e-6)
    assert metric.fidelity(a, a) == 0.0

    same = a[:1].expand(3, -1, -1, -1).contiguous()
    assert metric.diversity([same, same]) == 0.0
    groups = torch.stack([a[:3], b[:3]])  # [prompts, images per prompt, C, H, W]
    per_group = metric.diversity_per_group(groups)
    # by hand: the three unordered pairs of each group, as one batch of pairs
    first = torch.cat([g[[0, 0, 1]] for g in groups])
    second = torch.cat([g[[1, 2, 2]] for g in groups])
    hand = metric(first, second).view(2, 3).double().mean(1).tolist()
    assert torch.allclose(per_group, torch.tensor(hand, dtype=torch.float32), rtol=1e-5)
    assert hand[1] > 0.01
    assert metric.diversity(groups) == pytest.approx(sum(hand) / 2, rel=1e-5)
    assert metric.diversity([same, a[:3]]) == pytest.approx(hand[0] / 2, rel=1e-5)
    with pytest.raises(ValueError, match="needs >= 2"):
        metric.diversity([a[:1]])


def test_lpips_vgg_key_mapping(tmp_path):
    pytest.importorskip("lpips")
    # torchvision vgg16 ``features`` conv layers (index: in -> out channels); building a
    # second full VGG16 as a reference would cost seconds, so check the mapping directly.
    convs = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
             14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512),
             26: (512, 512), 28: (512, 512)}
    g = torch.Generator().manual_seed(1)
    state = {}
    for index, (cin, cout) in convs.items():
        state[f"{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
        state[f"{index}.bias"] = torch.randn(cout, generator=g) * 0.01
    torch.save(state, tmp_path / "vgg16-random.pth")
    metric = LPIPSMetric("vgg", weights_path=tmp_path / "vgg16-random.pth")
    layers = {index: layer for block in metric.model.net.children() for index, layer in block.named_children()}
    for key, value in state.items():
        index, param = key.split(".")
        assert torch.equal(getattr(layers[index], param), value), key
    a, b = _images(2, 5, size=32), _images(2, 6, size=32)
    assert torch.equal(metric(a, a), torch.zeros(2)) and metric(a, b).min() > 0


def test_lpips_missing_backbone_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(LPIPS_BACKBONE_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=LPIPS_BACKBONE_ENV) as err:
        LPIPSMetric("alex")
    assert "alexnet-owt-7be5be79.pth" in str(err.value)
    monkeypatch.setenv(LPIPS_BACKBONE_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        LPIPSMetric("alex")
