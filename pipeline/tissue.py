"""Tissue mask of a slide and the per-tile quantities derived from it.

Colour space: HSV saturation, S = (max(R,G,B) - min(R,G,B)) / max(R,G,B), thresholded with Otsu.
Why saturation and not grey level: glass and scanner background are white *or grey* (some
scanners fill unscanned areas with a flat grey; bright glass varies with illumination), and all
of those have S ~ 0 whatever their brightness, while haematoxylin and eosin are strongly
coloured (S ~ 0.2-0.6). A grey-level Otsu splits bright glass from dim glass on a slide with a
brightness gradient; a saturation Otsu does not.

Two guards around Otsu, both cheap:
- the threshold is clipped to [SATURATION_FLOOR, SATURATION_CEIL]. The floor stops an all-glass
  slide (no tissue at all) from having its JPEG noise split into "tissue"; the ceiling stops a
  slide that is almost all tissue from having pale eosin split off as "background".
- near-black pixels (max channel < DARK_MAX) are never tissue: out-of-scan black borders,
  black pen and dust have noisy, high saturation in dark pixels.

Clean-up sizes are areas in um^2 converted with the mask's own um per pixel: holes smaller than
`max_hole_um2` are filled, then connected components (8-connectivity) smaller than
`min_object_um2` are removed. The remaining components are the tissue "lumps".

Tile quantities are computed on the cleaned mask with exact area weights: a tile's footprint in
mask pixels has fractional edges, and its tissue fraction is the area integral of the mask over
that box (bilinear interpolation of the summed-area table is exact for a piecewise-constant
image), so a tile covering 3/4 of a tissue pixel counts 3/4 of it.

Bounded memory (`tissue_mask_from_overview`, what the tile stage uses): the overview is read
window by window, twice. Pass 1 keeps only a (max, min) channel histogram for Otsu (it fixes the
saturation, so the threshold is the one-piece one bit for bit) and each 16 x 16 block's largest
saturation; pass 2 reads, masks and cleans only the tissue windows: the blocks over threshold,
grouped and grown by one block of glass. A window's clean-up equals the whole mask's because its
border is glass: no component crosses it, and the glass touching it is checked to be larger than
a hole (else the whole overview is one window). `compute_tissue_mask` is the one-piece version.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.measure import label as label_components
from skimage.morphology import remove_small_holes, remove_small_objects

SATURATION_FLOOR = 0.05
SATURATION_CEIL = 0.25
DARK_MAX = 40  # uint8 max-channel value below which a pixel is "black", not tissue
COLOUR_SPACE = "HSV saturation"
BLOCK_PX = 16  # overview px per side of the blocks that locate the tissue windows
READ_PX = 512  # overview px per side of one read (pass 1 and 2): bounds the temporaries


@dataclass(frozen=True)
class MaskWindow:
    """A part of the cleaned mask: rows y0.., cols x0.. of the overview; outside every window
    the mask is 0. `labels` are the whole mask's component ids."""

    y0: int
    x0: int
    mask: np.ndarray  # (h, w) bool
    labels: np.ndarray  # (h, w) int32

    def integral(self) -> np.ndarray:
        """Summed-area table, zero row/column first: (h + 1, w + 1) float64."""
        sat = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), np.float64)
        # in place: no mask-sized float64 temporaries
        np.cumsum(self.mask, axis=0, dtype=np.float64, out=sat[1:, 1:])
        np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
        return sat


@dataclass(frozen=True)
class TissueMask:
    """A cleaned tissue mask of `shape` (as windows) and its connected components, on a grid of
    `downsample_x` x `downsample_y` level-0 pixels per mask pixel."""

    shape: tuple[int, int]  # (h, w) of the whole mask
    windows: tuple[MaskWindow, ...]
    n_components: int  # labels 1..n_components: tissue lumps (8-conn), raster order
    downsample_x: float  # level-0 px per mask px along x
    downsample_y: float
    threshold: float  # saturation threshold used (Otsu, clipped)
    otsu_threshold: float  # raw Otsu value, for messages

    @property
    def mask(self) -> np.ndarray:
        """The whole (h, w) bool mask (assembled: for small masks and tests)."""
        return self._assemble("mask", bool)

    @property
    def labels(self) -> np.ndarray:
        """The whole (h, w) int32 component labels (assembled: for small masks and tests)."""
        return self._assemble("labels", np.int32)

    def _assemble(self, name: str, dtype) -> np.ndarray:
        out = np.zeros(self.shape, dtype)
        for w in self.windows:
            a = getattr(w, name)
            out[w.y0:w.y0 + a.shape[0], w.x0:w.x0 + a.shape[1]] = a
        return out

    def box_fractions(
        self, x0_px_level0: np.ndarray, y0_px_level0: np.ndarray, size_px_level0: float
    ) -> np.ndarray:
        """Tissue area fraction of each square box (level-0 top-left, side in level-0 px)."""
        tables = [(w.y0, w.x0, w.integral()) for w in self.windows]

        def corner(i: np.ndarray, j: np.ndarray) -> np.ndarray:
            # the whole mask's summed-area table at integer corners: the sum of the windows'
            # (integers, so exact in any order)
            total = np.zeros(np.shape(i), np.float64)
            for y0, x0, sat in tables:
                total += sat[np.clip(i - y0, 0, sat.shape[0] - 1),
                             np.clip(j - x0, 0, sat.shape[1] - 1)]
            return total

        return _box_fractions(
            corner, self.shape, x0_px_level0 / self.downsample_x,
            y0_px_level0 / self.downsample_y, size_px_level0 / self.downsample_x,
            size_px_level0 / self.downsample_y,
        )

    def box_majority_labels(
        self, x0_px_level0: np.ndarray, y0_px_level0: np.ndarray, size_px_level0: float
    ) -> np.ndarray:
        """Component (1..n) covering the largest tissue area in each box; 0 if no tissue."""
        return box_majority_labels(
            self._label_patch, self.shape, x0_px_level0 / self.downsample_x,
            y0_px_level0 / self.downsample_y, size_px_level0 / self.downsample_x,
            size_px_level0 / self.downsample_y,
        )

    def _label_patch(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        patch = np.zeros((max(0, r1 - r0), max(0, c1 - c0)), np.int32)
        for w in self.windows:
            h, wd = w.labels.shape
            a0, a1 = max(r0, w.y0), min(r1, w.y0 + h)
            b0, b1 = max(c0, w.x0), min(c1, w.x0 + wd)
            if a0 < a1 and b0 < b1:
                patch[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = w.labels[a0 - w.y0:a1 - w.y0,
                                                                    b0 - w.x0:b1 - w.x0]
        return patch


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] as float32 (0 where the pixel is black), without the float64
    (H, W, 3) temporaries of skimage.color.rgb2hsv, which matter on a whole-slide overview."""
    mx = rgb.max(axis=2)
    mn = rgb.min(axis=2)
    out = np.zeros(mx.shape, np.float32)
    np.divide(mx.astype(np.float32) - mn, mx, out=out, where=mx > 0)
    return out


def tissue_threshold(sat: np.ndarray, dark: np.ndarray | None = None) -> tuple[float, float]:
    """(clipped threshold, raw Otsu threshold) of saturation over the non-dark pixels."""
    values = sat[~dark] if dark is not None else sat.ravel()
    if values.size == 0 or float(values.max()) == float(values.min()):
        otsu = float(values.max()) if values.size else 0.0
    else:
        otsu = float(threshold_otsu(values))
    return float(np.clip(otsu, SATURATION_FLOOR, SATURATION_CEIL)), otsu


def _area_kw(fn, area_px: float) -> dict:
    """Keyword for 'remove components smaller than area_px' across scikit-image versions:
    0.26 has `max_size` (removes size <= max_size), older ones `min_size`/`area_threshold`
    (removes size < value)."""
    if "max_size" in inspect.signature(fn).parameters:
        return {"max_size": max(0, math.ceil(area_px) - 1)}
    name = "min_size" if fn is remove_small_objects else "area_threshold"
    return {name: max(0, math.ceil(area_px))}


def compute_tissue_mask(
    rgb: np.ndarray,
    downsample_x: float,
    downsample_y: float,
    mask_um_per_px: float,
    min_object_um2: float,
    max_hole_um2: float,
) -> TissueMask:
    """Otsu tissue mask of a low-resolution RGB overview (see the module docstring).

    `downsample_x/y`: level-0 px per overview px; `mask_um_per_px`: size of one overview pixel
    in um, used to turn the clean-up areas (um^2) into pixel counts.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    rgb = rgb[..., :3]
    sat = saturation(rgb)
    dark = rgb.max(axis=2) < DARK_MAX
    thr, otsu = tissue_threshold(sat, dark)
    mask = (sat > thr) & ~dark
    px_area_um2 = mask_um_per_px**2
    hole_px = max_hole_um2 / px_area_um2
    if hole_px >= 1:
        mask = remove_small_holes(mask, connectivity=1, **_area_kw(remove_small_holes, hole_px))
    obj_px = min_object_um2 / px_area_um2
    if obj_px > 1:
        mask = remove_small_objects(
            mask, connectivity=2, **_area_kw(remove_small_objects, obj_px)
        )
    labels, n = label_components(mask, connectivity=2, return_num=True)
    window = MaskWindow(0, 0, mask.astype(bool), labels.astype(np.int32))
    return TissueMask(
        shape=mask.shape, windows=(window,), n_components=int(n),
        downsample_x=float(downsample_x), downsample_y=float(downsample_y),
        threshold=thr, otsu_threshold=otsu,
    )


def box_fractions(
    mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, w: float, h: float
) -> np.ndarray:
    """Mean of `mask` over boxes [x0, x0+w) x [y0, y0+h) in (fractional) mask-pixel units."""
    sat = MaskWindow(0, 0, mask, mask).integral()
    return _box_fractions(lambda i, j: sat[i, j], mask.shape, x0, y0, w, h)


def _box_fractions(corner, shape: tuple[int, int], x0: np.ndarray, y0: np.ndarray, w: float,
                   h: float) -> np.ndarray:
    """`box_fractions` given `corner(i, j)`, the summed-area table S of a mask of `shape` at
    integer corners (S(i, j) = integral over [0, i) x [0, j)). Inside a pixel the integral is
    bilinear in (x, y), so bilinear interpolation of S is the exact area integral at
    fractional corners."""
    x0 = np.asarray(x0, np.float64)
    y0 = np.asarray(y0, np.float64)
    rows, cols = shape[0] + 1, shape[1] + 1

    def at(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        # bilinear interpolation of S at (y, x), 4 values per box corner: memory O(boxes), not
        # O(boxes x mask width) (a CAMELYON grid at level 0 is ~10^6 boxes)
        yc = np.clip(y, 0, rows - 1)
        xc = np.clip(x, 0, cols - 1)
        i0 = np.minimum(np.floor(yc).astype(np.intp), rows - 2)
        j0 = np.minimum(np.floor(xc).astype(np.intp), cols - 2)
        fy, fx = yc - i0, xc - j0
        return (corner(i0, j0) * (1 - fy) * (1 - fx) + corner(i0 + 1, j0) * fy * (1 - fx)
                + corner(i0, j0 + 1) * (1 - fy) * fx + corner(i0 + 1, j0 + 1) * fy * fx)

    total = at(y0 + h, x0 + w) - at(y0 + h, x0) - at(y0, x0 + w) + at(y0, x0)
    return np.clip(total / (w * h), 0.0, 1.0)


def _overlap_weights(lo: float, hi: float, n: int) -> tuple[int, np.ndarray]:
    """(first pixel index, overlap length of [lo, hi) with each pixel it touches), clamped."""
    lo, hi = max(lo, 0.0), min(hi, float(n))
    i0 = int(math.floor(lo))
    i1 = max(i0 + 1, int(math.ceil(hi)))
    edges = np.arange(i0, i1 + 1, dtype=np.float64)
    wts = np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo)
    return i0, np.clip(wts, 0.0, None)


def box_majority_labels(
    patch_at, shape: tuple[int, int], x0: np.ndarray, y0: np.ndarray, w: float, h: float
) -> np.ndarray:
    """Per box (mask-pixel units, fractional), the nonzero label with the largest covered area
    (exact area weights; ties go to the smaller label); 0 when the box holds no label.
    `patch_at(r0, r1, c0, c1)`: the labels in rows [r0, r1) x cols [c0, c1) of `shape`."""
    out = np.zeros(np.asarray(x0).size, np.int32)
    H, W = shape
    for k, (bx, by) in enumerate(zip(np.asarray(x0, float), np.asarray(y0, float), strict=True)):
        cx, wx = _overlap_weights(bx, bx + w, W)
        cy, wy = _overlap_weights(by, by + h, H)
        patch = patch_at(cy, min(cy + wy.size, H), cx, min(cx + wx.size, W))
        wts = np.outer(wy[: patch.shape[0]], wx[: patch.shape[1]])
        votes = np.bincount(patch.ravel(), weights=wts.ravel())
        votes[0] = 0.0
        if votes.size > 1 and votes.max() > 0:
            out[k] = int(np.argmax(votes))
    return out


# -- bounded memory: the overview window by window ----------------------------------------------


def tissue_mask_from_overview(
    overview, mask_um_per_px: float, min_object_um2: float, max_hole_um2: float,
    on_read=None, align: int = 1,
) -> TissueMask:
    """`compute_tissue_mask(overview image)`, bit for bit, without the whole overview in memory
    (module docstring). `overview`: `pipeline.slide.Overview` (`shape`, `read`, `downsample_x/y`,
    `tile_px`); `on_read(r0, c0, rgb)` sees every pass-1 read (the tile stage's thumbnail), whose
    origins are multiples of `align`."""
    H, W = overview.shape
    counts = np.zeros(1 << 16, np.int64)  # non-dark pixels per (max, min) channel value
    blocks = np.full((-(-H // BLOCK_PX), -(-W // BLOCK_PX)), -1.0, np.float32)
    step = overview.tile_px(math.lcm(BLOCK_PX, align), READ_PX)
    for r0, c0, rgb in _reads(overview, 0, H, 0, W, step, on_read):
        sat, dark = saturation(rgb), rgb.max(axis=2) < DARK_MAX
        code = rgb.max(axis=2).astype(np.int32) << 8 | rgb.min(axis=2)
        counts += np.bincount(code[~dark], minlength=1 << 16)
        sat[dark] = -1.0
        h, w = sat.shape
        padded = np.full((-(-h // BLOCK_PX) * BLOCK_PX, -(-w // BLOCK_PX) * BLOCK_PX), -1.0,
                         np.float32)
        padded[:h, :w] = sat
        b = padded.reshape(padded.shape[0] // BLOCK_PX, BLOCK_PX, -1, BLOCK_PX).max(axis=(1, 3))
        blocks[r0 // BLOCK_PX:r0 // BLOCK_PX + b.shape[0],
               c0 // BLOCK_PX:c0 // BLOCK_PX + b.shape[1]] = b
    thr, otsu = threshold_from_counts(counts)
    px_area_um2 = mask_um_per_px**2
    hole_px, obj_px = max_hole_um2 / px_area_um2, min_object_um2 / px_area_um2
    clean = _Cleanup(math.ceil(hole_px) if hole_px >= 1 else 0,
                     math.ceil(obj_px) if obj_px > 1 else 0)
    boxes = _windows(blocks > thr, H, W)
    if not boxes and 0 < H * W < clean.hole_min:
        boxes = [(0, H, 0, W)]  # all glass, smaller than a hole: filled, as in one piece
    parts = []
    for y0, y1, x0, x1 in boxes:
        m = np.zeros((y1 - y0, x1 - x0), bool)
        for r0, c0, rgb in _reads(overview, y0, y1, x0, x1, step):
            m[r0 - y0:r0 - y0 + rgb.shape[0], c0 - x0:c0 - x0 + rgb.shape[1]] = (
                (saturation(rgb) > thr) & ~(rgb.max(axis=2) < DARK_MAX))
        ring = (y0 > 0, y1 < H, x0 > 0, x1 < W)  # sides inside the overview: glass
        m = clean(m, ring)
        if m is None:  # glass along the border smaller than a hole: clean the whole overview
            return _one_window(overview, thr, otsu, clean, step)
        if m.any():
            parts.append((y0, x0, m))
    return _labelled(parts, overview, thr, otsu)


def _reads(overview, y0: int, y1: int, x0: int, x1: int, step: int, on_read=None):
    """(r0, c0, rgb) over rows [y0, y1) x cols [x0, x1) of the overview in step x step reads."""
    for r0 in range(y0, y1, step):
        for c0 in range(x0, x1, step):
            rgb = overview.read(r0, min(r0 + step, y1), c0, min(c0 + step, x1))
            if on_read is not None:
                on_read(r0, c0, rgb)
            yield r0, c0, rgb


def threshold_from_counts(counts: np.ndarray) -> tuple[float, float]:
    """`tissue_threshold` of the pixels counted per (max, min) channel value (index max << 8 |
    min): the same histogram (same range and bin edges, from the same float32 saturations) and
    so the same Otsu threshold as on the pixels themselves."""
    code = np.arange(1 << 16)
    pairs = np.stack([code >> 8, code & 255, code & 255], axis=-1).astype(np.uint8)[None]
    sat = saturation(pairs)[0]
    seen = counts > 0
    if not seen.any():
        otsu = 0.0
    elif float(sat[seen].max()) == float(sat[seen].min()):
        otsu = float(sat[seen].max())
    else:
        hist, edges = np.histogram(sat[seen], bins=256, weights=counts[seen])
        centers = (edges[:-1] + edges[1:]) / 2.0  # as skimage.exposure.histogram
        otsu = float(threshold_otsu(hist=(hist.astype(np.int64), centers)))
    return float(np.clip(otsu, SATURATION_FLOOR, SATURATION_CEIL)), otsu


@dataclass(frozen=True)
class _Cleanup:
    """`compute_tissue_mask`'s clean-up on one window; 0 = that step is off."""

    hole_min: int  # background components (4-conn) with fewer pixels are filled
    object_min: int  # tissue components (8-conn) with fewer pixels are removed

    def __call__(self, m: np.ndarray, ring: tuple[bool, bool, bool, bool]) -> np.ndarray | None:
        """The cleaned window, or None when glass touching its border sides `ring` (top,
        bottom, left, right) is smaller than a hole: only the whole mask tells if it is one."""
        if self.hole_min:
            bg, _ = ndi.label(~m, ndi.generate_binary_structure(2, 1))
            small = np.bincount(bg.ravel()) < self.hole_min
            small[0] = False
            edge = [e for e, on in zip((bg[0], bg[-1], bg[:, 0], bg[:, -1]), ring,
                                       strict=True) if on]
            if edge and small[np.concatenate(edge)].any():
                return None
            m = m | small[bg]
        if self.object_min:
            fg, _ = ndi.label(m, ndi.generate_binary_structure(2, 2))
            small = np.bincount(fg.ravel()) < self.object_min
            small[0] = False
            m = m & ~small[fg]
        return m


def _windows(fg_blocks: np.ndarray, H: int, W: int) -> list[tuple[int, int, int, int]]:
    """Overview (y0, y1, x0, x1) of disjoint windows that hold every block over threshold and
    one block of glass around (except at the overview's edge): each group of touching blocks'
    box grown by one block; boxes that overlap or touch merged until none do."""
    eight = np.ones((3, 3), bool)
    lab, _ = ndi.label(fg_blocks, eight)
    bh, bw = fg_blocks.shape
    boxes = [(max(0, r.start - 1), min(bh, r.stop + 1), max(0, c.start - 1), min(bw, c.stop + 1))
             for r, c in ndi.find_objects(lab)]
    while boxes:
        painted = np.zeros((bh, bw), bool)
        for a, b, c, d in boxes:
            painted[a:b, c:d] = True
        lab, n = ndi.label(painted, eight)
        merged = [(r.start, r.stop, c.start, c.stop) for r, c in ndi.find_objects(lab)]
        if n == len(boxes):
            break
        boxes = merged
    return [(a * BLOCK_PX, min(b * BLOCK_PX, H), c * BLOCK_PX, min(d * BLOCK_PX, W))
            for a, b, c, d in boxes]


def _one_window(overview, thr: float, otsu: float, clean: _Cleanup, step: int) -> TissueMask:
    H, W = overview.shape
    m = np.zeros((H, W), bool)
    for r0, c0, rgb in _reads(overview, 0, H, 0, W, step):
        m[r0:r0 + rgb.shape[0], c0:c0 + rgb.shape[1]] = (
            (saturation(rgb) > thr) & ~(rgb.max(axis=2) < DARK_MAX))
    m = clean(m, (False, False, False, False))
    return _labelled([(0, 0, m)] if m.any() else [], overview, thr, otsu)


def _labelled(parts: list, overview, thr: float, otsu: float) -> TissueMask:
    """Label each window's components and number them over the whole mask in raster order of
    their first pixel, as one `label_components` of the whole mask does."""
    H, W = overview.shape
    local, firsts = [], []
    for y0, x0, m in parts:
        lab, n = label_components(m, connectivity=2, return_num=True)
        _, first = np.unique(lab.ravel(), return_index=True)
        first = first[-n:] if n else first[:0]  # labels 1..n (0 may be absent)
        firsts.append((y0 + first // m.shape[1]) * W + x0 + first % m.shape[1])
        local.append(lab)
    order = np.argsort(np.concatenate(firsts)) if firsts else np.zeros(0, np.intp)
    ids = np.empty(order.size, np.int32)
    ids[order] = np.arange(1, order.size + 1, dtype=np.int32)
    windows, k = [], 0
    for (y0, x0, m), lab, first in zip(parts, local, firsts, strict=True):
        lut = np.zeros(first.size + 1, np.int32)
        lut[1:] = ids[k:k + first.size]
        k += first.size
        windows.append(MaskWindow(y0, x0, m, lut[lab]))
    return TissueMask(
        shape=(H, W), windows=tuple(windows), n_components=int(order.size),
        downsample_x=float(overview.downsample_x), downsample_y=float(overview.downsample_y),
        threshold=thr, otsu_threshold=otsu,
    )
