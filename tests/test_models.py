"""Backbone registry tests, parametrized over every registered backbone."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from torchvision.transforms import v2

import models
from models.efficientnet_lite import EfficientNetLite, efficientnet_lite0, lite0_checkpoint_path, remap_checkpoint

ALL = models.list_backbones()
DOWNLOADED = [n for n in ALL if not models.get_backbone_spec(n).offline]


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME where any download attempt fails as it does without a network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch"


def test_registry_lists_the_required_backbones():
    assert ALL[0] == models.DEFAULT_BACKBONE == "efficientnet_lite0"
    assert {"efficientnet_lite0", "resnet18", "mobilenet_v3_large", "efficientnet_b0"} <= set(ALL)
    assert models.list_backbones(offline_only=True) == ["efficientnet_lite0"]


@pytest.mark.parametrize("name", ALL)
def test_metadata_is_complete(name):
    spec = models.get_backbone_spec(name)
    assert spec.name == name
    assert len(spec.mean) == len(spec.std) == 3 and all(s > 0 for s in spec.std)
    assert 0 < spec.input_size <= spec.resize_size
    assert spec.feature_dim > 0
    assert spec.interpolation in {"bilinear", "bicubic"}
    assert spec.weights in {"bundled", "download"}
    assert spec.license and spec.weights_source and spec.description
    assert (spec.weights_file is not None) == (spec.weights == "download")
    meta = spec.metadata()
    assert meta["mean"] == list(spec.mean) and meta["feature_dim"] == spec.feature_dim


@pytest.mark.parametrize("name", ALL)
def test_random_init_features_shape_and_finite(name):
    torch.manual_seed(0)
    net = models.get_backbone(name, pretrained=False).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, net.spec.feature_dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_classifier_forward(name):
    clf = models.build_classifier(name, 3, pretrained=False).eval()
    with torch.no_grad():
        logits = clf(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    clf.freeze_backbone()
    assert not any(p.requires_grad for p in clf.backbone.parameters())
    assert all(p.requires_grad for p in clf.head.parameters())


@pytest.mark.parametrize("name", ALL)
def test_blocks_hold_every_parameter_once_in_forward_order(name):
    clf = models.build_classifier(name, 3, pretrained=False)
    blocks = clf.blocks()
    assert len(blocks) >= 5
    owners = [id(p) for block in blocks for p in block.parameters()]
    assert len(owners) == len(set(owners)) and set(owners) == {id(p) for p in clf.backbone.parameters()}
    # forward order: the first block sees the 3-channel image, the last one gives the features
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: seen.append(k)) for k, b in enumerate(blocks)
             if not isinstance(b, torch.nn.ModuleList)]
    with torch.no_grad():
        clf.eval()(torch.randn(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    assert seen == sorted(seen) and len(seen) >= len(blocks) - 2


@pytest.mark.parametrize("name", ALL)
def test_unfreezing_the_last_blocks(name):
    clf = models.build_classifier(name, 3, pretrained=False)
    blocks = clf.blocks()
    trainable = clf.unfreeze_last_blocks(2)
    def ids(modules):
        return [[id(p) for p in m.parameters()] for m in modules]

    assert ids(trainable) == ids(blocks[-2:])
    assert all(p.requires_grad for b in trainable for p in b.parameters())
    assert not any(p.requires_grad for b in blocks[:-2] for p in b.parameters())
    assert all(p.requires_grad for p in clf.head.parameters())
    clf.train()
    assert clf.head.training and all(b.training for b in trainable)
    leaves = [m for b in blocks[:-2] for m in b.modules() if next(m.children(), None) is None]
    assert leaves and not any(m.training for m in leaves)  # frozen BatchNorm keeps its statistics
    with pytest.raises(ValueError, match=f"has {len(blocks)} blocks"):
        clf.unfreeze_last_blocks(len(blocks) + 1)


@pytest.mark.parametrize("name", DOWNLOADED)
def test_downloaded_weights_load_from_a_seeded_cache(name, offline_torch_home):
    spec = models.get_backbone_spec(name)
    arch = torchvision.models.get_model(name, weights=None)
    torch.manual_seed(1)
    for p in arch.parameters():
        p.data.normal_()
    path = models.torchvision_checkpoint_path(spec.weights_file)
    assert str(path).startswith(str(offline_torch_home))
    path.parent.mkdir(parents=True)
    torch.save(arch.state_dict(), path)

    net = models.get_backbone(name, pretrained=True)
    loaded = net.net.state_dict()
    seeded = arch.state_dict()
    # The classification head is replaced by Identity; every other tensor comes from the seeded file.
    assert set(loaded) < set(seeded)
    for key, value in loaded.items():
        torch.testing.assert_close(value, seeded[key])


@pytest.mark.parametrize("name", DOWNLOADED)
def test_downloaded_weights_offline_error_names_the_file(name, offline_torch_home):
    spec = models.get_backbone_spec(name)
    with pytest.raises(models.BackboneWeightsError) as err:
        models.get_backbone(name, pretrained=True)
    message = str(err.value)
    assert str(models.torchvision_checkpoint_path(spec.weights_file)) in message
    assert "efficientnet_lite0" in message and "TORCH_HOME" in message


def test_unknown_backbone_suggests_the_closest():
    with pytest.raises(models.UnknownBackboneError, match="Did you mean 'resnet18'") as err:
        models.get_backbone("resnet_18")
    assert "efficientnet_lite0" in str(err.value)


def test_duplicate_registration_is_refused():
    spec = models.get_backbone_spec("resnet18")
    with pytest.raises(ValueError, match="already registered"):
        models.register_backbone(spec)


def test_lite0_checkpoint_uses_every_key():
    state = torch.load(lite0_checkpoint_path(), map_location="cpu", weights_only=True)
    remapped = remap_checkpoint(state)
    assert len(remapped) == len(state)
    expected = EfficientNetLite(num_classes=1000).state_dict()
    assert set(remapped) == set(expected)
    for key, value in remapped.items():
        assert value.shape == expected[key].shape, key
    with pytest.raises(KeyError, match="Unexpected key"):
        remap_checkpoint({**state, "_extra.weight": torch.zeros(1)})


def _imagenet_top5(model, spec):
    """Top-5 ImageNet labels for scikit-learn's two bundled real photos (a palace and a flower)."""
    categories = torchvision.models.get_weight("ResNet18_Weights.IMAGENET1K_V1").meta["categories"]
    prep = v2.Compose([
        v2.ToImage(), v2.Resize(spec.resize_size, antialias=True), v2.CenterCrop(spec.input_size),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std),
    ])
    x = torch.stack([prep(Image.fromarray(img)) for img in load_sample_images().images])
    with torch.no_grad():
        top = model.eval()(x).topk(5).indices
    return [[categories[i] for i in row] for row in top.tolist()]


def test_lite0_imagenet_head_recognises_real_photos():
    spec = models.get_backbone_spec("efficientnet_lite0")
    palace, flower = _imagenet_top5(efficientnet_lite0(pretrained=True), spec)
    assert palace[0] == "palace" and "monastery" in palace
    assert flower[0] == "daisy"
    torch.manual_seed(0)
    palace_rand, flower_rand = _imagenet_top5(efficientnet_lite0(pretrained=False), spec)
    assert "palace" not in palace_rand and "daisy" not in flower_rand


def _digit_features(pretrained: bool, images: torch.Tensor) -> np.ndarray:
    torch.manual_seed(0)
    net = models.get_backbone("efficientnet_lite0", pretrained=pretrained).eval()
    with torch.no_grad():
        return net(images).numpy()


def test_linear_probe_pretrained_beats_random_init_on_digits():
    """The same linear probe on frozen features: ImageNet weights carry signal, random init does not."""
    digits = load_digits()
    idx = np.random.RandomState(0).permutation(len(digits.target))[:500]
    x = torch.tensor(digits.images[idx], dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=32, mode="bilinear").repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = digits.target[idx]

    def probe(features):
        a, b, ya, yb = train_test_split(features, y, test_size=0.5, random_state=0, stratify=y)
        return LogisticRegression(max_iter=2000).fit(a, ya).score(b, yb)

    pretrained, random_init = probe(_digit_features(True, x)), probe(_digit_features(False, x))
    assert pretrained >= 0.75
    assert pretrained - random_init >= 0.3
