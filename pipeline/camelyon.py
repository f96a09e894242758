"""CAMELYON16 and CAMELYON17 evaluation protocols as pure functions.

CAMELYON16 (lesion detection): slide-level ROC-AUC and the lesion-level FROC of the official
evaluation script (evaluation mask = reference tumor dilated and hole-filled, ITC lesions
neither TP nor FP, score = mean sensitivity at 1/4..8 FPs per slide).

CAMELYON17 (patient pN-stage): slide class from the largest predicted lesion, pN-stage from
the five node slides of a patient, quadratic-weighted Cohen kappa, and the submission CSV.

Grids here are (H, W) arrays in row/col order; point coordinates are (x, y) = (col, row).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.distance import pdist
from skimage.measure import label as sk_label
from skimage.measure import regionprops
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from pipeline.io import atomic_path
from pipeline.metrics import MetricsError

# ---------------------------------------------------------------------------------------------
# CAMELYON17
# ---------------------------------------------------------------------------------------------

# pN stages in clinical order (the order the quadratic kappa weights use).
PN_STAGES: tuple[str, ...] = ("pN0", "pN0(i+)", "pN1mi", "pN1", "pN2")
# Slide classes as the challenge writes them in its reference CSV.
SLIDE_NEGATIVE, SLIDE_ITC, SLIDE_MICRO, SLIDE_MACRO = "negative", "itc", "micro", "macro"
SLIDE_CLASSES: tuple[str, ...] = (SLIDE_NEGATIVE, SLIDE_ITC, SLIDE_MICRO, SLIDE_MACRO)
# Largest-lesion size limits (TNM / CAMELYON17): macro > 2.0 mm, micro > 0.2 mm, else ITC.
MACRO_MIN_UM = 2000.0
MICRO_MIN_UM = 200.0
# Official scorer's weighted-average FP rates (CAMELYON16 FROC).
FROC_FP_RATES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

_STAGE_BY_LOWER = {s.lower(): s for s in PN_STAGES}


def _component_diameters_tiles(lab: np.ndarray, n: int) -> np.ndarray:
    """Per component 1..n: largest distance between two of its tile centres, in tiles, + 1."""
    out = np.zeros(n, dtype=np.float64)
    for k, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        rows, cols = np.nonzero(lab[sl] == k)  # row-major: cols ascend within each row
        # The farthest pair lies on the convex hull, and every hull vertex is the leftmost or
        # rightmost tile of its row: keep those (<= 2 per row) instead of all tiles.
        _, first = np.unique(rows, return_index=True)
        last = np.append(first[1:] - 1, rows.size - 1)
        keep = np.unique(np.concatenate([first, last]))
        pts = np.column_stack([rows[keep], cols[keep]]).astype(np.float64)
        out[k - 1] = (pdist(pts).max() if len(pts) > 1 else 0.0) + 1.0
    return out


def slide_class_from_mask(pred_tumor_grid: Any, pitch_um: float) -> tuple[str, float]:
    """CAMELYON17 slide class from the largest predicted lesion.

    Lesions are the 8-connected components of `pred_tumor_grid` (True = predicted tumor tile).
    A lesion's longest diameter is defined as

        diameter_um = (max Euclidean distance between two of its tile centres + 1) * pitch_um

    i.e. centre-to-centre extent plus half a tile at each end: a straight run of n tiles along
    a row or column measures exactly n * pitch_um, a single tile measures pitch_um. The largest
    lesion is the one with the largest diameter (not area). Class of the slide:
    ``diameter > 2000 um`` macro, ``> 200 um`` micro, any tumor tile at all itc, else negative
    (limits are strict: exactly 2000 um is micro, exactly 200 um is itc).

    Args:
        pred_tumor_grid: (H, W) bool grid of predicted tumor tiles.
        pitch_um: tile grid pitch (tile side on the slide) in micrometres.

    Returns (class, largest_diameter_um); a negative slide has diameter 0.0.
    """
    grid = np.asarray(pred_tumor_grid, dtype=bool)
    if grid.ndim != 2:
        raise MetricsError(f"slide_class_from_mask: need an (H, W) grid, got shape {grid.shape}")
    if not (math.isfinite(pitch_um) and pitch_um > 0):
        raise MetricsError(f"slide_class_from_mask: pitch_um must be > 0, got {pitch_um}")
    lab, n = sk_label(grid, connectivity=2, return_num=True)
    if n == 0:
        return SLIDE_NEGATIVE, 0.0
    diameter_um = float(_component_diameters_tiles(lab, n).max() * pitch_um)
    return slide_class_of_diameter(diameter_um), diameter_um


def slide_class_of_diameter(diameter_um: float) -> str:
    """CAMELYON17 class of a slide with tumor whose largest lesion measures `diameter_um`."""
    if diameter_um > MACRO_MIN_UM:
        return SLIDE_MACRO
    if diameter_um > MICRO_MIN_UM:
        return SLIDE_MICRO
    return SLIDE_ITC


def _slide_class(c: str, where: str) -> str:
    lc = str(c).strip().lower()
    if lc not in SLIDE_CLASSES:
        raise MetricsError(f"{where}: unknown slide class {c!r} (expected one of {SLIDE_CLASSES})")
    return lc


def pn_stage(slide_classes: Iterable[str]) -> str:
    """Patient pN-stage (CAMELYON17 rules) from the classes of the patient's node slides.

    Positive nodes are micro or macro slides (ITC-only nodes are not positive):
        pN2      >= 4 positive nodes, at least one macro (CAMELYON17 has 5 nodes, so 4-5)
        pN1      1-3 positive nodes, at least one macro
        pN1mi    micro metastases but no macro (whatever their number: 4 micro -> pN1mi)
        pN0(i+)  only ITC
        pN0      no tumor at all
    Classes are "negative" / "itc" / "micro" / "macro" (case-insensitive).
    """
    classes = [_slide_class(c, "pn_stage") for c in slide_classes]
    if not classes:
        raise MetricsError("pn_stage: a patient needs at least one slide class")
    n_macro = classes.count(SLIDE_MACRO)
    n_positive = n_macro + classes.count(SLIDE_MICRO)
    if n_macro:
        return "pN2" if n_positive >= 4 else "pN1"
    if n_positive:
        return "pN1mi"
    if SLIDE_ITC in classes:
        return "pN0(i+)"
    return "pN0"


def _stage_lower(s: str, where: str) -> str:
    ls = str(s).strip().lower()
    if ls not in _STAGE_BY_LOWER:
        raise MetricsError(f"{where}: unknown pN-stage {s!r} (expected one of {PN_STAGES})")
    return ls


def pn_kappa(true_stages: Sequence[str], pred_stages: Sequence[str]) -> float:
    """CAMELYON17 score: quadratic-weighted Cohen kappa between true and predicted pN-stages.

    Stages are compared lower-cased over the fixed ordered label set
    pN0 < pN0(i+) < pN1mi < pN1 < pN2 (``sklearn.metrics.cohen_kappa_score(..., labels=...,
    weights="quadratic")``), so the weight of a disagreement is the squared distance between
    the stages' ranks. kappa = 1 - sum(w * observed) / sum(w * expected-by-chance). NaN when
    undefined (e.g. every patient, true and predicted, has the same stage).
    """
    t = [_stage_lower(s, "pn_kappa") for s in true_stages]
    p = [_stage_lower(s, "pn_kappa") for s in pred_stages]
    if len(t) != len(p):
        raise MetricsError(f"pn_kappa: {len(t)} true stages but {len(p)} predicted")
    if not t:
        raise MetricsError("pn_kappa: no patients to score")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when kappa is undefined; we return NaN
        k = cohen_kappa_score(t, p, labels=[s.lower() for s in PN_STAGES], weights="quadratic")
    return float(k)


def _with_suffix(name: str, suffix: str) -> str:
    return name if name.lower().endswith(suffix) else name + suffix


def _check_name(name: str, path: Path) -> str:
    name = str(name)
    if not name or any(ch in name for ch in ',"\r\n'):
        raise MetricsError(f"{path}: cannot write name {name!r} into the submission CSV")
    return name


def write_camelyon17_submission(
    path: str | Path,
    patient_stages: Mapping[str, str],
    slide_classes: Mapping[str, Mapping[str, str]],
) -> None:
    """Write a CAMELYON17 submission CSV (atomically).

    Format: header ``patient,stage``; then per patient (sorted by name) one row
    ``patient_004.zip,pN1`` followed by its slides' rows (sorted) ``patient_004_node_2.tif,macro``.
    The official scorer reads only the ``.zip`` rows; slide rows are for inspection.

    Args:
        patient_stages: patient id -> pN stage (any case; written in canonical case). ".zip" is
            appended to the id unless it already ends with it.
        slide_classes: patient id -> {slide id -> slide class}; ".tif" is appended to a slide id
            unless it already ends with it. Patients without slides get only their .zip row.
    """
    path = Path(path)
    unknown = set(slide_classes) - set(patient_stages)
    if unknown:
        raise MetricsError(f"{path}: slides given for patients without a stage: {sorted(unknown)}")
    lines = ["patient,stage"]
    for patient in sorted(patient_stages):
        stage = _STAGE_BY_LOWER[_stage_lower(patient_stages[patient], str(path))]
        lines.append(f"{_with_suffix(_check_name(patient, path), '.zip')},{stage}")
        for slide, cls in sorted(slide_classes.get(patient, {}).items()):
            lines.append(
                f"{_with_suffix(_check_name(slide, path), '.tif')},{_slide_class(cls, str(path))}"
            )
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def read_camelyon17_submission(path: str | Path) -> dict[str, str]:
    """Read patient stages from a CAMELYON17 CSV the way the official scorer does.

    Only rows whose first field ends in ``.zip`` are used (header and slide rows are ignored);
    the stage is lower-cased. Returns {patient id without ".zip": lower-case stage}.
    """
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"{path}: submission file not found")
    stages: dict[str, str] = {}
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or not row[0].strip().lower().endswith(".zip"):
                continue
            if len(row) < 2:
                raise MetricsError(f"{path}:{lineno}: patient row has no stage")
            patient = row[0].strip()[: -len(".zip")]
            if patient in stages:
                raise MetricsError(f"{path}:{lineno}: patient {patient} appears twice")
            stages[patient] = row[1].strip().lower()
    return stages


# ---------------------------------------------------------------------------------------------
# CAMELYON16
# ---------------------------------------------------------------------------------------------


def slide_auc(slide_truth: Any, slide_score: Any) -> float:
    """Slide-level ROC-AUC (CAMELYON16 task 1): 1 = tumor slide, score = any per-slide tumor
    score (max tile probability, predicted area, ...). NaN when only one class is present."""
    y = np.asarray(slide_truth).ravel()
    s = np.asarray(slide_score, dtype=np.float64).ravel()
    if y.shape != s.shape or y.size == 0:
        raise MetricsError(f"slide_auc: need equal non-empty arrays, got {y.size} and {s.size}")
    if not np.isin(y, (0, 1)).all() or not np.isfinite(s).all():
        raise MetricsError("slide_auc: truth must be 0/1 and scores finite")
    if y.min() == y.max():
        return math.nan
    return float(roc_auc_score(y, s))


def evaluation_mask(
    tumor_raster: Any,
    pixel_um: float,
    dilation_radius_um: float = 37.5,
    itc_major_axis_um: float = 275.0,
) -> tuple[np.ndarray, set[int]]:
    """CAMELYON16 evaluation mask: labelled lesions and which of them are ITC.

    Follows the official evaluation script: every pixel closer than `dilation_radius_um` to a
    reference tumor pixel (Euclidean distance transform, strict ``<``) joins the tumor, holes
    are filled, lesions are the 8-connected components (labels 1..n). A lesion is ITC when its
    major axis (``regionprops.axis_major_length`` * pixel_um, the ellipse with the same second
    moments) is < `itc_major_axis_um`.

    The protocol text says "dilated by 75 um"; the official code's radius is
    75 / (2 * pixel size), i.e. 37.5 um, which grows a lesion's diameter by 75 um — hence the
    ITC limit 275 um = 200 um + 75 um. The default follows the code.

    Returns (labels int32 (H, W), set of ITC label ids).
    """
    tumor = np.asarray(tumor_raster, dtype=bool)
    if tumor.ndim != 2:
        raise MetricsError(f"evaluation_mask: need an (H, W) raster, got shape {tumor.shape}")
    if not (math.isfinite(pixel_um) and pixel_um > 0):
        raise MetricsError(f"evaluation_mask: pixel_um must be > 0, got {pixel_um}")
    if not tumor.any():
        return np.zeros(tumor.shape, np.int32), set()
    # EDT in um (sampling) instead of a huge disk: fast for any radius.
    dist_um = ndi.distance_transform_edt(~tumor, sampling=pixel_um)
    # `tumor |` keeps the reference itself when the radius is 0 (dist < 0 is never true).
    filled = ndi.binary_fill_holes(tumor | (dist_um < dilation_radius_um))
    labels = sk_label(filled, connectivity=2).astype(np.int32)
    itc = {
        int(r.label)
        for r in regionprops(labels)
        if r.axis_major_length * pixel_um < itc_major_axis_um
    }
    return labels, itc


def _detections_array(d: Any, slide: str) -> np.ndarray:
    a = np.asarray(d, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, 3))
    if a.ndim != 2 or a.shape[1] != 3 or not np.isfinite(a).all():
        raise MetricsError(
            f"froc: detections for {slide} must be a finite (k, 3) array of x, y, prob; "
            f"got shape {a.shape}"
        )
    if (a[:, 2] < 0).any():  # the official scores lesions from 0 up: a negative p is no score
        raise MetricsError(f"froc: detections for {slide} have a negative probability "
                           f"({a[:, 2].min():g}); probabilities must be >= 0")
    return a


def froc(
    detections: Mapping[str, Any],
    masks: Mapping[str, tuple[np.ndarray, set[int]] | None],
    fp_rates: Sequence[float] = FROC_FP_RATES,
    interpolation: str = "linear",
) -> dict[str, Any]:
    """Lesion-level FROC of CAMELYON16, equal to the official evaluation script.

    The reference is computationalpathologygroup/Camelyon16 `Python/Evaluation_FROC.py` (commit
    546b6138); each rule below names the line it follows.

    Args:
        detections: slide id -> (k, 3) array of (x_px, y_px, prob) in the evaluation mask's
            pixel coordinates (pixel (row, col) = (int(y), int(x))), prob >= 0. Slides may be
            missing (no detections).
        masks: slide id -> (labels, itc_ids) from `evaluation_mask` for tumor slides, None for
            normal slides. Every slide evaluated must be here; len(masks) is the slide count.
        fp_rates: average FPs per slide at which sensitivity is read (official: 1/4 .. 8).
        interpolation: how sensitivity is read at a given FP rate from the operating points.
            "linear" (default) = the challenge's score: ``np.interp`` along the polyline
            through (0, 0) and the operating points in order of decreasing threshold (the
            official script plots this curve; its score is the mean of np.interp on the
            reversed arrays, as in NCRF's port). "step" (not the challenge's number) =
            sensitivity of the operating point with the largest FP rate not exceeding it. The
            two agree unless a TP and an FP share a probability (tied operating point).

    Scoring per detection: on a normal slide -> FP (l. 147-148). On a tumor slide: label 0 ->
    FP (l. 136-137); an ITC lesion -> ignored, neither TP nor FP (l. 141); a non-ITC lesion ->
    its score starts at 0 (l. 124) and a hit replaces it only when strictly greater
    (l. 142-145), so the lesion's score is its highest hit and a lesion hit only at p = 0 is
    NOT detected. Sensitivity is over all non-ITC lesions of all slides (l. 153, 182); FP rate
    is FPs / number of slides (l. 181).

    Thresholds (l. 175-178): the distinct values of all FP probabilities and all lesion scores
    -- a lesion scored 0 (missed, or ITC: the official keeps a 0 for every lesion label)
    included -- in increasing order WITHOUT the lowest one (`for Thresh in all_probs[1:]`); at
    each, count FPs and lesion scores >= it. The (0, 0) point is appended (l. 179-180). Dropping
    the lowest value only drops "count everything" when some lesion scored 0; when every lesion
    is detected and there is no ITC it drops the lowest real operating point, as the official
    does. The official stores lesion scores as float32 (l. 124); here they stay float64, which
    is identical for float32 probabilities (every model output here) and differs only when a
    TP and an FP probability are closer than float32 resolution.

    Returns dict with thresholds (inf first, then decreasing), fps_per_slide and sensitivity
    (aligned with thresholds, starting at the (0, 0) point), fp_rates, sensitivity_at_fp_rates,
    score (mean of those), n_slides, n_lesions (non-ITC), n_itc_lesions, n_fp_total,
    n_detected_lesions (score > 0). Sensitivities are NaN when there are no non-ITC lesions.
    """
    if interpolation not in ("linear", "step"):
        raise MetricsError(f"froc: interpolation must be 'linear' or 'step', got {interpolation!r}")
    if not masks:
        raise MetricsError("froc: no slides to evaluate (masks is empty)")
    extra = set(detections) - set(masks)
    if extra:
        raise MetricsError(f"froc: detections for slides with no mask entry: {sorted(extra)}")
    fp_probs: list[np.ndarray] = []
    tp_probs: list[float] = []
    n_lesions = n_itc = n_scored_zero = 0
    for slide, mask in masks.items():
        det = _detections_array(detections.get(slide, np.zeros((0, 3))), slide)
        if mask is None:
            fp_probs.append(det[:, 2])
            continue
        fps_s, best, n_les, n_itc_s, n_zero = _score_tumor_slide(slide, det, *mask)
        fp_probs.append(fps_s)
        tp_probs.extend(best)
        n_lesions, n_itc, n_scored_zero = (n_lesions + n_les, n_itc + n_itc_s,
                                           n_scored_zero + n_zero)

    fp = np.sort(np.concatenate(fp_probs)) if fp_probs else np.zeros(0)
    tp = np.sort(np.asarray(tp_probs, dtype=np.float64))  # detected lesions only (all > 0)
    n_slides = len(masks)
    # official l. 175-176: every distinct value (a 0 for each lesion scored 0) but the lowest
    values = np.unique(np.concatenate([fp, tp, [0.0] if n_scored_zero else []]))
    thr = values[1:][::-1]  # decreasing; all > 0, so a lesion scored 0 is never counted
    n_fp_at = fp.size - np.searchsorted(fp, thr, side="left")  # count of prob >= t
    n_tp_at = tp.size - np.searchsorted(tp, thr, side="left")
    thresholds = np.concatenate([[np.inf], thr])
    fps = np.concatenate([[0.0], n_fp_at / n_slides])
    if n_lesions:
        sens = np.concatenate([[0.0], n_tp_at / n_lesions])
    else:
        sens = np.full(thresholds.shape, np.nan)
    rates = np.asarray(fp_rates, dtype=np.float64)
    if interpolation == "linear":
        at = np.interp(rates, fps, sens)
    else:
        # fps is non-decreasing: the last point with fps <= r has the largest FP count <= r.
        at = sens[np.searchsorted(fps, rates, side="right") - 1]
    return {
        "thresholds": thresholds,
        "fps_per_slide": fps,
        "sensitivity": sens,
        "fp_rates": rates.tolist(),
        "sensitivity_at_fp_rates": [float(v) for v in at],
        "score": float(np.mean(at)),
        "n_slides": n_slides,
        "n_lesions": n_lesions,
        "n_itc_lesions": n_itc,
        "n_fp_total": int(fp.size),
        "n_detected_lesions": int(tp.size),
        "interpolation": interpolation,
    }



def _score_tumor_slide(
    slide: str, det: np.ndarray, labels: np.ndarray, itc_ids: set[int],
) -> tuple[np.ndarray, list[float], int, int, int]:
    """One tumor slide's detections scored as the official script does (see `froc`): (FP
    probabilities, each detected non-ITC lesion's score, non-ITC lesions, ITC lesions, lesions
    whose official score stays 0: missed ones and ITCs)."""
    labels = np.asarray(labels)
    ids = np.unique(labels[labels > 0])
    itc = {int(i) for i in itc_ids}
    n_itc = int(np.isin(ids, list(itc)).sum())
    n_lesions = len(ids) - n_itc
    if det.shape[0] == 0:
        return det[:, 2], [], n_lesions, n_itc, len(ids)  # official: a 0 for every label
    cols = np.floor(det[:, 0]).astype(np.int64)
    rows = np.floor(det[:, 1]).astype(np.int64)
    h, w = labels.shape
    outside = (rows < 0) | (rows >= h) | (cols < 0) | (cols >= w)
    if outside.any():
        i = int(np.argmax(outside))
        raise MetricsError(f"froc: detection ({det[i, 0]}, {det[i, 1]}) of {slide} lies "
                           f"outside its {w}x{h} evaluation mask")
    hit = labels[rows, cols]
    best: dict[int, float] = {}
    for lesion, p in zip(hit.tolist(), det[:, 2].tolist(), strict=True):
        # official l. 124, 142: a lesion starts at 0 and needs p > score: a 0 never counts
        if lesion != 0 and lesion not in itc and p > best.get(lesion, 0.0):
            best[lesion] = p
    return det[hit == 0, 2], list(best.values()), n_lesions, n_itc, len(ids) - len(best)

def detections_from_grid(prob_grid: Any, threshold: float) -> np.ndarray:
    """Turn a tile tumor-probability grid into FROC detections.

    Each 8-connected component of ``prob_grid >= threshold`` (NaN = background, never tumor)
    gives one detection at its highest-probability tile (ties: first in row-major order), with
    that probability. Coordinates are the tile centre in grid units: x = col + 0.5,
    y = row + 0.5 (tile (row, col) spans [col, col+1) x [row, row+1)), so multiplying by the
    grid pitch gives the centre's position, and int(x), int(y) index the grid itself.

    Returns a (k, 3) float64 array of (x, y, prob), in component-label (row-major) order.
    """
    prob = np.asarray(prob_grid, dtype=np.float64)
    if prob.ndim != 2:
        raise MetricsError(f"detections_from_grid: need an (H, W) grid, got shape {prob.shape}")
    with np.errstate(invalid="ignore"):
        fg = prob >= threshold  # NaN compares False
    lab, n = sk_label(fg, connectivity=2, return_num=True)
    if n == 0:
        return np.zeros((0, 3))
    flat = np.flatnonzero(lab)
    comp = lab.ravel()[flat]
    p = prob.ravel()[flat]
    # Sort by component, then probability descending, then flat index (row-major tie-break).
    order = np.lexsort((flat, -p, comp))
    first = order[np.r_[True, np.diff(comp[order]) != 0]]
    rows, cols = np.unravel_index(flat[first], prob.shape)
    return np.column_stack([cols + 0.5, rows + 0.5, p[first]]).astype(np.float64)
