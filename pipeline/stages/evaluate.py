"""Stage `evaluate`: every method's tile predictions against the annotations -> the reports.

The protocols live in pipeline/evaluation/ (one module each); this stage reads params and
paths, runs them per method and writes the files.

Methods (pipeline.schema.METHODS): classifier (data/features/<slide>.h5 `tumor_prob`) and
separate, e2e, seg_only, frozen (data/predictions/<method>/<slide>.h5); a method without files
for the evaluated split is "not run", one with files for only some of them stops the stage,
unpredicted tiles count as predicted normal (pipeline.evaluation.inputs).

Computed on the slides of `evaluate.split` (default test), threshold `evaluate.threshold`:
  patch          accuracy, PR-AUC (trapezoid, the paper's), average precision, ROC-AUC over the
                 split's tumor/normal tiles pooled (nolabel excluded) — paper Table 1
  tumor_points   per slide, predicted tumor components touching no annotated tumor; mean per
                 slide (paper Fig. 5/6 text)
  camelyon16     slide ROC-AUC of the max tile probability and of the predicted tumor area;
                 lesion FROC by the official protocol
  camelyon17     patient pN-stage kappa vs the truth (manifest slide_label; where missing, the
                 annotation's class): slide classes by the largest-lesion rule, and by the
                 paper's random forest on heat-map features (`evaluate.rf`, patient-level
                 cross-validation; pipeline/slide_classify.py), each over the split's patients
                 and over all patients (all splits, includes training data)

Reads:  the manifest (data.manifest), data/tiles/<slide>.h5, data/labels/<slide>.h5,
        data/features/<slide>.h5, data/predictions/<method>/<slide>.h5, annotations (for the
        CAMELYON evaluation masks), the slides themselves for thumbnails (optional), and
        reports/*.json of the training stages (shown in index.html).
Writes: reports/metrics.json (NaN -> null), reports/curves/{pr,roc}.csv (long format, one row
        per point, column `method`), reports/evaluate_slides.csv (per slide x method),
        reports/camelyon17/<method>_submission.csv, <method>_rf_submission.csv, reference.csv
        and slide_features_<method>.csv (the forest's features and out-of-fold classes),
        reports/figures/<slide>.png and <slide>_heatmap.png (evaluated split),
        reports/figures/{pr,roc}_curves.png, reports/index.html and
        reports/timings/evaluate.json (wall time; not a metric).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import typer

from pipeline import report
from pipeline.evaluation import camelyon17 as cam17
from pipeline.evaluation import outputs
from pipeline.evaluation.camelyon16 import camelyon16_section
from pipeline.evaluation.inputs import (
    NOT_RUN,
    EvaluateError,
    MethodPredictions,
    SlideTruth,
    load_method,
    load_truth,
    method_file,
)
from pipeline.evaluation.outputs import json_clean
from pipeline.evaluation.patch import patch_section
from pipeline.evaluation.tumor_points import tumor_points_section
from pipeline.io import write_json_atomic, write_timings
from pipeline.log import get_logger, progress
from pipeline.manifest import load_manifest
from pipeline.params import Params, load_params
from pipeline.paths import Paths
from pipeline.schema import METHODS

log = get_logger("pipeline.evaluate")
STAGE = "evaluate"
SECTIONS = ("patch", "tumor_points", "camelyon16", "camelyon17")


@dataclass
class MethodResult:
    """Everything one method contributes to the reports."""

    sections: dict[str, dict[str, Any]]  # metrics.json section -> this method's entry
    curves: dict[str, pd.DataFrame]  # "pr" / "roc" rows, column `method` first
    slide_rows: list[dict[str, Any]]
    c17: cam17.Camelyon17Result | None = None  # None when the CAMELYON17 protocol failed


def load_inputs(params: Params, paths: Paths
                ) -> tuple[dict[str, SlideTruth], list[SlideTruth], dict[str, MethodPredictions]]:
    """(every manifest slide's truth, the evaluated split's, each method's predictions)."""
    split = params.evaluate.split
    manifest = load_manifest(params.data.manifest, check_files=False)
    log.info("evaluate: manifest %s (%d slides), split %s, threshold %g",
             params.data.manifest, len(manifest), split, params.evaluate.threshold)
    truths = {row.slide_id: load_truth(paths, row)
              for row in progress(list(manifest.itertuples()), desc="read labels", unit="slide")}
    split_ids = [sid for sid, t in truths.items() if t.split == split]
    if not split_ids:
        raise EvaluateError(f"{params.data.manifest}: no slides in split {split!r} "
                            "(evaluate.split)")
    preds = {meth: load_method(paths, meth, truths, split_ids) for meth in METHODS}
    for meth, mp in preds.items():
        if mp.status == NOT_RUN:
            log.info("%s: no predictions for the %s slides -> not run", meth, split)
        else:
            log.info("%s: read %d prediction files from %s", meth, len(mp.probs),
                     method_file(paths, meth, "x").parent)
    return truths, [truths[s] for s in split_ids], preds


def evaluate_method(meth: str, mp: MethodPredictions, truths: Mapping[str, SlideTruth],
                    split_truths: Sequence[SlideTruth], params: Params) -> MethodResult:
    """Every protocol on one method's predictions; a CAMELYON protocol that cannot run (e.g. no
    micrometres) becomes a status string in its section, with a warning."""
    thr = float(params.evaluate.threshold)
    patch, curves = patch_section(split_truths, mp.probs, thr)
    patch["status"] = "ok"
    if meth == "frozen":
        patch["frozen_extractor"] = mp.attrs.get("frozen_extractor") or "unknown"
    tp, tp_slides = tumor_points_section(split_truths, mp.probs, thr)
    try:
        c16, scores = camelyon16_section(split_truths, mp.probs, thr)
    except EvaluateError as exc:
        log.warning("camelyon16 (%s): %s", meth, exc)
        c16, scores = {"status": str(exc)}, {}
    res17: cam17.Camelyon17Result | None = None
    try:
        res17 = cam17.evaluate_method(list(truths.values()), split_truths, mp.probs, thr,
                                      params.evaluate.rf, params.seed)
        c17_metrics = res17.metrics
    except EvaluateError as exc:
        log.warning("camelyon17 (%s): %s", meth, exc)
        c17_metrics = {"status": str(exc)}
    det = res17.details if res17 else {}
    rows = [outputs.slide_row(t, meth, mp.probs[t.slide_id], thr, tp_slides[t.slide_id], scores,
                              det) for t in split_truths]
    return MethodResult(
        sections={"patch": patch, "tumor_points": tp, "camelyon16": c16, "camelyon17": c17_metrics},
        curves={"pr": curves["pr"].assign(method=meth)[outputs.CURVE_COLUMNS["pr"]],
                "roc": curves["roc"].assign(method=meth)[outputs.CURVE_COLUMNS["roc"]]},
        slide_rows=rows, c17=res17)


def truth_source(truths: Mapping[str, SlideTruth]) -> str:
    """Where the CAMELYON17 truth comes from, for metrics.json and the page."""
    n_labelled = sum(bool(t.slide_label) for t in truths.values())
    if n_labelled == len(truths):
        return "manifest slide_label"
    if n_labelled == 0:
        return "annotations (largest lesion of the annotation raster)"
    return "manifest slide_label where given, else annotations"


def write_reports(paths: Paths, params: Params, metrics: dict[str, Any],
                  results: Mapping[str, MethodResult], split_truths: Sequence[SlideTruth],
                  preds: Mapping[str, MethodPredictions]) -> list[dict[str, str]]:
    """metrics.json, the CSV tables, the CAMELYON17 files, figures and index.html; returns the
    slide figures' links."""
    rep = paths.reports
    c17_dir = rep / "camelyon17"
    thr = float(params.evaluate.threshold)
    for meth, r in results.items():
        if r.c17 is not None:
            cam17.write_submissions(c17_dir, meth, r.c17)
            outputs.write_csv(c17_dir / f"slide_features_{meth}.csv", r.c17.features)
    details = {meth: r.c17.details for meth, r in results.items() if r.c17 is not None}
    if details:
        cam17.write_reference(c17_dir, split_truths, next(iter(details.values())))
    write_json_atomic(rep / "metrics.json", json_clean(metrics))
    curves = outputs.write_curves(rep / "curves", {
        name: [r.curves[name] for r in results.values()] for name in outputs.CURVE_COLUMNS})
    slide_rows = [row for r in results.values() for row in r.slide_rows]
    outputs.write_csv(rep / "evaluate_slides.csv", pd.DataFrame(slide_rows))
    log.info("wrote %s, %s, %s, %s", rep / "metrics.json", rep / "curves" / "pr.csv",
             rep / "curves" / "roc.csv", rep / "evaluate_slides.csv")
    labels = {meth: outputs.method_label(meth, preds[meth].attrs) for meth in METHODS}
    slide_figs = outputs.write_slide_figures(rep / "figures", rep / "tiles", split_truths, preds,
                                             labels, thr)
    curve_figs = outputs.write_curve_figures(rep / "figures", curves, labels, bool(results))
    report.write_index_html(
        rep / "index.html", metrics=json_clean(metrics), labels=labels, slide_rows=slide_rows,
        c17_details=details, slide_figs=slide_figs, curve_figs=curve_figs,
        training=report.read_training_metrics(rep, exclude=("metrics.json",)),
        rf=params.evaluate.rf.model_dump())
    return slide_figs


def run(params: Params, paths: Paths) -> dict:
    """Evaluate every method on `evaluate.split` and write the reports (see module docstring).
    Returns a summary: split, threshold, methods run, and per method accuracy / PR-AUC."""
    t0 = time.time()
    ep = params.evaluate
    truths, split_truths, preds = load_inputs(params, paths)
    run_methods = [meth for meth in METHODS if preds[meth].status == "ok"]
    frozen_extractor = preds["frozen"].attrs.get("frozen_extractor") if "frozen" in \
        run_methods else None
    metrics: dict[str, Any] = {
        "evaluation": {"split": ep.split, "threshold": float(ep.threshold), "seed": params.seed,
                       "n_slides": len(split_truths),
                       "n_patients": len({t.patient_id for t in split_truths}),
                       "frozen_extractor": frozen_extractor or "",
                       "camelyon17_truth": truth_source(truths)},
        **{sec: {} for sec in SECTIONS},
    }
    results: dict[str, MethodResult] = {}
    for meth in METHODS:
        if meth in run_methods:
            results[meth] = evaluate_method(meth, preds[meth], truths, split_truths, params)
        for sec in SECTIONS:
            metrics[sec][meth] = (results[meth].sections[sec] if meth in results
                                  else {"status": NOT_RUN})
    slide_figs = write_reports(paths, params, metrics, results, split_truths, preds)
    seconds = round(time.time() - t0, 3)
    write_timings(paths, STAGE, seconds=seconds)
    log.info("wrote %d slide figures to %s and %s; evaluate took %.1f s", 2 * len(slide_figs),
             paths.reports / "figures", paths.reports / "index.html", seconds)
    return summarize(metrics, run_methods, seconds)


def summarize(metrics: Mapping[str, Any], run_methods: Sequence[str], seconds: float) -> dict:
    """The stage's summary: split, threshold, methods run / not run, per method accuracy,
    PR-AUC, tumor points per slide and the CAMELYON17 kappas (rule, random forest)."""
    ev = metrics["evaluation"]
    summary: dict[str, Any] = {
        "split": ev["split"], "threshold": ev["threshold"], "n_slides": ev["n_slides"],
        "methods_run": list(run_methods), "not_run": [x for x in METHODS if x not in run_methods],
        "seconds": seconds}
    for meth in run_methods:
        pm = metrics["patch"][meth]
        k = metrics["camelyon17"][meth]
        summary[meth] = {
            "accuracy": pm["accuracy"], "pr_auc": pm["pr_auc"],
            "tumor_points_per_slide": metrics["tumor_points"][meth]["mean_per_slide"],
            "kappa_rule": k.get("evaluated_split", {}).get("kappa", math.nan),
            "kappa_rf": k.get("random_forest", {}).get("evaluated_split", {}).get("kappa",
                                                                                  math.nan)}
    return summary


def _pct(v: Any) -> str:
    return f"{100 * v:.2f} %" if v is not None and math.isfinite(v) else "n/a"


def cli(
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
) -> None:
    """Score every method on evaluate.split and write the reports.

    Reads: the manifest, data/tiles, data/labels, data/features (classifier-only),
    data/predictions/<method> (separate, e2e, seg_only, frozen; absent = "not run"),
    annotations, reports/*.json; params evaluate.* (incl. evaluate.rf), data.manifest, seed.
    Writes: reports/metrics.json, reports/curves/{pr,roc}.csv, reports/evaluate_slides.csv,
    reports/camelyon17/*.csv (submissions, slide features), reports/figures/*.png,
    reports/index.html, reports/timings/evaluate.json.
    """
    s = run(load_params(params_file), Paths())
    for meth in s["methods_run"]:
        r = s[meth]
        typer.echo(f"{meth:>10}: accuracy {_pct(r['accuracy'])}, PR-AUC {_pct(r['pr_auc'])}, "
                   f"tumor points/slide {r['tumor_points_per_slide']:.2f}, kappa rule "
                   f"{r['kappa_rule']:.3f} / random forest {r['kappa_rf']:.3f}")
    if s["not_run"]:
        typer.echo(f"not run: {', '.join(s['not_run'])}")
