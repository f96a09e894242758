"""Bad input, stage by stage: every case ends in ONE line naming the file and the cause (the CLI
prints `error: <message>` and exits 1), or with --on-error skip in a per-slide failure report
while the other slides complete; no partial output is left; a rerun after the fix continues
where it stopped. The SIGKILL kill-and-resume test is tests/test_resume.py.

Already covered elsewhere (not repeated here):
  slide: garbage bytes named .tiff -> one line naming it      test_tile::test_unreadable_file_...
  slide without mpp: warning naming the slide; tile mpp NaN (level tile.fallback_level), or
    tile.fallback_mpp when set -- never a silent guess       test_tile::test_slide_without_mpp_...
  no tissue (--on-error skip: report + others done)          test_tile::test_no_tissue_fails_...
  all tiles below tile.min_tissue                             test_tile::test_all_tiles_below_...
  truncated / stale tile index rewritten on rerun             test_tile::test_rerun_skips_...
  malformed XML / GeoJSON / mask, unknown suffix              test_annotations::test_malformed_...
  unknown ASAP groups / GeoJSON classes warned and listed     test_annotations::test_asap_groups_
    by_group_not_name, test_geojson_bare_list_..., test_label::test_asap_exclusion_holes_...
  polygons partly outside the slide (clipped)                 test_label::test_polygon_partly_...
  label --on-error skip on a malformed annotation             test_label::test_stage_on_error_...
  tile index missing / stale for label                        test_label::test_stale_tile_index_
  manifest: missing columns, duplicate slide_id, missing slide / annotation file, unknown split
    or slide_label, unsafe slide_id                           test_manifest::test_bad_manifests_
  checkpoint: feature_dim mismatch as `pretrained`, shapes / missing keys, junk file, U-Net
    checkpoint loaded as extractor                            test_models::test_checkpoint_...,
                                                              test_extractor_checkpoint_round_trip
Added here: truncated TIFF, PNG / text / empty file named .svs, a directory, a corrupt pyramid
level; skip + fix + resume for tile and label; the CLI path and exit code; ragged / empty-path
manifests; self-intersecting and overlapping polygons (even-odd, union: documented in
pipeline/annotations.py, no repair); polygons entirely outside the slide and annotation files no
manifest row references (warnings); empty train split; NaN loss with epoch and batch named;
checkpoints from other params / architectures refused with the mismatch named.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from conftest import make_params, make_synthetic_slide
from PIL import Image

from pipeline import schema
from pipeline.annotations import (
    AnnotationError,
    Polygon,
    rasterize,
    write_asap_xml,
)
from pipeline.manifest import ManifestError, load_manifest
from pipeline.models import (
    ModelError,
    build_extractor,
    extractor_expectations,
    load_extractor,
    save_checkpoint,
)
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.runtime import TrainingError
from pipeline.slide import SlideError
from pipeline.stages import label as label_stage
from pipeline.stages import tile as tile_stage
from pipeline.stages import train_extractor

REPO = Path(__file__).resolve().parents[1]
# tile params matching conftest's synthetic slide (128 px tiles at 0.5 um/px)
SYNTH = dict(size_px=128, mpp=0.5, mask_mpp=8.0, min_object_um2=2000.0, max_hole_um2=1000.0,
             workers=1)


def _one_line(msg: str, path: Path | str, *causes: str) -> None:
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for c in causes:
        assert c in msg, msg


def _temps(root: Path) -> list[Path]:
    return sorted(root.rglob("*.tmp"))


# -- bad slide files ---------------------------------------------------------------------------


def _garble_last_level(good: Path, out: Path) -> None:
    """A copy of `good` whose coarsest level's JPEG tile data is garbage (opens; reading the
    overview the tile stage uses fails)."""
    data = bytearray(good.read_bytes())
    with tifffile.TiffFile(good) as tif:
        page = tif.pages[len(tif.pages) - 1]
        lo = min(page.dataoffsets)
        hi = max(o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True))
    data[lo + 20:hi] = np.random.default_rng(0).integers(0, 256, hi - lo - 20, np.uint8).tobytes()
    out.write_bytes(bytes(data))


def _break_level0(good: Path, out: Path) -> None:
    """A copy of `good` whose level-0 JPEG tiles have no JPEG header (zeroed): it opens and
    its overview reads fine."""
    data = bytearray(good.read_bytes())
    with tifffile.TiffFile(good) as tif:
        for offset in tif.pages[0].dataoffsets:
            data[offset:offset + 64] = bytes(64)
    out.write_bytes(bytes(data))


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# kind -> (file name, expected cause in the message)
BAD_SLIDES = {
    "truncated": ("cut.tiff", "TIFF that OpenSlide cannot read"),
    "png": ("photo.svs", "a PNG image, not a whole-slide format"),
    "text": ("notes.svs", "unsupported or unrecognised slide format"),
    "empty": ("empty.svs", "empty file (0 bytes)"),
    "directory": ("folder.svs", "is a directory"),
    "corrupt_level": ("corrupt.tiff", "reading level 2 failed"),
}


def _make_bad(kind: str, folder: Path, good: Path) -> Path:
    name, _ = BAD_SLIDES[kind]
    path = folder / name
    if kind == "truncated":  # a valid pyramidal TIFF cut in half
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "png":
        path.write_bytes(_png_bytes())
    elif kind == "text":
        path.write_text("slide_id,slide_path\nthis is a CSV, not a slide\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    else:
        _garble_last_level(good, path)
    return path


@pytest.mark.parametrize("kind", sorted(BAD_SLIDES))
def test_bad_slide_file_is_one_line_naming_file_and_cause(kind, tmp_path, write_manifest,
                                                          synthetic_slide):
    bad = _make_bad(kind, tmp_path, synthetic_slide.path)
    manifest = write_manifest([("bad", bad)])
    paths = Paths(root=tmp_path)
    with pytest.raises(SlideError) as err:
        tile_stage.run(make_params(manifest, **SYNTH), paths)
    _one_line(str(err.value), bad, BAD_SLIDES[kind][1])
    assert not paths.tile_file("bad").exists() and _temps(tmp_path) == []


def test_skip_reports_each_bad_slide_completes_the_rest_and_resumes_after_the_fix(
        tmp_path, write_manifest, synthetic_slide_factory):
    good, blank = synthetic_slide_factory(), synthetic_slide_factory(blank=True)
    folder = tmp_path / "slides"
    folder.mkdir()
    bad = {kind: _make_bad(kind, folder, good.path) for kind in BAD_SLIDES}
    bad["blank"] = folder / "blank.tiff"
    bad["blank"].write_bytes(blank.path.read_bytes())
    rows = [("good", good.path)] + [(k, p) for k, p in bad.items()]
    params = make_params(write_manifest(rows), **SYNTH)
    paths = Paths(root=tmp_path)

    summary = tile_stage.run(params, paths, on_error="skip")
    assert summary["tiled"] == ["good"] and set(summary["failed"]) == set(bad)
    fails = pd.read_csv(paths.reports / "tile_failures.csv").set_index("slide_id")
    assert sorted(fails.index) == sorted(bad)
    for kind, path in bad.items():
        cause = BAD_SLIDES[kind][1] if kind in BAD_SLIDES else "no tissue found"
        _one_line(fails.loc[kind, "error"], path, cause)
        assert fails.loc[kind, "slide_path"] == str(path)
    assert sorted(p.name for p in paths.tiles.iterdir()) == ["good.h5"]  # nothing partial
    assert _temps(tmp_path) == []
    assert pd.read_csv(paths.reports / "tiles.csv")["slide_id"].tolist() == ["good"]

    # the fix: every bad file replaced by a readable slide; the rerun does only those
    good_mtime = paths.tile_file("good").stat().st_mtime_ns
    bad["directory"].rmdir()
    for path in bad.values():
        path.write_bytes(good.path.read_bytes())
    summary = tile_stage.run(params, paths, on_error="skip")
    assert summary["n_current"] == 1 and summary["n_failed"] == 0
    assert sorted(summary["tiled"]) == sorted(bad)
    assert paths.tile_file("good").stat().st_mtime_ns == good_mtime
    assert pd.read_csv(paths.reports / "tile_failures.csv").empty
    assert len(pd.read_csv(paths.reports / "tiles.csv")) == len(rows)


def test_slide_replaced_in_place_is_tiled_again(tmp_path, write_manifest,
                                                synthetic_slide_factory):
    path = tmp_path / "s.tiff"
    path.write_bytes(synthetic_slide_factory().path.read_bytes())
    params = make_params(write_manifest([("s", path)]), **SYNTH)
    paths = Paths(root=tmp_path)
    tile_stage.run(params, paths)
    path.write_bytes(synthetic_slide_factory(scale=2).path.read_bytes())  # another slide
    assert tile_stage.run(params, paths)["n_tiled"] == 1


def _tiled_slide_with_broken_level0(tmp_path: Path, write_manifest) -> tuple[Path, Paths]:
    """A slide whose level-0 tile data is damaged (the overview is fine), already tiled."""
    good = make_synthetic_slide(tmp_path / "good.tiff")
    bad = tmp_path / "l0.tiff"
    _break_level0(good.path, bad)
    paths = Paths(root=tmp_path)
    tile_stage.run(make_params(write_manifest([("s", bad)]), **SYNTH), paths)
    return bad, paths


def test_corrupt_tile_data_names_file_and_position(tmp_path, write_manifest):
    """Damage inside level 0 passes the tile stage (it reads only the overview) and surfaces
    when the tiles' pixels are read."""
    from pipeline.data import slide_loader

    bad, paths = _tiled_slide_with_broken_level0(tmp_path, write_manifest)
    with pytest.raises(SlideError) as err:
        for _ in slide_loader(paths.tile_file("s"), None, 4, workers=0):
            pass
    _one_line(str(err.value), bad, "read_region failed at (")


def test_error_from_a_dataloader_worker_is_printed_as_one_line(tmp_path, write_manifest,
                                                               monkeypatch, capsys):
    from pipeline import cli
    from pipeline.data import slide_loader

    bad, paths = _tiled_slide_with_broken_level0(tmp_path, write_manifest)
    with pytest.raises(SlideError) as err:
        for _ in slide_loader(paths.tile_file("s"), None, 4, workers=1):
            pass

    def app():
        raise err.value

    monkeypatch.setattr(cli, "build_app", lambda names=None: app)
    capsys.readouterr()  # drop the progress bars printed so far
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    printed = capsys.readouterr().err
    assert printed.count("\n") == 1 and printed.startswith(f"error: {bad}: read_region failed")


# -- the CLI path: `error: <one line>` and exit code 1 -----------------------------------------


def _write_labels(paths: Paths, sid: str, labels) -> None:
    labels = np.asarray(labels, dtype=schema.LABEL_DTYPES[schema.LABEL])
    paths.labels.mkdir(parents=True, exist_ok=True)
    with h5py.File(paths.label_file(sid), "w") as f:
        f.attrs["schema_version"] = schema.SCHEMA_VERSION
        f.create_dataset(schema.LABEL, data=labels)
        f.create_dataset(schema.TUMOR_FRACTION, data=(labels == 1).astype(np.float32))
        f.create_dataset(schema.NORMAL_FRACTION, data=(labels == 0).astype(np.float32))


def _n_tiles(paths: Paths, sid: str) -> int:
    with h5py.File(paths.tile_file(sid), "r") as f:
        return int(f[schema.COORDS].shape[0])


def _params_yaml(root: Path, manifest: Path, **extra: dict) -> Path:
    sections = {"data": {"manifest": str(manifest)}, "tile": SYNTH, **extra}
    text = "".join(f"{s}:\n" + "".join(f"  {k}: {v}\n" for k, v in kv.items())
                   for s, kv in sections.items())
    (root / "params.yaml").write_text(text)
    return root / "params.yaml"


def _manifest(root: Path, rows: list[tuple[str, Path, str, str]]) -> Path:
    lines = ["slide_id,slide_path,annotation_path,split"]
    lines += [f"{sid},{p},{a},{split}" for sid, p, a, split in rows]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def test_cli_prints_one_error_line_and_exits_1(tmp_path, synthetic_slide):
    """Two stages' CLIs at once (each interpreter start costs seconds): tile on a truncated
    slide, train-extractor on a train split without labels (label's one-line errors are
    checked through run() below; its CLI runs in tests/test_resume.py)."""
    procs = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}

    def start(name: str, stage: str, cwd: Path) -> None:
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "pipeline", stage, "--params", "params.yaml"], cwd=cwd,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # tile: a truncated slide
    a = tmp_path / "tile"
    a.mkdir()
    cut = _make_bad("truncated", a, synthetic_slide.path)
    _params_yaml(a, _manifest(a, [("cut", cut, "", "train")]))
    start("tile", "tile", a)
    # train-extractor: the only train slide has nolabel tiles only
    b = tmp_path / "train"
    b.mkdir()
    manifest_b = _manifest(b, [("s", synthetic_slide.path, "", "train")])
    _params_yaml(b, manifest_b, extractor={"workers": 0, "epochs": 1})
    tile_stage.run(make_params(manifest_b, **SYNTH), Paths(root=b))
    _write_labels(Paths(root=b), "s", [schema.LABEL_NOLABEL] * _n_tiles(Paths(root=b), "s"))
    start("train", "train-extractor", b)

    expected = {
        "tile": (cut, "TIFF that OpenSlide cannot read"),
        "train": (manifest_b, "the train split has no labelled tiles"),
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, (name, out, err)
        assert "Traceback" not in err, err
        last = err.rstrip("\n").splitlines()[-1]
        assert last.startswith("error: "), err
        _one_line(last, *expected[name])
    assert not Paths(root=a).tile_file("cut").exists() and _temps(tmp_path) == []
    assert not (Paths(root=b).models / "extractor.pt").exists()


# -- manifests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("body, cause", [
    ("s1,s1.tiff,,train\ns2,a,b,c,d,e\n", "cannot read CSV: Error tokenizing data"),
    ("s1,,,train\n", "slide s1: slide_path is empty"),
    ("", "no slides listed"),
])
def test_more_bad_manifests_one_line(tmp_path, body, cause):
    (tmp_path / "s1.tiff").write_bytes(b"x")
    f = tmp_path / "manifest.csv"
    f.write_text("slide_id,slide_path,annotation_path,split\n" + body)
    with pytest.raises(ManifestError) as err:
        load_manifest(f)
    _one_line(str(err.value), f, cause)


def test_manifest_saved_by_excel_with_a_bom_reads(tmp_path):
    (tmp_path / "s1.tiff").write_bytes(b"x")
    f = tmp_path / "manifest.csv"
    f.write_text("slide_id,slide_path,annotation_path,split\ns1,s1.tiff,,train\n",
                 encoding="utf-8-sig")
    assert load_manifest(f)["slide_id"].tolist() == ["s1"]


# -- annotations ---------------------------------------------------------------------------------


def _even_odd(points: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Crossing-number point-in-polygon (even-odd rule), an independent route."""
    x, y = points[:, 0][:, None], points[:, 1][:, None]
    x0, y0 = ring[:, 0][None], ring[:, 1][None]
    x1, y1 = np.roll(ring[:, 0], -1)[None], np.roll(ring[:, 1], -1)[None]
    straddle = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return ((straddle & (x < xc)).sum(axis=1) % 2) == 1


def test_self_intersecting_rings_follow_the_even_odd_rule():
    # bow-tie (0,0)->(40,40)->(40,0)->(0,40): two triangles meeting at (20, 20); centres at
    # 5, 15, 25, 35; the triangles' boundaries count as inside
    bow = np.array([[0, 0], [40, 40], [40, 0], [0, 40]], float)
    got = rasterize([Polygon(bow)], (4, 4), (0, 0), 10)
    np.testing.assert_array_equal(got, [[1, 0, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 1]])
    # pentagram: even-odd leaves its central pentagon OUT (a nonzero-winding fill would not)
    ang = np.pi / 2 + np.arange(5) * 4 * np.pi / 5
    star = np.stack([50.3 + 45 * np.cos(ang), 50.3 - 45 * np.sin(ang)], axis=1)
    got = rasterize([Polygon(star)], (10, 10), (0, 0), 10)
    centres = np.stack(np.meshgrid(np.arange(10) * 10 + 5.0, np.arange(10) * 10 + 5.0),
                       axis=-1).reshape(-1, 2)
    np.testing.assert_array_equal(got.ravel(), _even_odd(centres, star))
    assert not got[4:6, 4:6].any() and got.sum() >= 10  # hollow centre, filled points


def test_overlapping_polygons_are_unioned_not_xored():
    a = np.array([[0, 0], [30, 0], [30, 30], [0, 30]], float)
    got = rasterize([Polygon(a), Polygon(a + 10)], (4, 4), (0, 0), 10)
    want = np.zeros((4, 4), bool)
    want[0:3, 0:3] = want[1:4, 1:4] = True
    np.testing.assert_array_equal(got, want)


def _tile_index(path: Path, params: Params, rc, slide_wh=(400, 400)) -> None:
    """A tile index as the tile stage writes it: 100 level-0 px tiles of 20 px at 0.5 um/px."""
    grid = np.asarray(rc, dtype=np.int32).reshape(-1, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f[schema.COORDS] = (grid[:, ::-1] * 100).astype(np.int64)
        f[schema.GRID] = grid
        f[schema.TISSUE_FRACTION] = np.ones(len(grid), np.float32)
        f[schema.LUMP_ID] = np.ones(len(grid), np.int32)
        f.attrs.update({
            "schema_version": schema.SCHEMA_VERSION, "params_hash": params.section_hash("tile"),
            "params_json": params.section_json("tile"), "slide_id": path.stem,
            "slide_path": "/nowhere.tiff", "slide_fingerprint": "0-x",
            "slide_width_px_level0": slide_wh[0],
            "slide_height_px_level0": slide_wh[1], "mpp": 0.5, "mpp_source": "metadata",
            "tile_mpp": 2.5, "level": 0, "level_downsample": 1.0, "read_size_px": 100,
            "tile_size_px": 20, "tile_size_px_level0": 100.0, "grid_rows": 4, "grid_cols": 4,
            "n_lumps": 1})


def _label_project(tmp_path: Path, annotations: dict[str, str]) -> tuple[Params, Paths]:
    """Slides a, b, ... (4 tiles each, row 0) with the given annotation texts (.xml)."""
    (tmp_path / "ann").mkdir()
    rows = []
    params = Params.model_validate({"data": {"manifest": str(tmp_path / "manifest.csv")},
                                    "tile": {"size_px": 20, "workers": 1},
                                    "label": {"raster_subsample": 2}})
    paths = Paths(root=tmp_path)
    for sid, text in annotations.items():
        (tmp_path / f"{sid}.tiff").write_bytes(b"x")  # never opened by the label stage
        ann = tmp_path / "ann" / f"{sid}.xml"
        ann.write_text(text)
        rows.append((sid, tmp_path / f"{sid}.tiff", str(ann), "train"))
        _tile_index(paths.tile_file(sid), params, [(0, 0), (0, 1), (0, 2), (0, 3)])
    _manifest(tmp_path, rows)
    return params, paths


def _asap(tmp_path: Path, *rects) -> str:
    f = tmp_path / "tmp_asap.xml"
    write_asap_xml(f, [np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)
                       for x0, y0, x1, y1 in rects])
    text = f.read_text()
    f.unlink()
    return text


def test_label_warns_about_polygons_outside_and_unreferenced_files(tmp_path, caplog):
    inside = _asap(tmp_path, (0, 0, 100, 100))  # exactly tile (0, 0)
    outside = _asap(tmp_path, (0, 0, 100, 100), (5000, 5000, 5100, 5100), (-300, 0, -200, 50))
    params, paths = _label_project(tmp_path, {"a": inside, "b": outside})
    (tmp_path / "ann" / "c.xml").write_text(inside)  # a slide missing from the manifest
    (tmp_path / "ann" / "c.png").write_bytes(b"")  # masks are not checked (look like slides)
    with caplog.at_level(logging.WARNING, logger="pipeline.label"):
        summary = label_stage.run(params, paths)
    assert summary["n_labelled"] == 2 and summary["n_tumor"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    outside_msgs = [w for w in warnings if "entirely outside" in w]
    assert len(outside_msgs) == 1
    _one_line(outside_msgs[0], tmp_path / "ann" / "b.xml", "2 of 3 tumor", "400x400")
    unref = [w for w in warnings if "not referenced" in w]
    assert len(unref) == 1 and "1 annotation file(s)" in unref[0] and "c.xml" in unref[0]
    assert "c.png" not in unref[0]


def test_label_skip_then_fix_relabels_only_the_fixed_slide(tmp_path):
    good = _asap(tmp_path, (0, 0, 150, 100))  # tiles (0, 0) tumor, (0, 1) half -> tumor
    params, paths = _label_project(tmp_path, {"a": good, "b": good, "c": "<ASAP_Annotations>"})
    with pytest.raises(AnnotationError) as err:
        label_stage.run(params, paths)  # stops at c; a and b (before it) are done and kept
    _one_line(str(err.value), tmp_path / "ann" / "c.xml", "malformed ASAP XML")
    assert paths.label_file("a").is_file() and paths.label_file("b").is_file()
    summary = label_stage.run(params, paths, on_error="skip")
    assert list(summary["failed"]) == ["c"] and summary["n_current"] == 2
    _one_line(summary["failed"]["c"], tmp_path / "ann" / "c.xml", "malformed ASAP XML")
    assert not paths.label_file("c").exists() and _temps(tmp_path) == []
    mtimes = {s: paths.label_file(s).stat().st_mtime_ns for s in "ab"}
    (tmp_path / "ann" / "c.xml").write_text(good)  # the fix
    summary = label_stage.run(params, paths, on_error="skip")
    assert summary["n_labelled"] == 1 and summary["n_current"] == 2 and summary["n_failed"] == 0
    assert {s: paths.label_file(s).stat().st_mtime_ns for s in "ab"} == mtimes
    with h5py.File(paths.label_file("c"), "r") as f:
        np.testing.assert_array_equal(f[schema.LABEL][...], [1, 1, 0, 0])
    df = pd.read_csv(paths.reports / "labels.csv")
    assert df["slide_id"].tolist() == ["a", "b", "c"] and df["n_tumor"].tolist() == [2, 2, 2]


# -- training --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_project(tmp_path_factory) -> tuple[Params, Paths]:
    """One synthetic slide tiled (13 tiles), labelled tumor / normal alternately; params for a
    tiny CPU run of train-extractor."""
    root = tmp_path_factory.mktemp("train_project")
    slide = make_synthetic_slide(root / "s.tiff")
    manifest = _manifest(root, [("s", slide.path, "", "train")])
    params = make_params(manifest, **SYNTH)
    raw = params.model_dump(mode="json")
    raw["extractor"].update(arch="small_cnn", crop_px=64, batch_size=4, epochs=1, workers=0,
                            amp=False)
    params = Params.model_validate(raw)
    paths = Paths(root=root)
    assert tile_stage.run(params, paths)["n_tiled"] == 1
    _write_labels(paths, "s", np.arange(_n_tiles(paths, "s")) % 2)
    return params, paths


def _with_manifest(params: Params, manifest: Path) -> Params:
    raw = params.model_dump(mode="json")
    raw["data"]["manifest"] = str(manifest)
    return Params.model_validate(raw)


def test_train_split_without_labelled_tiles_is_refused(train_project, tmp_path):
    """No train slide at all (a train split whose tiles are all nolabel: the CLI test)."""
    params, paths = train_project
    slide = Path(load_manifest(params.data.manifest)["slide_path"][0])
    # no train slide at all (the only slide is val)
    m = _manifest(tmp_path, [("s", slide, "", "val")])
    with pytest.raises(TrainingError) as err:
        train_extractor.run(_with_manifest(params, m), paths)
    _one_line(str(err.value), m, "the train split has no labelled tiles")
    assert not (paths.models / "extractor.pt").exists()


def test_nan_loss_stops_naming_epoch_and_batch(train_project, monkeypatch):
    params, paths = train_project
    calls = []

    def nan_on_second_batch(*args, **kwargs):
        model = build_extractor(*args, **kwargs)

        def hook(module, inputs, output):
            calls.append(1)
            return output * float("nan") if len(calls) == 2 else output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_extractor, "build_extractor", nan_on_second_batch)
    with pytest.raises(TrainingError) as err:
        train_extractor.run(params, paths)
    assert str(err.value) == ("train-extractor: non-finite loss (nan) at epoch 0, batch 1; "
                              "lower the learning rate or check the inputs")
    assert len(calls) == 2  # stopped at once, before another step
    assert not (paths.models / "extractor.pt").exists() and _temps(paths.root) == []


# -- checkpoints -------------------------------------------------------------------------------


def _params(**extractor) -> Params:
    raw = Params().model_dump(mode="json")
    raw["extractor"].update(extractor)
    return Params.model_validate(raw)


def _checkpoint(tmp_path: Path, params: Params) -> Path:
    path = tmp_path / "extractor.pt"
    model = build_extractor(params.extractor.arch, params.extractor.feature_dim)
    save_checkpoint(path, model, {"params_json": params.section_json("seed", "extractor", "tile")})
    return path


def test_checkpoint_from_other_params_is_refused_naming_each_mismatch(tmp_path):
    trained = _params(feature_dim=16, crop_px=224)
    path = _checkpoint(tmp_path, trained)
    model, _ = load_extractor(path, expected=extractor_expectations(trained))
    assert model.feature_dim == 16
    raw = trained.model_dump(mode="json")
    raw["tile"]["mpp"] = 0.5
    raw["extractor"]["feature_dim"] = 8
    other = Params.model_validate(raw)
    with pytest.raises(ModelError) as err:
        load_extractor(path, expected=extractor_expectations(other))
    _one_line(str(err.value), path, "feature_dim: checkpoint 16, params ask for 8",
              "tile.mpp: checkpoint 1.0, params ask for 0.5")
    assert "arch:" not in str(err.value)  # only the keys that differ
    # a checkpoint that does not record its params cannot be checked: refused too
    bare = tmp_path / "bare.pt"
    save_checkpoint(bare, build_extractor("small_cnn", 16))
    with pytest.raises(ModelError, match="tile.mpp: not recorded in the checkpoint"):
        load_extractor(bare, expected=extractor_expectations(trained))


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = _checkpoint(tmp_path, _params(arch="small_cnn"))
    with pytest.raises(ModelError) as err:
        load_extractor(path, expected=extractor_expectations(_params(arch="resnet18")))
    _one_line(str(err.value), path, "arch: checkpoint 'small_cnn', params ask for 'resnet18'")
    with pytest.raises(ModelError) as err:  # as extractor.pretrained
        build_extractor("resnet18", 16, pretrained=str(path))
    _one_line(str(err.value), path, "checkpoint is arch='small_cnn'", "arch='resnet18'")
    # a plain state_dict of another architecture: the first missing / unexpected key is named
    plain = tmp_path / "plain.pt"
    torch.save(build_extractor("small_cnn", 16).state_dict(), plain)
    with pytest.raises(ModelError) as err:
        build_extractor("resnet18", 16, pretrained=str(plain))
    _one_line(str(err.value), plain, "does not fit", "missing", "unexpected")


def test_extract_features_refuses_a_checkpoint_trained_under_other_params(train_project,
                                                                          tmp_path):
    from pipeline import extraction as extract_features

    params, paths = train_project
    raw = params.model_dump(mode="json")
    raw["tile"]["mpp"] = 1.0  # the extractor saw 1.0 um/px tiles; these are 0.5 um/px
    ckpt = tmp_path / "extractor.pt"
    save_checkpoint(ckpt, build_extractor("small_cnn", params.extractor.feature_dim),
                    {"params_json": Params.model_validate(raw).section_json(
                        "seed", "extractor", "tile")})
    out = Paths(root=tmp_path)
    (out.tiles).mkdir(parents=True)
    (out.labels).mkdir(parents=True)
    for src, dst in ((paths.tile_file("s"), out.tile_file("s")),
                     (paths.label_file("s"), out.label_file("s"))):
        dst.write_bytes(src.read_bytes())
    with pytest.raises(ModelError, match="tile.mpp: checkpoint 1.0, params ask for 0.5"):
        extract_features.extract_all(params, out, ckpt)
    assert not out.feature_file("s").exists()
