"""Direct TIFF tile decoding (pipeline/tiffread.py) gives OpenSlide's pixels exactly, is really
used where it applies, and falls back to OpenSlide wherever it does not or cannot."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline import tiffread
from pipeline.slide import READER_ENV, Slide
from pipeline.tiff import write_pyramidal_tiff
from pipeline.tiffread import TiledTiffLevels


def _textured(tmp_path_factory, tile_px: int):
    rng = np.random.default_rng(3)
    h, w = 900, 1100
    coarse = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
    img = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:h, :w]
    img += rng.normal(0, 12, size=img.shape)
    path = tmp_path_factory.mktemp("tiffread") / f"textured_{tile_px}.tiff"
    write_pyramidal_tiff(path, np.clip(img, 0, 255).astype(np.uint8), mpp=0.5, n_levels=3,
                         tile_px=tile_px)
    return path


@pytest.fixture(scope="module")
def textured_tiff(tmp_path_factory):
    """A 3-level JPEG TIFF (256-px tiles) of smooth random texture whose size is no multiple of
    the tile, so the right and bottom tiles are partly padding."""
    return _textured(tmp_path_factory, 256)


@pytest.mark.parametrize("tile_px", [128, 512])
def test_other_tiff_tile_sizes_equal_openslide(tmp_path_factory, tile_px):
    """CAMELYON16 .tif files use 512-px tiles; 128 makes every region straddle many tiles."""
    path = _textured(tmp_path_factory, tile_px)
    with Slide(path) as slide:
        for x0, y0, level, size in REGIONS:
            np.testing.assert_array_equal(slide.read_rgb(x0, y0, level, size),
                                          slide._read_openslide(x0, y0, level, size))
        assert slide.direct_reads


# (x0, y0) in level-0 px, level, size: aligned, straddling 4 tiles, over the right/bottom edge,
# partly left of / above the slide, at the coarser levels, wholly outside
REGIONS = [
    (0, 0, 0, 256), (256, 512, 0, 256), (100, 130, 0, 256), (1000, 800, 0, 256),
    (-64, -32, 0, 128), (300, 200, 0, 300), (512, 256, 1, 256), (2, 6, 1, 200),
    (0, 0, 2, 275), (1200, 1000, 0, 64), (-600, 10, 0, 100),
]


def test_direct_reads_equal_openslide_and_are_used(textured_tiff, monkeypatch):
    calls = []
    real_read = TiledTiffLevels.read

    def spy(self, *args):
        out = real_read(self, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(TiledTiffLevels, "read", spy)
    with Slide(textured_tiff) as slide:
        for x0, y0, level, size in REGIONS:
            direct = slide.read_rgb(x0, y0, level, size)
            reference = slide._read_openslide(x0, y0, level, size)
            assert direct.shape == (size, size, 3) and direct.dtype == np.uint8
            np.testing.assert_array_equal(direct, reference, err_msg=f"{(x0, y0, level, size)}")
        assert slide.direct_reads
    assert len(calls) == len(REGIONS) and all(calls)  # every region was decoded directly


def test_direct_reads_equal_openslide_on_real_aperio(cmu_svs):
    """Aperio SVS: 240-px tiles, so 256-px reads straddle up to four of them."""
    rng = np.random.default_rng(0)
    with Slide(cmu_svs) as slide:
        w, h = slide.dimensions
        for _ in range(25):
            x0, y0 = int(rng.integers(-100, w - 100)), int(rng.integers(-100, h - 100))
            np.testing.assert_array_equal(slide.read_rgb(x0, y0, 0, 256),
                                          slide._read_openslide(x0, y0, 0, 256))
        assert slide.vendor == "aperio" and slide.direct_reads


def test_fractional_level_coordinates_go_to_openslide(textured_tiff, monkeypatch):
    """x0 / downsample not whole: OpenSlide resamples, so the direct path must not answer."""
    with Slide(textured_tiff) as slide:
        slide.read_rgb(0, 0, 0, 256)  # verifies the direct path on level 0
        assert slide.direct_reads

        def fail(*args):
            raise AssertionError("direct path used for a fractional level coordinate")

        monkeypatch.setattr(TiledTiffLevels, "read", fail)
        got = slide.read_rgb(257, 3, 1, 128)  # level 1 (downsample 2): x 128.5, y 1.5
        np.testing.assert_array_equal(got, slide._read_openslide(257, 3, 1, 128))


def test_any_difference_from_openslide_turns_the_direct_path_off(textured_tiff, monkeypatch,
                                                                 caplog):
    real_read = TiledTiffLevels.read
    n_direct = []

    def off_by_one(self, *args):
        n_direct.append(1)
        out = real_read(self, *args)
        out = out.copy()
        out[0, 0, 0] ^= 1  # one byte of one pixel
        return out

    monkeypatch.setattr(TiledTiffLevels, "read", off_by_one)
    with caplog.at_level(logging.WARNING, logger="pipeline.slide"), Slide(textured_tiff) as slide:
        got = slide.read_rgb(256, 256, 0, 256)
        np.testing.assert_array_equal(got, slide._read_openslide(256, 256, 0, 256))
        assert not slide.direct_reads
        slide.read_rgb(0, 0, 0, 256)
        slide.read_rgb(512, 0, 0, 256)
    assert len(n_direct) == 1  # never tried again on this handle
    assert "differs from OpenSlide" in caplog.text and str(textured_tiff) in caplog.text


def test_uniform_region_does_not_verify_the_decoder(textured_tiff):
    with Slide(textured_tiff) as slide:
        out = slide.read_rgb(-1000, -1000, 0, 64)  # wholly outside: white, nothing decoded
        assert (out == 255).all()
        assert not slide.direct_reads
        slide.read_rgb(0, 0, 0, 64)
        assert slide.direct_reads


def test_environment_forces_openslide(textured_tiff, monkeypatch):
    monkeypatch.setenv(READER_ENV, "openslide")

    def fail(*args, **kwargs):
        raise AssertionError("direct path opened although OpenSlide was forced")

    monkeypatch.setattr(TiledTiffLevels, "open", fail)
    with Slide(textured_tiff) as slide:
        slide.read_rgb(0, 0, 0, 256)
        assert not slide.direct_reads


def test_other_vendors_and_missing_levels_are_not_served(textured_tiff):
    with Slide(textured_tiff) as slide:
        dims = slide.level_dimensions
    assert TiledTiffLevels.open(textured_tiff, "hamamatsu", dims) is None
    assert TiledTiffLevels.open(textured_tiff, "generic-tiff", [(123, 45)]) is None
    levels = TiledTiffLevels.open(textured_tiff, "generic-tiff", dims)
    try:
        assert sorted(levels.levels) == [0, 1, 2]
        assert levels.read(5, 0, 0, 16, 16) is None
    finally:
        levels.close()


def test_decoded_tile_cache_is_bounded(textured_tiff, monkeypatch):
    monkeypatch.setattr(tiffread, "TILE_CACHE_BYTES", 3 * 256 * 256 * 3)
    with Slide(textured_tiff) as slide:
        levels = TiledTiffLevels.open(textured_tiff, slide.vendor, slide.level_dimensions)
    try:
        for x in range(0, 900, 50):  # straddling reads: decoded tiles are cached
            levels.read(0, x, x // 2, 256, 256)
            assert levels._tile_bytes <= tiffread.TILE_CACHE_BYTES
            assert levels._tile_bytes == sum(t.nbytes for t in levels._tiles.values())
        assert levels._tiles  # it did cache something
    finally:
        levels.close()


def test_each_level_is_verified_on_its_own(textured_tiff, monkeypatch, caplog):
    """Level 0 matching OpenSlide says nothing about level 1's page: it is checked too."""
    real_read = TiledTiffLevels.read

    def corrupt_level_1(self, level, *args):
        out = real_read(self, level, *args)
        if level == 1 and out is not None:
            out = out.copy()
            out[0, 0, 0] ^= 1
        return out

    monkeypatch.setattr(TiledTiffLevels, "read", corrupt_level_1)
    with caplog.at_level(logging.WARNING, logger="pipeline.slide"), Slide(textured_tiff) as slide:
        slide.read_rgb(0, 0, 0, 256)
        assert slide.direct_reads
        got = slide.read_rgb(512, 256, 1, 256)
        np.testing.assert_array_equal(got, slide._read_openslide(512, 256, 1, 256))
        assert not slide.direct_reads
    assert "level 1" in caplog.text


def test_a_damaged_jpeg_tile_is_an_error_as_with_openslide(tmp_path_factory):
    """libjpeg-turbo decodes a cut-short JPEG with a warning and a grey remainder; OpenSlide
    raises. A tile whose stream ends early must not become silent grey pixels."""
    import shutil

    import tifffile

    from pipeline.slide import SlideError

    path = tmp_path_factory.mktemp("damaged") / "damaged.tiff"
    shutil.copy(_textured(tmp_path_factory, 256), path)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        k = 1 * -(-page.imagewidth // page.tilewidth) + 1  # tile row 1, column 1
        offset, count = page.dataoffsets[k], page.databytecounts[k]
    with open(path, "r+b") as f:
        f.seek(offset + count // 2)
        f.write(b"\xff\xd9")  # an end-of-image marker half-way through the scan
    with Slide(path) as slide:
        slide.read_rgb(0, 0, 0, 256)  # an intact tile: the direct path is verified
        assert slide.direct_reads
        with pytest.raises(SlideError, match=str(path)):
            slide.read_rgb(256, 256, 0, 256)
