"""The whole chain with a timm encoder (issue 14), on test_baselines' tiny three-slide project:
fetch-weights (a local random vit_tiny state dict standing in for a foundation model's
pytorch_model.bin) -> train-extractor (last block trainable) -> extract-features -> train-unet ->
e2e-finetune, and train-frozen with the encoder's native features: what
`dvc exp run -S extractor.arch=timm:vit_tiny_patch16_224 -S extractor.pretrained=<file>` runs.
"""

from __future__ import annotations

import json

import h5py
import pytest
import timm
import torch

from pipeline import schema
from pipeline.encoders import PRETRAINED_DIR
from pipeline.models import load_extractor, load_unet
from pipeline.params import Params
from pipeline.stages import (
    e2e_finetune,
    extract_features,
    fetch_weights,
    train_extractor,
    train_frozen,
    train_unet,
)
from tests.test_baselines import SLIDES, make_project

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VIT = "timm:vit_tiny_patch16_224"
KW = {"img_size": 32}


def _with(params: Params, **extractor) -> Params:
    raw = params.model_dump(mode="json")
    raw["extractor"].update(extractor)
    raw["e2e"].update(epochs=1, chunk_size=16)
    return Params.model_validate(raw)


def test_timm_encoder_runs_the_chain(tmp_path):
    (tmp_path / "proj").mkdir()
    params, paths = make_project(tmp_path / "proj")
    torch.manual_seed(7)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **KW)  # with its head
    weights = tmp_path / "uni_like" / "pytorch_model.bin"
    weights.parent.mkdir()
    torch.save(ref.state_dict(), weights)
    params = _with(params, arch=VIT, timm_kwargs=KW, pretrained=str(weights), epochs=1,
                   batch_size=16, trainable_blocks=1)

    info = fetch_weights.run(params, paths)
    assert (paths.models / PRETRAINED_DIR / info["file"]).is_file()
    train_extractor.run(params, paths)
    model, meta = load_extractor(paths.models / "extractor.pt")
    assert meta["arch"] == VIT and meta["encoder"]["timm_kwargs"] == KW
    assert meta["encoder"]["preprocess"]["input_px"] == 32
    assert meta["encoder"]["trainable_blocks"] == 1
    trained = model.backbone.state_dict()
    for k, v in ref.state_dict().items():  # frozen blocks kept the file's weights exactly
        if k.startswith(("blocks.0.", "patch_embed.", "pos_embed", "cls_token")):
            assert torch.equal(trained[k], v), k
    assert not torch.equal(trained["blocks.11.mlp.fc2.weight"], ref.blocks[11].mlp.fc2.weight)

    extract_features.run(params, paths)
    for sid in SLIDES:
        with h5py.File(paths.feature_file(sid), "r") as f:
            assert f[schema.FEATURES].shape[1] == 4 and f.attrs["extractor_arch"] == VIT
            enc = json.loads(f.attrs["encoder_json"])
            assert enc["preprocess"]["mean"] == meta["encoder"]["preprocess"]["mean"]
    unet_summary = train_unet.run(params, paths)
    assert unet_summary["best_epoch"] >= 0
    e2e_finetune.run(params, paths)
    assert load_extractor(paths.models / "e2e_extractor.pt")[1]["arch"] == VIT

    # "frozen FM features + U-Net": the encoder's native 192-d features, standardised
    frozen = _with(params, feature_dim="native")
    summary = train_frozen.run(frozen, paths)
    assert summary["frozen_extractor"] == "pretrained:pytorch_model.bin"
    assert summary["extractor_arch"] == VIT
    with h5py.File(paths.feature_file("a", "frozen"), "r") as f:
        assert f[schema.FEATURES].shape[1] == 192
    unet, _ = load_unet(paths.models / "frozen_unet.pt")
    assert unet.in_channels == 192
    fx, fmeta = load_extractor(paths.models / "frozen_extractor.pt")
    assert fx.native and fmeta["encoder"]["feature_head"] == "native"
    for k, v in ref.state_dict().items():  # frozen: the file's encoder, untouched
        if not k.startswith("head."):
            assert torch.equal(fx.backbone.state_dict()[k], v), k
