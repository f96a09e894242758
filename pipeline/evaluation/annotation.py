"""The CAMELYON ground truth of a slide from its annotation: the evaluation raster, the official
CAMELYON16 evaluation mask and the true CAMELYON17 slide class."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline import camelyon
from pipeline.annotations import rasterize, read_annotation, sample_mask
from pipeline.evaluation.inputs import EvaluateError, SlideTruth

# Resolution of the CAMELYON16 evaluation mask: the official script works at level 5 of
# 0.243 um/px slides, ~7.8 um/px.
FROC_RASTER_UM = 8.0
# Dilation radius of the evaluation mask: the official script's 75 um / 2 (camelyon.py).
DILATION_UM = 37.5
# A slide whose raster at FROC_RASTER_UM would exceed this many pixels is rasterised coarser.
MAX_RASTER_PIXELS = 64_000_000


def raster_geometry(t: SlideTruth) -> tuple[float, tuple[int, int]]:
    """(pitch in level-0 px, (H, W)) of the slide's CAMELYON evaluation raster: about
    FROC_RASTER_UM um/px from level-0 (0, 0), coarser when that would exceed MAX_RASTER_PIXELS."""
    if not math.isfinite(t.mpp):
        raise EvaluateError(f"{t.slide_id}: slide mpp unknown; the CAMELYON evaluation needs "
                            "micrometres (set tile.fallback_mpp)")
    w, h = t.slide_wh_px_level0
    pitch = max(FROC_RASTER_UM / t.mpp, math.sqrt(w * h / MAX_RASTER_PIXELS))
    return pitch, (max(1, math.ceil(h / pitch)), max(1, math.ceil(w / pitch)))


@dataclass(frozen=True)
class AnnotationTruth:
    """What the CAMELYON protocols need from a slide's annotation, computed once per slide.
    The evaluation mask is kept cropped to its lesions (plus a zero margin), so a test set of
    large slides does not hold full-slide rasters in memory."""

    has_tumor: bool
    slide_class: str  # CAMELYON17 class of the largest annotated lesion
    mask: tuple[np.ndarray, set[int]] | None  # cropped evaluation-mask labels, ITC ids
    offset_rc: tuple[int, int]  # raster (row, col) of mask[0, 0]
    pitch_px_level0: float  # raster pitch
    shape: tuple[int, int]  # full raster (H, W)


def tumor_raster(t: SlideTruth) -> tuple[np.ndarray, float] | None:
    """The slide's annotated tumor (tumor minus exclusions, masks included) on the evaluation
    raster (see raster_geometry). Returns (raster (H, W) bool, pitch in level-0 px), or None
    when the slide has no annotation."""
    if not t.annotation_path:
        return None
    w, h = t.slide_wh_px_level0
    pitch, shape = raster_geometry(t)
    ann = read_annotation(t.annotation_path, (w, h), max_mask_downsample=pitch)
    tumor = rasterize(ann.tumor, shape, (0.0, 0.0), pitch)
    if ann.mask is not None:
        tumor |= sample_mask(ann.mask, shape, (0.0, 0.0), pitch)
    if ann.exclusion:
        tumor &= ~rasterize(ann.exclusion, shape, (0.0, 0.0), pitch)
    return tumor, pitch


def annotation_truth(t: SlideTruth) -> AnnotationTruth:
    """The slide's CAMELYON ground truth (cached on `t`): official evaluation mask (dilated
    37.5 um, holes filled, ITC lesions marked) cropped to the tumor's bounding box plus a margin
    wider than the dilation, so dilation and hole filling give what the full raster would."""
    if t._raster is not None:
        return t._raster
    pitch, shape = raster_geometry(t)
    r = tumor_raster(t)
    if r is None or not r[0].any():
        t._raster = AnnotationTruth(False, camelyon.SLIDE_NEGATIVE, None, (0, 0), pitch, shape)
        return t._raster
    tumor = r[0]
    pixel_um = pitch * t.mpp
    rows, cols = np.nonzero(tumor)
    margin = int(math.ceil(DILATION_UM / pixel_um)) + 2
    r0, c0 = max(0, rows.min() - margin), max(0, cols.min() - margin)
    r1, c1 = min(shape[0], rows.max() + margin + 1), min(shape[1], cols.max() + margin + 1)
    crop = tumor[r0:r1, c0:c1]
    cls, _ = camelyon.slide_class_from_mask(crop, pixel_um)
    t._raster = AnnotationTruth(True, cls, camelyon.evaluation_mask(crop, pixel_um, DILATION_UM),
                                (int(r0), int(c0)), pitch, shape)
    return t._raster


def true_slide_class(t: SlideTruth) -> tuple[str, str]:
    """(CAMELYON17 slide class, source): the manifest's slide_label when given, else the class of
    the annotation raster's largest lesion (no annotation: negative). The annotation is used
    rather than the tile labels because tiles quantise a lesion's diameter to the tile pitch."""
    if t.slide_label:
        return t.slide_label, "manifest"
    return annotation_truth(t).slide_class, "annotation"
