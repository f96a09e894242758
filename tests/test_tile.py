"""The `tile` stage and the tissue mask: exact grids on slides of known geometry, the real Aperio
file, failures named per slide, reruns that skip current outputs and rewrite damaged ones."""

from __future__ import annotations

import json
import logging
import math
import sys
import types

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import GLASS_RGB, TISSUE_RGB, make_params

from pipeline.errors import PipelineError
from pipeline.io import h5_is_current
from pipeline.paths import Paths
from pipeline.schema import TILE_ATTRS
from pipeline.slide import Slide, SlideError
from pipeline.stages.tile import run
from pipeline.tileindex import TileIndexError, read_tile_index
from pipeline.tiling import NoTissueError, grid_positions
from pipeline.tissue import SATURATION_FLOOR, box_fractions, compute_tissue_mask

# tile params matching the synthetic slide: 128 px tiles at 0.5 um/px, mask at 8 um/px
SYNTH = dict(size_px=128, mpp=0.5, mask_mpp=8.0, min_object_um2=2000.0, max_hole_um2=1000.0,
             workers=1)


def _tile(tmp_path, write_manifest, slides, on_error="fail", **tile):
    manifest = write_manifest([(sid, s.path if hasattr(s, "path") else s) for sid, s in slides])
    params = make_params(manifest, **{**SYNTH, **tile})
    paths = Paths(root=tmp_path)
    return run(params, paths, on_error=on_error), params, paths


def _as_dict(idx):
    return {tuple(g): int(lump) for g, lump in zip(idx.grid.tolist(), idx.lump_id, strict=True)}


# -- tissue mask -------------------------------------------------------------------------------


def test_tissue_mask_fills_small_holes_removes_specks_and_ignores_dark_and_grey():
    rgb = np.empty((100, 100, 3), np.uint8)
    rgb[:] = GLASS_RGB
    rgb[10:50, 10:50] = TISSUE_RGB  # 40 x 40 px tissue = 1600 um^2 at 1 um/px
    rgb[20:24, 20:24] = GLASS_RGB  # 16 px hole: filled (max_hole 50)
    rgb[30:40, 30:40] = GLASS_RGB  # 100 px hole: kept
    rgb[80:83, 80:83] = TISSUE_RGB  # 9 px speck: removed (min_object 50)
    rgb[60:90, 5:40] = (10, 2, 3)  # near-black, saturated by noise: not tissue
    rgb[5:40, 60:95] = (150, 150, 150)  # grey: not tissue
    tm = compute_tissue_mask(rgb, 1.0, 1.0, 1.0, min_object_um2=50, max_hole_um2=50)
    expected = np.zeros((100, 100), bool)
    expected[10:50, 10:50] = True
    expected[30:40, 30:40] = False
    np.testing.assert_array_equal(tm.mask, expected)
    assert tm.n_components == 1 and set(np.unique(tm.labels)) == {0, 1}


def test_tissue_mask_on_glass_only_is_empty_despite_noise():
    rng = np.random.default_rng(1)
    rgb = np.clip(np.array(GLASS_RGB) + rng.integers(-4, 5, (64, 64, 3)), 0, 255).astype(np.uint8)
    tm = compute_tissue_mask(rgb, 1.0, 1.0, 1.0, 0, 0)
    assert tm.threshold == SATURATION_FLOOR and tm.otsu_threshold < SATURATION_FLOOR
    assert not tm.mask.any() and tm.n_components == 0


def test_box_fractions_are_exact_area_integrals():
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = True
    # box [0.5, 2.5) x [0.75, 1.75): covers 0.75 of pixel (1, 1) -> 0.75 / 2.0
    f = box_fractions(mask, np.array([0.5, 2.0]), np.array([0.75, 0.0]), 2.0, 1.0)
    np.testing.assert_allclose(f, [0.375, 0.0])


def test_grid_positions_round_a_fractional_pitch():
    grid, coords, rows, cols = grid_positions(2220, 2967, 513.0260521042084)
    assert (rows, cols) == (5, 4)  # floor(2967 / 513.03), floor(2220 / 513.03)
    assert grid[:3].tolist() == [[0, 0], [0, 1], [0, 2]]
    assert coords[5].tolist() == [513, 513]  # row 1, col 1
    assert coords[-1].tolist() == [round(3 * 513.0260521042084), round(4 * 513.0260521042084)]


# -- exact grids on generated slides -----------------------------------------------------------


@pytest.mark.parametrize("min_tissue", [0.8, 0.6])
def test_synthetic_slide_exact_grid_and_lumps(tmp_path, write_manifest, synthetic_slide,
                                              min_tissue):
    s = synthetic_slide
    summary, params, paths = _tile(tmp_path, write_manifest, [("s1", s)], min_tissue=min_tissue)
    expected = s.expected(min_tissue)
    assert summary["n_tiled"] == 1 and summary["n_tiles"] == len(expected)
    idx = read_tile_index(paths.tile_file("s1"))
    assert _as_dict(idx) == expected  # exact (row, col) set, in row-major order, with lump ids
    assert idx.grid.tolist() == [list(k) for k in expected]
    np.testing.assert_array_equal(idx.coords, [[c * 128, r * 128] for r, c in expected])
    partial = [k == s.partial_tile for k in expected]
    np.testing.assert_allclose(idx.tissue_fraction[~np.array(partial)], 1.0, atol=0.02)
    if any(partial):
        assert idx.tissue_fraction[partial][0] == pytest.approx(0.75, abs=0.03)
    a = idx.attrs
    assert set(TILE_ATTRS) <= set(a)
    assert (a["grid_rows"], a["grid_cols"]) == (6, 8)  # margins < 1 tile are not on the grid
    assert (a["slide_width_px_level0"], a["slide_height_px_level0"]) == (1120, 832)
    assert a["mpp"] == 0.5 and a["mpp_source"] == "metadata" and a["tile_mpp"] == 0.5
    assert a["level"] == 0 and a["read_size_px"] == 128 and a["tile_size_px_level0"] == 128.0
    assert a["n_lumps"] == max(expected.values())
    assert a["params_hash"] == params.section_hash("tile")
    assert a["params_json"] == params.section_json("tile")
    assert a["slide_path"] == str(s.path.resolve())
    for name, dtype in (("coords", np.int64), ("grid", np.int32), ("tissue_fraction", np.float32),
                        ("lump_id", np.int32)):
        with h5py.File(paths.tile_file("s1")) as f:
            assert f[name].dtype == dtype
    table = pd.read_csv(paths.reports / "tiles.csv")
    assert table.loc[0, "slide_id"] == "s1" and table.loc[0, "n_tiles"] == len(expected)
    assert (paths.reports / "tiles" / "s1.png").stat().st_size > 0


def test_upsampled_copy_gives_same_grid_with_doubled_coords(tmp_path, write_manifest,
                                                            synthetic_slide_factory):
    orig, up = synthetic_slide_factory(), synthetic_slide_factory(scale=2)
    _, _, paths = _tile(tmp_path, write_manifest, [("orig", orig), ("up", up)])
    a, b = read_tile_index(paths.tile_file("orig")), read_tile_index(paths.tile_file("up"))
    assert b.attrs["mpp"] == 0.25 and b.attrs["tile_mpp"] == 0.5
    assert b.attrs["level"] == 1 and b.attrs["read_size_px"] == 128  # served by the 2x level
    assert b.attrs["tile_size_px_level0"] == 256.0
    np.testing.assert_array_equal(a.grid, b.grid)
    np.testing.assert_array_equal(b.coords, 2 * a.coords)
    np.testing.assert_array_equal(a.lump_id, b.lump_id)
    assert _as_dict(a) == orig.expected(0.8)


def test_slide_without_mpp_warns_and_uses_fallback(tmp_path, write_manifest,
                                                   synthetic_slide_factory, caplog):
    s = synthetic_slide_factory(mpp=None)
    with Slide(s.path) as sl:
        assert sl.mpp is None  # the fixture really has no mpp
    with caplog.at_level(logging.WARNING, logger="pipeline.tile"):
        _, _, paths = _tile(tmp_path, write_manifest, [("nompp", s)])
    assert any("nompp" in r.getMessage() and "no mpp" in r.getMessage() for r in caplog.records)
    idx = read_tile_index(paths.tile_file("nompp"))
    assert idx.attrs["mpp_source"] == "unknown"
    assert math.isnan(idx.attrs["mpp"]) and math.isnan(idx.attrs["tile_mpp"])
    assert idx.attrs["level"] == 0 and idx.attrs["tile_size_px_level0"] == 128.0
    assert _as_dict(idx) == s.expected(0.8)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.tile"):
        _, _, paths = _tile(tmp_path, write_manifest, [("nompp", s)], fallback_mpp=0.25,
                            min_tissue=0.45)
    assert any("nompp" in r.getMessage() and "fallback_mpp" in r.getMessage()
               for r in caplog.records)
    idx = read_tile_index(paths.tile_file("nompp"))
    assert idx.attrs["mpp_source"] == "fallback_mpp" and idx.attrs["mpp"] == 0.25
    # assumed 0.25 um/px: 0.5 um/px tiles are 256 level-0 px -> a 4 x 3 grid
    assert (idx.attrs["grid_rows"], idx.attrs["grid_cols"]) == (3, 4)
    assert idx.attrs["tile_size_px_level0"] == 256.0
    # each 256-px tile is 2 x 2 original tiles; only (0, 1) and (1, 1) are half tissue
    assert idx.grid.tolist() == [[0, 1], [1, 1]]
    np.testing.assert_allclose(idx.tissue_fraction, 0.5, atol=0.02)


# -- the real scanner file ---------------------------------------------------------------------


def test_real_aperio_svs(tmp_path, write_manifest, cmu_svs):
    from skimage.filters import threshold_otsu

    from pipeline.tissue import saturation

    _, _, paths = _tile(tmp_path, write_manifest, [("cmu", cmu_svs)], size_px=256, mpp=1.0,
                        min_object_um2=20000.0, max_hole_um2=5000.0, min_tissue=0.8)
    idx = read_tile_index(paths.tile_file("cmu"))
    a = idx.attrs
    assert a["mpp"] == pytest.approx(0.499) and a["mpp_source"] == "metadata"
    assert (a["slide_width_px_level0"], a["slide_height_px_level0"]) == (2220, 2967)
    # 1.0 um/px from a 0.499 um/px slide with one level: read 513 px, resample to 256
    assert a["level"] == 0 and a["read_size_px"] == 513 and a["tile_size_px"] == 256
    assert a["tile_mpp"] == pytest.approx(1.0, abs=2e-3)
    assert (a["grid_rows"], a["grid_cols"]) == (5, 4) and idx.n_tiles > 0 and a["n_lumps"] >= 1
    with Slide(cmu_svs) as sl:
        tile = sl.read_tile(*idx.coords[0], idx.geometry)
        full = sl.read_rgb(0, 0, 0, 2967)[:, :2220]
    assert tile.shape == (256, 256, 3)
    # independent route: Otsu on full-resolution saturation, fraction per tile footprint
    sat = saturation(full)
    mask = sat > threshold_otsu(sat)
    pitch = a["tile_size_px_level0"]
    kept = {tuple(g) for g in idx.grid.tolist()}
    n_checked = 0
    for r in range(a["grid_rows"]):
        for c in range(a["grid_cols"]):
            x, y = round(c * pitch), round(r * pitch)
            frac = mask[y:y + 513, x:x + 513].mean()
            if frac > 0.9:
                assert (r, c) in kept, (r, c, frac)
                n_checked += 1
            elif frac < 0.7:
                assert (r, c) not in kept, (r, c, frac)
                n_checked += 1
    assert n_checked >= 15


# -- failures ----------------------------------------------------------------------------------


def test_no_tissue_fails_naming_the_slide_and_skip_completes_others(
        tmp_path, write_manifest, synthetic_slide_factory):
    blank, good = synthetic_slide_factory(blank=True), synthetic_slide_factory()
    with pytest.raises(NoTissueError, match=r"slide blank .*no tissue found"):
        _tile(tmp_path, write_manifest, [("blank", blank), ("good", good)])
    summary, _, paths = _tile(tmp_path, write_manifest, [("blank", blank), ("good", good)],
                              on_error="skip")
    assert summary["n_failed"] == 1 and list(summary["failed"]) == ["blank"]
    assert summary["tiled"] == ["good"] and paths.tile_file("good").is_file()
    assert not paths.tile_file("blank").exists()
    fails = pd.read_csv(paths.reports / "tile_failures.csv")
    assert fails["slide_id"].tolist() == ["blank"] and "no tissue" in fails.loc[0, "error"]
    assert pd.read_csv(paths.reports / "tiles.csv")["slide_id"].tolist() == ["good"]


def test_all_tiles_below_min_tissue_is_an_error(tmp_path, write_manifest, synthetic_slide):
    with pytest.raises(NoTissueError, match=r"slide s1 .*no tile has tissue fraction >= 0.8"):
        _tile(tmp_path, write_manifest, [("s1", synthetic_slide)], size_px=512)  # 2x2 blocks


def test_unreadable_file_is_a_one_line_error_naming_the_path(tmp_path, write_manifest):
    bad = tmp_path / "garbage.tiff"
    bad.write_bytes(b"this is not a slide\n" * 50)
    with pytest.raises(SlideError) as err:
        _tile(tmp_path, write_manifest, [("bad", bad)])
    msg = str(err.value)
    assert str(bad) in msg and "\n" not in msg


def test_bad_on_error_value_is_rejected(tmp_path, write_manifest, synthetic_slide):
    with pytest.raises(PipelineError, match="--on-error must be one of stop, skip"):
        _tile(tmp_path, write_manifest, [("s1", synthetic_slide)], on_error="ignore")


# -- reruns, shards, workers, pixel cache ------------------------------------------------------


def test_rerun_skips_current_and_rewrites_truncated_or_stale(tmp_path, write_manifest,
                                                            synthetic_slide):
    slides = [("s1", synthetic_slide)]
    _, params, paths = _tile(tmp_path, write_manifest, slides)
    out = paths.tile_file("s1")
    mtime = out.stat().st_mtime_ns
    csv_first = (paths.reports / "tiles.csv").read_bytes()
    summary, _, _ = _tile(tmp_path, write_manifest, slides)
    assert summary["n_current"] == 1 and summary["n_tiled"] == 0
    assert out.stat().st_mtime_ns == mtime
    # the git-tracked table is the same after a rerun that had nothing to do (no run-history
    # columns); the run's own record says what it did
    assert (paths.reports / "tiles.csv").read_bytes() == csv_first
    timings = json.loads(paths.timings_file("tile").read_text())
    assert timings["n_current"] == 1 and timings["n_tiled"] == 0 and timings["seconds"] > 0

    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])  # a killed writer without atomic rename
    assert not h5_is_current(out, params.section_hash("tile"))
    with pytest.raises(TileIndexError, match="s1.h5"):
        read_tile_index(out)
    summary, _, _ = _tile(tmp_path, write_manifest, slides)
    assert summary["n_tiled"] == 1
    assert _as_dict(read_tile_index(out)) == synthetic_slide.expected(0.8)

    summary, params2, _ = _tile(tmp_path, write_manifest, slides, min_tissue=0.6)  # stale
    assert summary["n_tiled"] == 1
    assert read_tile_index(out).attrs["params_hash"] == params2.section_hash("tile")
    assert read_tile_index(out).n_tiles == len(synthetic_slide.expected(0.6))


def test_shard_selects_every_nth_slide(tmp_path, write_manifest, synthetic_slide):
    slides = [(f"s{i}", synthetic_slide) for i in range(5)]
    manifest = write_manifest([(sid, s.path) for sid, s in slides])
    paths = Paths(root=tmp_path)
    summary = run(make_params(manifest, **SYNTH), paths, shard=(1, 2))
    assert summary["tiled"] == ["s1", "s3"]
    assert sorted(p.name for p in paths.tiles.glob("*.h5")) == ["s1.h5", "s3.h5"]
    with pytest.raises(PipelineError, match="shard"):
        run(make_params(manifest, **SYNTH), paths, shard=(2, 2))


def test_worker_processes_give_identical_output(tmp_path, write_manifest, synthetic_slide_factory):
    slides = [("a", synthetic_slide_factory()), ("b", synthetic_slide_factory(scale=2))]
    manifest = write_manifest([(sid, s.path) for sid, s in slides])
    p1, p2 = Paths(root=tmp_path / "one"), Paths(root=tmp_path / "two")
    run(make_params(manifest, **SYNTH), p1, workers=1)
    summary = run(make_params(manifest, **SYNTH), p2, workers=2)
    assert summary["n_tiled"] == 2
    for sid in ("a", "b"):
        x, y = read_tile_index(p1.tile_file(sid)), read_tile_index(p2.tile_file(sid))
        for k in ("coords", "grid", "tissue_fraction", "lump_id"):
            np.testing.assert_array_equal(getattr(x, k), getattr(y, k))


def test_pixel_cache_is_written_via_pipeline_data_once(tmp_path, write_manifest, synthetic_slide,
                                                      monkeypatch):
    calls = []

    def write_pixel_cache(tile_index_path, cache_path):
        calls.append((tile_index_path, cache_path))
        with h5py.File(tile_index_path) as src, h5py.File(cache_path, "w") as f:
            f.attrs["schema_version"] = src.attrs["schema_version"]
            f.attrs["params_hash"] = src.attrs["params_hash"]
            f.attrs["slide_fingerprint"] = src.attrs["slide_fingerprint"]

    monkeypatch.setitem(sys.modules, "pipeline.data",
                        types.SimpleNamespace(write_pixel_cache=write_pixel_cache))
    _, _, paths = _tile(tmp_path, write_manifest, [("s1", synthetic_slide)], cache_pixels=True)
    assert calls == [(paths.tile_file("s1"), paths.pixel_cache_file("s1"))]
    paths.pixel_cache_file("s1").unlink()
    summary, _, _ = _tile(tmp_path, write_manifest, [("s1", synthetic_slide)], cache_pixels=True)
    assert len(calls) == 2 and summary["n_tiled"] == 0  # only the cache was redone
    _tile(tmp_path, write_manifest, [("s1", synthetic_slide)], cache_pixels=True)
    assert len(calls) == 2


def test_cli_parses_shard_and_on_error(tmp_path, write_manifest, synthetic_slide_factory,
                                       monkeypatch):
    import typer
    from typer.testing import CliRunner

    from pipeline.stages.tile import cli

    blank, good = synthetic_slide_factory(blank=True), synthetic_slide_factory()
    manifest = write_manifest([("blank", blank.path), ("good", good.path)])
    params_yaml = tmp_path / "params.yaml"
    tile = "".join(f"  {k}: {v}\n" for k, v in SYNTH.items())
    params_yaml.write_text(f"data:\n  manifest: {manifest}\ntile:\n{tile}")
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    app.command()(cli)
    res = CliRunner().invoke(app, ["--params", str(params_yaml), "--on-error", "skip",
                                   "--shard", "0/1"])
    assert res.exit_code == 0, res.output
    assert "1 slides tiled" in res.output and "1 failed" in res.output
    assert (tmp_path / "data" / "tiles" / "good.h5").is_file()
    res = CliRunner().invoke(app, ["--params", str(params_yaml), "--shard", "1-2"])
    assert isinstance(res.exception, PipelineError) and "expected i/n" in str(res.exception)


def test_a_moved_project_writes_byte_identical_tile_and_label_files(tmp_path, synthetic_slide):
    """Inputs inside the project are recorded relative to the output folder, so a clone in
    another place reproduces the same bytes (and dvc.lock); slides elsewhere stay absolute."""
    import shutil

    from pipeline.stages import label as label_stage

    def project(root):
        (root / "slides").mkdir(parents=True)
        shutil.copy(synthetic_slide.path, root / "slides" / "s1.tiff")
        (root / "ann.geojson").write_text('{"type": "FeatureCollection", "features": []}')
        (root / "manifest.csv").write_text(
            "slide_id,slide_path,annotation_path,split\n"
            f"s1,slides/s1.tiff,ann.geojson,train\ns2,{synthetic_slide.path},,train\n")
        params = make_params(root / "manifest.csv", **SYNTH)
        paths = Paths(root=root)
        run(params, paths)
        label_stage.run(params, paths)
        return paths

    a, b = project(tmp_path / "a"), project(tmp_path / "elsewhere" / "b")
    for rel in ("data/tiles/s1.h5", "data/labels/s1.h5", "data/tiles/s2.h5"):
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel
    idx = read_tile_index(b.tile_file("s1"))
    assert str(idx.attrs["slide_path"]) == "../../slides/s1.tiff"
    assert idx.slide_path == (b.root / "slides" / "s1.tiff").resolve()
    assert read_tile_index(b.tile_file("s2")).slide_path == synthetic_slide.path.resolve()
    with Slide(idx.slide_path) as s:  # the recorded path opens the moved project's slide
        assert s.dimensions[0] > 0
    # and the rerun sees both as current (the recorded form is what is compared)
    assert run(make_params(b.root / "manifest.csv", **SYNTH), b)["n_current"] == 2
