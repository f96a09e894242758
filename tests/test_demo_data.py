"""demo-data stage and the synthetic slide renderer (pipeline/synth.py).

A tiny demo set (3 patients x 2 slides of 1.6 mm) is generated once per module; checks read it
back through OpenSlide / xml.etree / matplotlib paths, i.e. by routes other than the writer's.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import typer
from matplotlib.path import Path as MplPath
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from pipeline import synth
from pipeline.manifest import load_manifest
from pipeline.params import parse_params
from pipeline.paths import Paths
from pipeline.stages import demo_data

TINY = """
demo:
  seed: 3
  n_patients: 3
  slides_per_patient: 2
  slide_mm: 1.6
  mpp: 1.0
  split_patients: [1, 1, 1]
  jpeg_quality: 80
"""


def _params(text: str = TINY):
    return parse_params(text)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo1")
    summary = demo_data.run(_params(), Paths(root))
    return root / "data" / "demo", summary


def _read_xml(path: str) -> tuple[list[np.ndarray], list[np.ndarray], set[str]]:
    root = ET.parse(path).getroot()
    tumor, excl, groups = [], [], set()
    for a in root.iter("Annotation"):
        pts = sorted(a.iter("Coordinate"), key=lambda c: int(c.get("Order")))
        poly = np.array([[float(c.get("X")), float(c.get("Y"))] for c in pts])
        groups.add(a.get("PartOfGroup"))
        (excl if a.get("PartOfGroup") == "_2" else tumor).append(poly)
    return tumor, excl, groups


def _level0(path: str) -> np.ndarray:
    with openslide.OpenSlide(path) as s:
        return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))


def _inside_mask(polys: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixel-centre-in-polygon mask via matplotlib (not the PIL rasteriser the renderer uses)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    pts = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
    m = np.zeros(shape[0] * shape[1], bool)
    for p in polys:
        m |= MplPath(p).contains_points(pts)
    return m.reshape(shape)


def test_slides_open_with_mpp_and_levels(demo):
    out, summary = demo
    df = load_manifest(out / "manifest.csv")
    assert len(df) == 6 == summary["n_slides"]
    for path in df["slide_path"]:
        with openslide.OpenSlide(path) as s:
            assert float(s.properties["openslide.mpp-x"]) == pytest.approx(1.0)
            assert float(s.properties["openslide.mpp-y"]) == pytest.approx(1.0)
            assert s.level_count >= 3
            assert s.dimensions == (1600, 1600)
            assert s.level_dimensions[2] == (400, 400)


def test_manifest_layout(demo):
    out, _ = demo
    text = (out / "manifest.csv").read_text().splitlines()
    assert text[0] == "slide_id,slide_path,annotation_path,patient_id,split,slide_label"
    df = load_manifest(out / "manifest.csv")
    assert list(df["slide_id"]) == [f"patient_{p:03d}_node_{n}" for p in range(3) for n in range(2)]
    assert list(df["patient_id"]) == ["patient_000"] * 2 + ["patient_001"] * 2 + ["patient_002"] * 2
    assert list(df["split"]) == ["train"] * 2 + ["val"] * 2 + ["test"] * 2
    # relative paths in the CSV itself
    assert "slides/patient_000_node_0.tiff" in text[1]
    for r in df.itertuples():
        xml = out / "annotations" / f"{r.slide_id}.xml"
        if r.slide_label == "negative":
            assert r.annotation_path == "" and not xml.exists()
        else:
            assert Path(r.annotation_path) == xml.resolve() and xml.is_file()
    # each split (first patient of a split) has a tumor slide and a negative slide
    for split in ("train", "val", "test"):
        labels = set(df.loc[df["split"] == split, "slide_label"])
        assert "negative" in labels and labels - {"negative"}


def test_xml_polygons_parse_and_lie_inside(demo):
    out, _ = demo
    df = load_manifest(out / "manifest.csv")
    n_xml = 0
    for r in df[df["annotation_path"] != ""].itertuples():
        tumor, excl, groups = _read_xml(r.annotation_path)
        n_xml += 1
        assert groups <= {"_0", "_2"} and tumor
        for p in tumor + excl:
            assert p.shape[0] >= 3
            assert (p >= 0).all() and (p[:, 0] < 1600).all() and (p[:, 1] < 1600).all()
        for e in excl:  # exclusions sit inside a tumor outline
            assert any(MplPath(t).contains_points(e).all() for t in tumor)
    assert n_xml >= 3


def test_slide_label_matches_polygon_size(demo):
    out, _ = demo
    df = load_manifest(out / "manifest.csv")
    for r in df.itertuples():
        if r.annotation_path == "":
            assert r.slide_label == "negative"
            continue
        tumor, _, _ = _read_xml(r.annotation_path)
        d_um = 0.0
        for p in tumor:  # longest extent, by a loop instead of the broadcast in synth
            for a in p:
                d_um = max(d_um, float(np.max(np.hypot(*(p - a).T))))
        expect = "macro" if d_um > 2000 else "micro" if d_um > 200 else "itc"
        assert r.slide_label == expect, (r.slide_id, d_um)


def _half_tumor_slide(seed: int) -> np.ndarray:
    """1536 x 768 px of tissue at 1 um/px, the right half annotated tumor."""
    tissue = np.array([[-8, -8], [1544, -8], [1544, 776], [-8, 776]], float)
    tumor = np.array([[768, -8], [1544, -8], [1544, 776], [768, 776]], float)
    spec = synth.SlideSpec(width_px=1536, height_px=768, mpp=1.0, seed=seed, tissue=(tissue,),
                           tumor=(tumor,))
    return synth.render_slide(spec)


def _haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel haematoxylin OD by colour deconvolution with the renderer's stain vectors."""
    od = -np.log((rgb.astype(float) + 1) / 256)
    stains = np.linalg.pinv(np.stack([synth.H_OD, synth.E_OD]))
    return (od.reshape(-1, 3) @ stains)[:, 0].reshape(rgb.shape[:2])


def _large_nucleus_fraction(rgb: np.ndarray) -> float:
    """Fraction of nuclear pixels that survive a binary opening with a disc of radius 3 px:
    ~all of a nucleus >= 4 um in radius, little of 2.3-3.2 um lymphocytes."""
    mask = ndimage.binary_fill_holes(_haematoxylin(rgb) > 0.45)
    disc = np.hypot(*np.mgrid[-3:4, -3:4]) <= 3.2
    return float(ndimage.binary_opening(mask, structure=disc).sum() / max(mask.sum(), 1))


def test_tumor_matches_normal_at_low_res_and_differs_in_nuclei():
    """The answer is not in the low-resolution colour (issue 13): at 16 um/px tumor and normal
    tissue have the same mean and spread of colour; at 1 um/px tumor nuclei are much larger."""
    d_mean, d_std, big_n, big_t = [], [], [], []
    for seed in (1, 2, 3):
        rgb = _half_tumor_slide(seed)
        normal, tumor = rgb[:, 16:752], rgb[:, 784:1520]  # 16 px clear of the tumor border
        lo = [np.asarray(Image.fromarray(a).resize((46, 48), Image.Resampling.BOX), float)
              .reshape(-1, 3) for a in (normal, tumor)]
        d_mean.append(lo[1].mean(0) - lo[0].mean(0))
        d_std.append(lo[1].std(0) - lo[0].std(0))
        big_n.append(_large_nucleus_fraction(normal))
        big_t.append(_large_nucleus_fraction(tumor))
    # the former generator: tumor ~29 grey levels darker in red, block std ~8 levels higher
    assert np.abs(np.mean(d_mean, 0)).max() < 4.0, np.mean(d_mean, 0)
    assert np.abs(np.mean(d_std, 0)).max() < 2.0, np.mean(d_std, 0)
    assert min(big_t) > max(big_n) + 0.3, (big_n, big_t)


def test_deterministic_and_cleans_stale_files(demo, tmp_path):
    out1, _ = demo
    out2 = tmp_path / "data" / "demo"
    (out2 / "slides").mkdir(parents=True)
    (out2 / "annotations").mkdir()
    (out2 / "slides" / "old_slide.tiff").write_bytes(b"x")
    (out2 / "annotations" / "old_slide.xml").write_text("x")
    (out2 / "slides" / ".patient_000_node_0.tiff.abc.tmp").write_bytes(b"x")
    summary = demo_data.run(_params(), Paths(tmp_path))
    assert sorted(Path(p).name for p in summary["removed"]) == [
        ".patient_000_node_0.tiff.abc.tmp", "old_slide.tiff", "old_slide.xml"]
    assert not (out2 / "slides" / "old_slide.tiff").exists()
    assert (out1 / "manifest.csv").read_bytes() == (out2 / "manifest.csv").read_bytes()
    xmls = sorted(p.name for p in (out1 / "annotations").iterdir())
    assert xmls == sorted(p.name for p in (out2 / "annotations").iterdir()) and xmls
    for name in xmls:
        a, b = (o / "annotations" / name for o in (out1, out2))
        assert a.read_bytes() == b.read_bytes()
    for name in ("patient_000_node_0.tiff", "patient_002_node_1.tiff"):
        a = tifffile.imread(out1 / "slides" / name)
        b = tifffile.imread(out2 / "slides" / name)
        assert np.array_equal(a, b)
    # another seed gives another slide (the comparison above can fail)
    other = tmp_path / "other"
    demo_data.run(_params(TINY.replace("seed: 3", "seed: 4")), Paths(other))
    c = tifffile.imread(other / "data" / "demo" / "slides" / "patient_000_node_0.tiff")
    assert not np.array_equal(tifffile.imread(out1 / "slides" / "patient_000_node_0.tiff"), c)


def test_stage_reference_csv(demo):
    out, _ = demo
    df = load_manifest(out / "manifest.csv")
    lines = (out / "stages.csv").read_text().splitlines()
    assert lines[0] == "patient,stage"
    stages = dict(line.split(",") for line in lines[1:4])
    for p in range(3):
        labels = list(df.loc[df["patient_id"] == f"patient_{p:03d}", "slide_label"])
        assert stages[f"patient_{p:03d}.zip"] == demo_data.pn_stage(labels)
    assert lines[4] == f"patient_000_node_0.tiff,{df['slide_label'][0]}"


def test_pn_stage_rules():
    assert demo_data.pn_stage(["negative"] * 5) == "pN0"
    assert demo_data.pn_stage(["itc", "negative", "itc"]) == "pN0(i+)"
    assert demo_data.pn_stage(["micro", "itc", "negative"]) == "pN1mi"
    assert demo_data.pn_stage(["macro", "micro", "micro", "itc", "itc"]) == "pN1"
    assert demo_data.pn_stage(["macro", "micro", "micro", "micro", "negative"]) == "pN2"


def test_default_layout_has_every_class_in_the_right_splits():
    """Geometry only (no rendering): the default params' 30 slides."""
    params = _params("")
    plans = demo_data.plan_demo(params)
    assert len(plans) == 30
    labels = {(sid, split): synth.slide_label(spec.tumor, spec.mpp)
              for sid, _, split, spec in plans}
    assert set(labels.values()) == {"negative", "itc", "micro", "macro"}
    for split in ("train", "val", "test"):
        got = {lab for (_, s), lab in labels.items() if s == split}
        assert "negative" in got and got & {"itc", "micro", "macro"}
    test_labels = {lab for (_, s), lab in labels.items() if s == "test"}
    assert {"macro", "negative"} <= test_labels
    for _, _, _, spec in plans:
        assert spec.width_px == spec.height_px == 5000
        assert 1 <= len(spec.tissue) <= 3
        for t in spec.tumor:  # every tumor vertex lies in one tissue lump
            assert any(MplPath(lump).contains_points(t).all() for lump in spec.tissue)
        for look in spec.lookalikes:  # look-alikes are isolated from annotated tumor
            for t in spec.tumor:
                assert not MplPath(t).contains_points(look).any()


def test_split_patients_must_match_n_patients():
    bad = TINY.replace("n_patients: 3", "n_patients: 2")
    msg = r"demo\.split_patients \[1, 1, 1\] sums to 3, but demo\.n_patients is 2"
    with pytest.raises(demo_data.DemoDataError, match=msg):
        demo_data.run(_params(bad), Paths(Path("/nonexistent")))


def test_geometry_helpers_by_hand():
    square = np.array([[0, 0], [100, 0], [100, 100], [0, 100]], float)
    assert synth.longest_diameter(square) == pytest.approx(100 * np.sqrt(2))
    assert synth.slide_label([], 1.0) == "negative"
    assert synth.slide_label([square], 1.0) == "itc"  # 141 um
    assert synth.slide_label([square], 2.0) == "micro"  # 283 um
    assert synth.slide_label([square * 15], 1.0) == "macro"  # 2121 um
    assert synth.n_levels_for(5000) == 5 and synth.n_levels_for(1000) == 3


def test_render_known_geometry():
    tissue = np.array([[20, 20], [380, 20], [380, 380], [20, 380]], float)
    tumor = np.array([[200, 100], [360, 100], [360, 300], [200, 300]], float)
    spec = synth.SlideSpec(width_px=400, height_px=400, mpp=1.0, seed=1, tissue=(tissue,),
                           tumor=(tumor,))
    rgb = synth.render_slide(spec).astype(float)
    assert rgb.shape == (400, 400, 3)
    glass = rgb[:15, :15]
    assert glass.mean() > 235 and np.ptp(glass.mean(2)) < 15  # near-white, flat background
    normal = rgb[40:360, 40:180]
    tum = rgb[120:280, 220:340]
    assert normal.mean() < 215 and normal[..., 0].mean() > normal[..., 1].mean()  # pink tissue
    assert tum.mean() < 215 and tum[..., 0].mean() > tum[..., 1].mean()
    assert _large_nucleus_fraction(tum) > _large_nucleus_fraction(normal) + 0.3
    assert np.array_equal(synth.render_slide(spec), synth.render_slide(spec))


def test_cli_help_names_inputs_and_outputs():
    app = typer.Typer()
    app.command()(demo_data.cli)
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    assert "--params" in res.output and "data/demo/manifest.csv" in res.output
