"""Patch classifier architectures and checkpoints (pipeline.models). ImageNet weights through
torchvision's weights API: tests/test_weights.py; timm encoders: tests/test_timm_encoders.py."""

from pathlib import Path

import pytest
import torch

from pipeline.models import (
    ModelError,
    PatchClassifier,
    build_extractor,
    extractor_input_normalization,
    load_extractor,
    load_unet,
    save_checkpoint,
)
from pipeline.unet import UNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "googlenet"])
def test_shapes_and_attributes(arch):
    torch.manual_seed(0)
    m = build_extractor(arch, feature_dim=7).eval()
    assert isinstance(m, PatchClassifier) and m.arch == arch and m.feature_dim == 7
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        f = m.features(x)
        logits = m(x)
    assert f.shape == (3, 7) and logits.shape == (3, 2)
    # forward is exactly the 2-way Linear on the features (f_n after f_{n-1})
    assert torch.allclose(logits, m.head(f), atol=1e-6)
    assert m.head.in_features == 7 and m.feature.out_features == 7


def test_small_cnn_has_batchnorm_and_dropout():
    m = build_extractor("small_cnn")
    kinds = {type(mod).__name__ for mod in m.modules()}
    assert {"BatchNorm2d", "Dropout"} <= kinds


def test_googlenet_keeps_dropout_before_the_new_layers():
    m = build_extractor("googlenet")
    assert isinstance(m.backbone.dropout, torch.nn.Dropout)
    assert isinstance(m.backbone.fc, torch.nn.Identity)
    assert m.feature.in_features == 1024


def test_normalization_constants():
    mean, std = extractor_input_normalization()
    assert mean == pytest.approx((0.485, 0.456, 0.406))
    assert std == pytest.approx((0.229, 0.224, 0.225))


def test_small_cnn_has_no_imagenet_weights():
    with pytest.raises(ModelError, match="small_cnn"):
        build_extractor("small_cnn", pretrained="imagenet")


def test_missing_pretrained_path_is_named(tmp_path):
    p = tmp_path / "nope.pt"
    with pytest.raises(ModelError, match=str(p)):
        build_extractor("small_cnn", pretrained=str(p))


def test_unknown_arch():
    with pytest.raises(ModelError, match="vgg"):
        build_extractor("vgg")


def test_extractor_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = build_extractor("small_cnn", feature_dim=5)
    with torch.no_grad():  # non-default BN stats must survive the round trip too
        m.backbone[1].running_mean.uniform_(-1, 1)
    path = tmp_path / "models" / "extractor.pt"
    save_checkpoint(path, m, {"params_json": '{"a": 1}', "epoch": 3})
    assert [p.name for p in path.parent.iterdir()] == ["extractor.pt"]  # no temp file left
    m2, meta = load_extractor(path)
    assert meta["arch"] == "small_cnn" and meta["feature_dim"] == 5
    assert meta["epoch"] == 3 and meta["params_json"] == '{"a": 1}'
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    m2.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    # the same file also serves as `pretrained` for a matching arch, and is refused otherwise
    m3 = build_extractor("small_cnn", feature_dim=5, pretrained=str(path))
    assert torch.equal(m3.feature.weight, m.feature.weight)
    with pytest.raises(ModelError, match="feature_dim"):
        build_extractor("small_cnn", feature_dim=16, pretrained=str(path))


def test_unet_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = UNet(in_channels=6, n_classes=2, depth=2, width=4)
    path = tmp_path / "unet.pt"
    save_checkpoint(path, net, {"note": "x"})
    net2, meta = load_unet(path)
    assert meta["depth"] == 2 and meta["width"] == 4 and meta["in_channels"] == 6
    x = torch.randn(1, 6, 8, 8)
    net.eval()
    net2.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net2(x))
    with pytest.raises(ModelError, match="expected 'extractor'"):
        load_extractor(path)


def test_checkpoint_that_does_not_fit_is_refused(tmp_path):
    m = build_extractor("small_cnn", feature_dim=4)
    path = tmp_path / "e.pt"
    save_checkpoint(path, m)
    obj = torch.load(path, weights_only=True)
    obj["meta"]["feature_dim"] = 8  # meta and weights now disagree
    bad = tmp_path / "bad.pt"
    torch.save(obj, bad)
    with pytest.raises(ModelError) as err:
        load_extractor(bad)
    assert str(bad) in str(err.value) and "shape" in str(err.value)
    del obj["state_dict"]["head.bias"]
    obj["meta"]["feature_dim"] = 4
    torch.save(obj, bad)
    with pytest.raises(ModelError, match="missing.*head.bias"):
        load_extractor(bad)
    Path(tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt"):
        load_extractor(tmp_path / "junk.pt")


def test_small_cnn_overfits_eight_patches():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    m = build_extractor("small_cnn")
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    m.train()
    for _ in range(80):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x).argmax(1), y)
