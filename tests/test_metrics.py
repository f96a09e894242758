"""Patch metrics, curves and tumor points against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.metrics import MetricsError, curves, patch_metrics, tumor_points

# Six patches; sorted by prob: .9(T) .8(N) .7(T) .5(T) .4(T) .2(N). 4 tumor, 2 normal.
Y = np.array([1, 0, 1, 1, 0, 1])
P = np.array([0.9, 0.8, 0.7, 0.4, 0.2, 0.5])


def test_patch_metrics_hand_computed():
    m = patch_metrics(Y, P, threshold=0.5)
    # prob >= 0.5 -> tumor: .9 T ok, .8 T wrong, .7 T ok, .4 N wrong, .2 N ok, .5 T ok -> 4/6.
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 1, 1)
    assert (m["n"], m["n_tumor"], m["n_normal"]) == (6, 4, 2)
    # PR points (recall, precision) by threshold: (0,1) (1/4,1) (1/4,1/2) (1/2,2/3) (3/4,3/4)
    # (1,4/5) (1,4/6). Trapezoids: 1/4*1 + 1/4*(1/2+2/3)/2 + 1/4*(2/3+3/4)/2 + 1/4*(3/4+4/5)/2.
    pr_auc = 0.25 * 1 + 0.25 * (1 / 2 + 2 / 3) / 2 + 0.25 * (2 / 3 + 3 / 4) / 2
    pr_auc += 0.25 * (3 / 4 + 4 / 5) / 2
    assert pr_auc == pytest.approx(23 / 30)
    assert m["pr_auc"] == pytest.approx(23 / 30)
    # AP = sum dR * P = 1/4 * (1 + 2/3 + 3/4 + 4/5).
    assert m["average_precision"] == pytest.approx(193 / 240)
    # ROC-AUC = fraction of (tumor, normal) pairs ranked right: 5 of 8.
    assert m["roc_auc"] == pytest.approx(5 / 8)
    assert m["single_class"] is False


def test_threshold_is_inclusive():
    assert patch_metrics([1], [0.5], threshold=0.5)["accuracy"] == 1.0
    assert patch_metrics([0], [0.5], threshold=0.5)["accuracy"] == 0.0
    assert patch_metrics([1, 0], [0.5, 0.49], threshold=0.5)["tp"] == 1


def test_single_class_gives_nan_aucs_and_flag():
    m = patch_metrics([1, 1, 1], [0.9, 0.2, 0.6])
    assert m["single_class"] is True
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert all(math.isnan(m[k]) for k in ("pr_auc", "average_precision", "roc_auc"))


@pytest.mark.parametrize(
    "y, p",
    [([], []), ([0, 1], [0.5]), ([0, 2], [0.1, 0.2]), ([-1, 1], [0.1, 0.2]),
     ([0, 1], [0.1, np.nan])],
)
def test_bad_input_raises_pipeline_error(y, p):
    with pytest.raises(MetricsError) as exc:
        patch_metrics(y, p)
    assert isinstance(exc.value, PipelineError)
    assert "\n" not in str(exc.value)


def test_curves_small_is_exact():
    c = curves(Y, P)
    pr, roc = c["pr"], c["roc"]
    assert list(pr.columns) == ["precision", "recall", "threshold"]
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    np.testing.assert_allclose(pr["recall"], [1, 1, 3 / 4, 1 / 2, 1 / 4, 1 / 4, 0])
    np.testing.assert_allclose(pr["precision"], [4 / 6, 4 / 5, 3 / 4, 2 / 3, 1 / 2, 1, 1])
    np.testing.assert_allclose(pr["threshold"][:-1], [0.2, 0.4, 0.5, 0.7, 0.8, 0.9])
    assert np.isnan(pr["threshold"].iloc[-1])
    # ROC runs (0,0) -> ... -> (1,1); first threshold (nothing positive) is NaN, not inf.
    assert (roc["fpr"].iloc[0], roc["tpr"].iloc[0]) == (0, 0)
    assert (roc["fpr"].iloc[-1], roc["tpr"].iloc[-1]) == (1, 1)
    assert np.isnan(roc["threshold"].iloc[0])
    assert np.isfinite(roc["threshold"].iloc[1:]).all()


def test_curves_thinned_keep_shape_and_ends():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 5000)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, y.size), 0, 1)
    c = curves(y, p, max_points=200)
    from sklearn.metrics import precision_recall_curve, roc_curve

    prec, rec, _ = precision_recall_curve(y, p)
    fpr, tpr, _ = roc_curve(y, p)
    assert len(prec) > 1000  # really thinned
    for df, (x_full, y_full), (xc, yc) in (
        (c["pr"], (rec, prec), ("recall", "precision")),
        (c["roc"], (fpr, tpr), ("fpr", "tpr")),
    ):
        assert 50 <= len(df) <= 200
        assert (df[xc].iloc[0], df[yc].iloc[0]) == (x_full[0], y_full[0])
        assert (df[xc].iloc[-1], df[yc].iloc[-1]) == (x_full[-1], y_full[-1])
        # thinned rows are a subsequence of the full curve (same order)
        full = list(zip(x_full.tolist(), y_full.tolist(), strict=True))
        pos = [full.index((a, b)) for a, b in zip(df[xc], df[yc], strict=True)]
        assert pos == sorted(pos)
    # ROC of the thinned curve is close to the true AUC
    assert np.trapezoid(c["roc"]["tpr"], c["roc"]["fpr"]) == pytest.approx(
        patch_metrics(y, p)["roc_auc"], abs=0.01
    )


def test_curves_single_class_empty():
    c = curves([0, 0], [0.1, 0.2])
    assert c["pr"].empty and c["roc"].empty
    assert list(c["pr"].columns) == ["precision", "recall", "threshold"]


# Predicted components: A {(0,0),(0,1)} overlaps truth at (0,1); B {(1,4),(2,3)} joined only
# diagonally, far from truth; C {(4,0)} alone; D {(4,5)} next to the true tile (3,5).
PRED = np.array(
    [
        [1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 1],
    ],
    dtype=bool,
)
TRUE = np.zeros_like(PRED)
TRUE[0, 1:3] = True
TRUE[3, 5] = True


def test_tumor_points_counts_components_off_truth():
    assert tumor_points(PRED, TRUE) == 3  # B (one component: diagonal counts), C, D
    assert tumor_points(PRED, TRUE, margin_tiles=1) == 2  # D now touches (3,5)
    assert tumor_points(PRED, PRED) == 0
    assert tumor_points(PRED, np.zeros_like(PRED)) == 4
    assert tumor_points(np.zeros_like(PRED), TRUE) == 0


def test_tumor_points_shape_mismatch():
    with pytest.raises(MetricsError):
        tumor_points(PRED, TRUE[:, :3])
