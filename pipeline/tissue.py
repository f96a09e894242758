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
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
from skimage.filters import threshold_otsu
from skimage.measure import label as label_components
from skimage.morphology import remove_small_holes, remove_small_objects

SATURATION_FLOOR = 0.05
SATURATION_CEIL = 0.25
DARK_MAX = 40  # uint8 max-channel value below which a pixel is "black", not tissue
COLOUR_SPACE = "HSV saturation"


@dataclass(frozen=True)
class TissueMask:
    """A cleaned tissue mask and its connected components, on a grid of `downsample_x` x
    `downsample_y` level-0 pixels per mask pixel."""

    mask: np.ndarray  # (h, w) bool
    labels: np.ndarray  # (h, w) int32, 0 = background, 1..n_components tissue lumps (8-conn)
    n_components: int
    downsample_x: float  # level-0 px per mask px along x
    downsample_y: float
    threshold: float  # saturation threshold used (Otsu, clipped)
    otsu_threshold: float  # raw Otsu value, for messages

    def box_fractions(
        self, x0_px_level0: np.ndarray, y0_px_level0: np.ndarray, size_px_level0: float
    ) -> np.ndarray:
        """Tissue area fraction of each square box (level-0 top-left, side in level-0 px)."""
        return box_fractions(
            self.mask, x0_px_level0 / self.downsample_x, y0_px_level0 / self.downsample_y,
            size_px_level0 / self.downsample_x, size_px_level0 / self.downsample_y,
        )

    def box_majority_labels(
        self, x0_px_level0: np.ndarray, y0_px_level0: np.ndarray, size_px_level0: float
    ) -> np.ndarray:
        """Component (1..n) covering the largest tissue area in each box; 0 if no tissue."""
        return box_majority_labels(
            self.labels, x0_px_level0 / self.downsample_x, y0_px_level0 / self.downsample_y,
            size_px_level0 / self.downsample_x, size_px_level0 / self.downsample_y,
        )


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
    return TissueMask(
        mask=mask.astype(bool), labels=labels.astype(np.int32), n_components=int(n),
        downsample_x=float(downsample_x), downsample_y=float(downsample_y),
        threshold=thr, otsu_threshold=otsu,
    )



def box_fractions(
    mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, w: float, h: float
) -> np.ndarray:
    """Mean of `mask` over boxes [x0, x0+w) x [y0, y0+h) in (fractional) mask-pixel units.

    The summed-area table S (padded with a zero row/column) gives the integral over
    [0, x) x [0, y) at integer corners; inside a pixel the integral is bilinear in (x, y), so
    bilinear interpolation of S is the exact area integral at fractional corners.
    """
    x0 = np.asarray(x0, np.float64)
    y0 = np.asarray(y0, np.float64)
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    # in place: two float64 temporaries of the mask's size would dominate the tile stage's
    # peak memory on a 10^5-px slide (benchmarks/camelyon_scale.py)
    np.cumsum(mask, axis=0, dtype=np.float64, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])

    def at(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        # bilinear interpolation of S at (y, x), 4 values per box corner: memory O(boxes), not
        # O(boxes x mask width) (a CAMELYON grid at level 0 is ~10^6 boxes)
        yc = np.clip(y, 0, sat.shape[0] - 1)
        xc = np.clip(x, 0, sat.shape[1] - 1)
        i0 = np.minimum(np.floor(yc).astype(np.intp), sat.shape[0] - 2)
        j0 = np.minimum(np.floor(xc).astype(np.intp), sat.shape[1] - 2)
        fy, fx = yc - i0, xc - j0
        return (sat[i0, j0] * (1 - fy) * (1 - fx) + sat[i0 + 1, j0] * fy * (1 - fx)
                + sat[i0, j0 + 1] * (1 - fy) * fx + sat[i0 + 1, j0 + 1] * fy * fx)

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
    labels: np.ndarray, x0: np.ndarray, y0: np.ndarray, w: float, h: float
) -> np.ndarray:
    """Per box (mask-pixel units, fractional), the nonzero label with the largest covered area
    (exact area weights; ties go to the smaller label); 0 when the box holds no label."""
    out = np.zeros(np.asarray(x0).size, np.int32)
    H, W = labels.shape
    for k, (bx, by) in enumerate(zip(np.asarray(x0, float), np.asarray(y0, float), strict=True)):
        cx, wx = _overlap_weights(bx, bx + w, W)
        cy, wy = _overlap_weights(by, by + h, H)
        patch = labels[cy:cy + wy.size, cx:cx + wx.size]
        wts = np.outer(wy[: patch.shape[0]], wx[: patch.shape[1]])
        votes = np.bincount(patch.ravel(), weights=wts.ravel())
        votes[0] = 0.0
        if votes.size > 1 and votes.max() > 0:
            out[k] = int(np.argmax(votes))
    return out
