"""The patch data path: pixels at the right place (slide, resampled level, pixel cache, workers),
augmentation, class-balanced sampling, split lists."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import openslide
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from pipeline import augment
from pipeline.data import (
    CACHE_COMPRESSION,
    MAX_OPEN_HANDLES,
    BalancedSampler,
    DataError,
    PatchDataset,
    PatchItems,
    SlidePatchDataset,
    _HandleCache,
    collect_labelled,
    epoch_indices,
    geometry_from_attrs,
    patch_loader,
    pixel_cache_path,
    read_tile_index,
    slide_loader,
    write_pixel_cache,
)
from pipeline.paths import Paths
from pipeline.schema import (
    COORDS,
    GRID,
    LABEL,
    LABEL_NOLABEL,
    LABEL_NORMAL,
    LABEL_TUMOR,
    LUMP_ID,
    SCHEMA_VERSION,
    TILE_DTYPES,
    TISSUE_FRACTION,
)
from pipeline.slide import Slide
from pipeline.tiff import write_pyramidal_tiff
from pipeline.tileindex import TileIndexError

SLIDE_PX = 512
TILE_PX = 64
SLIDE_MPP = 0.5


def _structured_rgb(seed: int) -> np.ndarray:
    """Gradients + 16 px blocks of random colour: any misplaced read differs clearly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SLIDE_PX, 0:SLIDE_PX]
    blocks = rng.integers(0, 256, size=(SLIDE_PX // 16, SLIDE_PX // 16, 3), dtype=np.uint8)
    rgb = np.repeat(np.repeat(blocks, 16, axis=0), 16, axis=1).astype(np.int32)
    rgb[..., 0] = (rgb[..., 0] + xx * 255 // SLIDE_PX) // 2
    rgb[..., 1] = (rgb[..., 1] + yy * 255 // SLIDE_PX) // 2
    return rgb.astype(np.uint8)


def _write_tile_index(path: Path, slide_path: Path, tile_mpp: float, params_hash: str = "h1"):
    """A tile index as the tile stage writes it (schema names), for tiles on the slide's grid."""
    with Slide(slide_path) as s:
        geom = s.tile_geometry(TILE_PX, tile_mpp)
    pitch = geom.tile_size_px_level0
    n_side = int(SLIDE_PX // pitch)
    grid = np.array([(r, c) for r in range(n_side) for c in range(n_side)], dtype=np.int32)
    grid = grid[(grid.sum(1) % 2 == 0) | (grid[:, 0] == n_side - 1)]  # a sparse, uneven set
    coords = np.round(grid[:, ::-1] * pitch).astype(np.int64)
    with h5py.File(path, "w") as f:
        f.create_dataset(COORDS, data=coords.astype(TILE_DTYPES[COORDS]))
        f.create_dataset(GRID, data=grid)
        f.create_dataset(TISSUE_FRACTION, data=np.ones(len(grid), np.float32))
        f.create_dataset(LUMP_ID, data=np.ones(len(grid), np.int32))
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["params_hash"] = params_hash
        f.attrs["slide_id"] = path.stem
        f.attrs["slide_path"] = str(slide_path)
        for k, v in geom.as_attrs().items():
            f.attrs[k] = v
        f.attrs.update(params_json="{}", slide_fingerprint="0-x", slide_width_px_level0=SLIDE_PX,
                       slide_height_px_level0=SLIDE_PX, grid_rows=n_side, grid_cols=n_side,
                       n_lumps=1)
    return geom, coords


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Two slides (mpp 0.5, 3 levels) and tile indices at three tile resolutions:
    0.5 um/px (level 0 exact), 1.0 (level 1 exact), 0.75 (no exact level: read 96 px at level 0
    and resample to 64)."""
    root = tmp_path_factory.mktemp("slides")
    out = {}
    for s in range(2):
        rgb = _structured_rgb(s)
        sp = root / f"slide{s}.tiff"
        write_pyramidal_tiff(sp, rgb, mpp=SLIDE_MPP, n_levels=3, tile_px=128, jpeg_quality=95)
        for name, tmpp in (("exact0", 0.5), ("exact1", 1.0), ("resampled", 0.75)):
            tf = root / "tiles" / f"s{s}_{name}.h5"
            tf.parent.mkdir(exist_ok=True)
            geom, coords = _write_tile_index(tf, sp, tmpp)
            out[(s, name)] = {"tile_file": tf, "slide": sp, "geom": geom, "coords": coords,
                              "rgb": rgb}
    return out


def _raw_openslide_tile(slide_path: Path, x0: int, y0: int, level: int, read_px: int,
                        out_px: int) -> np.ndarray:
    """Directly through openslide-python, not through pipeline.slide."""
    osr = openslide.OpenSlide(str(slide_path))
    rgba = np.asarray(osr.read_region((x0, y0), level, (read_px, read_px)))
    osr.close()
    assert (rgba[..., 3] == 255).all()  # inside the slide: opaque
    rgb = rgba[..., :3]
    if read_px != out_px:
        rgb = np.asarray(Image.fromarray(rgb).resize((out_px, out_px), Image.Resampling.BOX))
    return rgb


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


# -- geometry ----------------------------------------------------------------------------------
def test_geometry_from_attrs_round_trips_and_names_missing(slides):
    d = slides[(0, "resampled")]
    with h5py.File(d["tile_file"], "r") as f:
        geom = geometry_from_attrs(f.attrs)
    assert geom == d["geom"]
    assert (geom.level, geom.read_size_px, geom.tile_size_px) == (0, 96, 64)
    assert slides[(0, "exact1")]["geom"].level == 1
    with pytest.raises(TileIndexError, match="read_size_px"):
        geometry_from_attrs({"level": 0}, source="x.h5")


# -- pixels at the right place -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["exact0", "exact1", "resampled"])
def test_dataset_pixels_equal_raw_openslide_and_slide_read_tile(slides, name):
    d = slides[(1, name)]
    geom, coords = d["geom"], d["coords"]
    ds = SlidePatchDataset(d["tile_file"])
    assert len(ds) == len(coords)
    with Slide(d["slide"]) as s:
        for j in range(len(ds)):
            img, i = ds[j]
            assert i == j and img.dtype == torch.uint8 and img.shape == (3, TILE_PX, TILE_PX)
            x0, y0 = (int(v) for v in coords[j])
            raw = _raw_openslide_tile(d["slide"], x0, y0, geom.level, geom.read_size_px, TILE_PX)
            np.testing.assert_array_equal(_hwc(img), raw)
            np.testing.assert_array_equal(_hwc(img), s.read_tile(x0, y0, geom))


@pytest.mark.parametrize("name", ["exact0", "exact1", "resampled"])
def test_dataset_tiles_match_the_source_image_where_they_claim_to_be(slides, name):
    # Independent of OpenSlide: the tile must resemble the written image at its coords (JPEG
    # error only) and not the image a few pixels away.
    d = slides[(0, name)]
    pitch = d["geom"].tile_size_px_level0
    span = int(round(pitch))
    ds = SlidePatchDataset(d["tile_file"])
    rgb = d["rgb"].astype(np.float32)

    def expected(x0, y0):
        region = rgb[y0:y0 + span, x0:x0 + span]
        f = span // TILE_PX if span % TILE_PX == 0 else None
        if f:
            return region.reshape(TILE_PX, f, TILE_PX, f, 3).mean(axis=(1, 3))
        img = Image.fromarray(region.astype(np.uint8))
        return np.asarray(img.resize((TILE_PX, TILE_PX), Image.Resampling.BOX), np.float32)

    for j in range(len(ds)):
        got = _hwc(ds[j][0]).astype(np.float32)
        x0, y0 = (int(v) for v in d["coords"][j])
        err_here = np.abs(got - expected(x0, y0)).mean()
        sx = x0 + 8 if x0 + 8 + span <= SLIDE_PX else x0 - 8
        err_shifted = np.abs(got - expected(sx, y0)).mean()
        assert err_here < 10, (j, err_here)  # JPEG (q95, chroma subsampled) error: 2-7
        assert err_shifted > 2 * err_here + 5, (j, err_here, err_shifted)  # seen: > 20


def test_patch_dataset_over_slides_and_pixel_cache_agree_exactly(slides, tmp_path):
    files = [slides[(s, n)]["tile_file"] for s in (0, 1) for n in ("exact0", "resampled")]
    for tf in files:
        write_pixel_cache(tf, pixel_cache_path(tf))
        with h5py.File(pixel_cache_path(tf), "r") as f:
            n = read_tile_index(tf).n
            assert f.attrs["params_hash"] == "h1" and f.attrs["n"] == n
            assert f.attrs["tile_size_px"] == TILE_PX
            assert f["pixels"].chunks == (1, TILE_PX, TILE_PX, 3)
            assert f["pixels"].compression == CACHE_COMPRESSION[0]
    pairs = [(tf, i) for tf in files for i in (0, 3, 1)]
    plain = PatchDataset(pairs)
    cached = PatchDataset(pairs, pixel_cache=True)
    for j, (tf, i) in enumerate(pairs):
        a, la, ja = plain[j]
        b, lb, jb = cached[j]
        assert (la, ja) == (LABEL_NOLABEL, j) and (lb, jb) == (LABEL_NOLABEL, j)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        ref = SlidePatchDataset(tf, indices=[i])[0][0]
        torch.testing.assert_close(a, ref, rtol=0, atol=0)
    # the per-slide dataset reads the cache file it is given
    tf = files[1]
    c = SlidePatchDataset(tf, indices=[4, 2], pixel_cache_file=pixel_cache_path(tf))
    u = SlidePatchDataset(tf, indices=[4, 2])
    assert c[0][1] == 4 and c[1][1] == 2
    torch.testing.assert_close(c[1][0], u[1][0], rtol=0, atol=0)


def test_stale_or_missing_pixel_cache_is_refused(slides, tmp_path):
    tf = slides[(0, "exact1")]["tile_file"]
    with pytest.raises(DataError, match="pixel cache not found"):
        SlidePatchDataset(tf, pixel_cache_file=tmp_path / "none.pixels.h5")
    other = tmp_path / "other.h5"
    _write_tile_index(other, slides[(0, "exact1")]["slide"], 1.0, params_hash="h2")
    write_pixel_cache(other, tmp_path / "other.pixels.h5")
    with pytest.raises(DataError, match="stale"):
        SlidePatchDataset(tf, pixel_cache_file=tmp_path / "other.pixels.h5")


def test_bad_indices_and_missing_slide_name_the_file(slides, tmp_path):
    tf = slides[(0, "exact0")]["tile_file"]
    n = read_tile_index(tf).n
    with pytest.raises(DataError, match=rf"{tf.name}.*tile index {n} out of range"):
        SlidePatchDataset(tf, indices=[0, n])
    gone = tmp_path / "gone.h5"
    with h5py.File(tf, "r") as src, h5py.File(gone, "w") as dst:
        for name in src:
            dst.create_dataset(name, data=src[name][...])
        dst.attrs.update(dict(src.attrs))
        dst.attrs["slide_path"] = str(tmp_path / "moved.tiff")
    with pytest.raises(DataError, match="moved.tiff not found"):
        PatchDataset([(gone, 0)])


# -- processes ---------------------------------------------------------------------------------
def test_two_worker_loader_equals_in_process_and_dataset_pickles(slides):
    files = [slides[(s, "resampled")]["tile_file"] for s in (0, 1)]
    pairs = [(files[k % 2], k // 2) for k in range(10)]
    labels = np.array([k % 2 for k in range(10)], np.int8)
    base = PatchItems.from_pairs(pairs)
    items = PatchItems(base.tile_files, base.slide_no, base.tile_idx, labels)
    ds = PatchDataset(items)
    first = ds[0][0]  # opens a slide handle in this process before the fork / pickle
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[0][0], first, rtol=0, atol=0)

    def run(workers):
        imgs, labs, idx = [], [], []
        for x, y, j in patch_loader(ds, batch_size=3, workers=workers):
            imgs.append(x)
            labs.append(y)
            idx.append(j)
        return torch.cat(imgs), torch.cat(labs), torch.cat(idx)

    x0, y0, j0 = run(0)
    x2, y2, j2 = run(2)
    assert x0.shape == (10, 3, TILE_PX, TILE_PX)
    torch.testing.assert_close(x2, x0, rtol=0, atol=0)
    assert j2.tolist() == list(range(10)) and y2.tolist() == labels.tolist()
    assert (x0[0] != x0[1]).any()  # different slides, different pixels
    # the pixel cache path too, with the cache file already open in this process at the fork
    for tf in files:
        write_pixel_cache(tf, pixel_cache_path(tf))
    ds = PatchDataset(items, pixel_cache=True)
    torch.testing.assert_close(ds[0][0], first, rtol=0, atol=0)
    xc, _, jc = run(2)
    torch.testing.assert_close(xc, x0, rtol=0, atol=0)
    assert jc.tolist() == list(range(10))


def test_slide_loader_streams_in_order_with_workers(slides):
    d = slides[(1, "exact1")]
    ref = SlidePatchDataset(d["tile_file"])
    loader = slide_loader(d["tile_file"], batch_size=4, workers=2)
    assert loader.prefetch_factor == 2 and not loader.persistent_workers
    got = list(loader)
    idx = torch.cat([b[1] for b in got])
    assert idx.tolist() == list(range(len(ref)))
    torch.testing.assert_close(torch.cat([b[0] for b in got]),
                               torch.stack([ref[j][0] for j in range(len(ref))]), rtol=0, atol=0)


def test_handle_cache_is_lru_and_drops_handles_on_pickle():
    closed = []

    class H:
        def __init__(self, key):
            self.key = key

        def close(self):
            closed.append(self.key)

    c = _HandleCache(max_open=2)
    a = c.get("a", H)
    c.get("b", H)
    assert c.get("a", H) is a  # reuse; "a" is now most recent
    c.get("c", H)
    assert closed == ["b"] and list(c._open) == ["a", "c"]
    c2 = pickle.loads(pickle.dumps(c))
    assert c2.max_open == 2 and not c2._open
    c._pid = -1  # as in a forked child: inherited handles are closed, then reopened
    assert c.get("a", H) is not a and sorted(closed) == ["a", "b", "c"]


def test_open_slide_handles_stay_bounded_over_many_slides(slides, tmp_path):
    """One dataset per slide (as the loaders build them) must not keep one open handle (and
    file descriptor) per slide: the process keeps at most MAX_OPEN_HANDLES."""
    import os

    from pipeline import data

    n_slides = MAX_OPEN_HANDLES + 5
    tile_files = []
    for k in range(n_slides):
        link = tmp_path / f"copy{k}.tiff"
        link.symlink_to(slides[(0, "exact0")]["slide"])
        tf = tmp_path / f"copy{k}.h5"
        _write_tile_index(tf, link, 0.5)
        tile_files.append(tf)
    data._SLIDE_HANDLES.close_all()
    fds_before = len(os.listdir("/proc/self/fd"))
    datasets = [SlidePatchDataset(tf) for tf in tile_files]
    for ds in datasets:
        ds[0]
    assert len(data._SLIDE_HANDLES._open) == MAX_OPEN_HANDLES
    assert len(os.listdir("/proc/self/fd")) - fds_before <= 2 * MAX_OPEN_HANDLES
    data._SLIDE_HANDLES.close_all()


# -- augmentation ------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    # Per-patch ops are tiny; with intra-op threads on a busy 2-core box each parallel region
    # waits for a descheduled thread (~6 ms per op seen). Results do not depend on it.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tile(seed: int = 0, size: int = TILE_PX) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)


def _dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    return [torch.flip(torch.rot90(x, k, (1, 2)), dims=(2,)) if f else torch.rot90(x, k, (1, 2))
            for k in range(4) for f in (False, True)]


def test_train_transform_shape_dtype_and_reproducible_under_torch_seed(one_thread):
    t = augment.train_transform(56)
    x = _tile()
    torch.manual_seed(3)
    a = t(x)
    torch.manual_seed(3)
    b = t(x)
    torch.manual_seed(4)
    c = t(x)
    assert a.shape == (3, 56, 56) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert x.dtype == torch.uint8 and x.shape == (3, TILE_PX, TILE_PX)  # input untouched


def test_geometric_augmentation_is_a_dihedral_image_of_a_crop(one_thread):
    x = _tile(1)
    seen = set()
    for seed in range(80):
        torch.manual_seed(seed)
        y = augment.geometric_transform(TILE_PX)(x)  # crop = full tile: pure rot/flip
        assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)
        matches = [k for k, d in enumerate(_dihedral(x)) if torch.equal(y, d)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))  # all 4 rotations x flip occur
    torch.manual_seed(0)
    y = augment.geometric_transform(56)(x)
    found = [(dy, dx) for dy in range(9) for dx in range(9)
             if any(torch.equal(y, d) for d in _dihedral(x[:, dy:dy + 56, dx:dx + 56]))]
    assert len(found) == 1


def test_colour_factors_are_within_paper_range(one_thread):
    # On a uniform grey tile contrast, saturation and sharpness are no-ops and brightness scales
    # the value by its factor: the output value reveals the factor, which must lie in
    # [0.75, 1.25] and cover most of it (torchvision's default would be [0, 2]).
    x = torch.full((3, TILE_PX, TILE_PX), 128, dtype=torch.uint8)
    mean = torch.tensor(augment.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(augment.IMAGENET_STD).view(3, 1, 1)
    values = []
    for seed in range(200):
        torch.manual_seed(seed)
        y = augment.train_transform(56)(x)
        v = (y * std + mean) * 255
        assert (v - v[0, 0, 0]).abs().max() < 1e-3  # still uniform grey
        values.append(float(v[0, 0, 0]))
    # uint8 colour ops truncate: up to ~1 grey level lost per op (4 ops)
    assert 128 * 0.75 - 4 <= min(values) < 128 * 0.8
    assert 128 * 1.2 < max(values) <= 128 * 1.25 + 1e-3


def test_random_sharpness_uses_a_uniform_factor_from_torch_rng():
    x = _tile(2)
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        y = augment.RandomSharpness((0.75, 1.25))(x)
        torch.manual_seed(seed)
        factor = 0.75 + 0.5 * float(torch.rand(()))
        assert torch.equal(y, F.adjust_sharpness(x, factor))


def test_fast_uint8_sharpness_is_bit_identical_to_torchvision(one_thread):
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (2, 3, 40, 33), generator=g, dtype=torch.uint8)
    x[0, :, :8, :8] = 255  # saturated corner: exercises the clamp
    for factor in (0.0, 0.5, 0.75, 0.999, 1.0, 1.13, 1.25, 2.0, 3.7):
        assert torch.equal(augment.adjust_sharpness_uint8(x, factor),
                           F.adjust_sharpness(x, factor)), factor
        assert torch.equal(augment.adjust_sharpness_uint8(x[1], factor),
                           F.adjust_sharpness(x[1], factor)), factor


def test_eval_transform_is_the_normalised_centre_slice():
    x = _tile(3)
    y = augment.eval_transform(56)(x)
    mean = np.array(augment.IMAGENET_MEAN).reshape(3, 1, 1)
    std = np.array(augment.IMAGENET_STD).reshape(3, 1, 1)
    want = (x.numpy()[:, 4:60, 4:60] / 255.0 - mean) / std
    np.testing.assert_allclose(y.numpy(), want, atol=1e-5)
    torch.testing.assert_close(augment.eval_transform(56)(x), y, rtol=0, atol=0)
    full = augment.normalize_only()(x)
    np.testing.assert_allclose(full.numpy(), (x.numpy() / 255.0 - mean) / std, atol=1e-5)


# -- class balance -----------------------------------------------------------------------------
def _labels() -> np.ndarray:
    lab = np.array([LABEL_NORMAL] * 30 + [LABEL_TUMOR] * 7 + [LABEL_NOLABEL] * 10, np.int8)
    return np.random.default_rng(0).permutation(lab)


def test_balanced_epochs_have_equal_classes_all_minority_and_fresh_subsets():
    lab = _labels()
    tumor = set(np.flatnonzero(lab == LABEL_TUMOR))
    subsets = []
    for epoch in range(3):
        idx = epoch_indices(lab, seed=5, epoch=epoch)
        assert len(idx) == 14 and len(set(idx.tolist())) == 14
        assert (lab[idx] == LABEL_TUMOR).sum() == 7 and (lab[idx] == LABEL_NORMAL).sum() == 7
        assert set(idx[lab[idx] == LABEL_TUMOR].tolist()) == tumor
        subsets.append(frozenset(idx[lab[idx] == LABEL_NORMAL].tolist()))
    assert len(set(subsets)) == 3
    np.testing.assert_array_equal(epoch_indices(lab, 5, 1), epoch_indices(lab, 5, 1))
    assert not np.array_equal(epoch_indices(lab, 5, 1), epoch_indices(lab, 6, 1))


def test_unbalanced_uses_all_labelled_and_sampler_follows_epochs():
    lab = _labels()
    idx = epoch_indices(lab, seed=5, epoch=0, balance=False)
    assert sorted(idx.tolist()) == np.flatnonzero(lab >= 0).tolist()
    s = BalancedSampler(lab, seed=5)
    assert len(s) == 14 and list(s) == epoch_indices(lab, 5, 0).tolist()
    s.set_epoch(2)
    assert list(s) == epoch_indices(lab, 5, 2).tolist()
    assert len(BalancedSampler(lab, seed=5, balance=False)) == 37
    with pytest.raises(DataError, match="only of class"):
        epoch_indices(np.array([0, 0, -1], np.int8), 0, 0)


# -- split lists -------------------------------------------------------------------------------
def test_collect_labelled_reads_split_and_drops_nolabel(slides, tmp_path):
    paths = Paths(tmp_path)
    paths.tiles.mkdir(parents=True)
    paths.labels.mkdir(parents=True)
    src = slides[(0, "exact0")]["tile_file"]
    n = read_tile_index(src).n
    labs = {"a": np.array([0, 1, -1] * n, np.int8)[:n], "b": np.full(n, 0, np.int8),
            "c": np.full(n, 1, np.int8)}
    for sid, lab in labs.items():
        paths.tile_file(sid).write_bytes(src.read_bytes())
        with h5py.File(paths.label_file(sid), "w") as f:
            f.create_dataset(LABEL, data=lab)
    manifest = pd.DataFrame({"slide_id": ["a", "b", "c"], "split": ["train", "val", "train"]})
    items = collect_labelled(manifest, paths, "train")
    assert items.slide_ids == ("a", "c") and items.tile_files == (paths.tile_file("a"),
                                                                  paths.tile_file("c"))
    keep_a = np.flatnonzero(labs["a"] >= 0)
    assert items.tile_idx.tolist() == keep_a.tolist() + list(range(n))
    assert items.slide_no.tolist() == [0] * len(keep_a) + [1] * n
    assert items.labels.tolist() == labs["a"][keep_a].tolist() + [1] * n
    both = collect_labelled(manifest, paths, ["train", "val"], include_nolabel=True)
    assert len(both) == 3 * n
    ds = PatchDataset(items)
    assert ds[len(keep_a)][1] == 1 and ds[len(keep_a)][2] == len(keep_a)
    with h5py.File(paths.label_file("c"), "w") as f:
        f.create_dataset(LABEL, data=np.zeros(n - 1, np.int8))
    with pytest.raises(DataError, match=rf"c.h5: {n - 1} labels but .* has {n} tiles"):
        collect_labelled(manifest, paths, "train")


def test_pixel_cache_of_a_replaced_slide_is_refused(slides, tmp_path):
    """The cache records the slide's fingerprint: a cache made from another slide's content is
    stale even when the params hash and the tile count match."""
    import shutil

    tf = slides[(0, "exact0")]["tile_file"]
    cache = tmp_path / "c.pixels.h5"
    write_pixel_cache(tf, cache)
    SlidePatchDataset(tf, pixel_cache_file=cache)  # accepted as is
    moved = tmp_path / "t.h5"
    shutil.copy(tf, moved)
    with h5py.File(moved, "r+") as f:
        f.attrs["slide_fingerprint"] = "0-another-scan"
    with pytest.raises(DataError, match="stale"):
        SlidePatchDataset(moved, pixel_cache_file=cache)
