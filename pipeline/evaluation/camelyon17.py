"""CAMELYON17 protocol: slide classes -> patient pN-stage -> quadratic-weighted kappa vs the
truth (manifest slide_label; where missing, the class of the annotation raster).

Two slide classifiers, each scored over the evaluated split's patients and over all patients
(all splits, which includes the methods' training data):
  rule           the largest predicted lesion's diameter on the tile grid (macro > 2 mm,
                 micro > 0.2 mm, else ITC; camelyon.slide_class_from_mask)
  random_forest  the paper's protocol (§4.2.3): a random forest on heat-map features
                 (pipeline.slide_classify), out-of-fold predictions of a patient-level
                 cross-validation; kappa pooled and mean ± std over the folds
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import camelyon, slide_classify
from pipeline.evaluation.annotation import true_slide_class
from pipeline.evaluation.inputs import EvaluateError, SlideTruth, filled, predicted_grid
from pipeline.metrics import MetricsError
from pipeline.params import RandomForestParams

INCOMPLETE = "incomplete: not every slide has predictions"


def _check_um(t: SlideTruth) -> None:
    if not math.isfinite(t.pitch_um):
        raise EvaluateError(f"{t.slide_id}: slide mpp unknown; CAMELYON17 classes need um "
                            "(set tile.fallback_mpp)")


def predicted_slide_class(t: SlideTruth, prob: np.ndarray, threshold: float) -> tuple[str, float]:
    """CAMELYON17 class of a slide from its predicted tumor tiles, and the largest diameter."""
    _check_um(t)
    return camelyon.slide_class_from_mask(t.to_grid(filled(prob) >= threshold, False),
                                          t.pitch_um)


def _by_patient(truths: Sequence[SlideTruth]) -> dict[str, list[SlideTruth]]:
    out: dict[str, list[SlideTruth]] = {}
    for t in truths:
        out.setdefault(t.patient_id, []).append(t)
    return out


def camelyon17_section(truths: Sequence[SlideTruth], probs: Mapping[str, np.ndarray],
                       threshold: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Kappa of predicted (rule-based) vs true patient pN-stages over the patients of `truths`
    (each patient's stage from its slides among `truths`). Returns (metrics, details) with
    details = {"slide_pred", "slide_true": slide -> class, "patient_pred", "patient_true":
    patient -> stage, "slides_by_patient": patient -> {slide: predicted class}}."""
    by_patient = _by_patient(truths)
    slide_pred = {t.slide_id: predicted_slide_class(t, probs[t.slide_id], threshold)[0]
                  for t in truths}
    slide_true = {t.slide_id: true_slide_class(t)[0] for t in truths}
    patients = sorted(by_patient)
    p_pred = {p: camelyon.pn_stage([slide_pred[t.slide_id] for t in by_patient[p]])
              for p in patients}
    p_true = {p: camelyon.pn_stage([slide_true[t.slide_id] for t in by_patient[p]])
              for p in patients}
    kappa = camelyon.pn_kappa([p_true[p] for p in patients], [p_pred[p] for p in patients])
    out = {
        "kappa": kappa,
        "stage_accuracy": float(np.mean([p_true[p] == p_pred[p] for p in patients])),
        "slide_class_accuracy": float(np.mean([slide_true[s] == slide_pred[s]
                                               for s in slide_pred])),
        "n_patients": len(patients), "n_slides": len(truths),
    }
    details = {"slide_pred": slide_pred, "slide_true": slide_true, "patient_pred": p_pred,
               "patient_true": p_true,
               "slides_by_patient": {p: {t.slide_id: slide_pred[t.slide_id]
                                         for t in by_patient[p]} for p in patients}}
    return out, details


# -- random forest ---------------------------------------------------------------------------------
def slide_features(truths: Sequence[SlideTruth], probs: Mapping[str, np.ndarray],
                   thresholds: Sequence[float]) -> pd.DataFrame:
    """Heat-map features (slide_classify.heatmap_features) of each slide, indexed by slide id.
    Unpredicted tissue tiles count as probability 0, as everywhere in the evaluation."""
    rows = {}
    for t in truths:
        _check_um(t)
        grid = predicted_grid(t, filled(probs[t.slide_id]))
        rows[t.slide_id] = slide_classify.heatmap_features(grid, t.pitch_um, thresholds)
    return pd.DataFrame.from_dict(rows, orient="index",
                                  columns=slide_classify.feature_names(thresholds))


@dataclass
class ForestResult:
    metrics: dict[str, Any]
    cv: slide_classify.CVResult
    patient_pred: dict[str, str]


def forest_section(truths: Sequence[SlideTruth], features: pd.DataFrame,
                   rf: RandomForestParams, seed: int) -> ForestResult:
    """Random-forest slide classes by patient-level CV over `truths` and the pN-stage kappa."""
    ids = [t.slide_id for t in truths]
    cls = {t.slide_id: true_slide_class(t)[0] for t in truths}
    cv = slide_classify.cross_validate(features.loc[ids], [cls[s] for s in ids],
                                       [t.patient_id for t in truths], rf.folds, seed,
                                       rf.n_estimators)
    out, pred, _ = slide_classify.pn_kappa_cv(cv, cls, {t.slide_id: t.patient_id for t in truths})
    return ForestResult(out, cv, pred)


def _forest_or_status(truths: Sequence[SlideTruth], features: pd.DataFrame,
                      rf: RandomForestParams, seed: int) -> tuple[dict[str, Any],
                                                                  ForestResult | None]:
    try:
        r = forest_section(truths, features, rf, seed)
    except MetricsError as exc:  # e.g. a single patient: no cross-validation possible
        return {"status": str(exc)}, None
    return r.metrics, r


def features_table(truths: Sequence[SlideTruth], features: pd.DataFrame,
                   rule_pred: Mapping[str, str],
                   results: Mapping[str, ForestResult | None]) -> pd.DataFrame:
    """The features CSV: slide, patient, split, true and rule-based class, per scope the
    out-of-fold forest class and its fold (empty where the slide is not in that scope), then
    the features."""
    head = pd.DataFrame({
        "slide_id": [t.slide_id for t in truths], "patient_id": [t.patient_id for t in truths],
        "split": [t.split for t in truths],
        "true_class": [true_slide_class(t)[0] for t in truths],
        "rule_class": [rule_pred.get(t.slide_id, "") for t in truths],
    })
    for scope, r in results.items():
        head[f"rf_class_{scope}"] = [r.cv.pred.get(t.slide_id, "") if r else ""
                                     for t in truths]
        head[f"rf_fold_{scope}"] = [r.cv.fold.get(t.slide_id, "") if r else "" for t in truths]
    feats = features.loc[[t.slide_id for t in truths]].reset_index(drop=True)
    return pd.concat([head, feats], axis=1)


# -- one method ---------------------------------------------------------------------------------
@dataclass
class Camelyon17Result:
    metrics: dict[str, Any]  # metrics.json camelyon17.<method>
    details: dict[str, Any]  # camelyon17_section details of the evaluated split
    features: pd.DataFrame  # the features table
    forest: ForestResult | None  # the forest on the evaluated split (None when it could not run)


def evaluate_method(all_truths: Sequence[SlideTruth], split_truths: Sequence[SlideTruth],
                    probs: Mapping[str, np.ndarray], threshold: float,
                    rf: RandomForestParams, seed: int) -> Camelyon17Result:
    """Both classifiers on the evaluated split and, when every slide has predictions, on all
    splits. Raises EvaluateError when the slides have no micrometres."""
    c17, det = camelyon17_section(split_truths, probs, threshold)
    scored = list(split_truths)
    c17_all: dict[str, Any] = {"status": INCOMPLETE}
    rule_pred = det["slide_pred"]
    if all(t.slide_id in probs for t in all_truths):
        scored = list(all_truths)
        c17_all, det_all = camelyon17_section(all_truths, probs, threshold)
        rule_pred = det_all["slide_pred"]
    features = slide_features(scored, probs, rf.thresholds)
    rf_split, r_split = _forest_or_status(split_truths, features, rf, seed)
    rf_all, r_all = ({"status": INCOMPLETE}, None) if len(scored) < len(all_truths) else \
        _forest_or_status(all_truths, features, rf, seed)
    table = features_table(scored, features, rule_pred, {"split": r_split, "all": r_all})
    metrics = {"evaluated_split": c17, "all_splits": c17_all,
               "random_forest": {"evaluated_split": rf_split, "all_splits": rf_all}}
    return Camelyon17Result(metrics, det, table, r_split)


def write_submissions(out_dir: Path, method: str, res: Camelyon17Result) -> None:
    """<method>_submission.csv (rule) and, when the forest ran, <method>_rf_submission.csv
    (its out-of-fold classes and stages) of the evaluated split, in the official format."""
    det = res.details
    camelyon.write_camelyon17_submission(out_dir / f"{method}_submission.csv",
                                         det["patient_pred"], det["slides_by_patient"])
    if res.forest is None:
        return
    slides: dict[str, dict[str, str]] = {}
    for p, by_slide in det["slides_by_patient"].items():
        slides[p] = {s: res.forest.cv.pred[s] for s in by_slide}
    camelyon.write_camelyon17_submission(out_dir / f"{method}_rf_submission.csv",
                                         res.forest.patient_pred, slides)


def write_reference(out_dir: Path, split_truths: Sequence[SlideTruth],
                    det: Mapping[str, Any]) -> None:
    """reference.csv: the true stages and slide classes of the evaluated split."""
    slides_true: dict[str, dict[str, str]] = {}
    for t in split_truths:
        slides_true.setdefault(t.patient_id, {})[t.slide_id] = det["slide_true"][t.slide_id]
    camelyon.write_camelyon17_submission(out_dir / "reference.csv", det["patient_true"],
                                         slides_true)
