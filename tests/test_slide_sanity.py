"""Slide metadata sanity: an implausible mpp, non-square pixels or a tile smaller than one level-0
pixel stop the tile stage and `predict` with one line naming the slide, the value and the fix,
before any output is written.

The absurd slide is a stand-in for openslide-python's `tests/fixtures/boxes.tiff` (the file is
LGPL-2.1 with the rest of that repository, with no separate licence for the test data, so it is
not copied here): written with the same tags -- 300 x 250 px generic tiled TIFF, 64 px deflate
tiles, 4 levels, XResolution = YResolution = 14861707/524288 px/cm (72 dpi), which OpenSlide
reports as 352.78 um/px.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import make_params

from pipeline.params import ParamsError, parse_params
from pipeline.paths import Paths
from pipeline.slide import MPP_XY_TOLERANCE, Slide, SlideError, tile_geometry_for
from pipeline.stages import predict
from pipeline.stages.tile import run as tile_run

BOXES_RESOLUTION = (14861707, 524288)  # px per cm, as stored in boxes.tiff (72 dpi)
BOXES_MPP = 1e4 * 524288 / 14861707  # 352.78 um/px
SYNTH = dict(size_px=128, mpp=0.5, mask_mpp=8.0, min_object_um2=2000.0, max_hole_um2=1000.0,
             workers=1)


def _boxes_rgb(w: int = 300, h: int = 250) -> np.ndarray:
    rgb = np.full((h, w, 3), 255, np.uint8)
    for i, colour in enumerate([(200, 40, 40), (40, 160, 40), (40, 40, 200), (180, 60, 180)]):
        y, x = 20 + 50 * i, 30 + 60 * i
        rgb[y:y + 60, x:x + 80] = colour
    return rgb


def write_tiff(path: Path, rgb: np.ndarray, resolution_x, resolution_y, levels: int = 4) -> Path:
    """Generic tiled TIFF pyramid (deflate + predictor, like boxes.tiff) with the given level-0
    XResolution / YResolution in px per cm; coarser levels keep the same tags, as boxes.tiff."""
    with tifffile.TiffWriter(path) as tif:
        img = rgb
        for i in range(levels):
            tif.write(img, photometric="rgb", tile=(64, 64), compression="adobe_deflate",
                      predictor=True, subfiletype=0 if i == 0 else 1, metadata=None,
                      resolution=(resolution_x, resolution_y), resolutionunit="CENTIMETER")
            img = np.ascontiguousarray(img[::2, ::2])
    return path


@pytest.fixture
def boxes(tmp_path) -> Path:
    return write_tiff(tmp_path / "boxes.tiff", _boxes_rgb(), BOXES_RESOLUTION, BOXES_RESOLUTION)


def _assert_one_line_naming(msg: str, path: Path, *parts: str) -> None:
    assert "\n" not in msg.strip()
    assert str(path) in msg
    for p in parts:
        assert p in msg, (p, msg)


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_boxes_stand_in_has_the_fixture_geometry(boxes):
    with Slide(boxes) as s:
        assert s.dimensions == (300, 250) and len(s.level_dimensions) == 4
        assert s.vendor == "generic-tiff"
        assert s.mpp == pytest.approx(352.7777798, rel=1e-6)
        assert s.mpp == pytest.approx(BOXES_MPP, rel=1e-6)


def test_tile_stage_stops_on_absurd_mpp_before_writing(tmp_path, boxes, write_manifest):
    manifest = write_manifest([("boxes", boxes)])
    params = make_params(manifest, **SYNTH)
    paths = Paths(root=tmp_path / "project")
    with pytest.raises(SlideError) as ei:
        tile_run(params, paths, on_error="fail")
    _assert_one_line_naming(str(ei.value), boxes.resolve(), "352.778 um/px", "0.05-20 um/px",
                            "tile.mpp_range_um", "tile.fallback_mpp", "metadata")
    assert _files_under(paths.tile_file("boxes").parent) == []
    assert _files_under(paths.reports) == []


def test_tile_stage_cli_prints_one_line(tmp_path, boxes, write_manifest):
    manifest = write_manifest([("boxes", boxes)])
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"data:\n  manifest: {manifest}\ntile:\n  size_px: 128\n  mpp: 0.5\n"
                           "  workers: 1\n")
    r = subprocess.run([sys.executable, "-m", "pipeline", "tile", "--params", str(params_file)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, r.stderr
    _assert_one_line_naming(err[0], boxes.resolve(), "352.778", "tile.fallback_mpp")
    assert "Traceback" not in r.stderr
    assert _files_under(tmp_path / "data") == [] and _files_under(tmp_path / "reports") == []


def test_predict_stops_on_absurd_mpp_before_loading_models_or_writing(tmp_path, boxes):
    params = make_params(tmp_path / "unused.csv", **SYNTH)
    out = tmp_path / "out"
    # no models folder at all: the slide check comes first
    with pytest.raises(predict.PredictError) as ei:
        predict.run(params, Paths(root=tmp_path), [boxes], out,
                    models_dir=tmp_path / "no-models")
    _assert_one_line_naming(str(ei.value), boxes.resolve(), "352.778", "tile.fallback_mpp",
                            "--mpp")
    assert not out.exists()
    # an out folder that already exists stays empty
    out.mkdir()
    with pytest.raises(predict.PredictError):
        predict.run(params, Paths(root=tmp_path), [boxes], out, models_dir=tmp_path / "no-models")
    assert _files_under(out) == []


def test_predict_mpp_option_out_of_range_is_an_error(tmp_path, boxes):
    params = make_params(tmp_path / "unused.csv", **SYNTH)
    with pytest.raises(predict.PredictError, match=r"--mpp\) 500 um/px is outside"):
        predict.run(params, Paths(root=tmp_path), [boxes], tmp_path / "o",
                    models_dir=tmp_path / "no-models", mpp=500.0)
    assert not (tmp_path / "o").exists()


def test_fallback_mpp_replaces_rejected_metadata_with_a_warning(tmp_path, boxes, write_manifest,
                                                                caplog):
    tp = make_params(tmp_path / "m.csv", **SYNTH, fallback_mpp=0.25).tile
    with Slide(boxes) as s, caplog.at_level("WARNING", logger="pipeline.slide"):
        geom = tile_geometry_for(s, tp)
    assert geom.mpp_source == "fallback_mpp" and geom.mpp == 0.25 and geom.tile_mpp == 0.5
    assert geom.tile_size_px_level0 == 256.0 and geom.level == 1  # 0.5 / 0.25 = level 1
    assert any("352.778" in r.getMessage() and "fallback_mpp" in r.getMessage()
               for r in caplog.records)


def test_fallback_mpp_outside_the_range_is_an_error(tmp_path, boxes):
    tp = make_params(tmp_path / "m.csv", **SYNTH, fallback_mpp=30.0).tile
    with Slide(boxes) as s, pytest.raises(SlideError, match=r"fallback_mpp.* 30 um/px is outside"):
        tile_geometry_for(s, tp)


def test_tile_smaller_than_one_level0_pixel_is_an_error(tmp_path, boxes):
    # a range widened to accept 352.8 um/px: the tile (128 px at 0.5 um/px = 64 um) still
    # covers 0.18 level-0 px of this slide
    tp = make_params(tmp_path / "m.csv", **SYNTH, mpp_range_um=[0.05, 1000.0]).tile
    with Slide(boxes) as s, pytest.raises(SlideError) as ei:
        tile_geometry_for(s, tp)
    _assert_one_line_naming(str(ei.value), boxes, "covers 0.181 level-0 px", "less than one pixel",
                            "raise tile.mpp")
    # at a coarse enough tile mpp the same slide tiles (1 level-0 px per tile pixel)
    tp = make_params(tmp_path / "m.csv", **{**SYNTH, "mpp": BOXES_MPP},
                     mpp_range_um=[0.05, 1000.0]).tile
    with Slide(boxes) as s:
        geom = tile_geometry_for(s, tp)
    assert geom.mpp_source == "metadata" and geom.level == 0 and geom.read_size_px == 128


@pytest.mark.parametrize("mpp_y, ok", [(0.25 * (1 + MPP_XY_TOLERANCE / 2), True),
                                       (0.25 * (1 + 2 * MPP_XY_TOLERANCE), False),
                                       (0.5, False)])
def test_non_square_pixels_beyond_tolerance_are_an_error(tmp_path, write_manifest, mpp_y, ok):
    path = write_tiff(tmp_path / "rect.tiff", _boxes_rgb(), 1e4 / 0.25, 1e4 / mpp_y, levels=1)
    with Slide(path) as s:
        assert (s.mpp_x, s.mpp_y) == (pytest.approx(0.25), pytest.approx(mpp_y))
    tp = make_params(tmp_path / "m.csv", **SYNTH).tile
    if ok:
        with Slide(path) as s:
            assert tile_geometry_for(s, tp).mpp_source == "metadata"
        return
    manifest = write_manifest([("rect", path)])
    paths = Paths(root=tmp_path / "project")
    with pytest.raises(SlideError) as ei:
        tile_run(make_params(manifest, **SYNTH), paths)
    _assert_one_line_naming(str(ei.value), path.resolve(), "non-square pixels", "mpp-x 0.25",
                            f"mpp-y {mpp_y:g}", "tile.fallback_mpp")
    assert _files_under(paths.root) == []


def test_mpp_range_param_is_validated():
    assert parse_params("").tile.mpp_range_um == (0.05, 20.0)
    assert parse_params("tile:\n  mpp_range_um: [0.1, 2]\n").tile.mpp_range_um == (0.1, 2.0)
    with pytest.raises(ParamsError, match=r"tile\.mpp_range_um"):
        parse_params("tile:\n  mpp_range_um: [20, 0.05]\n")
    with pytest.raises(ParamsError, match=r"tile\.mpp_range_um"):
        parse_params("tile:\n  mpp_range_um: [0.05]\n")
