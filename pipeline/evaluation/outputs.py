"""What the evaluation writes besides the protocols' own files: strict-JSON metrics, the curve and
per-slide CSV tables, the figures and the page index.html (pipeline.report draws and renders)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import report
from pipeline.evaluation.inputs import MethodPredictions, SlideTruth, filled, predicted_grid
from pipeline.io import atomic_path
from pipeline.log import progress
from pipeline.schema import LABEL_NOLABEL, LABEL_TUMOR

CURVE_COLUMNS = {"pr": ["method", "recall", "precision"], "roc": ["method", "fpr", "tpr"]}


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


def write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")


def method_label(method: str, attrs: Mapping[str, Any] | None = None) -> str:
    """Display name; the frozen baseline names its extractor when the files say which."""
    name = report.METHOD_LABELS.get(method, method)
    fx = (attrs or {}).get("frozen_extractor")
    if method == "frozen" and fx:
        name = f"{name} ({fx})"
    return name


def write_curves(curve_dir: Path, rows: Mapping[str, Sequence[pd.DataFrame]]
                 ) -> dict[str, pd.DataFrame]:
    """curves/{pr,roc}.csv (long format, column `method`) and one file per method and curve:
    `dvc plots` colours by file, so dvc.yaml overlays those. Returns the long tables."""
    tables = {}
    for name, cols in CURVE_COLUMNS.items():
        table = (pd.concat(rows[name], ignore_index=True) if rows[name] else
                 pd.DataFrame(columns=cols))
        write_csv(curve_dir / f"{name}.csv", table)
        tables[name] = table
    for name, table in tables.items():
        for meth, part in table.groupby("method"):
            write_csv(curve_dir / f"{name}_{meth}.csv", part.drop(columns="method"))
    return tables


def slide_row(t: SlideTruth, method: str, prob: np.ndarray, threshold: float,
              tumor_points: int, scores: Mapping[str, tuple[float, float]],
              c17_details: Mapping[str, Any]) -> dict[str, Any]:
    """One row of evaluate_slides.csv (a slide under a method)."""
    keep = t.label != LABEL_NOLABEL
    pred = filled(prob) >= threshold
    max_prob, area = scores.get(t.slide_id, (math.nan, math.nan))
    return {
        "slide_id": t.slide_id, "patient_id": t.patient_id, "method": method,
        "n_tiles": t.n, "n_labelled": int(keep.sum()),
        "n_true_tumor": int((t.label == LABEL_TUMOR).sum()),
        "n_pred_tumor": int(pred.sum()),
        "accuracy": float(np.mean(pred[keep] == (t.label[keep] == LABEL_TUMOR)))
        if keep.any() else math.nan,
        "tumor_points": tumor_points,
        "max_prob": max_prob,
        "pred_area_mm2": area,
        "pred_class": c17_details.get("slide_pred", {}).get(t.slide_id, ""),
        "true_class": c17_details.get("slide_true", {}).get(t.slide_id, ""),
        "n_unpredicted": int(np.isnan(prob).sum()),
    }


def write_slide_figures(fig_dir: Path, tiles_png_dir: Path, truths: Sequence[SlideTruth],
                        preds: Mapping[str, MethodPredictions], labels: Mapping[str, str],
                        threshold: float) -> list[dict[str, str]]:
    """<slide>.png (paper Fig. 5 row) and <slide>_heatmap.png per slide; returns their links
    relative to the reports folder."""
    ran = [m for m in report.FIGURE_ORDER if m in preds and preds[m].status == "ok"]
    figs = []
    for t in progress(list(truths), desc="figures", unit="slide"):
        thumb = report.load_thumbnail(t.slide_path, t.slide_wh_px_level0,
                                      tiles_png_dir / f"{t.slide_id}.png")
        maps = report.SlideMaps(
            slide_id=t.slide_id, slide_wh_px_level0=t.slide_wh_px_level0,
            grid_extent_px_level0=t.grid_extent(),
            label_grid=t.to_grid(t.label, report.BACKGROUND),
            true_tumor_grid=t.to_grid(t.true_tumor, False),
            prob_grids={labels[m]: predicted_grid(t, preds[m].probs[t.slide_id]) for m in ran},
        )
        report.save_slide_figure(fig_dir / f"{t.slide_id}.png", thumb, maps, threshold)
        report.save_heatmap_figure(fig_dir / f"{t.slide_id}_heatmap.png", thumb, maps)
        figs.append({"slide_id": t.slide_id, "map": f"figures/{t.slide_id}.png",
                     "heatmap": f"figures/{t.slide_id}_heatmap.png"})
    return figs


def write_curve_figures(fig_dir: Path, curves: Mapping[str, pd.DataFrame],
                        labels: Mapping[str, str], any_ran: bool) -> dict[str, str]:
    """figures/{pr,roc}_curves.png of all methods; returns their links ({} when none ran)."""
    if not any_ran:
        return {}
    report.save_curves_figure(fig_dir / "pr_curves.png", curves["pr"], "recall", "precision",
                              labels, "Precision-recall (tiles)")
    report.save_curves_figure(fig_dir / "roc_curves.png", curves["roc"], "fpr", "tpr", labels,
                              "ROC (tiles)")
    return {"pr": "figures/pr_curves.png", "roc": "figures/roc_curves.png"}

