"""Tumor points (paper §4.2.1, Fig. 5/6 text): per slide, the 8-connected components of predicted
tumor tiles that share no tile with annotated tumor (tumor_fraction > 0)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline import metrics as m
from pipeline.evaluation.inputs import SlideTruth, filled


def slide_tumor_points(t: SlideTruth, prob: np.ndarray, threshold: float) -> int:
    """Tumor points of one slide (pipeline.metrics.tumor_points on the tile grid)."""
    pred = t.to_grid(filled(prob) >= threshold, False)
    return m.tumor_points(pred, t.to_grid(t.true_tumor, False))


def tumor_points_section(truths: Sequence[SlideTruth], probs: Mapping[str, np.ndarray],
                         threshold: float) -> tuple[dict[str, Any], dict[str, int]]:
    """(mean / total / max over the slides, slide id -> tumor points)."""
    tp = {t.slide_id: slide_tumor_points(t, probs[t.slide_id], threshold) for t in truths}
    out = {"mean_per_slide": float(np.mean(list(tp.values()))), "total": int(sum(tp.values())),
           "max_per_slide": int(max(tp.values())), "n_slides": len(tp)}
    return out, tp
