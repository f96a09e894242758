"""Annotation readers / writers / rasteriser: formats, round trips, errors, sampling convention."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.annotations import (
    AnnotationError,
    MaskAnnotation,
    Polygon,
    rasterize,
    read_annotation,
    read_asap_xml,
    read_mask,
    read_qupath_geojson,
    sample_mask,
    write_asap_xml,
    write_qupath_geojson,
)


def rect(x0, y0, x1, y1) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def _centres_inside_rect(shape, origin, pitch, x0, y0, x1, y1) -> np.ndarray:
    """Independent route: which raster centres fall in [x0, x1] x [y0, y1]."""
    ys = origin[1] + (np.arange(shape[0]) + 0.5) * pitch
    xs = origin[0] + (np.arange(shape[1]) + 0.5) * pitch
    return ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]


ASAP_VARIED = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="_0" Type="Polygon" PartOfGroup="_1" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="10" Y="10"/>
        <Coordinate Order="0" X="0" Y="0"/>
        <Coordinate Order="1" X="10" Y="0"/>
        <Coordinate Order="3" X="0" Y="10"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="Tumor1" Type="Spline" PartOfGroup="Tumor" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="100,5" Y="100"/>
        <Coordinate Order="1" X="200" Y="100"/>
        <Coordinate Order="2" X="200" Y="200"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 7" Type="Polygon" PartOfGroup="Exclusion" Color="#64FE2E">
      <Coordinates>
        <Coordinate Order="0" X="2" Y="2"/>
        <Coordinate Order="1" X="4" Y="2"/>
        <Coordinate Order="2" X="4" Y="4"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="x" Type="Polygon" PartOfGroup="metastasis A" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="300" Y="300"/>
        <Coordinate Order="1" X="310" Y="300"/>
        <Coordinate Order="2" X="310" Y="310"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="y" Type="Polygon" PartOfGroup="Stuff" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="0" Y="0"/>
        <Coordinate Order="1" X="1" Y="0"/>
        <Coordinate Order="2" X="1" Y="1"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="tiny" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="0" Y="0"/>
        <Coordinate Order="1" X="1" Y="0"/>
      </Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups>
    <Group Name="_1" PartOfGroup="None" Color="#F4FA58"><Attributes/></Group>
    <Group Name="Tumor" PartOfGroup="None" Color="#F4FA58"><Attributes/></Group>
    <Group Name="metastasis A" PartOfGroup="Tumor" Color="#F4FA58"><Attributes/></Group>
    <Group Name="Exclusion" PartOfGroup="None" Color="#64FE2E"><Attributes/></Group>
    <Group Name="Stuff" PartOfGroup="None" Color="#64FE2E"><Attributes/></Group>
  </AnnotationGroups>
</ASAP_Annotations>
"""


def test_asap_groups_by_group_not_name(tmp_path, caplog):
    path = tmp_path / "a.xml"
    path.write_text(ASAP_VARIED)
    with caplog.at_level(logging.WARNING):
        ann = read_annotation(path)
    assert ann.format == "asap_xml"
    # _1, Tumor and the nested "metastasis A" (PartOfGroup Tumor) are tumor
    assert len(ann.tumor) == 3
    np.testing.assert_array_equal(ann.tumor[0].exterior, rect(0, 0, 10, 10))  # sorted by Order
    np.testing.assert_array_equal(ann.tumor[1].exterior,
                                  [[100.5, 100], [200, 100], [200, 200]])  # decimal comma
    np.testing.assert_array_equal(ann.tumor[2].exterior, [[300, 300], [310, 300], [310, 310]])
    assert len(ann.exclusion) == 1 and not ann.normal
    np.testing.assert_array_equal(ann.exclusion[0].exterior, [[2, 2], [4, 2], [4, 4]])
    text = caplog.text
    assert "'Stuff'" in text and "unknown ASAP group" in text
    assert "< 3 points" in text


def test_asap_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tumors = [rng.uniform(0, 1e5, size=(k, 2)) for k in (3, 7, 40)]
    excl = [rng.uniform(0, 1e5, size=(5, 2))]
    path = tmp_path / "rt.xml"
    write_asap_xml(path, tumors, excl)
    ann = read_asap_xml(path)
    assert len(ann.tumor) == 3 and len(ann.exclusion) == 1
    for a, b in zip(ann.tumor, tumors, strict=True):
        np.testing.assert_allclose(a.exterior, b, atol=6e-5, rtol=0)
    np.testing.assert_allclose(ann.exclusion[0].exterior, excl[0], atol=6e-5, rtol=0)
    # a Polygon with a hole: the hole goes to the exclusion group
    write_asap_xml(path, [Polygon(rect(0, 0, 100, 100), (rect(10, 10, 20, 20),))],
                   tumor_group="_1")
    ann = read_asap_xml(path)
    np.testing.assert_array_equal(ann.tumor[0].exterior, rect(0, 0, 100, 100))
    np.testing.assert_array_equal(ann.exclusion[0].exterior, rect(10, 10, 20, 20))


def test_geojson_round_trip_with_holes_and_properties(tmp_path):
    rng = np.random.default_rng(1)
    polys = [
        Polygon(rng.uniform(0, 5e4, size=(6, 2)).round(3),
                (rect(1, 1, 2, 2), rng.uniform(0, 10, size=(4, 2)))),
        rng.uniform(0, 5e4, size=(3, 2)),
    ]
    path = tmp_path / "rt.geojson"
    write_qupath_geojson(path, polys, properties=[{"name": "a"}, {"name": "b", "score": 0.5}])
    raw = json.loads(path.read_text())
    assert raw["type"] == "FeatureCollection" and len(raw["features"]) == 2
    f0 = raw["features"][0]
    assert f0["geometry"]["type"] == "Polygon" and len(f0["geometry"]["coordinates"]) == 3
    ring = f0["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]  # closed ring
    assert f0["properties"]["objectType"] == "annotation"
    assert f0["properties"]["classification"]["name"] == "Tumor"
    assert len(f0["properties"]["classification"]["color"]) == 3
    assert raw["features"][1]["properties"]["score"] == 0.5
    ann = read_qupath_geojson(path)
    assert len(ann.tumor) == 2 and not ann.normal
    np.testing.assert_allclose(ann.tumor[0].exterior, polys[0].exterior, atol=6e-5, rtol=0)
    assert len(ann.tumor[0].holes) == 2
    for a, b in zip(ann.tumor[0].holes, polys[0].holes, strict=True):
        np.testing.assert_allclose(a, b, atol=6e-5, rtol=0)
    np.testing.assert_allclose(ann.tumor[1].exterior, polys[1], atol=6e-5, rtol=0)
    # explicit normal regions round-trip into `normal`
    write_qupath_geojson(path, [rect(0, 0, 5, 5)], classification="Normal")
    ann = read_qupath_geojson(path)
    assert ann.has_explicit_normal and not ann.tumor
    np.testing.assert_array_equal(ann.normal[0].exterior, rect(0, 0, 5, 5))


def test_geojson_bare_list_multipolygon_classes(tmp_path, caplog):
    def feat(geom, name, obj="annotation"):
        props = {"objectType": obj}
        if name is not None:
            props["classification"] = {"name": name, "colorRGB": -1}
        return {"type": "Feature", "geometry": geom, "properties": props}

    sq = lambda *a: [[list(map(float, p)) for p in rect(*a)] + [list(map(float, rect(*a)[0]))]]  # noqa: E731
    features = [
        feat({"type": "MultiPolygon", "coordinates": [sq(0, 0, 10, 10), sq(20, 0, 30, 10)]},
             "Tumor"),
        feat({"type": "Polygon", "coordinates": sq(0, 50, 10, 60)}, "NORMAL"),
        feat({"type": "Polygon", "coordinates": sq(0, 70, 10, 80)}, "Stroma"),
        feat({"type": "Polygon", "coordinates": sq(0, 90, 10, 99)}, None),
        feat({"type": "Polygon", "coordinates": sq(0, 0, 1, 1)}, "Tumor", obj="detection"),
        feat({"type": "Point", "coordinates": [1, 1]}, "Tumor"),
    ]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(features))
    with caplog.at_level(logging.WARNING):
        ann = read_annotation(path)
    assert ann.format == "geojson"
    assert [p.exterior.tolist() for p in ann.tumor] == [rect(0, 0, 10, 10).tolist(),
                                                         rect(20, 0, 30, 10).tolist()]
    assert len(ann.normal) == 1 and ann.normal[0].bounds() == (0, 50, 10, 60)
    assert "'Stroma'" in caplog.text and "(unclassified)" in caplog.text
    assert "objectType detection" in caplog.text and "geometry Point" in caplog.text


@pytest.mark.parametrize(
    "name, text, reason",
    [
        ("bad.xml", "<ASAP_Annotations><Annotations>", "malformed ASAP XML"),
        ("other.xml", "<svg></svg>", "not an ASAP annotation file"),
        ("coord.xml", ASAP_VARIED.replace('X="200" Y="200"', 'X="abc" Y="200"'),
         "bad coordinate"),
        ("bad.geojson", '{"type": "FeatureCollection", "features": [', "malformed GeoJSON"),
        ("obj.geojson", '{"type": "FeatureCollection", "features": 3}', "malformed GeoJSON"),
        ("geom.geojson", json.dumps([{"type": "Feature", "properties": {
            "classification": {"name": "Tumor"}}, "geometry": {"type": "Polygon"}}]),
         "malformed geometry"),
        ("mask.png", "not a png", "cannot read mask image"),
        ("a.shp", "", "unknown annotation suffix"),
    ],
)
def test_malformed_files_one_line_error_naming_file(tmp_path, name, text, reason):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(AnnotationError) as ei:
        read_annotation(path, slide_size_px_level0=(100, 100))
    msg = str(ei.value)
    assert str(path) in msg and reason in msg
    assert "\n" not in msg


def test_rasterize_centres_holes_and_clipping():
    shape, origin, pitch = (30, 40), (100.0, 50.0), 10.0
    outer = rect(-1000, 83, 262, 10_000)  # partly outside on three sides
    hole = rect(153, 123, 197, 167)
    got = rasterize([Polygon(outer, (hole,))], shape, origin, pitch)
    want = _centres_inside_rect(shape, origin, pitch, -1000, 83, 262, 10_000)
    want &= ~_centres_inside_rect(shape, origin, pitch, 153, 123, 197, 167)
    np.testing.assert_array_equal(got, want)
    assert got.sum() == 27 * 16 - 5 * 5
    # a polygon entirely outside costs nothing and draws nothing
    assert not rasterize([Polygon(rect(-500, -500, -10, -10))], shape, origin, pitch).any()
    # a centre exactly on an edge counts as inside (skimage includes the boundary)
    edge = rasterize([Polygon(rect(0, 0, 15, 15))], (3, 3), (0, 0), 10)
    np.testing.assert_array_equal(edge, [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


def test_rasterize_concave_polygon_matches_point_in_polygon():
    # an L-shape: independent point-in-polygon by rectangles
    L = np.array([[0, 0], [64, 0], [64, 24], [24, 24], [24, 64], [0, 64]], dtype=float) + 1
    got = rasterize([Polygon(L)], (8, 8), (0, 0), 8)
    want = (_centres_inside_rect((8, 8), (0, 0), 8, 1, 1, 65, 25)
            | _centres_inside_rect((8, 8), (0, 0), 8, 1, 1, 25, 65))
    np.testing.assert_array_equal(got, want)


def _mask_from_rects(shape, rects):
    m = np.zeros(shape, dtype=np.uint8)
    for r0, r1, c0, c1 in rects:
        m[r0:r1, c0:c1] = 255
    return m


def test_mask_png_scale_inferred_and_sampling(tmp_path):
    m = _mask_from_rects((25, 50), [(5, 10, 10, 30)])  # mask px at 1/8 of 400 x 200 slide
    path = tmp_path / "m.png"
    Image.fromarray(m).save(path)
    ann = read_annotation(path, slide_size_px_level0=(400, 200))
    assert ann.format == "mask" and ann.mask.scale_xy == (8.0, 8.0)
    assert ann.mask.array.dtype == bool and ann.mask.array.sum() == 5 * 20
    # level-0 tumor is x in [80, 240), y in [40, 80); sample with pitch 4 from (0, 0)
    got = sample_mask(ann.mask, (60, 110), (0, 0), 4)
    want = _centres_inside_rect((60, 110), (0, 0), 4, 80, 40, 239.9, 79.9)
    np.testing.assert_array_equal(got, want)
    # RGB masks: any non-zero channel is tumor
    rgb = np.zeros((25, 50, 3), np.uint8)
    rgb[0, 0, 2] = 1
    Image.fromarray(rgb).save(path)
    assert read_mask(path, (400, 200)).mask.array.sum() == 1
    # a mask whose aspect does not match the slide
    with pytest.raises(AnnotationError, match="does not match"):
        read_mask(path, (400, 400))


def test_mask_tiff_pyramid_level_choice_and_odd_sizes(tmp_path):
    full = _mask_from_rects((404, 1000), [(100, 300, 200, 500)])
    path = tmp_path / "m.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(full, tile=(64, 64), subfiletype=0)
        tif.write(full[::2, ::2], tile=(64, 64), subfiletype=1)
        tif.write(full[::4, ::4], tile=(64, 64), subfiletype=1)
    finest = read_mask(path, (1000, 404))
    assert finest.mask.array.shape == (404, 1000) and finest.mask.scale_xy == (1.0, 1.0)
    ann = read_mask(path, (1000, 404), max_downsample=3)
    assert ann.mask.array.shape == (202, 500) and ann.mask.scale_xy == (2.0, 2.0)
    ann = read_mask(path, (1000, 404), max_downsample=100)
    assert ann.mask.array.shape == (101, 250) and ann.mask.scale_xy == (4.0, 4.0)
    # a level whose size was rounded (1001 / 4 -> 250) still gets the exact integer scale
    assert read_mask(path, (1001, 404), max_downsample=100).mask.scale_xy == (4.0, 4.0)


def test_sample_mask_centres_and_outside():
    m = MaskAnnotation(np.ones((2, 2), bool), (10.0, 10.0))  # level-0 [0, 20) x [0, 20)
    # centres at 4, 12, 20, 28 (not the pixel corners 0, 8, 16, 24: 16 would be inside)
    got = sample_mask(m, (4, 4), (0.0, 0.0), 8.0)
    want = np.zeros((4, 4), bool)
    want[:2, :2] = True
    np.testing.assert_array_equal(got, want)
    # negative origin: samples left of / above the mask are False
    got = sample_mask(m, (4, 4), (-10.0, -10.0), 10.0)
    want = np.zeros((4, 4), bool)
    want[1:3, 1:3] = True
    np.testing.assert_array_equal(got, want)
