"""CAMELYON16-shaped synthetic slides (pipeline/synth_camelyon.py): what OpenSlide, the
annotation reader and the manifest loader see, glass written as one shared tile, and memory
that does not grow with the slide."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from matplotlib.path import Path as MplPath

from pipeline import synth_camelyon as sc
from pipeline.annotations import read_asap_xml
from pipeline.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
W, H = 8192, 4096


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, sc.CamelyonSlideSpec, dict]:
    out = tmp_path_factory.mktemp("camelyon")
    spec = sc.plan_camelyon_slide(3, W, H, n_lumps=2, lump_um=700.0)
    stats = sc.write_camelyon_tiff(spec, out / "s.tif")
    sc.write_camelyon_xml(out / "s.xml", spec)
    return out, spec, stats


def test_levels_mpp_and_dimensions_as_openslide_reads_them(small):
    out, spec, stats = small
    s = openslide.OpenSlide(out / "s.tif")
    assert s.properties["openslide.vendor"] == "generic-tiff"
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.243, abs=1e-6)
    assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.243, abs=1e-6)
    assert s.dimensions == (W, H)
    # 8192 -> 256: six power-of-two levels, the coarsest below TOP_LEVEL_MAX_PX
    assert s.level_count == spec.n_levels == 6
    assert s.level_dimensions == tuple((W >> k, H >> k) for k in range(6))
    assert [round(d) for d in s.level_downsamples] == [2**k for k in range(6)]
    assert max(s.level_dimensions[-1]) < sc.TOP_LEVEL_MAX_PX <= max(s.level_dimensions[-2])
    assert stats["levels"] == [list(d) for d in s.level_dimensions]
    with tifffile.TiffFile(out / "s.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilewidth, page.tilelength) == (512, 512)
        assert int(page.compression) == 7  # JPEG


def test_camelyon_sized_slide_has_nine_or_ten_levels():
    assert sc.plan_camelyon_slide(0, 96_000, 48_000, 1, 3000).n_levels == 9
    assert sc.plan_camelyon_slide(0, 128_000, 64_000, 1, 3000).n_levels == 10


def test_glass_tiles_share_one_encoding_and_decode_uniform(small):
    out, spec, stats = small
    glass = sc.glass_tile()
    with tifffile.TiffFile(out / "s.tif") as tif, open(out / "s.tif", "rb") as fh:
        page = tif.pages[0]
        blobs = []
        for off, n in zip(page.dataoffsets, page.databytecounts, strict=True):
            fh.seek(off)
            blobs.append(fh.read(n))
    n_glass = sum(b == glass for b in blobs)
    n_tiles = len(blobs)
    assert n_tiles == (W // 512) * (H // 512)
    assert 0.5 * n_tiles < n_glass < n_tiles  # mostly glass, and some tissue
    # every tile that is not the glass tile differs from it (tissue), each rendered on its own
    assert len({b for b in blobs if b != glass}) == n_tiles - n_glass
    # a glass region decodes to one colour; far from the lumps nothing but glass
    s = openslide.OpenSlide(out / "s.tif")
    corner = np.asarray(s.read_region((0, 0), 0, (512, 512)).convert("RGB"))
    assert (corner == corner[0, 0]).all()
    assert np.abs(corner[0, 0].astype(int) - sc.GLASS_RGB).max() <= 2


def test_asap_xml_round_trip_in_camelyon16_layout(small):
    out, spec, _ = small
    root = ET.parse(out / "s.xml").getroot()
    anns = root.findall("./Annotations/Annotation")
    assert [a.get("Name") for a in anns] == [f"Annotation {i}" for i in range(len(anns))]
    groups = [a.get("PartOfGroup") for a in anns]
    assert groups == ["_0"] + ["_1"] * (len(spec.tumors) - 1) + ["_2"] * len(spec.exclusions)
    assert [g.get("Name") for g in root.findall("./AnnotationGroups/Group")] == ["_0", "_1", "_2"]
    x = anns[0].find("./Coordinates/Coordinate").get("X")
    assert "." in x and float(x) > 0  # decimal string
    ann = read_asap_xml(out / "s.xml")
    assert len(ann.tumor) == len(spec.tumors) == 2 and len(ann.exclusion) == 1
    for got, want in zip(ann.tumor, spec.tumors, strict=True):
        np.testing.assert_allclose(got.exterior, want, atol=1e-4)
    np.testing.assert_allclose(ann.exclusion[0].exterior, spec.exclusions[0], atol=1e-4)


def _points_inside(poly: np.ndarray, n: int, rng, outside=()) -> np.ndarray:
    lo, hi = poly.min(0), poly.max(0)
    pts = rng.uniform(lo, hi, (4000, 2))
    ok = MplPath(poly).contains_points(pts)
    for o in outside:
        ok &= ~MplPath(o).contains_points(pts)
    return pts[ok][:n]


def test_tissue_where_annotated_and_glass_elsewhere(small):
    out, spec, _ = small
    s = openslide.OpenSlide(out / "s.tif")
    rng = np.random.default_rng(0)

    def patch(xy, level=0):
        ds = 2**level
        x, y = int(xy[0]) - 8 * ds, int(xy[1]) - 8 * ds
        return np.asarray(s.read_region((x, y), level, (16, 16)).convert("RGB")).astype(int)

    glass = np.asarray(sc.GLASS_RGB)
    for level in (0, 3):
        tumor_pts = _points_inside(spec.tumors[0], 5, rng, outside=spec.exclusions)
        assert len(tumor_pts) == 5
        for xy in tumor_pts:  # stained: darker than glass, and reddish-purple (G lowest)
            rgb = patch(xy, level).mean((0, 1))
            assert (glass - rgb).min() > 20 and rgb[1] < rgb[0] and rgb[1] < rgb[2]
    # the tumor is more haematoxylin (darker) than normal tissue of another lump, at level 3
    normal_pts = _points_inside(spec.lumps[1], 5, rng)
    tumor_mean = np.mean([patch(xy, 3).mean() for xy in
                          _points_inside(spec.tumors[0], 5, rng, outside=spec.exclusions)])
    normal_mean = np.mean([patch(xy, 3).mean() for xy in normal_pts])
    assert tumor_mean < normal_mean - 10
    # outside every lump's bounding box: glass
    far = [xy for xy in rng.uniform((16, 16), (W - 16, H - 16), (200, 2))
           if not any(MplPath(lump).contains_point(xy, radius=200) for lump in spec.lumps)][:20]
    for xy in far:
        assert np.abs(patch(xy) - glass).max() <= 3


def test_streaming_memory_does_not_grow_with_the_slide(tmp_path):
    """A 49152 x 24576 slide (level 0 would be 3.4 GiB as RGB) is written with the Python heap
    (numpy included) peaking at a few MB: levels are streamed as encoded tiles."""
    peaks = {}
    for side in (12288, 49152):
        spec = sc.plan_camelyon_slide(1, side, side // 2, n_lumps=1, lump_um=300.0)
        tracemalloc.start()
        stats = sc.write_camelyon_tiff(spec, tmp_path / f"{side}.tif")
        peaks[side] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert stats["tissue_tiles"] < 40
    level0 = 49152 * 24576 * 3
    assert peaks[49152] < 40 * 2**20 and peaks[49152] < level0 / 50
    # 16x the slide area, same tissue: the peak grows by the per-tile bookkeeping only
    assert peaks[49152] < 1.5 * peaks[12288] + 4 * 2**20


def test_command_writes_a_manifest_the_pipeline_loads(tmp_path):
    out = tmp_path / "set"
    cmd = [sys.executable, "-m", "pipeline", "synth-camelyon", "--out", str(out), "--n-slides",
           "2", "--width-px", "4096", "--height-px", "2048", "--lump-mm", "0.3", "--scale", "2",
           "--n-lumps", "1", "--splits", "train,test"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    df = load_manifest(out / "manifest.csv")
    assert list(df.slide_id) == ["tumor_001", "tumor_002"]
    assert list(df.split) == ["train", "test"]
    assert set(df.slide_label) <= {"itc", "micro", "macro"}
    s = openslide.OpenSlide(df.slide_path[0])
    # --scale 2: twice the area, sides x sqrt(2)
    assert s.dimensions == (round(4096 * 2**0.5), round(2048 * 2**0.5))
    assert read_asap_xml(df.annotation_path[0]).tumor


def test_lumps_that_do_not_fit_are_refused():
    with pytest.raises(sc.SynthError, match="do not fit"):
        sc.plan_camelyon_slide(0, 4096, 2048, n_lumps=3, lump_um=1000.0)
