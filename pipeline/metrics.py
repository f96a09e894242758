"""Patch-level evaluation metrics (paper §4.1) and the "tumor point" count, as pure functions.

Everything takes numpy arrays and returns plain Python numbers / numpy arrays / DataFrames, so
the evaluate stage (and tests) can call them without touching disk. CAMELYON16/17 protocols
(FROC, slide AUC, pN-stage, kappa) live in `pipeline.camelyon`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.measure import label as sk_label
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from pipeline.errors import PipelineError

# Default number of points kept per curve CSV: enough to draw, small enough for DVC plots.
CURVE_MAX_POINTS = 200


class MetricsError(PipelineError):
    """Bad input to a metric (wrong shape, labels outside {0, 1}, empty, non-finite)."""


def _binary_inputs(y_true: Any, prob: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return (y_true as int8 {0,1}, prob as float64), both 1-d of equal length."""
    y = np.asarray(y_true).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise MetricsError(f"{where}: y_true has {y.size} values but prob has {p.size}")
    if y.size == 0:
        raise MetricsError(f"{where}: no samples to evaluate (empty input)")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise MetricsError(
            f"{where}: y_true must be 0 (normal) or 1 (tumor); got {y[bad][0]!r} "
            "(drop nolabel tiles before evaluating)"
        )
    if not np.isfinite(p).all():
        raise MetricsError(f"{where}: prob has {int((~np.isfinite(p)).sum())} non-finite values")
    return y.astype(np.int8), p


def patch_metrics(y_true: Any, prob_tumor: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Tumor/normal patch classification metrics (paper §4.1: accuracy and PR-AUC).

    Args:
        y_true: (n,) ground-truth labels, 1 = tumor, 0 = normal (nolabel tiles already removed).
        prob_tumor: (n,) predicted tumor probability.
        threshold: a patch is predicted tumor when ``prob_tumor >= threshold`` (inclusive; the
            paper uses 0.5).

    Returns a dict with
        accuracy          fraction of patches whose thresholded prediction equals y_true
        pr_auc            area under the precision-recall curve, trapezoidal rule over the
                          points of ``sklearn.metrics.precision_recall_curve`` (sklearn ``auc``)
                          — the paper's "PR-AUC"
        average_precision sklearn's step-wise AP (sum over thresholds of ΔR·P), no interpolation
        roc_auc           area under the ROC curve
        tp, fp, tn, fn    confusion counts at `threshold` (tumor = positive)
        n, n_tumor, n_normal, threshold
        single_class      True when y_true holds one class only; the three AUCs are then NaN
                          (undefined), accuracy is still reported.
    Raises MetricsError on empty input, mismatched lengths, labels outside {0,1} or NaN probs.
    """
    y, p = _binary_inputs(y_true, prob_tumor, "patch_metrics")
    pred = p >= threshold
    pos = y == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    tn = int(np.sum(~pred & ~pos))
    fn = int(np.sum(~pred & pos))
    n_tumor = int(pos.sum())
    n = int(y.size)
    single = n_tumor in (0, n)
    if single:
        pr_auc = ap = roc = math.nan
    else:
        precision, recall, _ = precision_recall_curve(y, p)
        pr_auc = float(auc(recall, precision))
        ap = float(average_precision_score(y, p))
        roc = float(roc_auc_score(y, p))
    return {
        "accuracy": (tp + tn) / n,
        "pr_auc": pr_auc,
        "average_precision": ap,
        "roc_auc": roc,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
        "n_tumor": n_tumor,
        "n_normal": n - n_tumor,
        "threshold": float(threshold),
        "single_class": bool(single),
    }


def _thin_indices(x: np.ndarray, y: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most `max_points` curve points, spread evenly along the curve's arc length
    (not its index), always keeping both ends — so steep parts keep their shape."""
    n = x.size
    if n <= max_points:
        return np.arange(n)
    if max_points < 2:
        raise MetricsError(f"curves: max_points must be >= 2, got {max_points}")
    seg = np.hypot(np.diff(x), np.diff(y))
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    if cum[-1] == 0:
        return np.array([0, n - 1])
    targets = np.linspace(0.0, cum[-1], max_points - 1)
    idx = np.searchsorted(cum, targets, side="left")
    return np.unique(np.concatenate([np.clip(idx, 0, n - 1), [0, n - 1]]))


def curves(
    y_true: Any, prob: Any, max_points: int = CURVE_MAX_POINTS
) -> dict[str, pd.DataFrame]:
    """Precision-recall and ROC curves as DataFrames ready to write as DVC plot CSVs.

    Returns ``{"pr": DataFrame[precision, recall, threshold],
    "roc": DataFrame[fpr, tpr, threshold]}``, each thinned to at most `max_points` rows
    (evenly along the curve's arc length, end points kept). Rows come in sklearn's order (PR:
    recall decreasing; ROC: fpr increasing). The end point that corresponds to "nothing predicted
    tumor" (PR: precision 1, recall 0; ROC: 0, 0) has threshold NaN (sklearn gives none / inf).
    A single-class y_true gives empty DataFrames with those columns (the curves are undefined).
    """
    y, p = _binary_inputs(y_true, prob, "curves")
    if y.min() == y.max():
        return {
            "pr": pd.DataFrame(columns=["precision", "recall", "threshold"], dtype=float),
            "roc": pd.DataFrame(columns=["fpr", "tpr", "threshold"], dtype=float),
        }
    precision, recall, thr_pr = precision_recall_curve(y, p)
    # sklearn gives len(thresholds) == len(precision) - 1; the last point has no threshold.
    thr_pr = np.append(thr_pr.astype(np.float64), np.nan)
    fpr, tpr, thr_roc = roc_curve(y, p)
    thr_roc = np.where(np.isfinite(thr_roc), thr_roc, np.nan)
    i = _thin_indices(recall, precision, max_points)
    j = _thin_indices(fpr, tpr, max_points)
    return {
        "pr": pd.DataFrame(
            {"precision": precision[i], "recall": recall[i], "threshold": thr_pr[i]}
        ),
        "roc": pd.DataFrame({"fpr": fpr[j], "tpr": tpr[j], "threshold": thr_roc[j]}),
    }


def tumor_points(pred_tumor: Any, true_tumor: Any, margin_tiles: int = 0) -> int:
    """Count the paper's "tumor points": independent predicted tumor spots in a normal area.

    A tumor point is a connected component (8-connectivity, ``skimage.measure.label``
    connectivity=2) of `pred_tumor` that shares no tile with `true_tumor`. With
    ``margin_tiles=m > 0`` a component also counts as touching the truth when it comes within
    m tiles (Chebyshev distance, i.e. 8-neighbourhood grown m times) of a true tumor tile, so
    a prediction that only misses a lesion's border by a tile is not counted.

    Args:
        pred_tumor: (H, W) bool grid of predicted tumor tiles.
        true_tumor: (H, W) bool grid of ground-truth tumor tiles.
    """
    pred = np.asarray(pred_tumor, dtype=bool)
    true = np.asarray(true_tumor, dtype=bool)
    if pred.ndim != 2 or pred.shape != true.shape:
        raise MetricsError(
            f"tumor_points: need two (H, W) grids of the same shape, got {pred.shape} and "
            f"{true.shape}"
        )
    if margin_tiles < 0:
        raise MetricsError(f"tumor_points: margin_tiles must be >= 0, got {margin_tiles}")
    if margin_tiles:
        true = ndi.binary_dilation(true, structure=np.ones((3, 3), bool), iterations=margin_tiles)
    lab, n = sk_label(pred, connectivity=2, return_num=True)
    if n == 0:
        return 0
    touching = np.unique(lab[true & pred])  # labels of components sharing a true tile
    return int(n - touching.size)
