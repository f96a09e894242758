"""Bounded-memory tissue mask: the overview read window by window (`Slide.overview`) and the mask
cleaned per tissue window (`tissue.tissue_mask_from_overview`) give exactly the one-piece
results (`Slide.low_res_image` + `compute_tissue_mask`), and the tile stage never reads the
overview level in one piece."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import GLASS_RGB, TISSUE_RGB
from PIL import Image

from pipeline.slide import Overview, Slide
from pipeline.tiff import write_pyramidal_tiff
from pipeline.tissue import compute_tissue_mask, tissue_mask_from_overview


class _Level:
    """A one-level stand-in for Slide: an in-memory level read by window."""

    def __init__(self, img: np.ndarray):
        self.img, self.path = img, "mem"
        self.level_dimensions = [(img.shape[1], img.shape[0])]
        self.dimensions = self.level_dimensions[0]

    def read_level(self, level, x, y, w, h):
        return self.img[y:y + h, x:x + w]


class _Mem:
    """An overview that is already in memory, read in windows."""

    def __init__(self, img: np.ndarray):
        self.img, self.shape = img, img.shape[:2]
        self.downsample_x = self.downsample_y = 1.0

    def tile_px(self, multiple, target_px):
        return max(multiple, target_px // multiple * multiple)

    def read(self, r0, r1, c0, c1):
        return self.img[r0:r1, c0:c1]


def _assert_same(a, b):
    assert (a.shape, a.n_components, a.threshold, a.otsu_threshold) == (
        b.shape, b.n_components, b.threshold, b.otsu_threshold)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.labels, b.labels)


def _lumps(rng, h, w, n):
    """Glass with n tissue discs (holes, islands in holes, specks, a dark blot, some discs at
    the border), like a slide's overview."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GLASS_RGB
    yy, xx = np.mgrid[:h, :w]
    for _ in range(n):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 40)
        d = np.hypot(yy - cy, xx - cx)
        img[d < r] = TISSUE_RGB
        img[(d < r / 3)] = GLASS_RGB  # a hole...
        img[(d < r / 8)] = TISSUE_RGB  # ...with an island
    specks = rng.random((h, w)) < 0.0005
    img[specks] = TISSUE_RGB
    img[:3, :5] = (10, 2, 3)  # near-black: never tissue
    return img


@pytest.mark.parametrize("seed", range(12))
def test_windowed_mask_equals_one_piece_mask(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(30, 600, 2))
    img = _lumps(rng, h, w, int(rng.integers(0, 6)))
    hole, obj = float(rng.uniform(0, 800)), float(rng.uniform(0, 300))
    if seed == 0:
        hole = 1e9  # every glass region is a "hole": the whole overview becomes one window
    one = compute_tissue_mask(img, 1.0, 1.0, 1.0, obj, hole)
    win = tissue_mask_from_overview(_Mem(img), 1.0, obj, hole)
    _assert_same(one, win)
    x, y = rng.uniform(-8, w, 300), rng.uniform(-8, h, 300)
    size = float(rng.uniform(1, 40))
    np.testing.assert_array_equal(one.box_fractions(x, y, size), win.box_fractions(x, y, size))
    np.testing.assert_array_equal(one.box_majority_labels(x, y, size),
                                  win.box_majority_labels(x, y, size))


def test_lumps_in_glass_are_cleaned_in_small_windows():
    rng = np.random.default_rng(7)
    img = np.empty((700, 1100, 3), np.uint8)
    img[:] = GLASS_RGB
    yy, xx = np.mgrid[:700, :1100]
    for cy, cx, r in [(100, 120, 40), (500, 300, 60), (350, 900, 50), (690, 1090, 30)]:
        d = np.hypot(yy - cy, xx - cx)
        img[d < r] = TISSUE_RGB
        img[d < r / 3] = GLASS_RGB  # a hole with an island
        img[d < r / 8] = TISSUE_RGB
    img[rng.integers(0, 700, 12), rng.integers(0, 1100, 12)] = TISSUE_RGB  # specks
    one = compute_tissue_mask(img, 1.0, 1.0, 1.0, 50.0, 200.0)
    win = tissue_mask_from_overview(_Mem(img), 1.0, 50.0, 200.0)
    _assert_same(one, win)
    assert one.n_components == 7  # 4 lumps + the islands in their holes
    assert len(win.windows) == 4  # one per lump; the specks' windows come out empty
    assert sum(w.mask.size for w in win.windows) < img.shape[0] * img.shape[1] / 10


@pytest.mark.parametrize("seed", range(8))
def test_windowed_box_resize_equals_pil(seed):
    # Pillow's BOX resize replicated per window, including its choice of pass order
    rng = np.random.default_rng(100 + seed)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        oh, ow = (int(v) for v in rng.integers(1, 100, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(img).resize((ow, oh), Image.Resampling.BOX))
        ov = Overview(_Level(img), 0, (oh, ow))
        step = int(rng.integers(1, 40))
        out = np.zeros_like(ref)
        for r in range(0, oh, step):
            for c in range(0, ow, step):
                out[r:r + step, c:c + step] = ov.read(r, min(oh, r + step), c, min(ow, c + step))
        np.testing.assert_array_equal(out, ref, err_msg=f"{(h, w)} -> {(oh, ow)}")


def _pyramid(tmp_path, h, w, n_levels, seed=0):
    rng = np.random.default_rng(seed)
    img = _lumps(rng, h, w, 5)
    img = np.clip(img.astype(np.int16) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "s.tiff"
    write_pyramidal_tiff(path, img, mpp=0.25, n_levels=n_levels, tile_px=128)
    return path


@pytest.mark.parametrize("hw,ds", [((1024, 1536), 3.3), ((1000, 1530), 5.5), ((1024, 1536), 9.7)])
def test_slide_overview_equals_low_res_image(tmp_path, hw, ds):
    # (1000, 1530): levels with fractional downsamples (read in one piece, same pixels)
    path = _pyramid(tmp_path, *hw, n_levels=4)
    with Slide(path) as s:
        ref, ds_x = s.low_res_image(ds)
        ov = s.overview(ds)
        assert ov.shape == ref.shape[:2] and ov.downsample_x == ds_x
        one = compute_tissue_mask(ref, ds_x, ov.downsample_y, ds_x * 0.25, 200.0, 50.0)
        win = tissue_mask_from_overview(ov, ds_x * 0.25, 200.0, 50.0)
        out = np.zeros_like(ref)
        for r in range(0, ref.shape[0], 61):
            for c in range(0, ref.shape[1], 47):
                out[r:r + 61, c:c + 47] = ov.read(r, min(r + 61, ref.shape[0]), c,
                                                  min(c + 47, ref.shape[1]))
    _assert_same(one, win)
    np.testing.assert_array_equal(out, ref)


# -- the tile stage: same outputs as the one-piece mask, bounded reads -------------------------


def _one_piece_tiles(slide_path, params):
    """The tile stage's tiles and thumbnail from the one-piece overview (the former code path)."""
    from pipeline import tiling
    from pipeline.slide import tile_geometry_for

    tp = params.tile
    with Slide(slide_path) as s:
        geom = tile_geometry_for(s, tp)
        ds_req, mpp_areas = tiling._mask_downsample(s, geom, tp)
        rgb, ds_x = s.low_res_image(ds_req)
        width, height = s.dimensions
    tm = compute_tissue_mask(rgb, ds_x, height / rgb.shape[0], ds_x * mpp_areas,
                             tp.min_object_um2, tp.max_hole_um2)
    pitch = geom.tile_size_px_level0
    grid, coords, _, _ = tiling.grid_positions(width, height, pitch)
    frac = tm.box_fractions(coords[:, 0], coords[:, 1], pitch)  # the whole grid at once
    keep = (frac >= tp.min_tissue) & (frac > 0)
    grid, coords, frac = grid[keep], coords[keep], frac[keep]
    _, lump = np.unique(tm.box_majority_labels(coords[:, 0], coords[:, 1], pitch),
                        return_inverse=True)
    lump = lump + 1
    scale = max(1, -(-max(rgb.shape[:2]) // tiling.THUMB_MAX_PX))
    img = np.array(Image.fromarray(rgb).reduce(scale)) if scale > 1 else rgb.copy()
    return (grid, coords, frac, lump), tiling._thumbnail(img, scale, tm, coords, pitch)


def _tile_with_read_log(tmp_path, slide_path, params, monkeypatch):
    import openslide

    from pipeline.paths import Paths
    from pipeline.tileindex import read_tile_index
    from pipeline.tiling import thumb_file, tile_slide

    sizes = []
    real = openslide.OpenSlide.read_region

    def logged(self, location, level, size):
        sizes.append(size[0] * size[1])
        return real(self, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, "read_region", logged)
    paths = Paths(root=tmp_path / "proj")
    tile_slide("s", slide_path, params, paths)
    monkeypatch.undo()
    idx = read_tile_index(paths.tile_file("s"))
    png = np.asarray(Image.open(thumb_file(paths, "s")).convert("RGB"))
    return (idx.grid, idx.coords, idx.tissue_fraction, idx.lump_id), png, sizes


def _assert_tiles_equal(new, old):
    from pipeline.schema import TILE_DTYPES

    for a, b, dtype in zip(new, old, TILE_DTYPES.values(), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b, dtype=dtype))


def test_tile_stage_on_a_camelyon_shaped_slide_reads_in_bounded_windows(
        tmp_path, monkeypatch, write_manifest):
    from conftest import make_params

    from pipeline import synth_camelyon as sc

    spec = sc.plan_camelyon_slide(5, 32_768, 16_384, n_lumps=3, lump_um=900.0)
    path = tmp_path / "c.tif"
    sc.write_camelyon_tiff(spec, path)
    params = make_params(write_manifest([("s", path)]), size_px=256, mpp=0.25, mask_mpp=8.0,
                         workers=1)  # the paper's CAMELYON configuration
    from pipeline import tiling

    monkeypatch.setattr(tiling, "GRID_BAND_TILES", 500)  # the grid scored in 16 bands
    new_tiles, new_png, sizes = _tile_with_read_log(tmp_path, path, params, monkeypatch)
    old_tiles, old_png = _one_piece_tiles(path, params)
    _assert_tiles_equal(new_tiles, old_tiles)
    np.testing.assert_array_equal(new_png, old_png)
    assert len(new_tiles[0]) > 100
    # the mask level (32x) is 1024 x 512 px; no read is a large part of it
    with Slide(path) as s:
        level = s.best_level(8.0 / 0.243)
        lw, lh = s.level_dimensions[level]
    assert lw * lh == 1024 * 512 and max(sizes) <= 530 * 530 < lw * lh / 1.8


def test_tile_stage_on_a_demo_like_slide_matches_the_one_piece_mask(
        tmp_path, monkeypatch, write_manifest, synthetic_slide):
    from conftest import make_params

    params = make_params(write_manifest([("s", synthetic_slide.path)]), size_px=128, mpp=0.5,
                         mask_mpp=8.0, min_object_um2=2000.0, max_hole_um2=1000.0, workers=1)
    new_tiles, new_png, _ = _tile_with_read_log(tmp_path, synthetic_slide.path, params,
                                                monkeypatch)
    old_tiles, old_png = _one_piece_tiles(synthetic_slide.path, params)
    _assert_tiles_equal(new_tiles, old_tiles)
    np.testing.assert_array_equal(new_png, old_png)


def test_a_pillow_resizing_otherwise_gets_the_one_piece_overview(tmp_path, monkeypatch):
    from pipeline import slide as slide_mod

    path = _pyramid(tmp_path, 1024, 1536, n_levels=4)
    monkeypatch.setattr(slide_mod, "_pillow_vertical_first_rule", lambda: None)
    with Slide(path) as s:
        ref, _ = s.low_res_image(3.3)
        ov = s.overview(3.3)
        np.testing.assert_array_equal(ov.read(10, 200, 30, 90), ref[10:200, 30:90])
