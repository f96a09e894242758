"""Stage `evaluate`: every method's tile predictions against the annotations -> the reports.

Methods (pipeline.schema.METHODS) and where their per-tile tumor probabilities come from:
  classifier  `tumor_prob` of data/features/<slide>.h5 (the patch CNN on its own)
  separate, e2e, seg_only, frozen   data/predictions/<method>/<slide>.h5 `tumor_prob`
A method with no file for any slide of the evaluated split is reported "not run"; one with files
for only some of them stops the stage (a half-finished or stale run must not be scored).
Tiles a method did not predict (NaN, off a centered canvas) count as predicted normal (prob 0),
so every method is scored on the same tiles; their number is reported (`n_unpredicted`).

Computed on the slides of `evaluate.split` (default test), threshold `evaluate.threshold`:
  patch          accuracy, PR-AUC (trapezoid, the paper's), average precision, ROC-AUC over the
                 split's tumor/normal tiles pooled (nolabel excluded) — paper Table 1
  tumor_points   per slide, 8-connected components of predicted tumor tiles that share no tile
                 with annotated tumor (tumor_fraction > 0); mean per slide (paper Fig. 5/6 text)
  camelyon16     slide ROC-AUC of the max tile probability and of the predicted tumor area
                 (mm^2); lesion FROC by the official protocol on the annotation rasterised at
                 ~FROC_RASTER_UM um/px, detections = one per predicted component (its max tile)
  camelyon17     slide class (largest predicted lesion on the tile grid) -> patient pN-stage ->
                 quadratic-weighted kappa vs the truth (manifest slide_label; where missing, the
                 class of the annotation raster), over the split's patients and over all
                 patients (all splits, includes training data)

Reads:  the manifest (data.manifest), data/tiles/<slide>.h5, data/labels/<slide>.h5,
        data/features/<slide>.h5, data/predictions/<method>/<slide>.h5, annotations (for the
        CAMELYON evaluation masks), the slides themselves for thumbnails (optional), and
        reports/*.json of the training stages (shown in index.html).
Writes: reports/metrics.json (NaN -> null), reports/curves/{pr,roc}.csv (long format, one row
        per point, column `method`), reports/evaluate_slides.csv (per slide x method),
        reports/camelyon17/<method>_submission.csv + reference.csv, reports/figures/<slide>.png
        and <slide>_heatmap.png (evaluated split), reports/figures/{pr,roc}_curves.png,
        reports/index.html and reports/timings/evaluate.json (wall time; not a metric).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import typer

from pipeline import camelyon, report
from pipeline import metrics as m
from pipeline.annotations import rasterize, read_annotation, sample_mask
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, write_json_atomic, write_timings
from pipeline.log import get_logger, progress
from pipeline.manifest import load_manifest
from pipeline.params import Params, load_params
from pipeline.paths import Paths
from pipeline.schema import LABEL, LABEL_NOLABEL, LABEL_TUMOR, METHODS, TUMOR_FRACTION, TUMOR_PROB
from pipeline.tileindex import attr_value, read_tile_index

log = get_logger("pipeline.evaluate")
STAGE = "evaluate"

NOT_RUN = "not run"
# Resolution of the CAMELYON16 evaluation mask: the official script works at level 5 of
# 0.243 um/px slides, ~7.8 um/px.
FROC_RASTER_UM = 8.0
# Dilation radius of the evaluation mask: the official script's 75 um / 2 (camelyon.py).
DILATION_UM = 37.5
# A slide whose raster at FROC_RASTER_UM would exceed this many pixels is rasterised coarser.
MAX_RASTER_PIXELS = 64_000_000
# FP-rate key names in metrics.json (dots would split DVC's flattened metric names).
FP_RATE_KEYS = ("fp_0_25", "fp_0_5", "fp_1", "fp_2", "fp_4", "fp_8")


class EvaluateError(PipelineError):
    """Inputs of the evaluate stage are missing, partial or inconsistent (one line)."""


# -- inputs ------------------------------------------------------------------------------------
@dataclass
class SlideTruth:
    """One slide's tile grid and ground truth (everything but the predictions)."""

    slide_id: str
    split: str
    patient_id: str
    slide_label: str  # manifest CAMELYON17 slide class, "" when absent
    annotation_path: str
    slide_path: str
    grid: np.ndarray  # (N, 2) row, col
    grid_shape: tuple[int, int]  # (rows, cols)
    origin_xy_px_level0: tuple[float, float]  # level-0 x, y of grid cell (0, 0)'s corner
    pitch_px_level0: float  # tile side on the slide
    mpp: float  # level-0 um/px, NaN when unknown
    slide_wh_px_level0: tuple[int, int]
    label: np.ndarray  # (N,) int8 schema labels
    tumor_fraction: np.ndarray  # (N,) float32
    _raster: Any = field(default=None, repr=False)  # AnnotationTruth cache

    @property
    def n(self) -> int:
        return int(self.grid.shape[0])

    @property
    def pitch_um(self) -> float:
        return self.pitch_px_level0 * self.mpp  # NaN when mpp unknown

    @property
    def true_tumor(self) -> np.ndarray:
        """Tiles with any annotated tumor: a prediction touching them is not a 'tumor point'."""
        return self.tumor_fraction > 0

    def to_grid(self, values: np.ndarray, fill: Any) -> np.ndarray:
        """(rows, cols) array with `values` at the tiles' grid cells and `fill` elsewhere."""
        values = np.asarray(values)
        out = np.full(self.grid_shape, fill, dtype=np.result_type(values.dtype, np.asarray(fill)))
        out[self.grid[:, 0], self.grid[:, 1]] = values
        return out


def _read_datasets(path: Path, names: Sequence[str], what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise EvaluateError(f"{path}: {what} not found")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in names if k not in f]
            if missing:
                raise EvaluateError(f"{path}: {what} lacks dataset(s) {', '.join(missing)}")
            out = {k: np.asarray(f[k][...]) for k in names}
            out["_attrs"] = {k: attr_value(v) for k, v in f.attrs.items()}  # type: ignore[assignment]
            return out
    except OSError as exc:
        raise EvaluateError(f"{path}: cannot read HDF5 ({exc})") from None


def load_truth(paths: Paths, row: Any) -> SlideTruth:
    """Tile index + labels of one manifest row."""
    idx = read_tile_index(paths.tile_file(row.slide_id))
    lab = _read_datasets(paths.label_file(row.slide_id), (LABEL, TUMOR_FRACTION), "label file")
    if lab[LABEL].shape[0] != idx.n_tiles:
        raise EvaluateError(
            f"{paths.label_file(row.slide_id)}: {lab[LABEL].shape[0]} labels but the tile index "
            f"has {idx.n_tiles} tiles; rerun `label`"
        )
    a = idx.attrs
    pitch = float(a["tile_size_px_level0"])
    grid = idx.grid.astype(np.int64)
    coords = idx.coords.astype(np.float64)
    origin = np.median(coords - grid[:, ::-1] * pitch, axis=0) if len(grid) else np.zeros(2)
    return SlideTruth(
        slide_id=row.slide_id, split=row.split, patient_id=row.patient_id,
        slide_label=str(row.slide_label), annotation_path=str(row.annotation_path),
        slide_path=str(row.slide_path) or str(a.get("slide_path", "")), grid=grid,
        grid_shape=(int(a["grid_rows"]), int(a["grid_cols"])),
        origin_xy_px_level0=(float(origin[0]), float(origin[1])), pitch_px_level0=pitch,
        mpp=float(a["mpp"]),
        slide_wh_px_level0=(int(a["slide_width_px_level0"]), int(a["slide_height_px_level0"])),
        label=lab[LABEL].astype(np.int8), tumor_fraction=lab[TUMOR_FRACTION].astype(np.float32),
    )


def method_file(paths: Paths, method: str, slide_id: str) -> Path:
    """Where a method's per-tile tumor probabilities of a slide live."""
    if method == "classifier":
        return paths.feature_file(slide_id)
    return paths.prediction_file(method, slide_id)


@dataclass
class MethodPredictions:
    method: str
    probs: dict[str, np.ndarray]  # slide id -> (N,) float32, NaN = not predicted
    attrs: dict[str, Any]  # attrs of the first file read (e.g. frozen_extractor)
    status: str  # "ok" or NOT_RUN


def load_method(paths: Paths, method: str, truths: Mapping[str, SlideTruth],
                split_ids: Sequence[str]) -> MethodPredictions:
    """Read a method's predictions for every slide that has them. NOT_RUN when none of the
    split's slides has a file; EvaluateError when only some do."""
    have = {sid: method_file(paths, method, sid).is_file() for sid in truths}
    in_split = [sid for sid in split_ids if have[sid]]
    if not in_split:
        return MethodPredictions(method, {}, {}, NOT_RUN)
    if len(in_split) != len(split_ids):
        missing = next(sid for sid in split_ids if not have[sid])
        raise EvaluateError(
            f"{method_file(paths, method, missing)}: missing while {len(in_split)} other "
            f"{truths[missing].split} slides have {method} predictions; rerun the stage that "
            "writes them"
        )
    probs: dict[str, np.ndarray] = {}
    attrs: dict[str, Any] = {}
    for sid, ok in have.items():
        if not ok:
            continue
        path = method_file(paths, method, sid)
        d = _read_datasets(path, (TUMOR_PROB,), f"{method} predictions")
        p = np.asarray(d[TUMOR_PROB], np.float32).ravel()
        if p.shape[0] != truths[sid].n:
            raise EvaluateError(
                f"{path}: {p.shape[0]} tile predictions but the tile index has {truths[sid].n} "
                "tiles (stale predictions); rerun the stage that writes them"
            )
        probs[sid] = p
        if not attrs:
            attrs = dict(d["_attrs"])  # type: ignore[arg-type]
    return MethodPredictions(method, probs, attrs, "ok")


def _filled(prob: np.ndarray) -> np.ndarray:
    """NaN (not predicted) -> 0.0, i.e. predicted normal."""
    return np.nan_to_num(np.asarray(prob, np.float64), nan=0.0)


# -- annotation raster (CAMELYON ground truth) -----------------------------------------------
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


# -- metrics (pure, on loaded arrays) -----------------------------------------------------------
def patch_section(truths: Sequence[SlideTruth], probs: Mapping[str, np.ndarray],
                  threshold: float) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """Pooled patch metrics over the labelled (tumor/normal) tiles of `truths`, and the curves."""
    ys, ps, n_unpred = [], [], 0
    for t in truths:
        keep = t.label != LABEL_NOLABEL
        p = np.asarray(probs[t.slide_id])[keep]
        n_unpred += int(np.isnan(p).sum())
        ys.append((t.label[keep] == LABEL_TUMOR).astype(np.int8))
        ps.append(_filled(p))
    y, p = np.concatenate(ys), np.concatenate(ps)
    if y.size == 0:
        raise EvaluateError("evaluate: no tumor/normal tiles in the evaluated split")
    out = m.patch_metrics(y, p, threshold)
    out["n_unpredicted"] = n_unpred
    return out, m.curves(y, p)


def slide_tumor_points(t: SlideTruth, prob: np.ndarray, threshold: float) -> int:
    """Tumor points of one slide (pipeline.metrics.tumor_points on the tile grid)."""
    pred = t.to_grid(_filled(prob) >= threshold, False)
    return m.tumor_points(pred, t.to_grid(t.true_tumor, False))


def predicted_grid(t: SlideTruth, prob: np.ndarray) -> np.ndarray:
    """Tile probabilities on the grid, NaN off tissue / unpredicted."""
    return t.to_grid(np.asarray(prob, np.float64), np.nan)


def slide_scores(t: SlideTruth, prob: np.ndarray, threshold: float) -> tuple[float, float]:
    """(max tile tumor probability, predicted tumor area in mm^2) — CAMELYON16 slide scores."""
    p = _filled(prob)
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


def predicted_slide_class(t: SlideTruth, prob: np.ndarray, threshold: float) -> tuple[str, float]:
    """CAMELYON17 class of a slide from its predicted tumor tiles, and the largest diameter."""
    if not math.isfinite(t.pitch_um):
        raise EvaluateError(f"{t.slide_id}: slide mpp unknown; CAMELYON17 classes need um "
                            "(set tile.fallback_mpp)")
    return camelyon.slide_class_from_mask(t.to_grid(_filled(prob) >= threshold, False),
                                          t.pitch_um)


def camelyon17_section(truths: Sequence[SlideTruth], probs: Mapping[str, np.ndarray],
                       threshold: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Kappa of predicted vs true patient pN-stages over the patients of `truths` (each
    patient's stage from its slides among `truths`). Returns (metrics, details) with details =
    {"slide_pred", "slide_true": slide -> class, "patient_pred", "patient_true": patient ->
    stage, "slides_by_patient": patient -> {slide: predicted class}}."""
    by_patient: dict[str, list[SlideTruth]] = {}
    for t in truths:
        by_patient.setdefault(t.patient_id, []).append(t)
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


# -- output helpers ------------------------------------------------------------------------------
def json_clean(o: Any) -> Any:
    """Recursively: NaN/inf -> None, numpy scalars -> Python (metrics.json must be strict JSON)."""
    if isinstance(o, Mapping):
        return {str(k): json_clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_clean(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")


def method_label(method: str, attrs: Mapping[str, Any] | None = None) -> str:
    """Display name; the frozen baseline names its extractor when the files say which."""
    name = report.METHOD_LABELS.get(method, method)
    fx = (attrs or {}).get("frozen_extractor")
    if method == "frozen" and fx:
        name = f"{name} ({fx})"
    return name


# -- the stage ------------------------------------------------------------------------------------
def run(params: Params, paths: Paths) -> dict:
    """Evaluate every method on `evaluate.split` and write the reports (see module docstring).
    Returns a summary: split, threshold, methods run, and per method accuracy / PR-AUC."""
    t0 = time.time()
    ep = params.evaluate
    thr = float(ep.threshold)
    manifest = load_manifest(params.data.manifest, check_files=False)
    log.info("evaluate: manifest %s (%d slides), split %s, threshold %g",
             params.data.manifest, len(manifest), ep.split, thr)
    truths: dict[str, SlideTruth] = {}
    for row in progress(list(manifest.itertuples()), desc="read labels", unit="slide"):
        truths[row.slide_id] = load_truth(paths, row)
    split_ids = [sid for sid, t in truths.items() if t.split == ep.split]
    if not split_ids:
        raise EvaluateError(f"{params.data.manifest}: no slides in split {ep.split!r} "
                            "(evaluate.split)")
    split_truths = [truths[s] for s in split_ids]
    preds = {meth: load_method(paths, meth, truths, split_ids) for meth in METHODS}
    run_methods = [meth for meth in METHODS if preds[meth].status == "ok"]
    for meth in METHODS:
        if preds[meth].status == NOT_RUN:
            log.info("%s: no predictions for the %s slides -> not run", meth, ep.split)
        else:
            log.info("%s: read %d prediction files from %s", meth, len(preds[meth].probs),
                     method_file(paths, meth, "x").parent)
    frozen_extractor = preds["frozen"].attrs.get("frozen_extractor") if "frozen" in \
        run_methods else None

    metrics: dict[str, Any] = {
        "evaluation": {"split": ep.split, "threshold": thr, "seed": params.seed,
                       "n_slides": len(split_ids),
                       "n_patients": len({t.patient_id for t in split_truths}),
                       "frozen_extractor": frozen_extractor or ""},
        "patch": {}, "tumor_points": {}, "camelyon16": {}, "camelyon17": {},
    }
    pr_rows, roc_rows, slide_rows = [], [], []
    c17_details: dict[str, dict] = {}
    for meth in METHODS:
        mp = preds[meth]
        if mp.status == NOT_RUN:
            for sec in ("patch", "tumor_points", "camelyon16", "camelyon17"):
                metrics[sec][meth] = {"status": NOT_RUN}
            continue
        patch, curves = patch_section(split_truths, mp.probs, thr)
        patch["status"] = "ok"
        if meth == "frozen":
            patch["frozen_extractor"] = frozen_extractor or "unknown"
        metrics["patch"][meth] = patch
        pr_rows.append(curves["pr"].assign(method=meth)[["method", "recall", "precision"]])
        roc_rows.append(curves["roc"].assign(method=meth)[["method", "fpr", "tpr"]])

        tp = {t.slide_id: slide_tumor_points(t, mp.probs[t.slide_id], thr) for t in split_truths}
        metrics["tumor_points"][meth] = {
            "mean_per_slide": float(np.mean(list(tp.values()))), "total": int(sum(tp.values())),
            "max_per_slide": int(max(tp.values())), "n_slides": len(tp)}

        try:
            c16, scores = camelyon16_section(split_truths, mp.probs, thr)
        except EvaluateError as exc:  # e.g. slides without mpp: no micrometres, no protocol
            log.warning("camelyon16 (%s): %s", meth, exc)
            c16, scores = {"status": str(exc)}, {}
        metrics["camelyon16"][meth] = c16

        det: dict[str, Any] = {}
        try:
            c17, det = camelyon17_section(split_truths, mp.probs, thr)
            c17_all: dict[str, Any]
            if all(sid in mp.probs for sid in truths):
                c17_all, _ = camelyon17_section(list(truths.values()), mp.probs, thr)
            else:
                c17_all = {"status": "incomplete: not every slide has predictions"}
            metrics["camelyon17"][meth] = {"evaluated_split": c17, "all_splits": c17_all}
            c17_details[meth] = det
            camelyon.write_camelyon17_submission(
                paths.reports / "camelyon17" / f"{meth}_submission.csv", det["patient_pred"],
                det["slides_by_patient"])
        except EvaluateError as exc:
            log.warning("camelyon17 (%s): %s", meth, exc)
            metrics["camelyon17"][meth] = {"status": str(exc)}
        for t in split_truths:
            p = mp.probs[t.slide_id]
            keep = t.label != LABEL_NOLABEL
            pred = _filled(p) >= thr
            slide_rows.append({
                "slide_id": t.slide_id, "patient_id": t.patient_id, "method": meth,
                "n_tiles": t.n, "n_labelled": int(keep.sum()),
                "n_true_tumor": int((t.label == LABEL_TUMOR).sum()),
                "n_pred_tumor": int(pred.sum()),
                "accuracy": float(np.mean(pred[keep] == (t.label[keep] == LABEL_TUMOR)))
                if keep.any() else math.nan,
                "tumor_points": tp[t.slide_id],
                "max_prob": scores.get(t.slide_id, (math.nan, math.nan))[0],
                "pred_area_mm2": scores.get(t.slide_id, (math.nan, math.nan))[1],
                "pred_class": det.get("slide_pred", {}).get(t.slide_id, ""),
                "true_class": det.get("slide_true", {}).get(t.slide_id, ""),
                "n_unpredicted": int(np.isnan(p).sum()),
            })
    n_labelled = sum(bool(t.slide_label) for t in truths.values())
    metrics["evaluation"]["camelyon17_truth"] = (
        "manifest slide_label" if n_labelled == len(truths) else
        "annotations (largest lesion of the annotation raster)" if n_labelled == 0 else
        "manifest slide_label where given, else annotations")

    any_det = next(iter(c17_details.values()), None)
    if any_det is not None:
        slides_true: dict[str, dict[str, str]] = {}
        for t in split_truths:
            slides_true.setdefault(t.patient_id, {})[t.slide_id] = any_det["slide_true"][
                t.slide_id]
        camelyon.write_camelyon17_submission(paths.reports / "camelyon17" / "reference.csv",
                                             any_det["patient_true"], slides_true)

    rep = paths.reports
    write_json_atomic(rep / "metrics.json", json_clean(metrics))
    pr = pd.concat(pr_rows, ignore_index=True) if pr_rows else \
        pd.DataFrame(columns=["method", "recall", "precision"])
    roc = pd.concat(roc_rows, ignore_index=True) if roc_rows else \
        pd.DataFrame(columns=["method", "fpr", "tpr"])
    _write_csv(rep / "curves" / "pr.csv", pr)
    _write_csv(rep / "curves" / "roc.csv", roc)
    # One file per method too: `dvc plots` colours by file, so dvc.yaml overlays these.
    for name, table in (("pr", pr), ("roc", roc)):
        for meth, part in table.groupby("method"):
            _write_csv(rep / "curves" / f"{name}_{meth}.csv", part.drop(columns="method"))
    _write_csv(rep / "evaluate_slides.csv", pd.DataFrame(slide_rows))
    log.info("wrote %s, %s, %s, %s", rep / "metrics.json", rep / "curves" / "pr.csv",
             rep / "curves" / "roc.csv", rep / "evaluate_slides.csv")

    # -- figures and the HTML page ---------------------------------------------------------
    labels = {meth: method_label(meth, preds[meth].attrs) for meth in METHODS}
    fig_dir = rep / "figures"
    slide_figs: list[dict[str, str]] = []
    for t in progress(split_truths, desc="figures", unit="slide"):
        thumb = report.load_thumbnail(t.slide_path, t.slide_wh_px_level0,
                                      rep / "tiles" / f"{t.slide_id}.png")
        maps = report.SlideMaps(
            slide_id=t.slide_id, slide_wh_px_level0=t.slide_wh_px_level0,
            grid_extent_px_level0=_grid_extent(t),
            label_grid=t.to_grid(t.label, report.BACKGROUND),
            true_tumor_grid=t.to_grid(t.true_tumor, False),
            prob_grids={labels[meth]: predicted_grid(t, preds[meth].probs[t.slide_id])
                        for meth in report.FIGURE_ORDER if meth in run_methods},
        )
        report.save_slide_figure(fig_dir / f"{t.slide_id}.png", thumb, maps, thr)
        report.save_heatmap_figure(fig_dir / f"{t.slide_id}_heatmap.png", thumb, maps)
        slide_figs.append({"slide_id": t.slide_id, "map": f"figures/{t.slide_id}.png",
                           "heatmap": f"figures/{t.slide_id}_heatmap.png"})
    curve_figs = {}
    if run_methods:
        report.save_curves_figure(fig_dir / "pr_curves.png", pr, "recall", "precision",
                                  labels, "Precision-recall (tiles)")
        report.save_curves_figure(fig_dir / "roc_curves.png", roc, "fpr", "tpr", labels,
                                  "ROC (tiles)")
        curve_figs = {"pr": "figures/pr_curves.png", "roc": "figures/roc_curves.png"}
    training = report.read_training_metrics(rep, exclude=("metrics.json",))
    report.write_index_html(
        rep / "index.html", metrics=json_clean(metrics), labels=labels,
        slide_rows=slide_rows, c17_details=c17_details, slide_figs=slide_figs,
        curve_figs=curve_figs, training=training,
    )
    seconds = round(time.time() - t0, 3)
    write_timings(paths, STAGE, seconds=seconds)
    log.info("wrote %d slide figures to %s and %s; evaluate took %.1f s", 2 * len(slide_figs),
             fig_dir, rep / "index.html", seconds)
    summary = {"split": ep.split, "threshold": thr, "n_slides": len(split_ids),
               "methods_run": run_methods,
               "not_run": [x for x in METHODS if x not in run_methods],
               "seconds": seconds}
    for meth in run_methods:
        pm = metrics["patch"][meth]
        summary[meth] = {"accuracy": pm["accuracy"], "pr_auc": pm["pr_auc"],
                         "tumor_points_per_slide": metrics["tumor_points"][meth][
                             "mean_per_slide"]}
    return summary


def _grid_extent(t: SlideTruth) -> tuple[float, float, float, float]:
    """(left, right, bottom, top) of the tile grid in level-0 px, for matplotlib's imshow."""
    ox, oy = t.origin_xy_px_level0
    rows, cols = t.grid_shape
    return (ox, ox + cols * t.pitch_px_level0, oy + rows * t.pitch_px_level0, oy)


def cli(
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
) -> None:
    """Score every method on evaluate.split and write the reports.

    Reads: the manifest, data/tiles, data/labels, data/features (classifier-only),
    data/predictions/<method> (separate, e2e, seg_only, frozen; absent = "not run"),
    annotations, reports/*.json; params evaluate.*, data.manifest, seed.
    Writes: reports/metrics.json, reports/curves/{pr,roc}.csv, reports/evaluate_slides.csv,
    reports/camelyon17/*.csv, reports/figures/*.png, reports/index.html,
    reports/timings/evaluate.json.
    """
    s = run(load_params(params_file), Paths())
    for meth in s["methods_run"]:
        typer.echo(f"{meth:>10}: accuracy {100 * s[meth]['accuracy']:.2f} %, PR-AUC "
                   f"{100 * (s[meth]['pr_auc'] if s[meth]['pr_auc'] is not None else math.nan):.2f}"
                   f" %, tumor points/slide {s[meth]['tumor_points_per_slide']:.2f}")
    if s["not_run"]:
        typer.echo(f"not run: {', '.join(s['not_run'])}")
