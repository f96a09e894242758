"""The `label` stage: thresholds at their boundaries, holes / exclusions, masks, the stage end
to end. Tile indices are written by hand here (schema names), independent of the tile stage.

Geometry used throughout: tile_size_px 20, raster_subsample 2 -> 10 x 10 samples per tile;
tile pitch 100 level-0 px -> one sample per 10 level-0 px, centres at 5, 15, ..., 95 within a
tile. Polygon edges sit on multiples of 10 (never on a centre), so every fraction is exact.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pandas as pd
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from pipeline import labeling, schema
from pipeline.annotations import (
    AnnotationError,
    Polygon,
    write_asap_xml,
    write_qupath_geojson,
)
from pipeline.labeling import LabelError, assign_labels, label_slide, tile_raster
from pipeline.params import DataParams, LabelParams, Params, TileParams
from pipeline.paths import Paths
from pipeline.stages import label as label_stage
from pipeline.stages.label import run
from pipeline.tiff import write_pyramidal_tiff

T, N, X = schema.LABEL_TUMOR, schema.LABEL_NORMAL, schema.LABEL_NOLABEL
PITCH = 100.0


def rect(x0, y0, x1, y1) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def make_params(manifest="manifest.csv", **label_kw) -> Params:
    return Params(
        data=DataParams(manifest=str(manifest)),
        tile=TileParams(size_px=20, workers=1),
        label=LabelParams(raster_subsample=2, **label_kw),
    )


def write_tile_index(path, params: Params, rc, slide_wh=(400, 400), mpp=0.5,
                     params_hash=None) -> None:
    """A tile index exactly as the tile stage writes it (grid origin 0, pitch PITCH)."""
    grid = np.asarray(rc, dtype=np.int32).reshape(-1, 2)
    coords = np.stack([np.round(grid[:, 1] * PITCH), np.round(grid[:, 0] * PITCH)], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f[schema.COORDS] = coords.astype(schema.TILE_DTYPES[schema.COORDS])
        f[schema.GRID] = grid.astype(schema.TILE_DTYPES[schema.GRID])
        f[schema.TISSUE_FRACTION] = np.ones(len(grid), schema.TILE_DTYPES[schema.TISSUE_FRACTION])
        f[schema.LUMP_ID] = np.ones(len(grid), schema.TILE_DTYPES[schema.LUMP_ID])
        attrs = {
            "schema_version": schema.SCHEMA_VERSION,
            "params_hash": params_hash or params.section_hash("tile"),
            "params_json": params.section_json("tile"),
            "slide_id": path.stem, "slide_path": "/nowhere.tiff", "slide_fingerprint": "0-x",
            "slide_width_px_level0": slide_wh[0], "slide_height_px_level0": slide_wh[1],
            "mpp": mpp, "mpp_source": "metadata", "tile_mpp": mpp * PITCH / 20, "level": 0,
            "level_downsample": 1.0, "read_size_px": 100, "tile_size_px": 20,
            "tile_size_px_level0": PITCH, "grid_rows": slide_wh[1] // 100,
            "grid_cols": slide_wh[0] // 100, "n_lumps": 1,
        }
        assert set(attrs) == set(schema.TILE_ATTRS)
        f.attrs.update(attrs)


def label_one(tmp_path, ann_path, rc, params=None, slide_wh=(400, 400)):
    """Label one hand-made slide; returns (tumor_fraction, normal_fraction, label, attrs)."""
    params = params or make_params()
    tiles, out = tmp_path / "tiles" / "s.h5", tmp_path / "labels" / "s.h5"
    write_tile_index(tiles, params, rc, slide_wh)
    label_slide("s", tiles, str(ann_path or ""), out, params.label,
                params.section_hash("tile", "label"), params.section_hash("tile"))
    with h5py.File(out, "r") as f:
        for name, dtype in schema.LABEL_DTYPES.items():
            assert f[name].dtype == dtype
        return (f[schema.TUMOR_FRACTION][...], f[schema.NORMAL_FRACTION][...],
                f[schema.LABEL][...], dict(f.attrs))


ROW4 = [(0, 0), (0, 1), (0, 2), (0, 3)]
# 20 samples of tile (0, 0): the top two sample rows
TUMOR_20 = rect(0, 0, 100, 20)
# 21 samples of tile (0, 1): two rows plus one sample (an L-shape)
TUMOR_21 = np.array([[100, 0], [200, 0], [200, 20], [110, 20], [110, 30], [100, 30]], float)


def test_tumor_threshold_is_strict_camelyon_convention(tmp_path):
    ann = tmp_path / "a.xml"
    write_asap_xml(ann, [TUMOR_20, TUMOR_21])
    tf, nf, lab, attrs = label_one(tmp_path, ann, ROW4)
    np.testing.assert_array_equal(tf, np.float32([0.2, 0.21, 0, 0]))
    # no explicit normal regions: normal = 1 - tumor, so 0.8 at tile 0 (>= 0.8 -> normal)
    np.testing.assert_array_equal(nf, np.float32([0.8, 0.79, 1, 1]))
    np.testing.assert_array_equal(lab, [N, T, N, N])
    assert attrs["annotation_format"] == "asap_xml" and attrs["annotation_path"] == str(ann)
    assert attrs["schema_version"] == schema.SCHEMA_VERSION
    assert attrs["params_hash"] == make_params().section_hash("tile", "label")
    assert attrs["raster_um"] == pytest.approx(10 * 0.5)  # 10 level-0 px at 0.5 um/px
    assert set(attrs) == set(schema.LABEL_ATTRS)
    # lowering tumor_min below 0.2 flips tile 0
    _, _, lab, _ = label_one(tmp_path, ann, ROW4, make_params(tumor_min=0.19))
    np.testing.assert_array_equal(lab, [T, T, N, N])


def test_explicit_normal_regions_80_vs_79_percent(tmp_path):
    ann = tmp_path / "a.geojson"
    normal_79 = np.array([[300, 0], [400, 0], [400, 70], [390, 70], [390, 80], [300, 80]], float)
    with open(ann, "w") as fh:
        json.dump({"type": "FeatureCollection", "features": [
            _feature(TUMOR_20, "Tumor"), _feature(TUMOR_21, "Tumor"),
            _feature(rect(-50, -50, 100, 100), "Normal"),  # all of tile 0 (20 % is tumor)
            _feature(rect(200, 0, 300, 80), "normal"),  # 80 samples of tile (0, 2)
            _feature(normal_79, "Normal"),  # 79 samples of tile (0, 3)
        ]}, fh)
    tf, nf, lab, attrs = label_one(tmp_path, ann, ROW4 + [(1, 0)])
    np.testing.assert_array_equal(tf, np.float32([0.2, 0.21, 0, 0, 0]))
    # normal = inside normal regions minus tumor; unannotated tissue (tile (1, 0)) is not normal
    np.testing.assert_array_equal(nf, np.float32([0.8, 0, 0.8, 0.79, 0]))
    np.testing.assert_array_equal(lab, [N, T, N, X, X])
    assert attrs["annotation_format"] == "geojson"


def test_exclusions_count_as_explicit_normal():
    from pipeline.annotations import Annotation
    from pipeline.labeling import tile_fractions

    ann = Annotation(path="x", format="asap_xml", tumor=[Polygon(rect(0, 0, 100, 100))],
                     exclusion=[Polygon(rect(0, 0, 100, 30))],
                     normal=[Polygon(rect(100, 0, 200, 100))])
    rc = np.array([(0, 0), (0, 1), (0, 2)])
    tf, nf = tile_fractions(ann, tile_raster(rc[:, ::-1] * 100, rc, 20, PITCH, 2))
    np.testing.assert_array_equal(tf, [0.7, 0, 0])
    np.testing.assert_array_equal(nf, [0.3, 1, 0])


def _feature(ring, name, holes=()):
    coords = [np.vstack([r, r[:1]]).tolist() for r in (ring, *holes)]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords},
            "properties": {"objectType": "annotation", "classification": {"name": name}}}


def test_asap_exclusion_holes_and_varied_groups(tmp_path, caplog):
    # tumor everywhere (partly outside the slide), group _1; exclusion = all of tile (0, 2)
    # plus half of tile (0, 3), group "Exclusion"; a second tumor group "Tumor"; unknown group
    ann = tmp_path / "a.xml"
    write_asap_xml(ann, [rect(-100, -100, 450, 100)], [rect(200, -10, 350, 110)],
                   tumor_group="_1")
    text = ann.read_text().replace('PartOfGroup="_2"', 'PartOfGroup="Exclusion"')
    extra = ('<Annotation Name="q" Type="Polygon" PartOfGroup="Tumor"><Coordinates>'
             '<Coordinate Order="0" X="0" Y="100"/><Coordinate Order="1" X="50" Y="100"/>'
             '<Coordinate Order="2" X="50" Y="200"/><Coordinate Order="3" X="0" Y="200"/>'
             '</Coordinates></Annotation>'
             '<Annotation Name="r" Type="Polygon" PartOfGroup="Mystery"><Coordinates>'
             '<Coordinate Order="0" X="100" Y="100"/><Coordinate Order="1" X="200" Y="100"/>'
             '<Coordinate Order="2" X="200" Y="200"/></Coordinates></Annotation>')
    ann.write_text(text.replace("</Annotations>", extra + "</Annotations>"))
    tf, nf, lab, _ = label_one(tmp_path, ann, ROW4 + [(1, 0), (1, 1)])
    np.testing.assert_array_equal(tf, np.float32([1, 1, 0, 0.5, 0.5, 0]))
    np.testing.assert_array_equal(lab, [T, T, N, T, T, N])
    assert "'Mystery'" in caplog.text


def test_geojson_holes_multipolygon_and_partly_outside(tmp_path):
    ann = tmp_path / "a.geojson"
    multi = {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
             "geometry": {"type": "MultiPolygon", "coordinates": [
                 [np.vstack([rect(0, 100, 100, 200), rect(0, 100, 100, 200)[:1]]).tolist()],
                 [np.vstack([rect(300, 100, 400, 150), rect(300, 100, 400, 150)[:1]]).tolist()],
             ]}}
    features = [
        # row 0: tumor over tiles 0..2 with a hole = exactly tile (0, 1); reaches far outside
        _feature(rect(-1000, -1000, 300, 100), "Tumor", holes=(rect(100, 0, 200, 100),)),
        multi,
    ]
    ann.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    rc = ROW4 + [(1, 0), (1, 1), (1, 3)]
    tf, nf, lab, _ = label_one(tmp_path, ann, rc)
    np.testing.assert_array_equal(tf, np.float32([1, 0, 1, 0, 1, 0, 0.5]))
    np.testing.assert_array_equal(nf, np.float32([0, 1, 0, 1, 0, 1, 0.5]))
    np.testing.assert_array_equal(lab, [T, N, T, N, T, N, T])


def test_polygon_partly_outside_the_slide(tmp_path):
    ann = tmp_path / "a.xml"
    # x from far left to 150 (half of tile (0, 1)), y from -1000 to far below the slide
    write_asap_xml(ann, [rect(-1000, -1000, 150, 5000)])
    tf, _, lab, _ = label_one(tmp_path, ann, ROW4 + [(3, 0), (3, 1)])
    np.testing.assert_array_equal(tf, np.float32([1, 0.5, 0, 0, 1, 0.5]))
    np.testing.assert_array_equal(lab, [T, T, N, N, T, T])


# A union of rectangles whose edges are multiples of 4 (whole mask px at downsample 4) and of
# 10 (never on a sample centre, which sit at 5 mod 10): mask and polygon agree exactly.
MASK_RECTS = [(0, 0, 200, 100), (200, 100, 260, 300), (40, 300, 400, 340)]


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_low_resolution_mask_gives_the_polygon_labels(tmp_path, fmt):
    rc = [(r, c) for r in range(4) for c in range(4)]
    poly = tmp_path / "p.xml"
    write_asap_xml(poly, [rect(*r) for r in MASK_RECTS])
    tf_p, nf_p, lab_p, _ = label_one(tmp_path, poly, rc)
    # the same region as a mask at 1/4 of level 0 (100 x 100 px for a 400 x 400 slide)
    m = np.zeros((100, 100), np.uint8)
    for x0, y0, x1, y1 in MASK_RECTS:
        m[y0 // 4:y1 // 4, x0 // 4:x1 // 4] = 1
    mask = tmp_path / f"m.{fmt}"
    if fmt == "png":
        Image.fromarray(m).save(mask)
    else:  # pyramid: level 0 at 1/2 (200 px), level 1 at 1/4: the reader picks a level <= 10x
        import tifffile

        with tifffile.TiffWriter(mask) as tif:
            tif.write(np.repeat(np.repeat(m, 2, 0), 2, 1), tile=(64, 64), subfiletype=0)
            tif.write(m, tile=(64, 64), subfiletype=1)
    tf_m, nf_m, lab_m, attrs = label_one(tmp_path, mask, rc)
    assert attrs["annotation_format"] == "mask"
    np.testing.assert_array_equal(tf_m, tf_p)
    np.testing.assert_array_equal(nf_m, nf_p)
    np.testing.assert_array_equal(lab_m, lab_p)
    # and both equal the hand count: tile (1, 2) = x 200..260 -> 6 sample cols, all rows
    i = rc.index((1, 2))
    assert tf_p[i] == np.float32(0.6)
    assert tf_p[rc.index((3, 0))] == np.float32(0.24)  # x 40..100, y 300..340: 6 x 4
    assert tf_p[rc.index((0, 0))] == 1 and tf_p[rc.index((3, 3))] == np.float32(0.4)


def test_tile_raster_recovers_grid_from_rounded_coords():
    pitch = 1021.7
    grid = np.array([[0, 0], [3, 7], [12, 5]])
    coords = np.stack([np.round(grid[:, 1] * pitch), np.round(grid[:, 0] * pitch)], 1)
    r = tile_raster(coords, grid, tile_size_px=256, tile_size_px_level0=pitch,
                    raster_subsample=8)
    assert r.n == 32 and r.pitch_px_level0 == pytest.approx(pitch / 32)
    np.testing.assert_array_equal(r.start_xy, grid[:, ::-1] * 32)


def test_assign_labels_boundaries():
    tf = np.array([0.2, 0.2000001, 0.0, 0.0, 0.5])
    nf = np.array([0.8, 0.0, 0.8, 0.7999999, 0.5])
    np.testing.assert_array_equal(assign_labels(tf, nf, 0.2, 0.8), [N, T, N, X, T])


def test_banded_raster_equals_one_band(tmp_path):
    # many bands of one tile row each must give the same fractions as one band
    from pipeline.annotations import read_annotation
    from pipeline.labeling import tile_fractions

    ann = tmp_path / "a.geojson"
    write_qupath_geojson(ann, [Polygon(np.array([[13, 7], [391, 45], [260, 388], [31, 300]]),
                                       (rect(150, 150, 230, 210),))])
    rc = np.array([(r, c) for r in range(4) for c in range(4)])
    coords = rc[:, ::-1] * 100
    raster = tile_raster(coords, rc, 20, PITCH, 2)
    a = read_annotation(ann)
    one = tile_fractions(a, raster)
    many = tile_fractions(a, raster, band_pixels=1)
    np.testing.assert_array_equal(one[0], many[0])
    assert 0 < one[0].sum() < 16


# -- the stage end to end ----------------------------------------------------------------------
def build_project(tmp_path, extra_rows=()):
    """Three slides: A (ASAP), B (GeoJSON with Normal regions), C (negative, no file)."""
    slides = tmp_path / "slides"
    slides.mkdir()
    img = np.full((64, 64, 3), 240, np.uint8)
    for sid in "ABCD":
        write_pyramidal_tiff(slides / f"{sid}.tiff", img, mpp=0.5, n_levels=1, tile_px=64)
    write_asap_xml(tmp_path / "A.xml", [TUMOR_20, TUMOR_21, rect(0, 100, 400, 200)])
    write_qupath_geojson(tmp_path / "B.geojson", [rect(0, 0, 200, 100)], classification="Normal")
    rows = [
        "slide_id,slide_path,annotation_path,split",
        "A,slides/A.tiff,A.xml,train",
        "B,slides/B.tiff,B.geojson,val",
        "C,slides/C.tiff,,test",
        *extra_rows,
    ]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    params = make_params(tmp_path / "manifest.csv")
    paths = Paths(root=tmp_path)
    write_tile_index(paths.tile_file("A"), params, ROW4 + [(1, 0), (1, 1), (2, 2)])
    write_tile_index(paths.tile_file("B"), params, ROW4)
    write_tile_index(paths.tile_file("C"), params, [(0, 0), (2, 3)])
    return params, paths


# A: tiles (0,0) 20 % -> normal, (0,1) 21 % -> tumor, (0,2),(0,3) normal, row 1 tumor, (2,2)
# normal. B: (0,0),(0,1) fully normal, (0,2),(0,3) unannotated -> nolabel. C: all normal.
EXPECTED_CSV = [
    {"slide_id": "A", "split": "train", "n_tiles": 7, "n_tumor": 3, "n_normal": 4, "n_nolabel": 0},
    {"slide_id": "B", "split": "val", "n_tiles": 4, "n_tumor": 0, "n_normal": 2, "n_nolabel": 2},
    {"slide_id": "C", "split": "test", "n_tiles": 2, "n_tumor": 0, "n_normal": 2, "n_nolabel": 0},
]


def test_stage_end_to_end_csv_counts_and_rerun(tmp_path):
    params, paths = build_project(tmp_path)
    summary = run(params, paths, workers=2)
    df = pd.read_csv(tmp_path / "reports" / "labels.csv")
    assert list(df.columns) == list(labeling.CSV_COLUMNS)
    assert df.to_dict("records") == EXPECTED_CSV
    assert summary["n_labelled"] == 3 and summary["n_current"] == 0 and summary["n_failed"] == 0
    assert (summary["n_tiles"], summary["n_tumor"], summary["n_normal"],
            summary["n_nolabel"]) == (13, 3, 8, 2)
    with h5py.File(paths.label_file("C"), "r") as f:
        assert f.attrs["annotation_format"] == "none" and f.attrs["annotation_path"] == ""
        np.testing.assert_array_equal(f[schema.TUMOR_FRACTION][...], [0, 0])
        np.testing.assert_array_equal(f[schema.NORMAL_FRACTION][...], [1, 1])
    # rerun: everything current, nothing rewritten, same CSV
    mtimes = {s: os.stat(paths.label_file(s)).st_mtime_ns for s in "ABC"}
    summary = run(params, paths)
    assert summary["n_labelled"] == 0 and summary["n_current"] == 3
    assert {s: os.stat(paths.label_file(s)).st_mtime_ns for s in "ABC"} == mtimes
    assert pd.read_csv(tmp_path / "reports" / "labels.csv").to_dict("records") == EXPECTED_CSV
    # a changed label param makes the outputs stale; a truncated file is redone
    paths.label_file("A").write_bytes(b"\x89HDF\r\n")
    assert run(params, paths)["n_labelled"] == 1
    summary = run(make_params(tmp_path / "manifest.csv", normal_min=0.9), paths)
    assert summary["n_labelled"] == 3


def test_stage_on_error_skip_and_fail_and_shards(tmp_path):
    params, paths = build_project(tmp_path, extra_rows=["D,slides/D.tiff,D.geojson,test"])
    (tmp_path / "D.geojson").write_text('{"type": "FeatureCollection", "features": [}')
    write_tile_index(paths.tile_file("D"), params, [(0, 0)])
    with pytest.raises(AnnotationError, match="D.geojson: malformed GeoJSON"):
        run(params, paths, on_error="fail")
    summary = run(params, paths, on_error="skip", workers=2)
    assert list(summary["failed"]) == ["D"] and summary["n_failed"] == 1
    assert "malformed GeoJSON" in summary["failed"]["D"]
    df = pd.read_csv(tmp_path / "reports" / "labels.csv")
    assert df.to_dict("records") == EXPECTED_CSV  # D is not listed
    # shards: 1/2 holds manifest rows 1 and 3 (B, D)
    for s in "ABC":
        paths.label_file(s).unlink()
    summary = run(params, paths, on_error="skip", shard=(1, 2))
    assert summary["n_slides"] == 2 and summary["n_labelled"] == 1
    assert summary["n_tiles"] == 4  # B only (D failed); A and C belong to shard 0
    assert paths.label_file("B").exists() and not paths.label_file("A").exists()


def test_stale_tile_index_is_refused(tmp_path):
    params, paths = build_project(tmp_path)
    write_tile_index(paths.tile_file("B"), params, ROW4, params_hash="0" * 16)
    with pytest.raises(LabelError, match=r"B\.h5: tile index missing or not written"):
        run(params, paths)


def test_cli(tmp_path, monkeypatch):
    params, paths = build_project(tmp_path)
    (tmp_path / "params.yaml").write_text(
        f"data:\n  manifest: {tmp_path / 'manifest.csv'}\n"
        "tile:\n  size_px: 20\n  workers: 1\nlabel:\n  raster_subsample: 2\n"
    )
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    app.command("label")(label_stage.cli)
    app.command("other")(lambda: None)  # force sub-command mode
    res = CliRunner().invoke(app, ["label", "--params", "params.yaml", "--shard", "0/1"])
    assert res.exit_code == 0, res.output
    assert "3 labelled" in res.output and "3 tumor, 8 normal, 2 nolabel" in res.output
    assert pd.read_csv(tmp_path / "reports" / "labels.csv").to_dict("records") == EXPECTED_CSV
