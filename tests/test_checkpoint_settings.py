"""Checkpoints carry the settings they were trained with (pipeline/models.py): from the params
their trainer records, or as given; a U-Net adds its config; e2e keeps its source's; an older
checkpoint without them is refused in one line. (predict's use of them: tests/test_predict.py.)"""

from __future__ import annotations

import pytest
import torch

from pipeline.models import (
    SETTINGS_VERSION,
    ModelError,
    build_extractor,
    checkpoint_settings,
    extractor_input_normalization,
    load_extractor,
    load_unet,
    save_checkpoint,
    training_settings,
)
from pipeline.params import Params
from pipeline.unet import UNet


def _params(**tile) -> Params:
    raw = Params().model_dump(mode="json")
    raw["tile"].update(tile)
    raw["extractor"].update(crop_px=96)
    raw["featuremap"].update(size=16, mode="full", per_lump=True)
    return Params.model_validate(raw)


def test_an_extractor_records_the_tile_crop_and_normalisation_its_trainer_recorded(tmp_path):
    params = _params(mpp=0.5, size_px=128)
    path = tmp_path / "extractor.pt"
    # what train-extractor / train-frozen write: the params sections they read
    save_checkpoint(path, build_extractor("small_cnn", 16),
                    {"params_json": params.section_json("seed", "extractor", "tile")})
    _, meta = load_extractor(path)
    s = checkpoint_settings(meta, path)
    mean, std = extractor_input_normalization()
    assert s == {"settings_version": SETTINGS_VERSION, "tile.mpp": 0.5, "tile.size_px": 128,
                 "extractor.crop_px": 96, "normalization.mean": list(mean),
                 "normalization.std": list(std)}


def test_a_unet_records_the_maps_scale_layout_and_its_config(tmp_path):
    params = _params(mpp=2.0)
    path = tmp_path / "unet.pt"
    net = UNet(in_channels=16, depth=2, width=4)
    save_checkpoint(path, net, {"settings": training_settings(params.model_dump(mode="json"))})
    _, meta = load_unet(path)
    s = checkpoint_settings(meta, path)
    assert s["tile.mpp"] == 2.0 and s["extractor.crop_px"] == 96
    assert (s["featuremap.mode"], s["featuremap.size"], s["featuremap.per_lump"]) == (
        "full", 16, True)
    assert {k: s[f"unet.{k}"] for k in net.config()} == net.config()


def test_a_finetuned_copy_keeps_its_sources_settings(tmp_path):
    """e2e-finetune saves {**source_meta, ...}: the settings travel with the weights."""
    src = tmp_path / "unet.pt"
    net = UNet(in_channels=16, depth=2, width=4)
    save_checkpoint(src, net, {"settings": training_settings(
        _params(mpp=0.25).model_dump(mode="json"))})
    _, meta = load_unet(src)
    save_checkpoint(tmp_path / "e2e_unet.pt", net, {**meta, "e2e_params_json": "{}"})
    _, e2e_meta = load_unet(tmp_path / "e2e_unet.pt")
    assert e2e_meta["settings"] == meta["settings"]
    assert checkpoint_settings(e2e_meta, "e2e_unet.pt")["tile.mpp"] == 0.25


def test_older_and_newer_checkpoints_are_refused_in_one_line(tmp_path):
    path = tmp_path / "old.pt"
    save_checkpoint(path, build_extractor("small_cnn", 16))
    obj = torch.load(path, weights_only=True)
    del obj["meta"]["settings"]
    torch.save(obj, path)
    _, meta = load_extractor(path)  # the weights still load (training stages check params)
    with pytest.raises(ModelError, match=r"old.pt: checkpoint of an older schema") as err:
        checkpoint_settings(meta, path)
    assert "\n" not in str(err.value)
    newer = {"settings": {"settings_version": SETTINGS_VERSION + 1}}
    with pytest.raises(ModelError, match="newer than this pipeline"):
        checkpoint_settings(newer, path)
