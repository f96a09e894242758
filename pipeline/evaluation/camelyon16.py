"""CAMELYON16 protocol: slide ROC-AUC of the max tile probability and of the predicted tumor area
(mm^2); lesion FROC by the official protocol on the annotation rasterised at ~FROC_RASTER_UM
um/px, detections = one per predicted component (its most probable tile)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline import camelyon
from pipeline.evaluation.annotation import AnnotationTruth, annotation_truth
from pipeline.evaluation.inputs import SlideTruth, filled, predicted_grid

# FP-rate key names in metrics.json (dots would split DVC's flattened metric names).
FP_RATE_KEYS = ("fp_0_25", "fp_0_5", "fp_1", "fp_2", "fp_4", "fp_8")


def slide_scores(t: SlideTruth, prob: np.ndarray, threshold: float) -> tuple[float, float]:
    """(max tile tumor probability, predicted tumor area in mm^2) — CAMELYON16 slide scores."""
    p = filled(prob)
    max_prob = float(p.max()) if p.size else 0.0
    area_mm2 = float((p >= threshold).sum() * (t.pitch_um / 1000.0) ** 2)
    return max_prob, area_mm2


def froc_detections(t: SlideTruth, prob: np.ndarray, threshold: float,
                    ann: AnnotationTruth) -> np.ndarray:
    """One detection per predicted tumor component (its most probable tile's centre), in the
    pixel coordinates of the slide's (cropped) evaluation mask. Detections outside the crop are
    moved onto its zero margin: they hit no lesion either way (false positives)."""
    det = camelyon.detections_from_grid(predicted_grid(t, prob), threshold)
    if det.shape[0] == 0:
        return det
    ox, oy = t.origin_xy_px_level0
    x = (ox + det[:, 0] * t.pitch_px_level0) / ann.pitch_px_level0
    y = (oy + det[:, 1] * t.pitch_px_level0) / ann.pitch_px_level0
    if ann.mask is None:
        h, w = ann.shape
    else:
        x, y = x - ann.offset_rc[1], y - ann.offset_rc[0]
        h, w = ann.mask[0].shape
    x = np.clip(x, 0.0, np.nextafter(w, 0))
    y = np.clip(y, 0.0, np.nextafter(h, 0))
    return np.column_stack([x, y, det[:, 2]])


def camelyon16_section(truths: Sequence[SlideTruth], probs: Mapping[str, np.ndarray],
                       threshold: float) -> tuple[dict[str, Any], dict[str, tuple[float, float]]]:
    """Slide AUCs (max probability, predicted area) and the lesion FROC for one method.
    Returns (metrics, slide id -> (max_prob, area_mm2)). Slide truth: annotated tumor (or a
    tile with tumor fraction > 0)."""
    truth, s_max, s_area, scores = [], [], [], {}
    dets: dict[str, np.ndarray] = {}
    masks: dict[str, tuple[np.ndarray, set[int]] | None] = {}
    for t in truths:
        ann = annotation_truth(t)
        truth.append(int(ann.has_tumor or bool(t.true_tumor.any())))
        mx, area = slide_scores(t, probs[t.slide_id], threshold)
        s_max.append(mx)
        s_area.append(area)
        scores[t.slide_id] = (mx, area)
        masks[t.slide_id] = ann.mask
        dets[t.slide_id] = froc_detections(t, probs[t.slide_id], threshold, ann)
    out: dict[str, Any] = {
        "slide_auc_max_prob": camelyon.slide_auc(truth, s_max),
        "slide_auc_area": camelyon.slide_auc(truth, s_area),
        "n_slides": len(truths), "n_tumor_slides": int(sum(truth)),
    }
    fr = camelyon.froc(dets, masks)
    out["froc"] = fr["score"]
    out.update(dict(zip(FP_RATE_KEYS, fr["sensitivity_at_fp_rates"], strict=True)))
    out.update({"n_lesions": fr["n_lesions"], "n_itc_lesions": fr["n_itc_lesions"],
                "n_detected_lesions": fr["n_detected_lesions"], "n_fp": fr["n_fp_total"]})
    return out, scores
