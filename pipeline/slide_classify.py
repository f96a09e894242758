"""CAMELYON17 slide classification by a random forest on heat-map features, with patient-level
cross-validation (paper §4.2.3: "we predict the slide-level label by training random forest as
used in [18] ... by 5-fold cross-validation"; [18] = Lee & Paeng 2018).

Input per slide: its tile tumor-probability grid (rows, cols) — NaN where the grid has no
tissue tile; tissue tiles a method did not predict are passed as 0 (predicted normal), as in the
rest of the evaluation — and the tile pitch in micrometres.

Features (`heatmap_features`; the columns of reports/camelyon17/slide_features_<method>.csv).
Regions at threshold t are the 8-connected components of tiles with probability >= t; areas are
tiles x pitch²; the suffix `_t50` means t = 0.5, `_t90` t = 0.9 (evaluate.rf.thresholds):

  tissue_area_um2             tissue tiles x pitch²
  prob_max, prob_mean         highest / mean tile probability over tissue
  prob_p90, prob_p99          90th / 99th percentile of the tile probabilities over tissue
  n_regions_tXX               number of regions
  total_area_um2_tXX          area of all regions
  tumor_fraction_tXX          region tiles / tissue tiles
  largest_area_um2_tXX        area of the largest region (by area)
  largest_major_axis_um_tXX   its major axis: length of the ellipse with the same second moments
                              (skimage regionprops.axis_major_length on the tile grid x pitch;
                              0 for a single tile), the CAMELYON16 ITC measure
  largest_eccentricity_tXX    its eccentricity (0 circle .. 1 line)
  largest_solidity_tXX        its area / convex-hull area
  largest_prob_mean_tXX       mean probability inside it
  largest_diameter_um_tXX     longest diameter of any region as the rule-based classifier
                              measures it (camelyon.slide_class_from_mask), so the forest can
                              learn at least the rule
  region_prob_mean_tXX        mean probability over all region tiles
  region_prob_p50_tXX, region_prob_p90_tXX   median / 90th percentile over all region tiles

A slide with no region at t has 0 for every `_tXX` feature. These are the features Lee & Paeng
and other CAMELYON17 teams computed from their heat maps (region count, largest region's area,
major axis, eccentricity, solidity and mean probability, tumor/tissue ratio, probability
statistics), on the tile grid instead of a pixel heat map.

Cross-validation (`cross_validate`): sklearn RandomForestClassifier (seeded) evaluated with
GroupKFold over patients (shuffled, seeded), so all slides of a patient are in one fold. With
fewer patients than folds, n_splits = number of patients (leave-one-patient-out) and the note
says so. Each slide's class is predicted by the forest trained on the other folds
(out-of-fold); `pn_kappa_cv` turns those into patient pN-stages (camelyon.pn_stage) and scores
them with the official quadratic-weighted kappa (camelyon.pn_kappa): pooled over every patient,
and per fold (mean ± std over the folds where kappa is defined).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from skimage.measure import label as sk_label
from skimage.measure import regionprops
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import GroupKFold

from pipeline import camelyon
from pipeline.metrics import MetricsError

GLOBAL_FEATURES = ("tissue_area_um2", "prob_max", "prob_mean", "prob_p90", "prob_p99")
REGION_FEATURES = (
    "n_regions", "total_area_um2", "tumor_fraction", "largest_area_um2",
    "largest_major_axis_um", "largest_eccentricity", "largest_solidity", "largest_prob_mean",
    "largest_diameter_um", "region_prob_mean", "region_prob_p50", "region_prob_p90",
)


def threshold_suffix(t: float) -> str:
    """Column suffix of threshold t: 0.5 -> '_t50', 0.9 -> '_t90', 0.995 -> '_t99_5'."""
    return "_t" + f"{100 * t:.6g}".replace(".", "_")


def feature_names(thresholds: Sequence[float]) -> list[str]:
    """Feature columns in order: global ones, then the region features per threshold."""
    names = list(GLOBAL_FEATURES)
    for t in thresholds:
        names += [f + threshold_suffix(t) for f in REGION_FEATURES]
    if len(set(names)) != len(names):
        raise MetricsError(f"slide features: thresholds {list(thresholds)} give duplicate names")
    return names


def _region_features(prob: np.ndarray, tissue: np.ndarray, t: float,
                     pitch_um: float) -> dict[str, float]:
    """The REGION_FEATURES of one threshold (all 0 when no tile reaches t)."""
    fg = tissue & (prob >= t)
    lab, n = sk_label(fg, connectivity=2, return_num=True)
    out = dict.fromkeys(REGION_FEATURES, 0.0)
    if n == 0:
        return out
    tile_um2 = pitch_um**2
    inside = prob[fg]
    largest = max(regionprops(lab, intensity_image=prob), key=lambda r: (r.area, -r.label))
    out.update({
        "n_regions": float(n),
        "total_area_um2": float(fg.sum() * tile_um2),
        "tumor_fraction": float(fg.sum() / tissue.sum()),
        "largest_area_um2": float(largest.area * tile_um2),
        "largest_major_axis_um": float(largest.axis_major_length * pitch_um),
        "largest_eccentricity": float(largest.eccentricity),
        "largest_solidity": float(largest.solidity),
        "largest_prob_mean": float(largest.intensity_mean),
        "largest_diameter_um": camelyon.slide_class_from_mask(fg, pitch_um)[1],
        "region_prob_mean": float(inside.mean()),
        "region_prob_p50": float(np.percentile(inside, 50)),
        "region_prob_p90": float(np.percentile(inside, 90)),
    })
    return out


def heatmap_features(prob_grid: Any, pitch_um: float,
                     thresholds: Sequence[float] = (0.5, 0.9)) -> dict[str, float]:
    """The slide's features (module docstring) from its (rows, cols) probability grid, NaN off
    tissue. A grid without tissue gives all zeros."""
    prob = np.asarray(prob_grid, dtype=np.float64)
    if prob.ndim != 2:
        raise MetricsError(f"heatmap_features: need a (rows, cols) grid, got shape {prob.shape}")
    if not (math.isfinite(pitch_um) and pitch_um > 0):
        raise MetricsError(f"heatmap_features: pitch_um must be > 0, got {pitch_um}")
    tissue = np.isfinite(prob)
    p = prob[tissue]
    out = dict.fromkeys(feature_names(thresholds), 0.0)
    if p.size == 0:
        return out
    out.update({
        "tissue_area_um2": float(p.size * pitch_um**2), "prob_max": float(p.max()),
        "prob_mean": float(p.mean()), "prob_p90": float(np.percentile(p, 90)),
        "prob_p99": float(np.percentile(p, 99)),
    })
    filled = np.where(tissue, prob, 0.0)
    for t in thresholds:
        sfx = threshold_suffix(t)
        for k, v in _region_features(filled, tissue, t, pitch_um).items():
            out[k + sfx] = v
    return out


@dataclass(frozen=True)
class CVResult:
    """Out-of-fold slide classes of a patient-level cross-validation."""

    pred: dict[str, str]  # slide id -> class predicted by the forest not trained on its fold
    fold: dict[str, int]  # slide id -> fold index (0..n_splits-1)
    n_splits: int
    note: str  # how the folds were made, in words


def cross_validate(features: pd.DataFrame, classes: Sequence[str], patients: Sequence[str],
                   n_folds: int = 5, seed: int = 0, n_estimators: int = 100) -> CVResult:
    """Out-of-fold random-forest slide classes. `features` is indexed by slide id (one row per
    slide, numeric columns); `classes` and `patients` align with its rows. Folds: GroupKFold by
    patient (shuffled with `seed`); n_splits = min(n_folds, number of patients)."""
    x = features.to_numpy(dtype=np.float64)
    y = np.asarray([str(c).lower() for c in classes])
    groups = np.asarray(patients)
    if not (len(x) == len(y) == len(groups)) or len(x) == 0:
        raise MetricsError(f"cross_validate: need equal non-empty features ({len(x)}), classes "
                           f"({len(y)}) and patients ({len(groups)})")
    bad = sorted(set(y) - set(camelyon.SLIDE_CLASSES))
    if bad:
        raise MetricsError(f"cross_validate: unknown slide class(es) {bad}")
    n_patients = len(set(groups.tolist()))
    if n_patients < 2:
        raise MetricsError("cross_validate: need slides of at least 2 patients")
    n_splits = min(n_folds, n_patients)
    note = (f"{n_splits}-fold GroupKFold by patient" if n_splits == n_folds else
            f"{n_splits} folds: n_splits = number of patients ({n_patients} < {n_folds})")
    cv = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    pred = np.empty(len(y), dtype=object)
    fold = np.empty(len(y), dtype=np.int64)
    for k, (train, test) in enumerate(cv.split(x, y, groups)):
        rf = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=1)
        rf.fit(x[train], y[train])
        pred[test] = rf.predict(x[test])
        fold[test] = k
    ids = [str(s) for s in features.index]
    return CVResult(dict(zip(ids, pred.tolist(), strict=True)),
                    dict(zip(ids, fold.tolist(), strict=True)), n_splits, note)


def pn_kappa_cv(cv: CVResult, true_class: Mapping[str, str],
                patient_of: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str],
                                                       dict[str, str]]:
    """Patient pN-stages from the out-of-fold slide classes and their kappa.

    Returns (metrics, predicted stage per patient, true stage per patient); metrics: kappa
    (pooled over all patients), kappa_fold_mean / kappa_fold_std (population std) over the folds
    whose kappa is defined, n_folds, n_folds_scored, stage_accuracy, slide_class_accuracy,
    n_patients, n_slides, folds (the note)."""
    slides_of: dict[str, list[str]] = {}
    for s in cv.pred:
        slides_of.setdefault(patient_of[s], []).append(s)
    patients = sorted(slides_of)
    pred = {p: camelyon.pn_stage([cv.pred[s] for s in slides_of[p]]) for p in patients}
    true = {p: camelyon.pn_stage([true_class[s] for s in slides_of[p]]) for p in patients}
    fold_kappas = []
    for k in range(cv.n_splits):
        ps = [p for p in patients if cv.fold[slides_of[p][0]] == k]
        if ps:
            fold_kappas.append(camelyon.pn_kappa([true[p] for p in ps], [pred[p] for p in ps]))
    scored = [v for v in fold_kappas if math.isfinite(v)]
    mean = float(np.mean(scored)) if scored else math.nan  # NaN -> null in metrics.json
    std = float(np.std(scored)) if scored else math.nan
    out = {
        "kappa": camelyon.pn_kappa([true[p] for p in patients], [pred[p] for p in patients]),
        "kappa_fold_mean": mean, "kappa_fold_std": std,
        "n_folds": cv.n_splits, "n_folds_scored": len(scored), "folds": cv.note,
        "stage_accuracy": float(np.mean([true[p] == pred[p] for p in patients])),
        "slide_class_accuracy": float(np.mean([cv.pred[s] == str(true_class[s]).lower()
                                               for s in cv.pred])),
        "n_patients": len(patients), "n_slides": len(cv.pred),
    }
    return out, pred, true
