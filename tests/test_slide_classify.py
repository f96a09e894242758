"""The random-forest slide classifier (pipeline.slide_classify): heat-map features on hand-made
probability maps, patient-level folds, and the pN-stage kappa of the cross-validation on
synthetic sets where the features do / do not determine the class."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline import camelyon
from pipeline.metrics import MetricsError
from pipeline.slide_classify import (
    CVResult,
    cross_validate,
    feature_names,
    heatmap_features,
    pn_kappa_cv,
    threshold_suffix,
)

PITCH_UM = 100.0


def hand_made_map() -> np.ndarray:
    """10 x 10 grid, tissue = the inner 8 x 8 (64 tiles) at p = 0.1, NaN outside. Region A: a
    horizontal run of 3 tiles at 0.95 (row 2, cols 2-4). Region B: one tile at 0.6 at (7, 7),
    not touching A."""
    g = np.full((10, 10), np.nan)
    g[1:9, 1:9] = 0.1
    g[2, 2:5] = 0.95
    g[7, 7] = 0.6
    return g


def test_features_of_known_regions():
    f = heatmap_features(hand_made_map(), PITCH_UM, (0.5, 0.9))
    assert list(f) == feature_names((0.5, 0.9))
    tile = PITCH_UM**2
    assert f["tissue_area_um2"] == 64 * tile
    assert f["prob_max"] == 0.95
    assert f["prob_mean"] == pytest.approx((3 * 0.95 + 0.6 + 60 * 0.1) / 64)
    # t = 0.5: regions A (3 tiles) and B (1 tile)
    assert f["n_regions_t50"] == 2
    assert f["total_area_um2_t50"] == 4 * tile
    assert f["tumor_fraction_t50"] == pytest.approx(4 / 64)
    assert f["largest_area_um2_t50"] == 3 * tile
    # major axis of 3 collinear points 0, 1, 2: 4 * sqrt(variance 2/3) tiles
    assert f["largest_major_axis_um_t50"] == pytest.approx(4 * math.sqrt(2 / 3) * PITCH_UM)
    assert f["largest_eccentricity_t50"] == pytest.approx(1.0)
    assert f["largest_solidity_t50"] == pytest.approx(1.0)
    assert f["largest_prob_mean_t50"] == pytest.approx(0.95)
    assert f["largest_diameter_um_t50"] == pytest.approx(3 * PITCH_UM)  # the rule's measure
    assert f["region_prob_mean_t50"] == pytest.approx((3 * 0.95 + 0.6) / 4)
    assert f["region_prob_p50_t50"] == pytest.approx(0.95)
    # t = 0.9: only A
    assert f["n_regions_t90"] == 1
    assert f["total_area_um2_t90"] == 3 * tile
    assert f["region_prob_mean_t90"] == pytest.approx(0.95)


def test_two_blocks_largest_by_area_and_diagonal_connectivity():
    g = np.zeros((12, 12))
    g[0:4, 0:4] = 0.8  # 16 tiles
    g[8, 8] = g[9, 9] = g[10, 10] = 0.7  # diagonal: one 8-connected region of 3 tiles
    f = heatmap_features(g, 50.0, (0.5,))
    assert f["n_regions_t50"] == 2
    assert f["largest_area_um2_t50"] == 16 * 50.0**2
    assert f["largest_major_axis_um_t50"] == pytest.approx(
        4 * math.sqrt((16 - 1) / 12) * 50.0)  # a 4 x 4 square: both axes 4 sqrt(var of 0..3)
    assert f["largest_eccentricity_t50"] == pytest.approx(0.0, abs=1e-9)
    # diameter: the diagonal run measures (sqrt(8) + 1) tiles, the square (sqrt(18) + 1)
    assert f["largest_diameter_um_t50"] == pytest.approx((math.sqrt(18) + 1) * 50.0)


def test_no_region_and_no_tissue_give_zeros():
    g = np.full((5, 5), 0.2)
    f = heatmap_features(g, PITCH_UM, (0.5, 0.9))
    assert f["prob_max"] == pytest.approx(0.2)
    assert all(v == 0 for k, v in f.items() if k.endswith(("_t50", "_t90")))
    f = heatmap_features(np.full((5, 5), np.nan), PITCH_UM)
    assert set(f.values()) == {0.0}


def test_feature_names_and_bad_input():
    assert threshold_suffix(0.5) == "_t50" and threshold_suffix(0.995) == "_t99_5"
    with pytest.raises(MetricsError, match="duplicate"):
        feature_names((0.5, 0.5))
    with pytest.raises(MetricsError, match="pitch_um"):
        heatmap_features(np.zeros((3, 3)), math.nan)
    with pytest.raises(MetricsError, match="grid"):
        heatmap_features(np.zeros(3), 1.0)


# -- cross-validation -------------------------------------------------------------------------
def synthetic_set(n_patients: int, informative: bool, seed: int = 0
                  ) -> tuple[pd.DataFrame, list[str], list[str]]:
    """5 slides per patient, random classes. Informative: feature `size` lies in a class-specific
    band (negative 0, itc 0.1 mm, micro 1 mm, macro 5 mm, +-20 %) plus two noise columns.
    Not informative: every column is noise independent of the class."""
    rng = np.random.default_rng(seed)
    classes = rng.choice(list(camelyon.SLIDE_CLASSES), size=5 * n_patients,
                         p=[0.5, 0.1, 0.2, 0.2])
    band = {"negative": 0.0, "itc": 100.0, "micro": 1000.0, "macro": 5000.0}
    size = np.array([band[c] for c in classes]) * rng.uniform(0.8, 1.2, classes.size)
    x = pd.DataFrame({
        "size": size if informative else rng.uniform(0, 5000, classes.size),
        "noise1": rng.normal(size=classes.size), "noise2": rng.normal(size=classes.size),
    }, index=[f"s{i}" for i in range(classes.size)])
    patients = [f"p{i // 5:02d}" for i in range(classes.size)]
    return x, classes.tolist(), patients


def test_folds_never_split_a_patient():
    x, y, pats = synthetic_set(13, informative=True)
    cv = cross_validate(x, y, pats, n_folds=5, seed=3, n_estimators=10)
    assert cv.n_splits == 5 and "5-fold" in cv.note
    fold_of_patient: dict[str, set[int]] = {}
    for sid, p in zip(x.index, pats, strict=True):
        fold_of_patient.setdefault(p, set()).add(cv.fold[sid])
    assert all(len(f) == 1 for f in fold_of_patient.values())
    assert set(cv.fold.values()) == set(range(5))


def test_fewer_patients_than_folds_is_one_fold_per_patient():
    x, y, pats = synthetic_set(3, informative=True)
    cv = cross_validate(x, y, pats, n_folds=5, seed=0, n_estimators=10)
    assert cv.n_splits == 3 and "number of patients" in cv.note
    assert len({cv.fold[s] for s in x.index}) == 3
    with pytest.raises(MetricsError, match="2 patients"):
        cross_validate(x.iloc[:5], y[:5], pats[:5], n_folds=5)


def test_cv_is_seeded():
    x, y, pats = synthetic_set(10, informative=False)
    a = cross_validate(x, y, pats, seed=1, n_estimators=20)
    b = cross_validate(x, y, pats, seed=1, n_estimators=20)
    assert a == b


def _kappa(informative: bool) -> dict:
    x, y, pats = synthetic_set(40, informative)
    cv = cross_validate(x, y, pats, n_folds=5, seed=0, n_estimators=50)
    out, pred, true = pn_kappa_cv(cv, dict(zip(x.index, y, strict=True)),
                                  dict(zip(x.index, pats, strict=True)))
    assert set(pred) == set(true) == set(pats)
    return out


def test_kappa_high_when_features_determine_the_class():
    k = _kappa(informative=True)
    assert k["slide_class_accuracy"] > 0.95
    assert k["kappa"] > 0.9
    assert k["n_folds"] == 5 and k["n_folds_scored"] == 5
    assert k["kappa_fold_mean"] > 0.85 and 0 <= k["kappa_fold_std"] < 0.15
    assert (k["n_patients"], k["n_slides"]) == (40, 200)


def test_kappa_low_when_labels_are_random():
    k = _kappa(informative=False)
    assert k["kappa"] < 0.4
    assert k["slide_class_accuracy"] < 0.6


def test_pn_kappa_cv_by_hand():
    # Patients A (slides a1 a2, fold 0) and B (b1, fold 1), C (c1, fold 1).
    cv = CVResult(pred={"a1": "macro", "a2": "negative", "b1": "micro", "c1": "negative"},
                  fold={"a1": 0, "a2": 0, "b1": 1, "c1": 1}, n_splits=2, note="2 folds")
    true = {"a1": "macro", "a2": "negative", "b1": "itc", "c1": "negative"}
    patient = {"a1": "A", "a2": "A", "b1": "B", "c1": "C"}
    out, pred, truth = pn_kappa_cv(cv, true, patient)
    assert pred == {"A": "pN1", "B": "pN1mi", "C": "pN0"}
    assert truth == {"A": "pN1", "B": "pN0(i+)", "C": "pN0"}
    assert out["kappa"] == pytest.approx(camelyon.pn_kappa(["pN1", "pN0(i+)", "pN0"],
                                                           ["pN1", "pN1mi", "pN0"]))
    # fold 0 has one patient, predicted right: kappa undefined -> not scored
    k1 = camelyon.pn_kappa(["pN0(i+)", "pN0"], ["pN1mi", "pN0"])
    assert out["n_folds_scored"] == 1 and out["kappa_fold_mean"] == pytest.approx(k1)
    assert out["kappa_fold_std"] == 0.0
    assert out["stage_accuracy"] == pytest.approx(2 / 3)
    assert out["slide_class_accuracy"] == pytest.approx(3 / 4)
