"""Pretrained ImageNet weights the way users get them (issue 11): torchvision's weights API and
real key layout, the `fetch-weights` stage that makes the file a DVC-tracked input, and the
offline error.

No test downloads anything: the "ImageNet" files are state dicts of torchvision's own nets in
the exact layout of its weight files (GoogLeNet built with aux_logits=True, so the file holds
the auxiliary classifiers, as googlenet-1378be20.pth does; every net with its 1000-class fc),
saved under a temporary TORCH_HOME at the path and name torchvision uses. Any attempt to
download fails the test.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision

from pipeline.encoders import PRETRAINED_DIR, WEIGHTS_JSON, fetch_weights, tracked_file
from pipeline.errors import PipelineError
from pipeline.models import ModelError, build_extractor, imagenet_weights_file
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.stages import fetch_weights as fetch_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FILES = {"googlenet": "googlenet-1378be20.pth", "resnet18": "resnet18-f37072fd.pth"}
URL = "https://download.pytorch.org/models/"


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME; downloading is an error."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_download(url, *args, **kwargs):
        raise URLError(f"offline test: refusing to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return home


def _torchvision_file(arch: str, torch_home: Path, seed: int = 1) -> dict:
    """Write a state dict with the key layout of torchvision's ImageNet file for `arch` where
    torchvision expects it; returns it."""
    torch.manual_seed(seed)
    if arch == "googlenet":  # torchvision's weights: aux classifiers included
        net = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    else:
        net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-default BN statistics must arrive too
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = net.state_dict()
    path = torch_home / "hub" / "checkpoints" / FILES[arch]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def _params(**extractor) -> Params:
    raw = Params().model_dump(mode="json")
    raw["extractor"].update(extractor)
    return Params.model_validate(raw)


def test_weights_file_name_and_url_come_from_torchvision_enum(torch_home):
    for arch, name in FILES.items():
        path, url = imagenet_weights_file(arch)
        assert path == torch_home / "hub" / "checkpoints" / name and url == URL + name


@pytest.mark.parametrize("arch", ["googlenet", "resnet18"])
def test_imagenet_real_layout_through_fetch_weights_and_the_stage_path(arch, torch_home,
                                                                      tmp_path):
    state = _torchvision_file(arch, torch_home)
    if arch == "googlenet":
        assert sum(k.startswith(("aux1.", "aux2.")) for k in state) == 20  # the real file's
    paths = Paths(tmp_path / "proj")
    info = fetch_stage.run(_params(arch=arch, pretrained="imagenet"), paths)
    stored = paths.models / PRETRAINED_DIR / FILES[arch]
    assert info["file"] == FILES[arch] and stored.is_file() and info["url"] == URL + FILES[arch]
    index = json.loads((paths.models / PRETRAINED_DIR / WEIGHTS_JSON).read_text())
    assert index["sha256"] == info["sha256"] and str(torch_home) not in json.dumps(index)

    # what train-extractor / train-frozen do: read only the fetched copy
    m = build_extractor(arch, 16, "imagenet", weights_dir=paths.models / PRETRAINED_DIR)
    # ... and what a user does outside the pipeline: torchvision's hub cache
    m_user = build_extractor(arch, 16, "imagenet")
    ref = (torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False,
                                        transform_input=True) if arch == "googlenet"
           else torchvision.models.resnet18(weights=None))
    ref.load_state_dict(state)  # what torchvision.models.<arch>(weights=...) would hold
    ref.fc = torch.nn.Identity()
    for model in (m, m_user):
        own = model.backbone.state_dict()
        assert not any(k.startswith(("aux1.", "aux2.")) for k in own)  # dropped after loading
        for k, v in own.items():
            assert torch.equal(v, state[k]), k
        x = torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model.eval().backbone(x), ref.eval()(x))
    # the weights' own preprocessing, recorded with the model
    t = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.transforms()
    assert list(m.preprocess.mean) == list(t.mean) and list(m.preprocess.std) == list(t.std)
    assert "IMAGENET1K_V1" in m.preprocess.source


def test_googlenet_file_without_torchvision_layout_is_refused(torch_home, tmp_path):
    state = _torchvision_file("googlenet", torch_home)
    path = torch_home / "hub" / "checkpoints" / FILES["googlenet"]
    torch.save({k: v for k, v in state.items() if not k.startswith("aux2.")}, path)
    with pytest.raises(ModelError) as err:
        build_extractor("googlenet", 16, "imagenet")
    msg = str(err.value)
    assert str(path) in msg and "missing" in msg and "aux2." in msg and "\n" not in msg


@pytest.mark.parametrize("arch", ["googlenet", "resnet18"])
def test_offline_without_the_file_names_file_url_and_place(arch, torch_home, tmp_path):
    expected = torch_home / "hub" / "checkpoints" / FILES[arch]
    for call in (lambda: build_extractor(arch, 16, "imagenet"),
                 lambda: fetch_weights(arch, "imagenet", tmp_path / "pretrained")):
        with pytest.raises(PipelineError) as err:
            call()
        msg = str(err.value)
        assert str(expected) in msg and URL + FILES[arch] in msg and "\n" not in msg
        assert "put it at" in msg
    assert not expected.exists() and not (tmp_path / "pretrained").exists()


def test_small_cnn_and_timm_have_no_torchvision_imagenet_weights(torch_home):
    with pytest.raises(ModelError, match="small_cnn"):
        fetch_weights("small_cnn", "imagenet", torch_home / "x")
    with pytest.raises(ModelError, match="hf-hub"):
        build_extractor("timm:vit_tiny_patch16_224", 16, "imagenet")


def test_fetch_weights_none_is_offline_and_the_folder_holds_only_what_params_name(
        torch_home, tmp_path):
    _torchvision_file("resnet18", torch_home)
    out = tmp_path / "pretrained"
    fetch_weights("resnet18", "imagenet", out)
    assert sorted(p.name for p in out.iterdir()) == [FILES["resnet18"], WEIGHTS_JSON]
    info = fetch_weights("resnet18", "none", out)  # needs no file, no network
    assert info["file"] is None and [p.name for p in out.iterdir()] == [WEIGHTS_JSON]
    with pytest.raises(ModelError) as err:  # the stages never fall back to a cache
        build_extractor("resnet18", 16, "imagenet", weights_dir=out)
    assert "fetch-weights" in str(err.value) and "pretrained=none" in str(err.value)
    with pytest.raises(ModelError, match="fetch-weights"):
        tracked_file(tmp_path / "nowhere", "resnet18", "imagenet")


def test_fetch_weights_copies_a_local_file_and_refuses_one_inside_its_folder(tmp_path):
    src = tmp_path / "mine.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), src)
    out = tmp_path / "pretrained"
    info = fetch_weights("resnet18", str(src), out)
    assert (out / "mine.pt").read_bytes() == src.read_bytes() and info["file"] == "mine.pt"
    m = build_extractor("resnet18", 16, str(src), weights_dir=out)
    assert m.feature.in_features == 512
    with pytest.raises(ModelError, match="rewrites"):
        fetch_weights("resnet18", str(out / "mine.pt"), out)


def test_dvc_yaml_tracks_the_weights_for_every_stage_that_builds_an_encoder():
    from ruamel.yaml import YAML

    stages = YAML(typ="safe").load(Path("dvc.yaml").read_text())["stages"]
    assert stages["fetch-weights"]["outs"] == [f"models/{PRETRAINED_DIR}"]
    assert {"extractor.arch", "extractor.pretrained"} <= set(stages["fetch-weights"]["params"])
    for name in ("train-extractor", "train-frozen"):
        assert f"models/{PRETRAINED_DIR}" in stages[name]["deps"], name
    # the key itself, or its whole section
    assert {"extractor", "extractor.pretrained"} & set(stages["train-frozen"]["params"])


def test_fetch_weights_is_a_cli_command():
    from pipeline.cli import STAGES

    assert STAGES["fetch-weights"] == "fetch_weights"
