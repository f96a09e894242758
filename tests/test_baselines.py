"""The two Table 1 baselines: segmentation-only (U-Net on the low-res slide image) and frozen
features (U-Net on features of an extractor never trained on patches).

A tiny project is built once per module with the real tile and label stages: three 10 x 9 tile
slides (32 px tiles at 1 um/px) of flat pink tissue with a dark purple tumor rectangle on whole
tiles (annotated in ASAP XML), so every tile's label and colour are known by construction.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from sklearn.metrics import roc_auc_score
from torch import nn

from pipeline import schema
from pipeline.annotations import write_asap_xml
from pipeline.encoders import fetch_weights
from pipeline.io import sha256_file
from pipeline.models import ModelError, build_extractor, imagenet_weights_file
from pipeline.params import Params, SegOnlyParams
from pipeline.paths import Paths
from pipeline.stages import label as label_stage
from pipeline.stages import tile as tile_stage
from pipeline.stages import train_frozen, train_seg_only
from pipeline.stages.train_seg_only import (
    SegOnlyError,
    load_seg_image,
    predict_seg_image,
)
from pipeline.tiff import write_pyramidal_tiff
from pipeline.tileindex import read_tile_index

TILE_PX = 32  # at 1 um/px on a 1 um/px slide: pitch 32 level-0 px
ROWS, COLS = 9, 10
TISSUE_ROWS, TISSUE_COLS = (1, 8), (1, 9)  # tiles [r0, r1) x [c0, c1) covered by tissue
GLASS = (242, 242, 240)
PINK = (215, 120, 185)
PURPLE = (110, 45, 140)
# slide_id -> (split, tumor tiles [r0, r1) x [c0, c1))
SLIDES = {
    "a": ("train", (2, 5), (2, 5)),
    "b": ("val", (4, 7), (5, 8)),
    "c": ("test", (2, 4), (4, 8)),
}
TINY = SegOnlyParams(downsample=8, depth=2, width=4, crop_tiles=4, batch_size=1, epochs=30,
                     lr=1e-2, augment=True)  # k = 32 / 8 = 4 px per tile


def _slide_rgb(tumor_rows, tumor_cols, seed: int) -> np.ndarray:
    t = TILE_PX
    img = np.empty((ROWS * t + 8, COLS * t + 8, 3), np.int16)  # a strip that holds no tile
    img[:] = GLASS
    img[TISSUE_ROWS[0] * t:TISSUE_ROWS[1] * t, TISSUE_COLS[0] * t:TISSUE_COLS[1] * t] = PINK
    img[tumor_rows[0] * t:tumor_rows[1] * t, tumor_cols[0] * t:tumor_cols[1] * t] = PURPLE
    img += np.random.default_rng(seed).integers(-4, 5, size=img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _in_tumor(slide_id: str, rc) -> bool:
    _, (r0, r1), (c0, c1) = SLIDES[slide_id]
    return r0 <= rc[0] < r1 and c0 <= rc[1] < c1


def _params(root: Path, **sections) -> Params:
    raw = Params().model_dump(mode="json")
    raw["data"]["manifest"] = str(root / "manifest.csv")
    raw["tile"].update(size_px=TILE_PX, mpp=1.0, mask_mpp=8.0, min_object_um2=1000.0,
                       max_hole_um2=0.0, workers=1)
    raw["extractor"].update(arch="small_cnn", crop_px=TILE_PX, workers=0, feature_dim=4)
    raw["featuremap"].update(size=12)
    raw["unet"].update(depth=2, width=4, epochs=3, batch_size=2)
    for name, kv in sections.items():
        raw[name].update(kv)
    return Params.model_validate(raw)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds OpenMP waits, which cost
    seconds per step when other processes hold the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_project(root: Path) -> tuple[Params, Paths]:
    """The three SLIDES written under `root` with ASAP annotations and a manifest, tiled and
    labelled by the real stages (also used by test_timings)."""
    lines = ["slide_id,slide_path,annotation_path,split"]
    for i, (sid, (split, rows, cols)) in enumerate(SLIDES.items()):
        write_pyramidal_tiff(root / f"{sid}.tiff", _slide_rgb(rows, cols, i), mpp=1.0,
                             n_levels=3, tile_px=64)
        x0, x1, y0, y1 = cols[0] * TILE_PX, cols[1] * TILE_PX, rows[0] * TILE_PX, rows[1] * TILE_PX
        write_asap_xml(root / f"{sid}.xml",
                       [np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)])
        lines.append(f"{sid},{sid}.tiff,{sid}.xml,{split}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    params = _params(root)
    paths = Paths(root)
    tile_stage.run(params, paths)
    label_stage.run(params, paths, workers=1)
    return params, paths


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, Params]:
    """Tiled and labelled three-slide project (real tile and label stages)."""
    root = tmp_path_factory.mktemp("baselines")
    params, _ = make_project(root)
    return root, params


def _labels(paths: Paths, sid: str) -> np.ndarray:
    with h5py.File(paths.label_file(sid), "r") as f:
        return np.asarray(f[schema.LABEL][...])


def _pred(paths: Paths, method: str, sid: str) -> tuple[np.ndarray, dict]:
    with h5py.File(paths.prediction_file(method, sid), "r") as f:
        return np.asarray(f[schema.TUMOR_PROB][...]), dict(f.attrs)


def _seg(paths: Paths, sid: str, downsample: int = 8):
    root = paths.root
    return load_seg_image(sid, root / f"{sid}.tiff", paths.tile_file(sid), paths.label_file(sid),
                          downsample)


# -- seg-only: image / target alignment ----------------------------------------------------------


def test_fixture_labels_match_the_painted_tumor(project):
    root, _ = project
    paths = Paths(root)
    for sid in SLIDES:
        idx = read_tile_index(paths.tile_file(sid))
        assert idx.n == 7 * 8  # every tissue tile kept
        want = [schema.LABEL_TUMOR if _in_tumor(sid, rc) else schema.LABEL_NORMAL
                for rc in idx.grid]
        np.testing.assert_array_equal(_labels(paths, sid), want)


@pytest.mark.parametrize("downsample", [8, 4])
def test_seg_image_blocks_align_with_tiles(project, downsample):
    """Tile (r, c)'s k x k block of the image has the colour painted at that tile on the slide,
    and its block of the target is the tile's class; everything else is IGNORE_INDEX."""
    root, _ = project
    paths = Paths(root)
    k = TILE_PX // downsample
    for sid in SLIDES:
        seg = _seg(paths, sid, downsample)
        idx = read_tile_index(paths.tile_file(sid))
        assert seg.px_per_tile == k
        # bounding box of the tiles (rows 1..7, cols 1..8) + one tile of margin, inside the slide
        assert seg.origin_rc == (0, 0)
        assert seg.image.shape == (9 * k, 10 * k, 3)
        assert seg.target.shape == (9 * k, 10 * k)
        r0, c0 = seg.origin_rc
        seen = np.zeros(seg.target.shape, bool)
        for rc, lab in zip(idx.grid, _labels(paths, sid), strict=True):
            ys = slice((rc[0] - r0) * k, (rc[0] - r0 + 1) * k)
            xs = slice((rc[1] - c0) * k, (rc[1] - c0 + 1) * k)
            colour = seg.image[ys, xs].reshape(-1, 3).mean(0)
            painted = PURPLE if _in_tumor(sid, rc) else PINK
            assert np.abs(colour - painted).max() < 12, (sid, rc, colour)
            want = 1 if lab == schema.LABEL_TUMOR else 0
            assert (seg.target[ys, xs] == want).all()
            seen[ys, xs] = True
        assert (seg.target[~seen] == schema.IGNORE_INDEX).all()
        # the margin row/col is glass
        assert np.abs(seg.image[:k].reshape(-1, 3).mean(0) - GLASS).max() < 12


def test_seg_image_rejects_indivisible_downsample(project):
    root, _ = project
    with pytest.raises(SegOnlyError, match=r"a\.h5: tile_size_px 32 is not divisible"):
        _seg(Paths(root), "a", downsample=3)


class _RedIsTumor(nn.Module):
    """Stand-in U-Net: tumor logit = (red channel - 0.5) * 4, normal logit 0."""

    multiple = 4

    def forward(self, x):
        return torch.stack([torch.zeros_like(x[:, 0]), (x[:, 0] - 0.5) * 4], 1)


def test_predict_is_block_mean_of_tumor_probability(project):
    """Every tile gets the mean softmax tumor probability over its own block (computed here
    directly from the image with numpy)."""
    root, _ = project
    paths = Paths(root)
    seg = _seg(paths, "c")
    prob = predict_seg_image(_RedIsTumor(), seg, torch.device("cpu"))
    idx = read_tile_index(paths.tile_file("c"))
    assert prob.shape == (idx.n,) and prob.dtype == np.float32
    red = (seg.image[..., 0] / 255.0 - 0.485) / 0.229  # ImageNet-normalised red channel
    p_px = 1 / (1 + np.exp(-(red - 0.5) * 4))
    k = seg.px_per_tile
    want = [p_px[r * k:(r + 1) * k, c * k:(c + 1) * k].mean() for r, c in idx.grid]
    np.testing.assert_allclose(prob, want, rtol=1e-5, atol=1e-6)
    # tumor (purple, less red) tiles score lower than pink ones with this stand-in
    tumor = np.array([_in_tumor("c", rc) for rc in idx.grid])
    assert prob[tumor].max() < prob[~tumor].min()


# -- seg-only: the stage ---------------------------------------------------------------------------


def test_seg_only_stage_learns_and_is_seeded(project):
    root, params = project
    paths = Paths(root)
    summary = train_seg_only.run(params, paths, TINY)
    first = {sid: _pred(paths, "seg_only", sid) for sid in SLIDES}
    for sid, (prob, attrs) in first.items():
        n = read_tile_index(paths.tile_file(sid)).n
        assert prob.shape == (n,)
        assert np.isfinite(prob).all() and (prob >= 0).all() and (prob <= 1).all()
        assert attrs["method"] == "seg_only" and attrs["slide_id"] == sid
        assert attrs["n_unpredicted"] == 0
        assert attrs["model_sha256"] == sha256_file(paths.models / "seg_only.pt")
    # tumor colour is trivially separable: the test slide's tiles must be ranked right
    prob, _ = first["c"]
    auc = roc_auc_score(_labels(paths, "c"), prob)
    assert auc > 0.95
    report = json.loads((paths.reports / "train_seg_only.json").read_text())
    assert report["px_per_tile"] == 4 and report["n_train_slides"] == 1
    assert report["best_epoch"] == summary["best_epoch"]
    curve = (paths.reports / "train_seg_only.csv").read_text().splitlines()
    assert curve[0] == "epoch,train_loss,val_loss" and len(curve) == 1 + TINY.epochs

    train_seg_only.run(params, paths, TINY)
    for sid in SLIDES:
        np.testing.assert_array_equal(_pred(paths, "seg_only", sid)[0], first[sid][0])


# -- frozen baseline ----------------------------------------------------------------------------


def _features(paths: Paths) -> dict[str, np.ndarray]:
    out = {}
    for sid in SLIDES:
        with h5py.File(paths.feature_file(sid, "frozen"), "r") as f:
            out[sid] = np.asarray(f[schema.FEATURES][...])
    return out


def test_frozen_untrained_with_pretrained_none_and_seeded(project):
    root, params = project
    params = _params(root, extractor={"arch": "resnet18"})  # pretrained: none
    paths = Paths(root)
    summary = train_frozen.run(params, paths)
    assert summary["frozen_extractor"] == "untrained"
    report = json.loads((paths.reports / "train_frozen.json").read_text())
    assert report["frozen_extractor"] == "untrained" and report["extractor_arch"] == "resnet18"
    assert report["frozen_standardized"] is True and report["n_standardization_tiles"] == 56
    feats = _features(paths)
    # standardised on all 56 tiles of the one train slide: exactly mean 0, std 1 there
    np.testing.assert_allclose(feats["a"].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(feats["a"].std(0), 1, rtol=1e-3)
    preds = {sid: _pred(paths, "frozen", sid) for sid in SLIDES}
    for sid, (prob, attrs) in preds.items():
        n = read_tile_index(paths.tile_file(sid)).n
        assert feats[sid].shape == (n, 4) and prob.shape == (n,)
        assert attrs["frozen_extractor"] == "untrained" and attrs["method"] == "frozen"
        assert attrs["frozen_standardized"] == 1
        ok = np.isfinite(prob)
        assert ok.sum() == n - attrs["n_unpredicted"]
        assert ((prob[ok] >= 0) & (prob[ok] <= 1)).all()

    # an identical extractor is not rewritten (its sha256 stays, features stay current)
    sha = sha256_file(paths.models / "frozen_extractor.pt")
    train_frozen.run(params, paths)
    assert sha256_file(paths.models / "frozen_extractor.pt") == sha

    # from scratch: same seed -> same extractor -> same features and predictions
    shutil.rmtree(root / "data" / "features_frozen")
    (paths.models / "frozen_extractor.pt").unlink()
    train_frozen.run(params, paths)
    for sid, f in _features(paths).items():
        np.testing.assert_array_equal(f, feats[sid])
        np.testing.assert_array_equal(_pred(paths, "frozen", sid)[0], preds[sid][0])


def test_fold_standardization_rescales_the_feature_layer():
    torch.manual_seed(0)
    model = build_extractor("small_cnn", 5, "none").eval()
    x = torch.rand(6, 3, 32, 32)
    mean, std = torch.randn(5), torch.rand(5) + 0.1
    with torch.no_grad():
        before = model.features(x)
        train_frozen.fold_standardization(model, mean, std)
        after = model.features(x)
    torch.testing.assert_close(after, (before - mean) / std, rtol=1e-4, atol=1e-5)


def test_frozen_extractor_follows_the_params_and_the_fetched_weights(project, tmp_path,
                                                                     monkeypatch):
    """pretrained=imagenet: the file fetch-weights put in models/pretrained (never whatever
    the torch hub cache holds); pretrained=none: untrained, even with weights in the cache."""
    root, _ = project
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    weights, _ = imagenet_weights_file("resnet18")
    assert weights.is_relative_to(tmp_path)
    weights.parent.mkdir(parents=True)
    torch.manual_seed(123)  # stands in for the real file: torchvision's layout (fc included)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, weights)
    fetched = tmp_path / "pretrained"
    with pytest.raises(ModelError, match="fetch-weights"):  # not fetched: no cache fallback
        train_frozen.frozen_extractor(_params(root, extractor={"arch": "resnet18",
                                                               "pretrained": "imagenet"}),
                                      fetched)
    fetch_weights("resnet18", "imagenet", fetched)
    params = _params(root, extractor={"arch": "resnet18", "pretrained": "imagenet"})
    model, source = train_frozen.frozen_extractor(params, fetched)
    assert source == "imagenet"
    torch.testing.assert_close(model.backbone.conv1.weight, state["conv1.weight"], rtol=0, atol=0)
    # the checkpoint records a frozen encoder (was None, which reloads as "all trainable")
    assert model.encoder_meta()["trainable_blocks"] == 0
    assert not any(q.requires_grad for q in model.backbone.parameters())

    untrained = _params(root, extractor={"arch": "resnet18", "pretrained": "none"})
    model_u, source_u = train_frozen.frozen_extractor(untrained, fetched)
    assert source_u == "untrained"
    assert not torch.equal(model_u.backbone.conv1.weight, state["conv1.weight"])
    assert train_frozen.frozen_source("hf-hub:MahmoodLab/UNI") == "pretrained:MahmoodLab/UNI"


def test_cli_registers_both_stages():
    from pipeline.cli import app

    names = {c.name for c in app.registered_commands}
    assert {"train-seg-only", "train-frozen"} <= names
