"""The `predict` command and the exact tile-mask vectoriser.

Vectoriser: hand-drawn grids with known outlines (L shape, hole, island in a hole, diagonal
touches, pinches), and random masks checked by rasterising the polygons back.
Exports: the GeoJSON / ASAP XML written for a tile pattern are read back by our own annotation
readers and rasterised by the label stage's helpers; the tumor tiles must be exactly the
predicted ones (on integer and non-integer tile pitches).
Command: synthetic slides (tissue = tiles rows 1-8 x cols 1-8 of 64 level-0 px at 1 um/px),
tiny untrained models; a known probability pattern is injected for the numeric checks (area,
lesions, diameter, class by hand); corrupt slides / folders with --on-error fail and skip.
"""

from __future__ import annotations

import json
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import GLASS_RGB, TISSUE_RGB
from PIL import Image
from typer.testing import CliRunner

from pipeline import schema
from pipeline.annotations import read_annotation
from pipeline.augment import eval_transform
from pipeline.cli import app, main
from pipeline.labeling import assign_labels, tile_fractions, tile_raster
from pipeline.models import build_extractor, save_checkpoint, training_settings
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.predict import export, infer
from pipeline.predict import slide as predict_slide
from pipeline.slide import Slide
from pipeline.stages import predict
from pipeline.tiff import write_pyramidal_tiff
from pipeline.unet import UNet
from pipeline.vectorize import (
    asap_exclusions,
    mask_polygons,
    polygons_to_mask,
    rasterize_grid,
    rectangles,
    ring_area,
    trace_rings,
)

# -- vectoriser on hand-drawn grids ------------------------------------------------------------


def _m(rows: list[str]) -> np.ndarray:
    return np.array([[ch == "#" for ch in r] for r in rows], dtype=bool)


def test_l_shape_is_one_exact_outline():
    mask = _m(["#..",
               "#..",
               "###"])
    polys, regions = mask_polygons(mask)
    assert len(polys) == 1 and polys[0].holes == ()
    # corners only, starting at the smallest (y, x), interior on the right (y down)
    assert polys[0].exterior.tolist() == [[0, 0], [1, 0], [1, 2], [3, 2], [3, 3], [0, 3]]
    assert ring_area(polys[0].exterior) == 5.0
    np.testing.assert_array_equal(regions, mask.astype(np.int32))


def test_hole_is_an_interior_ring_and_an_island_in_it_is_its_own_polygon():
    mask = _m(["#####",
               "#...#",
               "#.#.#",
               "#...#",
               "#####"])
    polys, regions = mask_polygons(mask)
    assert [(p.region, p.part) for p in polys] == [(1, 1), (2, 2)]
    ring, island = polys
    assert ring.exterior.tolist() == [[0, 0], [5, 0], [5, 5], [0, 5]]
    assert [h.tolist() for h in ring.holes] == [[[1, 1], [1, 4], [4, 4], [4, 1]]]
    assert ring_area(ring.holes[0]) == -9.0
    assert island.exterior.tolist() == [[2, 2], [3, 2], [3, 3], [2, 3]] and island.holes == ()
    np.testing.assert_array_equal(polygons_to_mask(polys, mask.shape), mask)
    # ASAP: an exclusion of the whole hole would erase the island; the hole's background tiles
    # are covered by rectangles instead: row 1 (3 tiles), row 2 left and right, row 3
    excl = asap_exclusions(polys, mask)
    assert sorted(e.tolist() for e in excl) == sorted([
        [[1, 1], [4, 1], [4, 2], [1, 2]], [[1, 2], [2, 2], [2, 3], [1, 3]],
        [[3, 2], [4, 2], [4, 3], [3, 3]], [[1, 3], [4, 3], [4, 4], [1, 4]]])
    tumor = rasterize_grid([p.exterior for p in polys], mask.shape) & ~rasterize_grid(
        excl, mask.shape)
    np.testing.assert_array_equal(tumor, mask)


def test_diagonal_tiles_are_one_region_of_two_square_parts():
    mask = _m(["#.",
               ".#"])
    polys, regions = mask_polygons(mask)
    assert [(p.region, p.part) for p in polys] == [(1, 1), (1, 2)]
    assert polys[0].exterior.tolist() == [[0, 0], [1, 0], [1, 1], [0, 1]]
    assert polys[1].exterior.tolist() == [[1, 1], [2, 1], [2, 2], [1, 2]]
    assert regions.tolist() == [[1, 0], [0, 1]]


@pytest.mark.parametrize("rows, n_holes", [
    ([".##", "#.#", "###"], 1),  # pocket open at a corner: hole touching the outline at a point
    (["####", "#.##", "##.#", "####"], 2),  # two holes touching at a point
])
def test_pinches_give_simple_rings(rows, n_holes):
    mask = _m(rows)
    polys, _ = mask_polygons(mask)
    assert len(polys) == 1 and len(polys[0].holes) == n_holes
    for ring in (polys[0].exterior, *polys[0].holes):
        assert len({tuple(v) for v in ring.tolist()}) == len(ring)  # no vertex twice
    np.testing.assert_array_equal(polygons_to_mask(polys, mask.shape), mask)


def test_random_masks_round_trip_and_areas_add_up():
    rng = np.random.default_rng(0)
    for _ in range(150):
        shape = tuple(rng.integers(1, 14, size=2))
        mask = rng.random(shape) < rng.uniform(0.2, 0.8)
        polys, regions = mask_polygons(mask)
        np.testing.assert_array_equal(polygons_to_mask(polys, mask.shape), mask)
        excl = asap_exclusions(polys, mask)
        asap = rasterize_grid([p.exterior for p in polys], shape) & ~rasterize_grid(excl, shape)
        np.testing.assert_array_equal(asap, mask)
        # shoelace areas (a different route than rasterising) add up to the tile count
        total = sum(ring_area(p.exterior) + sum(ring_area(h) for h in p.holes) for p in polys)
        assert total == mask.sum()
        assert all(ring_area(r) != 0 for r, _ in trace_rings(mask))
        assert {p.region for p in polys} == set(np.unique(regions[mask]).tolist())


def test_rectangles_cover_exactly_and_disjointly():
    mask = _m(["##.#", "##.#", "####"])
    rects = rectangles(mask)
    cover = np.zeros(mask.shape, int)
    for r in rects:
        cover += rasterize_grid([r], mask.shape)
    np.testing.assert_array_equal(cover, mask.astype(int))


# -- exports read back by our own readers and the label stage --------------------------------

PATTERN = _m(["#####...",   # ring with a hole and an island (region 1 and 2) ...
              "#...#...",
              "#.#.#...",
              "#...#...",
              "#####...",
              ".....#..",   # ... a tile touching the ring diagonally (region 1, second part)
              ".#......",   # an L (region 3)
              ".##....#"])  # a single tile (region 4)


def _label_tumor(annotation_path: Path, coords, grid, tile_px: int, pitch: float) -> np.ndarray:
    """Tiles the label stage calls tumor from an annotation file (tumor fraction > 0.2)."""
    raster = tile_raster(coords, grid, tile_px, pitch, raster_subsample=8)
    tumor_f, normal_f = tile_fractions(read_annotation(annotation_path), raster)
    return assign_labels(tumor_f, normal_f, 0.2, 0.8) == schema.LABEL_TUMOR


@pytest.mark.parametrize("pitch", [256.0, 100.6])
def test_written_regions_rasterise_back_to_the_predicted_tiles(tmp_path, pitch):
    rng = np.random.default_rng(1)
    for k, tumor in enumerate([PATTERN, rng.random((9, 11)) < 0.45]):
        rows, cols = tumor.shape
        grid = np.argwhere(np.ones_like(tumor)).astype(np.int64)  # every tile has tissue
        coords = np.rint(grid[:, ::-1] * pitch).astype(np.int64)  # as the tile stage does
        heat = np.where(tumor, 0.9, 0.1).astype(np.float32)
        gj, xml = tmp_path / f"{k}.geojson", tmp_path / f"{k}.xml"
        lesions, _ = export.write_regions(gj, xml, tumor, heat, pitch, pitch * 0.5,
                                           np.zeros(2))
        expected = tumor[grid[:, 0], grid[:, 1]]
        for path in (gj, xml):
            np.testing.assert_array_equal(_label_tumor(path, coords, grid, 64, pitch), expected)
        assert sum(les["n_tiles"] for les in lesions) == tumor.sum()


def test_no_predicted_tumor_writes_empty_files_our_readers_accept(tmp_path):
    tumor = np.zeros((3, 4), bool)
    gj, xml = tmp_path / "e.geojson", tmp_path / "e.xml"
    lesions, shapes = export.write_regions(gj, xml, tumor, np.full((3, 4), 0.1, np.float32),
                                            256.0, 128.0, np.zeros(2))
    assert lesions == [] and shapes == []
    for path in (gj, xml):
        ann = read_annotation(path)
        assert ann.tumor == [] and ann.exclusion == []


# -- the command on synthetic slides -----------------------------------------------------------

TILE_PX = 64  # = level-0 px at 1 um/px
TISSUE = (1, 9)  # tissue tile rows / cols [1, 9)


def _slide_rgb(seed: int = 0) -> np.ndarray:
    size = 10 * TILE_PX + 40  # 10 x 10 tile grid, a margin under one tile
    img = np.empty((size, size, 3), np.int16)
    img[:] = GLASS_RGB
    a, b = TISSUE[0] * TILE_PX, TISSUE[1] * TILE_PX
    img[a:b, a:b] = TISSUE_RGB
    img += np.random.default_rng(seed).integers(-4, 5, size=img.shape, dtype=np.int16)
    # some texture so that tiles differ for the models
    img[a:b, a:b] += (np.arange(b - a)[:, None] % 17).astype(np.int16)[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("predict_slides")
    out = {"a": d / "slide_a.tiff", "b": d / "slide_b.tiff", "nompp": d / "slide_nompp.tiff",
           "corrupt": d / "corrupt.tiff", "folder": d / "folder.tiff"}
    write_pyramidal_tiff(out["a"], _slide_rgb(0), mpp=1.0, n_levels=2)
    write_pyramidal_tiff(out["b"], _slide_rgb(1), mpp=1.0, n_levels=2)
    write_pyramidal_tiff(out["nompp"], _slide_rgb(2), mpp=None, n_levels=2)
    out["corrupt"].write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    out["folder"].mkdir()
    return out


def save_models(d: Path, params: Params, unet_params: Params | None = None) -> Path:
    """Untrained small models recording the settings of `params` (the U-Net: `unet_params`):
    extractor (8-d features) + U-Net (depth 2), and perturbed e2e copies (other sha256)."""
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ext = build_extractor("small_cnn", feature_dim=8)
    unet = UNet(in_channels=8, depth=2, width=4)
    meta = {"settings": training_settings(params.model_dump(mode="json"))}
    unet_meta = {"settings": training_settings((unet_params or params).model_dump(mode="json"))}
    save_checkpoint(d / "extractor.pt", ext, meta)
    save_checkpoint(d / "unet.pt", unet, unet_meta)
    with torch.no_grad():
        ext.feature.bias.add_(0.01)
        unet.head.bias.add_(0.01)
    save_checkpoint(d / "e2e_extractor.pt", ext, meta)
    save_checkpoint(d / "e2e_unet.pt", unet, unet_meta)
    return d


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return save_models(tmp_path_factory.mktemp("predict_models"), _params())


def _params(**featuremap) -> Params:
    raw = Params().model_dump(mode="json")
    raw["tile"].update(size_px=TILE_PX, mpp=1.0, mask_mpp=8.0, min_object_um2=2000.0,
                       max_hole_um2=500.0, workers=1)
    raw["extractor"].update(crop_px=TILE_PX, workers=0, feature_dim=8)
    raw["featuremap"].update({"size": 8, **featuremap})
    raw["unet"].update(depth=2, width=4)
    return Params.model_validate(raw)


def _params_file(tmp_path: Path, params: Params) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps(params.model_dump(mode="json")))  # JSON is YAML 1.2
    return path


def _pattern_probs(models, index, params, workers):
    """Stand-in for the models: PATTERN (placed on the tissue tiles) -> 0.9 / 0.1, with a tile
    exactly at the threshold (tumor) and one just below it (not tumor)."""
    heat = np.full((10, 10), 0.1, np.float32)
    heat[TISSUE[0]:TISSUE[1], TISSUE[0]:TISSUE[1]][PATTERN] = 0.9
    heat[1, 1] = 0.5  # ring corner: >= threshold 0.5 counts
    heat[6, 6] = 0.7  # the diagonal tile of region 1
    heat[2, 8] = 0.49  # below threshold
    return infer.TileProbs(heat[index.grid[:, 0], index.grid[:, 1]], None)


def test_known_pattern_end_to_end(tmp_path, slides, models_dir, monkeypatch):
    monkeypatch.setattr(predict_slide, "predict_tile_probs", _pattern_probs)
    out = tmp_path / "out"
    args = ["predict", str(slides["a"]), "--out", str(out), "--models", str(models_dir),
            "--params", str(_params_file(tmp_path, _params()))]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    folder = out / "slide_a"
    s = json.loads((folder / "slide_a.summary.json").read_text())
    pitch_um = 64.0
    n_tumor = int(PATTERN.sum())  # 22 tiles
    assert s["method"] == "e2e" and s["n_tiles"] == 64 and s["n_tumor_tiles"] == n_tumor == 22
    assert s["tumor_area_mm2"] == pytest.approx(n_tumor * pitch_um**2 / 1e6)
    assert s["n_lesions"] == 4
    # largest lesion: ring + diagonal tile, farthest centres (0,0)-(5,5): (sqrt(50) + 1) tiles
    assert s["largest_lesion_diameter_um"] == pytest.approx((math.sqrt(50) + 1) * pitch_um)
    assert s["camelyon17_class"] == "micro"  # 516 um: > 200, <= 2000
    les = {x["id"]: x for x in s["lesions"]}
    assert [les[k]["n_tiles"] for k in (1, 2, 3, 4)] == [17, 1, 3, 1]
    assert les[1]["n_parts"] == 2
    assert les[1]["probability_max"] == pytest.approx(0.9)
    assert les[1]["probability_mean"] == pytest.approx((15 * 0.9 + 0.5 + 0.7) / 17, rel=1e-6)
    assert les[1]["area_um2"] == pytest.approx(17 * pitch_um**2)

    with h5py.File(folder / "slide_a.heatmap.h5") as f:
        heat = f[schema.TUMOR_PROB][...]
        coords, grid, tile_prob = f[schema.COORDS][...], f[schema.GRID][...], f["tile_prob"][...]
        assert f.attrs["method"] == "e2e" and f.attrs["tile_size_px_level0"] == 64.0
        assert f.attrs["mpp"] == 1.0
    assert heat.shape == (10, 10) and heat.dtype == np.float32
    tissue = np.zeros((10, 10), bool)
    tissue[TISSUE[0]:TISSUE[1], TISSUE[0]:TISSUE[1]] = True
    assert np.isnan(heat[~tissue]).all() and np.isfinite(heat[tissue]).all()
    np.testing.assert_array_equal(heat[grid[:, 0], grid[:, 1]], tile_prob)
    np.testing.assert_array_equal(coords, grid[:, ::-1] * 64)

    # both exports -> our readers -> label-stage rasterisation == predicted tiles
    predicted = tile_prob >= 0.5
    for name in ("slide_a.tumor.geojson", "slide_a.tumor.xml"):
        np.testing.assert_array_equal(_label_tumor(folder / name, coords, grid, 64, 64.0),
                                      predicted)
    gj = json.loads((folder / "slide_a.tumor.geojson").read_text())
    assert len(gj["features"]) == 5  # ring (with its hole), diagonal part, island, L, single
    assert {f["properties"]["classification"]["name"] for f in gj["features"]} == {"Tumor"}
    ring = gj["features"][0]
    assert ring["properties"]["id"] == 1 and len(ring["geometry"]["coordinates"]) == 2
    assert ring["geometry"]["coordinates"][0][:4] == [[64, 64], [384, 64], [384, 384], [64, 384]]
    groups = [a.get("PartOfGroup") for a in ET.parse(folder / "slide_a.tumor.xml").iter(
        "Annotation")]
    assert groups.count("_0") == 5 and groups.count("_2") == 4  # the hole around the island
    with Image.open(folder / "slide_a.heatmap.png") as im:
        assert im.format == "PNG" and min(im.size) > 300

    # rerun: the summary is current, nothing is rewritten
    mtime = (folder / "slide_a.summary.json").stat().st_mtime_ns
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "1 current" in res.output
    assert (folder / "slide_a.summary.json").stat().st_mtime_ns == mtime
    assert not list(out.glob(".work-*"))  # work files are gone


def test_real_models_auto_picks_e2e_switches_to_full_and_classifier_matches(
        tmp_path, slides, models_dir):
    # canvas 4 x 4 < the 8 x 8 tissue tiles: centered would drop tiles -> mode full
    params = _params(size=4)
    small_canvas = save_models(tmp_path / "m4", params)
    s = predict.run(params, Paths(root=tmp_path), [slides["a"], slides["b"]], tmp_path / "o",
                    models_dir=small_canvas)
    assert s["method"] == "e2e" and s["n_predicted"] == 2 and s["n_failed"] == 0
    summ = json.loads((tmp_path / "o/slide_a/slide_a.summary.json").read_text())
    assert summ["featuremap_mode"] == "full" and summ["n_unpredicted"] == 0
    assert any("featuremap.mode=full" in w for w in summ["warnings"])
    assert summ["model_sha256"]["unet"] != summ["model_sha256"]["extractor"]

    # classifier: tile_prob is the extractor's softmax on the tile pixels, computed here by
    # another route (Slide.read_tile, no DataLoader)
    predict.run(params, Paths(root=tmp_path), [slides["a"]], tmp_path / "c",
                models_dir=models_dir, method="classifier")
    with h5py.File(tmp_path / "c/slide_a/slide_a.heatmap.h5") as f:
        coords, tile_prob = f[schema.COORDS][...], f["tile_prob"][...]
        assert f.attrs["method"] == "classifier" and f.attrs["unet_sha256"] == ""
    model = predict.load_models(models_dir, "classifier", torch.device("cpu")).extractor
    tf = eval_transform(TILE_PX)
    with Slide(slides["a"]) as sl:
        geom = sl.tile_geometry(TILE_PX, 1.0)
        x = torch.stack([tf(torch.from_numpy(sl.read_tile(int(cx), int(cy), geom)).permute(
            2, 0, 1)) for cx, cy in coords])
    with torch.no_grad():
        expected = torch.softmax(model(x), 1)[:, 1].numpy()
    np.testing.assert_allclose(tile_prob, expected, atol=1e-5)


def test_method_resolution(tmp_path, models_dir):
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(predict.PredictError, match="no models found"):
        predict.resolve_method(d, "auto")
    (d / "extractor.pt").write_bytes((models_dir / "extractor.pt").read_bytes())
    assert predict.resolve_method(d, "auto") == "classifier"
    (d / "unet.pt").write_bytes((models_dir / "unet.pt").read_bytes())
    (d / "e2e_extractor.pt").write_bytes((models_dir / "e2e_extractor.pt").read_bytes())
    assert predict.resolve_method(d, "auto") == "separate"  # e2e needs both files
    with pytest.raises(Exception, match="e2e_unet.pt: checkpoint not found"):
        predict.load_models(d, "e2e", torch.device("cpu"))


def test_skip_mode_completes_good_slides_and_lists_bad_ones(tmp_path, slides, models_dir,
                                                            monkeypatch):
    monkeypatch.setattr(predict_slide, "predict_tile_probs", _pattern_probs)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [
        "predict", str(slides["corrupt"]), str(slides["a"]), str(slides["folder"]),
        "--out", str(out), "--models", str(models_dir), "--on-error", "skip",
        "--params", str(_params_file(tmp_path, _params()))])
    assert res.exit_code == 0, res.output
    assert (out / "slide_a" / "slide_a.summary.json").is_file()
    fails = pd.read_csv(out / "predict_failures.csv")
    assert sorted(fails["slide_path"]) == sorted([str(slides["corrupt"]), str(slides["folder"])])
    assert sorted(fails["slide_id"]) == ["corrupt", "folder"]
    msgs = dict(zip(fails["slide_path"], fails["error"], strict=True))
    # the slide reader's own one-line cause, after the path
    assert msgs[str(slides["corrupt"])].startswith(f"{slides['corrupt']}: ")
    assert len(msgs[str(slides["corrupt"])]) > len(str(slides["corrupt"])) + 10
    assert "is a directory" in msgs[str(slides["folder"])]
    assert not (out / "corrupt").exists() and not (out / "folder").exists()


@pytest.mark.parametrize("bad, cause", [("corrupt", ""), ("folder", "is a directory")])
def test_fail_mode_exits_nonzero_with_one_line_naming_the_file(tmp_path, slides, models_dir,
                                                               monkeypatch, capsys, bad, cause):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "pipeline", "predict", str(slides["a"]), str(slides[bad]), "--out", str(out),
        "--models", str(models_dir), "--params", str(_params_file(tmp_path, _params()))])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {slides[bad]}: ")
    assert cause in lines[0] and len(lines[0]) > len(f"error: {slides[bad]}: ") + 10
    assert "Traceback" not in err
    assert not (out / "slide_a").exists()  # paths are checked before any work


def test_slide_without_mpp_uses_the_mpp_option_else_reports_unknown_sizes(
        tmp_path, slides, models_dir, monkeypatch):
    monkeypatch.setattr(predict_slide, "predict_tile_probs", _pattern_probs)
    params = _params()
    s = predict.run(params, Paths(root=tmp_path), [slides["nompp"]], tmp_path / "o",
                    models_dir=models_dir, mpp=1.0)
    summ = json.loads((tmp_path / "o/slide_nompp/slide_nompp.summary.json").read_text())
    assert s["n_predicted"] == 1 and summ["mpp_source"] == "fallback_mpp"
    assert summ["mpp"] == 1.0 and summ["tumor_area_mm2"] == pytest.approx(22 * 64**2 / 1e6)
    assert any("--mpp" in w for w in summ["warnings"])

    predict.run(params, Paths(root=tmp_path), [slides["nompp"]], tmp_path / "u",
                models_dir=models_dir)
    summ = json.loads((tmp_path / "u/slide_nompp/slide_nompp.summary.json").read_text())
    assert summ["mpp_source"] == "unknown" and summ["mpp"] is None
    assert summ["tumor_area_mm2"] is None and summ["camelyon17_class"] is None
    assert summ["n_tumor_tiles"] == 22  # the tile grid itself is the same (64 px at level 0)
    assert summ["largest_lesion_diameter_px_level0"] == pytest.approx((math.sqrt(50) + 1) * 64)

    # --mpp does not override metadata; the summary says so
    predict.run(params, Paths(root=tmp_path), [slides["a"]], tmp_path / "m",
                models_dir=models_dir, mpp=0.5)
    summ = json.loads((tmp_path / "m/slide_a/slide_a.summary.json").read_text())
    assert summ["mpp"] == 1.0 and summ["mpp_source"] == "metadata"
    assert any("metadata was used" in w for w in summ["warnings"])


def test_bad_arguments_are_one_line_errors(tmp_path, slides, models_dir):
    params = _params()
    twin = tmp_path / "x" / "slide_a.tiff"
    twin.parent.mkdir()
    twin.write_bytes(slides["a"].read_bytes())
    with pytest.raises(predict.PredictError, match="same name as"):
        predict.run(params, Paths(root=tmp_path), [slides["a"], twin], tmp_path / "o",
                    models_dir=models_dir)
    with pytest.raises(predict.PredictError, match="--mpp must be a positive"):
        predict.run(params, Paths(root=tmp_path), [slides["a"]], tmp_path / "o",
                    models_dir=models_dir, mpp=0.0)
    with pytest.raises(predict.PredictError, match="models folder not found"):
        predict.run(params, Paths(root=tmp_path), [slides["a"]], tmp_path / "o",
                    models_dir=tmp_path / "nope")


def test_worker_errors_are_reduced_to_their_original_line():
    from pipeline.slide import SlideError

    # what torch's DataLoader re-raises from a worker: the same type, a traceback as text
    exc = SlideError("Caught SlideError in DataLoader worker process 0.\nOriginal Traceback "
                     "(most recent call last):\n  File \"x.py\", line 1, in f\n"
                     "pipeline.slide.SlideError: /s/a.tiff: read_region failed at (0, 0): bad\n")
    one = predict._one_line(exc, Path("/s/a.tiff"))
    assert one == "/s/a.tiff: read_region failed at (0, 0): bad"
    assert predict._one_line(ValueError("boom"), Path("/s/b.tiff")) == "/s/b.tiff: ValueError: boom"


# -- models carry their settings -----------------------------------------------------------------


def _half_mpp_slide(tmp_path: Path) -> Path:
    """The usual tissue square on a 0.5 um/px slide: 64 level-0 px tiles at 0.5 um/px."""
    path = tmp_path / "slide_half.tiff"
    write_pyramidal_tiff(path, _slide_rgb(3), mpp=0.5, n_levels=2)
    return path


def _at_mpp(params: Params, mpp: float) -> Params:
    return params.model_copy(update={"tile": params.tile.model_copy(update={"mpp": mpp})})


def test_models_run_at_their_training_mpp_whatever_the_params_say(tmp_path, caplog):
    """A model trained at 0.5 um/px run with params saying 1.0 (the demo's) predicts at 0.5."""
    models = save_models(tmp_path / "m", _at_mpp(_params(), 0.5))
    demo = _at_mpp(_params(), 1.0)
    with caplog.at_level("INFO", logger="pipeline.predict"):
        s = predict.run(demo, Paths(root=tmp_path), [_half_mpp_slide(tmp_path)],
                        tmp_path / "o", models_dir=models)
    assert s["settings"]["tile.mpp"] == 0.5
    summ = json.loads((tmp_path / "o/slide_half/slide_half.summary.json").read_text())
    assert summ["tile_mpp"] == 0.5 and summ["tile_size_px_level0"] == 64.0
    assert summ["n_tiles"] == 64  # at 1.0 um/px it would be 16 tiles of 128 level-0 px
    assert "tile.mpp is 1.0 in the params but the models were trained with 0.5" in caplog.text


def test_a_flag_contradicting_the_models_is_an_error_naming_both_values(tmp_path, slides):
    models = save_models(tmp_path / "m", _at_mpp(_params(), 0.5))
    args = ["predict", str(slides["a"]), "--out", str(tmp_path / "o"), "--models", str(models),
            "--params", str(_params_file(tmp_path, _params()))]
    res = CliRunner().invoke(app, [*args, "--tile-mpp", "1.0"])
    assert res.exit_code != 0
    assert isinstance(res.exception, predict.PredictError)
    assert str(res.exception) == ("--tile-mpp 1.0 but the models were trained with tile.mpp "
                                  "0.5")
    with pytest.raises(predict.PredictError, match="--featuremap-size 16 but the models were "
                       "trained with featuremap.size 8"):
        predict.run(_params(), Paths(root=tmp_path), [slides["a"]], tmp_path / "o",
                    models_dir=models, flags={"--featuremap-size": 16})
    # a flag that agrees is fine
    s = predict.run(_params(), Paths(root=tmp_path), [slides["a"]], tmp_path / "o",
                    models_dir=models, method="classifier", flags={"--tile-mpp": 0.5})
    assert s["n_predicted"] == 1


def test_a_checkpoint_without_settings_is_a_one_line_error(tmp_path, slides):
    d = save_models(tmp_path / "m", _params())
    ckpt = torch.load(d / "extractor.pt", weights_only=True)
    del ckpt["meta"]["settings"]  # what every checkpoint looked like before settings
    torch.save(ckpt, d / "extractor.pt")
    with pytest.raises(Exception, match=r"extractor.pt: checkpoint of an older schema: it does "
                       r"not record the settings") as err:
        predict.run(_params(), Paths(root=tmp_path), [slides["a"]], tmp_path / "o",
                    models_dir=d, method="classifier")
    assert "\n" not in str(err.value)


def test_extractor_and_unet_trained_at_different_scales_are_refused(tmp_path, slides):
    d = save_models(tmp_path / "m", _params(), unet_params=_at_mpp(_params(), 2.0))
    with pytest.raises(predict.PredictError, match=r"unet.pt was trained on features of tile.mpp "
                       r"2.0, .*extractor.pt on 1.0"):
        predict.run(_params(), Paths(root=tmp_path), [slides["a"]], tmp_path / "o",
                    models_dir=d, method="separate")


def test_one_diameter_measurement_gives_both_units_and_the_class():
    # predict measures the largest lesion once, at pitch 1, and scales it to um and level-0 px:
    # the same floats and class as slide_class_from_mask at each pitch
    from pipeline.camelyon import slide_class_from_mask, slide_class_of_diameter

    rng = np.random.default_rng(3)
    for _ in range(30):
        grid = rng.random((12, 15)) < rng.uniform(0.0, 0.3)
        pitch_um, pitch_px = rng.uniform(10, 300), rng.uniform(40, 1200)
        tiles = slide_class_from_mask(grid, 1.0)[1]
        cls, um = slide_class_from_mask(grid, pitch_um)
        assert float(tiles * pitch_um) == um
        assert float(tiles * pitch_px) == slide_class_from_mask(grid, pitch_px)[1]
        assert cls == (slide_class_of_diameter(um) if grid.any() else "negative")
