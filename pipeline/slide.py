"""One slide reader with explicit units (in the spirit of TIAToolbox's WSIReader).

Everything about reading pixels goes through `Slide`: which pyramid level serves a target mpp,
how big a region to read there, how it is resampled, and the low-resolution image the tissue
mask is computed on. Errors name the file and the OpenSlide reason.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.log import get_logger
from pipeline.tiffread import TiledTiffLevels

if TYPE_CHECKING:
    from pipeline.params import TileParams

log = get_logger("pipeline.slide")

# `openslide` forces every pixel read through OpenSlide (the direct TIFF tile path is only a
# speed-up: it is checked byte-for-byte against OpenSlide per slide handle).
READER_ENV = "PIPELINE_SLIDE_READER"

# A level whose downsample is within this relative tolerance of the wanted one is used as exact
# (scanners store e.g. 4.0002 instead of 4).
LEVEL_TOLERANCE = 0.02

# Level-0 mpp outside this range is a metadata error, not a slide (params: tile.mpp_range_um).
# Scanners write ~0.1-1 um/px; TIFF writers that default to 72 dpi give 352.8 um/px.
DEFAULT_MPP_RANGE_UM = (0.05, 20.0)
# mpp-x and mpp-y may differ by this relative amount (rounding in scanner metadata is far below
# it); more means non-square pixels, which one square tile grid cannot represent.
MPP_XY_TOLERANCE = 0.01


class SlideError(PipelineError):
    """A slide cannot be used; str() is one line naming the file and the cause."""


@dataclass(frozen=True)
class TileGeometry:
    """How a tile of `tile_size_px` at `tile_mpp` is read from a slide."""

    level: int
    level_downsample: float
    read_size_px: int
    tile_size_px: int
    tile_size_px_level0: float  # grid pitch in level-0 pixels
    tile_mpp: float  # NaN when the slide's mpp is unknown and no fallback was given
    mpp: float  # level-0 mpp used (NaN when unknown)
    mpp_source: str  # metadata | fallback_mpp | unknown

    def as_attrs(self) -> dict:
        return asdict(self)


def _openslide():
    import openslide

    return openslide


class Slide:
    """An open slide. Not picklable on purpose: open one per process / DataLoader worker."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        openslide = _openslide()
        if self.path.is_dir() and self.path.suffix.lower() not in {".mrxs"}:
            raise SlideError(f"{self.path}: is a directory, not a slide file")
        if not self.path.exists():
            raise SlideError(f"{self.path}: file not found")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(f"{self.path}: {_why_unsupported(self.path)}") from None
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{self.path}: OpenSlide cannot read it: {exc}") from None
        except Exception as exc:  # PIL fallback errors, OS errors
            raise SlideError(f"{self.path}: cannot open slide: {exc}") from None
        self.dimensions: tuple[int, int] = tuple(self._osr.dimensions)  # level-0 (w, h)
        self.level_dimensions = [tuple(d) for d in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        props = self._osr.properties
        mpp, self.mpp_x, self.mpp_y = None, _positive(props, "x"), _positive(props, "y")
        if self.mpp_x is not None:
            mpp = (self.mpp_x + self.mpp_y) / 2 if self.mpp_y is not None else self.mpp_x
        self.mpp: float | None = mpp  # as in the metadata; tile_geometry checks it
        self.vendor: str = props.get("openslide.vendor", "unknown")
        self._tiff: TiledTiffLevels | None = None
        self._tiff_off = os.environ.get(READER_ENV, "auto") == "openslide"  # for good once off
        self._tiff_verified: set[int] = set()  # levels whose decoding matched OpenSlide

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        raise TypeError("Slide handles must not cross processes; open one per worker")

    # -- geometry ---------------------------------------------------------------------------
    def best_level(self, downsample: float) -> int:
        """Finest-to-coarsest: the coarsest level whose downsample is <= the wanted one
        (within LEVEL_TOLERANCE), so we read at least as fine as asked and only ever shrink."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + LEVEL_TOLERANCE):
                best = i
        return best

    def metadata_mpp_problem(self, mpp_range_um: tuple[float, float] = DEFAULT_MPP_RANGE_UM
                             ) -> str | None:
        """Why the metadata mpp cannot be used (non-square pixels, implausible value), or None
        (usable, or absent)."""
        mx, my = self.mpp_x, self.mpp_y
        if mx is not None and my is not None and abs(mx - my) > MPP_XY_TOLERANCE * min(mx, my):
            return (f"non-square pixels in the metadata: mpp-x {mx:g} vs mpp-y {my:g} um/px "
                    f"(differ by more than {MPP_XY_TOLERANCE:.0%})")
        lo, hi = mpp_range_um
        if self.mpp is not None and not lo <= self.mpp <= hi:
            return (f"mpp {self.mpp:g} um/px in the metadata is outside the plausible range "
                    f"{lo:g}-{hi:g} um/px (tile.mpp_range_um)")
        return None

    def level0_mpp(self, fallback_mpp: float | None = None,
                   mpp_range_um: tuple[float, float] = DEFAULT_MPP_RANGE_UM
                   ) -> tuple[float | None, str]:
        """(level-0 mpp, source: metadata | fallback_mpp | unknown). Metadata that fails
        `metadata_mpp_problem` is replaced by `fallback_mpp` with a warning, or raises
        SlideError saying what to do: never a tile grid at an absurd scale."""
        problem = self.metadata_mpp_problem(mpp_range_um)
        if self.mpp is not None and problem is None:
            return self.mpp, "metadata"
        if fallback_mpp is None:
            if problem is None:
                return None, "unknown"
            raise SlideError(f"{self.path}: {problem}; fix the slide's resolution metadata or set "
                             "tile.fallback_mpp (predict: --mpp) to its true level-0 um/px")
        lo, hi = mpp_range_um
        if not lo <= fallback_mpp <= hi:
            raise SlideError(f"{self.path}: tile.fallback_mpp (predict: --mpp) {fallback_mpp:g} "
                             f"um/px is outside the plausible range {lo:g}-{hi:g} um/px "
                             "(tile.mpp_range_um); give the slide's true level-0 um/px")
        if problem is not None:
            log.warning("%s: %s; using tile.fallback_mpp (predict: --mpp) = %g um/px instead",
                        self.path, problem, fallback_mpp)
        return float(fallback_mpp), "fallback_mpp"

    def tile_geometry(
        self,
        tile_size_px: int,
        target_mpp: float,
        fallback_level: int = 0,
        fallback_mpp: float | None = None,
        mpp_range_um: tuple[float, float] = DEFAULT_MPP_RANGE_UM,
    ) -> TileGeometry:
        """How tiles of `tile_size_px` at `target_mpp` are read; raises SlideError (one line,
        naming the slide) when the mpp is implausible or a tile would cover < 1 level-0 px."""
        mpp, source = self.level0_mpp(fallback_mpp, mpp_range_um)
        if mpp is None:
            level = min(fallback_level, len(self.level_downsamples) - 1)
            ds = self.level_downsamples[level]
            return TileGeometry(level, ds, tile_size_px, tile_size_px, tile_size_px * ds,
                                math.nan, math.nan, "unknown")
        want = target_mpp / mpp  # level-0 px per output px
        if tile_size_px * want < 1:
            raise SlideError(
                f"{self.path}: a {tile_size_px} px tile at tile.mpp {target_mpp:g} um/px covers "
                f"{tile_size_px * want:.3g} level-0 px of this {mpp:g} um/px slide ({source}), "
                "less than one pixel; fix the slide's mpp (metadata or tile.fallback_mpp) or "
                "raise tile.mpp")
        level = self.best_level(want)
        ds = self.level_downsamples[level]
        if abs(ds - want) <= LEVEL_TOLERANCE * want:
            ds_eff, read = ds, tile_size_px
        else:
            ds_eff, read = want, int(round(tile_size_px * want / ds))
        return TileGeometry(level, ds, read, tile_size_px, tile_size_px * ds_eff,
                            mpp * ds_eff, mpp, source)

    # -- pixels -----------------------------------------------------------------------------
    def read_rgb(self, x0: int, y0: int, level: int, size_px: int) -> np.ndarray:
        """(size, size, 3) uint8 at `level`, top-left at level-0 (x0, y0); transparent
        (outside-slide) pixels become white, as on glass.

        Tiled TIFF levels (generic TIFF, Aperio) are decoded directly (pipeline/tiffread.py);
        the first non-uniform region of each level is compared with OpenSlide and any
        difference turns the direct path off for this slide, so pixels are always OpenSlide's."""
        if not self._tiff_off:
            fast = self._read_direct(int(x0), int(y0), int(level), int(size_px))
            if fast is not None:
                return fast
        return self._read_openslide(x0, y0, level, size_px)

    @property
    def direct_reads(self) -> bool:
        """Whether tiles are decoded directly from the TIFF (a level verified, none failed)."""
        return bool(self._tiff_verified) and not self._tiff_off

    def _read_openslide(self, x0: int, y0: int, level: int, size_px: int) -> np.ndarray:
        try:
            rgba = self._osr.read_region((int(x0), int(y0)), int(level), (size_px, size_px))
        except Exception as exc:
            raise SlideError(f"{self.path}: read_region failed at ({x0}, {y0}): {exc}") from None
        return _rgba_to_rgb(np.asarray(rgba))

    def _read_direct(self, x0: int, y0: int, level: int, size_px: int) -> np.ndarray | None:
        if self._tiff is None:
            self._tiff = TiledTiffLevels.open(self.path, self.vendor, self.level_dimensions)
            if self._tiff is None:
                self._tiff_off = True
                return None
        ds = self.level_downsamples[level]
        xl, yl = x0 / ds, y0 / ds
        if not (xl.is_integer() and yl.is_integer()):  # OpenSlide resamples these
            return None
        arr = self._tiff.read(level, int(xl), int(yl), size_px, size_px)
        if arr is None or level in self._tiff_verified:
            return arr
        reference = self._read_openslide(x0, y0, level, size_px)
        if np.array_equal(arr, reference):
            # a uniform region (glass, outside the slide) proves nothing about the decoder
            if arr.min() != arr.max():
                self._tiff_verified.add(level)
            return arr
        log.warning("%s: direct TIFF tile decoding differs from OpenSlide at (%d, %d) level %d; "
                    "reading this slide through OpenSlide", self.path, x0, y0, level)
        self._tiff_off = True
        self._tiff.close()
        self._tiff = None
        return reference

    def read_tile(self, x0: int, y0: int, geom: TileGeometry) -> np.ndarray:
        """The tile at level-0 (x0, y0) as (tile_size_px, tile_size_px, 3) uint8."""
        arr = self.read_rgb(x0, y0, geom.level, geom.read_size_px)
        if geom.read_size_px != geom.tile_size_px:
            img = Image.fromarray(arr)
            resample = (Image.Resampling.BOX if geom.read_size_px > geom.tile_size_px
                        else Image.Resampling.BILINEAR)
            arr = np.asarray(img.resize((geom.tile_size_px, geom.tile_size_px), resample))
        return arr

    def _overview_geometry(
        self, downsample: float
    ) -> tuple[int, tuple[int, int], tuple[int, int]]:
        """(pyramid level to read, its size, the overview's size) for a `downsample`x overview;
        SlideError when even the coarsest level is too large to read whole."""
        level = self.best_level(downsample)
        lw, lh = self.level_dimensions[level]
        if lw * lh > 40_000 * 40_000:
            raise SlideError(
                f"{self.path}: no pyramid level coarse enough for a {downsample:.1f}x overview "
                f"(coarsest is {self.level_dimensions[-1]}); convert it to a pyramidal format"
            )
        out_w = max(1, int(round(self.dimensions[0] / downsample)))
        out_h = max(1, int(round(self.dimensions[1] / downsample)))
        return level, (lw, lh), (out_w, out_h)

    def low_res_image(self, downsample: float) -> tuple[np.ndarray, float]:
        """The whole slide at roughly `downsample` (level-0 px per output px), read from the
        best pyramid level and shrunk. Returns (rgb uint8, exact downsample per axis used).
        Never reads level 0 unless the slide has no coarser level fine for the request."""
        level, (lw, lh), (out_w, out_h) = self._overview_geometry(downsample)
        try:
            img = self._osr.read_region((0, 0), level, (lw, lh))
        except Exception as exc:
            raise SlideError(f"{self.path}: reading level {level} failed: {exc}") from None
        arr = _rgba_to_rgb(np.asarray(img))
        if (out_w, out_h) != (lw, lh):
            arr = np.asarray(Image.fromarray(arr).resize((out_w, out_h), Image.Resampling.BOX))
        return arr, self.dimensions[0] / out_w

    def overview(self, downsample: float) -> Overview:
        """The image `low_res_image(downsample)` returns, read window by window with bounded
        memory (`Overview.read`): the same pixels, never the whole level in one piece unless
        the level's downsample puts window origins at fractional level-0 positions."""
        level, _, (out_w, out_h) = self._overview_geometry(downsample)
        # The overview reads each level tile about twice, neighbours first: a small OpenSlide
        # tile cache serves that. Its default (32 MiB) fills with a large slide's level tiles
        # and not with a small one's: +24 MiB from 1x to 4x in benchmarks/camelyon_scale.py.
        openslide = _openslide()
        if hasattr(openslide, "OpenSlideCache"):  # openslide-python >= 1.3
            self._osr.set_cache(openslide.OpenSlideCache(OVERVIEW_CACHE_BYTES))
        return Overview(self, level, (out_h, out_w), downsample)

    def read_level(self, level: int, x_level: int, y_level: int, w: int, h: int
                   ) -> np.ndarray | None:
        """(h, w, 3) uint8 of `level` at level pixel (x, y), exactly as the same window of a
        whole-level `read_region`, or None when the window's level-0 origin is fractional
        (OpenSlide resamples those, so the pixels would differ)."""
        ds = self.level_downsamples[level]
        x0, y0 = round(x_level * ds), round(y_level * ds)
        if x0 / ds != x_level or y0 / ds != y_level:
            return None
        try:
            rgba = self._osr.read_region((x0, y0), level, (w, h))
        except Exception as exc:
            raise SlideError(f"{self.path}: reading level {level} failed: {exc}") from None
        return _rgba_to_rgb(np.asarray(rgba))


class Overview:
    """A slide's low-resolution image, computed window by window: pixel for pixel what
    `Slide.low_res_image` gives (the pyramid level, then PIL's BOX resize to the exact size),
    with PIL's fixed-point BOX resampling replicated per window (`_box_coeffs`) so a window
    needs only the level pixels under it. Memory is the window's, not the slide's."""

    def __init__(self, slide: Slide, level: int, shape: tuple[int, int],
                 downsample: float | None = None):
        self.slide, self.level, self.shape = slide, level, shape
        lw, lh = slide.level_dimensions[level]
        self.level_shape = (lh, lw)
        self.downsample_x = slide.dimensions[0] / shape[1]
        self.downsample_y = slide.dimensions[1] / shape[0]
        # per axis: None (no resize on that axis, as PIL skips the pass) or (first, taps, k)
        self._rows = _box_coeffs(lh, shape[0]) if lh != shape[0] else None
        self._cols = _box_coeffs(lw, shape[1]) if lw != shape[1] else None
        self._whole: np.ndarray | None = None  # the level, when windows cannot be read exactly
        # Pillow's pass order: each pass rounds to uint8, so it shows in the pixels. Recent
        # Pillow (libImaging/Resample.c) goes vertical first when the height shrinks by more
        # than twice as many pixels as the width, older Pillow always horizontal first.
        dh, dw = lh - shape[0], lw - shape[1]
        rule = _pillow_vertical_first_rule()
        if rule is None:  # an order not replicated here: the level and PIL's resize, one piece
            self._rows = self._cols = None
            self._whole, _ = slide.low_res_image(downsample or slide.dimensions[0] / shape[1])
            self.level_shape = shape
        self._vertical_first = bool(rule) and self._rows is not None and dh > 0 and dh > dw * 2

    def tile_px(self, multiple: int, target_px: int) -> int:
        """Side of the square reads: about `target_px` level pixels, a multiple of `multiple`."""
        ratio = max(self.level_shape[0] / self.shape[0], self.level_shape[1] / self.shape[1], 1)
        return max(multiple, int(target_px / ratio) // multiple * multiple)

    def source_span(self, axis: int, a: int, b: int) -> tuple[int, int]:
        """Level pixels [lo, hi) that output pixels [a, b) along axis 0 (rows) / 1 (cols) use."""
        c = self._rows if axis == 0 else self._cols
        if c is None:
            return a, b
        first, taps, _ = c
        return int(first[a:b].min()), int((first[a:b] + taps[a:b]).max())

    def read(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Overview pixels [r0, r1) x [c0, c1) as (r1 - r0, c1 - c0, 3) uint8."""
        y0, y1 = self.source_span(0, r0, r1)
        x0, x1 = self.source_span(1, c0, c1)
        src = self._level_window(x0, y0, x1 - x0, y1 - y0)
        if self._vertical_first:
            src = _box_pass(src, self._rows, r0, r1, y0, axis=0)
        elif self._rows is not None and self._cols is not None:
            src = _box_pass(src, self._cols, c0, c1, x0, axis=1)
            src = _box_pass(src, self._rows, r0, r1, y0, axis=0)
            return src
        elif self._rows is not None:
            return _box_pass(src, self._rows, r0, r1, y0, axis=0)
        if self._cols is not None:
            src = _box_pass(src, self._cols, c0, c1, x0, axis=1)
        return src

    def _level_window(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._whole is None:
            arr = self.slide.read_level(self.level, x, y, w, h)
            if arr is not None:
                return arr
            log.debug("%s: level %d has a fractional downsample; overview read in one piece",
                      self.slide.path, self.level)
            lh, lw = self.level_shape
            self._whole = self.slide.read_level(self.level, 0, 0, lw, lh)
        return self._whole[y:y + h, x:x + w]


OVERVIEW_CACHE_BYTES = 4 << 20  # OpenSlide tile cache of a handle that reads an overview
# Pillow's libImaging/Resample.c for 8-bit images: coefficients in fixed point with 22 bits
PRECISION_BITS = 32 - 8 - 2


@functools.cache
def _pillow_vertical_first_rule() -> bool | None:
    """Whether this Pillow resizes vertically first when the height shrinks most (True), always
    horizontally first (False), or neither as replicated here (None), from one small resize
    whose two pass orders give different pixels."""
    img = np.random.default_rng(0).integers(0, 256, (36, 21, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).resize((14, 6), Image.Resampling.BOX))
    rows, cols = _box_coeffs(36, 6), _box_coeffs(21, 14)
    if np.array_equal(ref, _box_pass(_box_pass(img, rows, 0, 6, 0, 0), cols, 0, 14, 0, 1)):
        return True
    if np.array_equal(ref, _box_pass(_box_pass(img, cols, 0, 14, 0, 1), rows, 0, 6, 0, 0)):
        return False
    log.warning("this Pillow's BOX resize differs from pipeline.slide's replica; overviews are "
                "read in one piece")
    return None


def _box_coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for the BOX filter over the whole axis
    (box [0, in_size)): per output pixel its first input pixel, its number of taps and the
    (out_size, ksize) int64 fixed-point weights. Same double arithmetic, in the same order."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = 0.0 + (np.arange(out_size) + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    x = np.arange(ksize)
    arg = ((x[None, :] + xmin[:, None]) - center[:, None] + 0.5) * ss
    w = np.where((arg > -0.5) & (arg <= 0.5) & (x[None, :] < xmax[:, None]), 1.0, 0.0)
    ww = w.sum(axis=1, keepdims=True)  # sums of 1.0: exact in any order
    k = np.divide(w, ww, out=w.copy(), where=ww != 0)
    kk = np.trunc(0.5 + k * (1 << PRECISION_BITS)).astype(np.int64)
    return xmin, xmax, kk


def _box_pass(src: np.ndarray, coeffs, a: int, b: int, src0: int, axis: int) -> np.ndarray:
    """Output pixels [a, b) along `axis` of one resampling pass of `src` (uint8, whose index 0
    along `axis` is input pixel `src0`), summed in int32 from 2^21, shifted and clipped to
    uint8 as Pillow does (its sums fit an int: 255 x 2^22 plus rounding)."""
    first, _, kk = coeffs
    first, kk = first[a:b] - src0, kk[a:b].astype(np.int32)
    shape = list(src.shape)
    shape[axis] = b - a
    acc = np.full(shape, 1 << (PRECISION_BITS - 1), np.int32)
    wshape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    for t in range(kk.shape[1]):
        if not kk[:, t].any():
            continue
        idx = np.minimum(first + t, src.shape[axis] - 1)  # weight 0 past the taps
        acc += np.take(src, idx, axis=axis).astype(np.int32) * kk[:, t].reshape(wshape)
    return np.minimum(acc >> PRECISION_BITS, 255).astype(np.uint8)


def tile_geometry_for(slide: Slide, tp: TileParams) -> TileGeometry:
    """`slide.tile_geometry` with the tile.* params: the one call the tile stage and predict's
    up-front slide check share, so both accept and reject the same slides."""
    return slide.tile_geometry(tp.size_px, tp.mpp, tp.fallback_level, tp.fallback_mpp,
                               tuple(tp.mpp_range_um))


def _positive(props, axis: str) -> float | None:
    """openslide.mpp-<axis> as a positive finite float, else None (absent or garbage)."""
    try:
        v = float(props.get(f"openslide.mpp-{axis}", "nan"))
    except ValueError:
        return None
    return v if math.isfinite(v) and v > 0 else None


# File signatures, to say what a file OpenSlide rejects actually is.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_IMAGE_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image",
                b"GIF8": "a GIF image", b"BM": "a BMP image"}


def _why_unsupported(path: Path) -> str:
    """Why OpenSlide rejected `path`, from its first bytes: an empty file, a plain image, a
    damaged / truncated TIFF (OpenSlide reads every IFD on open, so a cut file is rejected
    as a whole), or an unknown format."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    if size == 0:
        return "empty file (0 bytes)"
    if head.startswith(_TIFF_MAGIC):
        return (f"TIFF that OpenSlide cannot read ({size} bytes): truncated, damaged, or not a "
                "tiled whole-slide TIFF")
    for magic, what in _IMAGE_MAGIC.items():
        if head.startswith(magic):
            return f"{what}, not a whole-slide format; convert it to a pyramidal tiled TIFF"
    return "unsupported or unrecognised slide format"


def slide_fingerprint(path: str | Path, span: int = 1 << 20) -> str:
    """Cheap content identity of a slide file: size + sha256 of its first and last MiB. A slide
    replaced in place (same path, new scan) gets a new fingerprint without hashing gigabytes.
    For folder formats (MRXS) the index file is fingerprinted."""
    import hashlib

    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(span))
        if size > span:
            f.seek(max(span, size - span))
            h.update(f.read(span))
    return f"{size}-{h.hexdigest()[:16]}"


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide gives premultiplied RGBA; composite onto white."""
    if rgba.ndim == 3 and rgba.shape[2] == 4:
        if rgba[..., 3].min() == 255:  # fully opaque (the usual tile): no compositing needed
            return np.ascontiguousarray(rgba[..., :3])
        rgb = rgba[..., :3].astype(np.uint16)
        a = rgba[..., 3:4].astype(np.uint16)
        out = rgb + (255 - a)  # premultiplied: colour + (1 - alpha) * white
        return np.clip(out, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgba[..., :3]).astype(np.uint8)
