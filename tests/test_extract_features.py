"""Alignment of the Separate Learning data: the feature stored for tile i is the model's output
on the patch read at coords[i], and the U-Net's prediction for the map cell of tile i comes
back to row i (no off-by-one between tile order, grid, canvas and prediction files)."""

from __future__ import annotations

import h5py
import numpy as np
import torch

from pipeline import extraction
from pipeline.augment import eval_transform, normalize_only
from pipeline.featuremap import build_layouts, place
from pipeline.models import build_extractor, save_checkpoint
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.segment import predict_tiles
from pipeline.slide import Slide
from pipeline.stages import extract_features, label, tile
from pipeline.tileindex import read_tile_index
from pipeline.unet import UNet
from tests.conftest import make_params

SYNTH = dict(size_px=128, mpp=0.5, mask_mpp=8.0, min_object_um2=2000.0, max_hole_um2=1000.0,
             workers=1)
CROP = 112


def _project(tmp_path, write_manifest, slide_path) -> tuple[Params, Paths]:
    raw = make_params(write_manifest([("s1", slide_path)]), **SYNTH).model_dump(mode="json")
    raw["extractor"].update(crop_px=CROP, workers=0)
    params = Params.model_validate(raw)
    paths = Paths(root=tmp_path)
    tile.run(params, paths)
    label.run(params, paths)
    return params, paths


def test_feature_of_tile_i_is_the_model_on_the_patch_at_coords_i(
    tmp_path, write_manifest, synthetic_slide_factory
):
    slide = synthetic_slide_factory()
    params, paths = _project(tmp_path, write_manifest, slide.path)
    torch.manual_seed(0)
    model = build_extractor("small_cnn", 16)
    save_checkpoint(paths.models / "extractor.pt", model,
                    {"params_json": params.section_json("seed", "extractor", "tile")})
    extract_features.run(params, paths)

    with h5py.File(paths.feature_file("s1"), "r") as f:
        feats, probs, coords = f["features"][...], f["tumor_prob"][...], f["coords"][...]
    index = read_tile_index(paths.tile_file("s1"))
    assert np.array_equal(coords, index.coords) and len(feats) == index.n > 3
    model.eval()
    with Slide(slide.path) as s, torch.no_grad():
        for i in (0, index.n // 2, index.n - 1):
            px = torch.from_numpy(s.read_tile(*coords[i], index.geometry).copy()).permute(2, 0, 1)
            f = model.features(eval_transform(CROP)(px)[None])
            p = torch.softmax(model.head(f), 1)[0, 1]
            np.testing.assert_allclose(feats[i], f[0].numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(probs[i], p.item(), rtol=1e-4, atol=1e-6)
    # a different tile's patch gives a different feature (the check above can fail)
    assert not np.allclose(feats[0], feats[index.n - 1], atol=1e-5)

    # rerun: nothing to do; a relabelled slide (same checkpoint bytes) is extracted again and
    # its feature file carries the new labels
    assert extract_features.run(params, paths)["n_extracted"] == 0
    with h5py.File(paths.label_file("s1"), "r+") as f:
        f["label"][0] = 1 - f["label"][0]
        new_label = int(f["label"][0])
    assert extract_features.run(params, paths)["n_extracted"] == 1
    with h5py.File(paths.feature_file("s1"), "r") as f:
        assert int(f["label"][0]) == new_label


def test_unet_prediction_of_tile_i_is_read_at_its_canvas_cell(
    tmp_path, write_manifest, synthetic_slide_factory
):
    slide = synthetic_slide_factory()
    _, paths = _project(tmp_path, write_manifest, slide.path)
    index = read_tile_index(paths.tile_file("s1"))
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(index.n, 16)).astype(np.float32)
    torch.manual_seed(0)
    unet = UNet(in_channels=16, depth=2, width=4).eval()
    (layout,) = build_layouts(index.grid, index.lump_id, 16, "centered", False, 2)
    off_r, off_c = layout.offset_rc
    assert np.array_equal(layout.canvas_rc, index.grid[layout.tile_index] + [off_r, off_c])
    probs = predict_tiles(unet, feats, [layout], torch.device("cpu"))
    with torch.no_grad():
        out = torch.softmax(unet(place(torch.from_numpy(feats[layout.tile_index]),
                                       layout)[None])[0], 0)
    for j in (0, layout.n_tiles // 2, layout.n_tiles - 1):
        i = layout.tile_index[j]
        r, c = index.grid[i]
        assert probs[i] == out[1, r + off_r, c + off_c].item()
    # features moved to another tile change that tile's prediction (the lookup is not constant)
    swapped = feats.copy()
    swapped[[0, -1]] = swapped[[-1, 0]]
    assert not np.allclose(predict_tiles(unet, swapped, [layout], torch.device("cpu")), probs)


def test_loader_batches_are_the_eval_transform_bit_for_bit(
    tmp_path, write_manifest, synthetic_slide_factory
):
    """The extraction loader's HWC centre crops, made model input, equal eval_transform on the
    CHW tile exactly: same crop offsets, same normalisation, contiguous NCHW on CPU."""
    slide = synthetic_slide_factory()
    params, paths = _project(tmp_path, write_manifest, slide.path)
    index = read_tile_index(paths.tile_file("s1"))
    loader = extraction.slides_loader([paths.tile_file("s1")], CROP, workers=0, batch_size=7)
    x, rows, k = next(iter(loader))
    assert k == 0
    assert x.dtype == torch.uint8 and tuple(x.shape) == (7, CROP, CROP, 3)
    got = extraction.model_input(x, torch.device("cpu"), normalize_only())
    assert got.is_contiguous() and tuple(got.shape) == (7, 3, CROP, CROP)
    with Slide(slide.path) as s:
        for b, i in enumerate(rows.tolist()):
            px = torch.from_numpy(s.read_tile(*index.coords[i], index.geometry).copy())
            want = eval_transform(CROP)(px.permute(2, 0, 1))
            assert torch.equal(got[b], want), f"tile {i}"
    # the check can fail: a crop one pixel off is not equal
    shifted = extraction.model_input(torch.roll(x, 1, dims=1), torch.device("cpu"),
                                           normalize_only())
    assert not torch.equal(shifted, got)


def test_slides_split_over_loaders_give_the_same_features(
    tmp_path, write_manifest, synthetic_slide_factory, monkeypatch
):
    slide = synthetic_slide_factory()
    raw = make_params(write_manifest([("s1", slide.path), ("s2", slide.path),
                                      ("s3", slide.path)]), **SYNTH).model_dump(mode="json")
    raw["extractor"].update(crop_px=CROP, workers=0)
    params = Params.model_validate(raw)
    paths = Paths(root=tmp_path)
    tile.run(params, paths)
    label.run(params, paths)
    torch.manual_seed(0)
    save_checkpoint(paths.models / "extractor.pt", build_extractor("small_cnn", 16),
                    {"params_json": params.section_json("seed", "extractor", "tile")})

    def features() -> list[np.ndarray]:
        out = []
        for sid in ("s1", "s2", "s3"):
            with h5py.File(paths.feature_file(sid), "r") as f:
                out.append(f["features"][...])
        return out

    groups = []
    real = extraction._loader_groups
    monkeypatch.setattr(extraction, "_loader_groups",
                        lambda *a: (groups.append(g) or (g, i) for g, i in real(*a)))
    extract_features.run(params, paths)
    one_loader = features()
    assert groups == [["s1", "s2", "s3"]]
    monkeypatch.setattr(extraction, "TILES_PER_LOADER", 1)  # one slide per loader
    groups.clear()
    for sid in ("s1", "s2", "s3"):
        paths.feature_file(sid).unlink()
    extract_features.run(params, paths)
    assert groups == [["s1"], ["s2"], ["s3"]]
    for a, b in zip(one_loader, features(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_infer_slides_yields_every_slide_once_as_it_completes_including_empty_ones(
    monkeypatch,
):
    """The one-batch-behind result loop over interleaved slides (two workers' runs, as
    `slides_loader` streams them): slides without tiles come out first, the others once each
    as their last batch arrives, and each slide's rows hold the model's output on its own
    batches."""
    torch.manual_seed(0)
    model = build_extractor("small_cnn", 16).eval()
    sizes, batch = [3, 0, 5, 0, 4], 2
    gen = torch.Generator().manual_seed(1)
    pixels = [torch.randint(0, 256, (n, CROP, CROP, 3), dtype=torch.uint8, generator=gen)
              for n in sizes]
    # worker A: slide 0, then slide 2's first batch; worker B: the rest of 2, then 4; in turn
    order = [(0, 0), (2, 2), (0, 2), (2, 4), (2, 0), (4, 0), (4, 2)]

    class FakeLoader:
        class dataset:  # noqa: N801 - mimics DataLoader.dataset.sizes
            pass

        dataset.sizes = sizes

        def __iter__(self):
            for k, a in order:
                end = min(a + batch, sizes[k])
                yield extraction.Batch(pixels[k][a:end], torch.arange(a, end), k)

    monkeypatch.setattr(extraction, "slides_loader", lambda *a, **k: FakeLoader())
    monkeypatch.setattr(extraction, "BATCH_SIZE", batch)
    out = list(extraction.infer_slides(model, ["a", "b", "c", "d", "e"], CROP,
                                       torch.device("cpu"), 0))
    assert [k for k, _, _ in out] == [1, 3, 0, 2, 4]
    assert [len(f) for _, f, _ in sorted(out, key=lambda r: r[0])] == sizes
    out.sort(key=lambda r: r[0])
    with torch.no_grad():
        for (_, feats, probs), px in zip(out, pixels, strict=True):
            if len(px) == 0:
                continue
            x = extraction.model_input(px, torch.device("cpu"), normalize_only())
            f = model.features(x)
            np.testing.assert_allclose(feats, f.numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(probs, torch.softmax(model.head(f), 1)[:, 1].numpy(),
                                       rtol=1e-5, atol=1e-6)
