"""Figures and the static HTML report of the evaluate stage (matplotlib Agg, no JS, no CDN).

Figure 5 style maps (paper): slide thumbnail | ground truth | one panel per method, tiles
coloured red = tumor, gray = normal, purple = nolabel, white = background; probability heat maps
with the annotated tumor outlined; PR / ROC curves of all methods. `write_index_html` puts the
metric tables (paper Table 1 form first), CAMELYON16/17 tables, training metrics and the images
(relative links) on one page that opens offline.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.io import atomic_path, write_text_atomic  # noqa: E402
from pipeline.log import get_logger  # noqa: E402
from pipeline.schema import LABEL_NOLABEL, LABEL_NORMAL, LABEL_TUMOR  # noqa: E402

log = get_logger("pipeline.report")

METHOD_LABELS = {
    "classifier": "Classifier only",
    "separate": "Separate Learning",
    "e2e": "End-to-End Learning",
    "seg_only": "Segmentation only",
    "frozen": "Frozen features",
}
# Row order of the paper's Table 1, and panel order of the maps (paper Fig. 5: classifier, seg
# only, ImageNet features, Separate, End-to-End).
TABLE_ORDER = ("classifier", "seg_only", "frozen", "separate", "e2e")
FIGURE_ORDER = TABLE_ORDER

# Map value of grid cells without a tile (anything not a schema label code).
BACKGROUND = -2
COLOURS = {  # paper Fig. 5
    "tumor": "#d62728",
    "normal": "#9a9a9a",
    "nolabel": "#8e44ad",
    "background": "#ffffff",
    "not predicted": "#f2d16b",
}
THUMB_MAX_PX = 1024
PANEL_IN = 2.8
DPI = 110


@dataclass
class SlideMaps:
    """What one slide's figures show; grids are (rows, cols) on the tile grid."""

    slide_id: str
    slide_wh_px_level0: tuple[int, int]
    grid_extent_px_level0: tuple[float, float, float, float]  # left, right, bottom, top
    label_grid: np.ndarray  # schema label codes, BACKGROUND off tissue
    true_tumor_grid: np.ndarray  # bool, annotated tumor in the tile
    prob_grids: dict[str, np.ndarray] = field(default_factory=dict)  # panel title -> prob/NaN


# -- thumbnails --------------------------------------------------------------------------------
def load_thumbnail(slide_path: str | Path, slide_wh_px_level0: tuple[int, int],
                   fallback_png: Path | None = None) -> np.ndarray | None:
    """The slide at <= THUMB_MAX_PX on its long side (whole slide, level-0 (0, 0) at the top
    left). Falls back to `fallback_png` (the tile stage's overview) and then to None, with a
    warning, when the slide cannot be read."""
    w, h = slide_wh_px_level0
    if slide_path and Path(slide_path).exists():
        try:
            from pipeline.slide import Slide

            with Slide(slide_path) as s:
                rgb, _ = s.low_res_image(max(w, h) / THUMB_MAX_PX)
            return rgb
        except (PipelineError, OSError) as exc:
            log.warning("thumbnail: %s", exc)
    if fallback_png is not None and fallback_png.is_file():
        return np.asarray(Image.open(fallback_png).convert("RGB"))
    log.warning("thumbnail: slide %s not readable and no %s; figure without it", slide_path,
                fallback_png)
    return None


# -- maps --------------------------------------------------------------------------------------
def label_rgb(label_grid: np.ndarray) -> np.ndarray:
    """(H, W, 3) float image of a ground-truth label grid in the Fig. 5 colours."""
    out = np.ones((*label_grid.shape, 3))
    for code, name in ((LABEL_TUMOR, "tumor"), (LABEL_NORMAL, "normal"),
                       (LABEL_NOLABEL, "nolabel")):
        out[label_grid == code] = to_rgb(COLOURS[name])
    return out


def prediction_rgb(prob_grid: np.ndarray, tissue: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W, 3) float image of a prediction: red >= threshold, gray below (nolabel tiles get
    their prediction too, as in the paper), 'not predicted' for tissue tiles without one."""
    out = np.ones((*prob_grid.shape, 3))
    with np.errstate(invalid="ignore"):
        tumor = prob_grid >= threshold
        normal = prob_grid < threshold
    out[tissue & np.isnan(prob_grid)] = to_rgb(COLOURS["not predicted"])
    out[normal] = to_rgb(COLOURS["normal"])
    out[tumor] = to_rgb(COLOURS["tumor"])
    return out


def _panels(n: int, height_ratio: float) -> tuple[plt.Figure, np.ndarray]:
    fig, axes = plt.subplots(1, n, figsize=(PANEL_IN * n, PANEL_IN * height_ratio + 0.9),
                             squeeze=False, layout="constrained")
    return fig, axes[0]


def _show_thumb(ax: plt.Axes, thumb: np.ndarray | None, maps: SlideMaps) -> None:
    w, h = maps.slide_wh_px_level0
    if thumb is None:
        ax.text(0.5, 0.5, "no thumbnail", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.imshow(thumb, extent=(0, w, h, 0), interpolation="lanczos")
    ax.set_title("Slide", fontsize=9)


def _frame(ax: plt.Axes, maps: SlideMaps) -> None:
    w, h = maps.slide_wh_px_level0
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def save_slide_figure(path: Path, thumb: np.ndarray | None, maps: SlideMaps,
                      threshold: float) -> None:
    """Paper Fig. 5 row: thumbnail | ground truth | each method's thresholded map, + legend."""
    w, h = maps.slide_wh_px_level0
    n = 2 + len(maps.prob_grids)
    fig, axes = _panels(n, h / max(w, 1))
    _show_thumb(axes[0], thumb, maps)
    ext = maps.grid_extent_px_level0
    axes[1].imshow(label_rgb(maps.label_grid), extent=ext, interpolation="nearest")
    axes[1].set_title("Ground truth", fontsize=9)
    tissue = maps.label_grid != BACKGROUND
    unpredicted = False
    for ax, (title, prob) in zip(axes[2:], maps.prob_grids.items(), strict=True):
        ax.imshow(prediction_rgb(prob, tissue, threshold), extent=ext, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        unpredicted |= bool((tissue & np.isnan(prob)).any())
    for ax in axes:
        _frame(ax, maps)
    names = ["tumor", "normal", "nolabel", "background"] + (["not predicted"] if unpredicted
                                                             else [])
    fig.legend(handles=[Patch(facecolor=COLOURS[k], edgecolor="black", label=k) for k in names],
               loc="outside lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.suptitle(f"{maps.slide_id}  (predictions: tumor if p >= {threshold:g}; nolabel tiles "
                 "are predicted too)", fontsize=9)
    _save(fig, path)


def save_heatmap_figure(path: Path, thumb: np.ndarray | None, maps: SlideMaps) -> None:
    """Thumbnail | each method's tumor probability (viridis, white off tissue), with the
    annotated tumor tiles outlined in red."""
    w, h = maps.slide_wh_px_level0
    n = 1 + len(maps.prob_grids)
    fig, axes = _panels(n, h / max(w, 1))
    _show_thumb(axes[0], thumb, maps)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    ext = maps.grid_extent_px_level0
    left, right, bottom, top = ext
    rows, cols = maps.true_tumor_grid.shape
    im = None
    for ax, (title, prob) in zip(axes[1:], maps.prob_grids.items(), strict=True):
        im = ax.imshow(np.ma.masked_invalid(prob), extent=ext, cmap=cmap, vmin=0.0, vmax=1.0,
                       interpolation="nearest")
        if maps.true_tumor_grid.any():
            # Contour of the tile-level truth; upsampled so it runs within 1/16 tile of the
            # cell edges instead of cutting corners between cell centres. Only the tumor's
            # bounding box (+1 cell of zeros): over the whole grid the upsampled contour input
            # grew with the slide (~1.6 GB for a 220k x 100k px slide; camelyon_scale bench).
            tr, tc = np.nonzero(maps.true_tumor_grid)
            r0, r1 = max(int(tr.min()) - 1, 0), min(int(tr.max()) + 2, rows)
            c0, c1 = max(int(tc.min()) - 1, 0), min(int(tc.max()) + 2, cols)
            up = np.kron(maps.true_tumor_grid[r0:r1, c0:c1].astype(float), np.ones((8, 8)))
            xs = left + (8 * c0 + np.arange(up.shape[1]) + 0.5) * (right - left) / (8 * cols)
            ys = top + (8 * r0 + np.arange(up.shape[0]) + 0.5) * (bottom - top) / (8 * rows)
            ax.contour(xs, ys, up, levels=[0.5], colors=COLOURS["tumor"], linewidths=0.8)
        ax.set_title(title, fontsize=9)
    for ax in axes:
        _frame(ax, maps)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="tumor probability")
    fig.suptitle(f"{maps.slide_id}  (red outline: annotated tumor tiles; {rows}x{cols} grid)",
                 fontsize=9)
    _save(fig, path)


def save_curves_figure(path: Path, df: pd.DataFrame, x: str, y: str,
                       labels: Mapping[str, str], title: str) -> None:
    """All methods' curves of one long-format table (column `method`) in one plot."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for meth in [mm for mm in TABLE_ORDER if mm in set(df["method"])]:
        d = df[df["method"] == meth]
        ax.plot(d[x], d[y], label=labels.get(meth, meth), lw=1.4)
    if x == "fpr":
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower left" if x == "recall" else "lower right")
    ax.grid(alpha=0.3)
    _save(fig, path)


# -- HTML --------------------------------------------------------------------------------------
def read_training_metrics(reports: Path, exclude: Sequence[str] = ()) -> dict[str, dict]:
    """reports/*.json (the training stages' metrics), name -> flat {key: value}; unreadable
    files are skipped with a warning."""
    out: dict[str, dict] = {}
    for p in sorted(reports.glob("*.json")):
        if p.name in exclude:
            continue
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("%s: not readable JSON, left out of index.html (%s)", p, exc)
            continue
        if isinstance(data, dict):
            out[p.stem] = _flatten(data)
    return out


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def fmt(v: Any, pct: bool = False, digits: int | None = None) -> str:
    """Table cell text: None/NaN -> 'n/a'; floats as % with 2 decimals (pct), with `digits`
    decimals, or 4 significant digits; anything else str()."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        if pct:
            return f"{100 * v:.2f}"
        return f"{v:.{digits}f}" if digits is not None else f"{v:.4g}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    c = f' class="{cls}"' if cls else ""
    return f"<table{c}><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>\n"


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;max-width:1400px;
color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0 16px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
thead th{background:#f3f3f3}
.note{color:#555;font-size:13px;max-width:1000px}
img{max-width:100%;border:1px solid #eee;margin:4px 0}
.curves img{max-width:420px;margin-right:12px}
"""


def write_index_html(
    path: Path, metrics: Mapping[str, Any], labels: Mapping[str, str],
    slide_rows: Sequence[Mapping[str, Any]], c17_details: Mapping[str, Mapping[str, Any]],
    slide_figs: Sequence[Mapping[str, str]], curve_figs: Mapping[str, str],
    training: Mapping[str, Mapping[str, Any]],
) -> None:
    """The one static page a reader opens (reports/index.html); image links are relative."""
    ev = metrics["evaluation"]
    esc = html.escape
    methods = [mm for mm in TABLE_ORDER if mm in metrics["patch"]]
    ran = [mm for mm in methods if metrics["patch"][mm].get("status") == "ok"]
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<title>multistage-wsi evaluation</title>"
        f"<style>{_CSS}</style></head><body>",
        "<h1>multistage-wsi — evaluation report</h1>",
        f"<p class=\"note\">Split <b>{esc(str(ev['split']))}</b>: {ev['n_slides']} slides, "
        f"{ev['n_patients']} patients; tumor threshold {ev['threshold']:g}; seed {ev['seed']}. "
        "Tiles not predicted by a method (off its canvas) count as predicted normal.</p>",
    ]
    if "frozen" in ran:
        parts.append(f"<p class=\"note\">Frozen-feature baseline extractor: "
                     f"<b>{esc(str(ev.get('frozen_extractor') or 'unknown'))}</b>.</p>")

    # Table 1
    rows = []
    for mm in methods:
        pm = metrics["patch"][mm]
        if pm.get("status") != "ok":
            rows.append([labels.get(mm, mm), "not run", "not run", "", "", "", "", ""])
            continue
        rows.append([labels.get(mm, mm), fmt(pm["accuracy"], True), fmt(pm["pr_auc"], True),
                     fmt(pm["average_precision"], True), fmt(pm["roc_auc"], True),
                     pm["n_tumor"], pm["n_normal"], pm["n_unpredicted"]])
    parts += [
        "<h2>Table 1 — patch classification (tumor vs normal tiles, nolabel excluded)</h2>",
        _table(["Method", "Accuracy (%)", "PR-AUC (%)", "Average precision (%)", "ROC-AUC (%)",
                "tumor tiles", "normal tiles", "unpredicted"], rows),
        "<p class=\"note\">PR-AUC: trapezoidal area under the precision-recall curve (the "
        "paper's metric); average precision: step-wise (sklearn). Single-class splits give "
        "n/a.</p>",
    ]
    if curve_figs:
        parts.append("<div class=\"curves\">" + "".join(
            f"<img src=\"{esc(v)}\" alt=\"{esc(k)} curves\">" for k, v in curve_figs.items())
            + "</div><p class=\"note\">Curve data: curves/pr.csv, curves/roc.csv.</p>")

    # tumor points
    tp_rows = [[labels.get(mm, mm), fmt(metrics["tumor_points"][mm]["mean_per_slide"]),
                metrics["tumor_points"][mm]["total"], metrics["tumor_points"][mm]["max_per_slide"]]
               for mm in ran]
    parts += ["<h2>Tumor points</h2>",
              "<p class=\"note\">Connected groups (8-neighbourhood on the tile grid) of tiles "
              "predicted tumor that touch no tile with annotated tumor — isolated false spots a "
              "pathologist would still have to inspect (paper §4.2.1). Lower is better.</p>",
              _table(["Method", "mean per slide", "total", "max on a slide"], tp_rows)]
    slides = sorted({r["slide_id"] for r in slide_rows})
    per = {(r["slide_id"], r["method"]): r for r in slide_rows}
    parts.append(_table(["Slide"] + [labels.get(mm, mm) for mm in ran],
                        [[s] + [per[(s, mm)]["tumor_points"] for mm in ran] for s in slides]))

    # CAMELYON16
    c16_rows = []
    for mm in ran:
        c = metrics["camelyon16"][mm]
        if "froc" not in c:
            c16_rows.append([labels.get(mm, mm), c.get("status", "n/a")] + [""] * 8)
            continue
        c16_rows.append([labels.get(mm, mm), fmt(c["slide_auc_max_prob"], True),
                         fmt(c["slide_auc_area"], True), fmt(c["froc"], digits=3)]
                        + [fmt(c[k], digits=3) for k in ("fp_0_25", "fp_0_5", "fp_1", "fp_2",
                                                          "fp_4", "fp_8")])
    any16 = next((metrics["camelyon16"][mm] for mm in ran if "froc" in metrics["camelyon16"][mm]),
                 None)
    parts += ["<h2>CAMELYON16 protocol</h2>",
              "<p class=\"note\">Slide AUC: ROC-AUC of a per-slide score (max tile probability; "
              "predicted tumor area in mm²) against 'slide has annotated tumor'. FROC: official "
              "lesion-level protocol (evaluation mask dilated 37.5 µm and hole-filled, ITC "
              "lesions &lt; 275 µm ignored; one detection per predicted tumor component at its "
              "most probable tile); score = mean sensitivity at 1/4..8 false positives per "
              "slide." + (f" {any16['n_tumor_slides']} of {any16['n_slides']} slides have "
                          f"tumor; {any16['n_lesions']} non-ITC lesions, {any16['n_itc_lesions']}"
                          " ITC." if any16 else "") + "</p>",
              _table(["Method", "slide AUC, max prob (%)", "slide AUC, area (%)", "FROC",
                      "sens @1/4 FP", "@1/2", "@1", "@2", "@4", "@8"], c16_rows)]

    # CAMELYON17
    c17_rows = []
    for mm in ran:
        c = metrics["camelyon17"][mm]
        sp, al = c.get("evaluated_split", {}), c.get("all_splits", {})
        c17_rows.append([labels.get(mm, mm), fmt(sp.get("kappa"), digits=3),
                         fmt(sp.get("stage_accuracy"), True), fmt(sp.get("slide_class_accuracy"),
                                                                  True), sp.get("n_patients", ""),
                         fmt(al.get("kappa"), digits=3) if "kappa" in al else al.get("status",
                                                                                     "n/a"),
                         al.get("n_patients", "")])
    parts += ["<h2>CAMELYON17 protocol (patient pN-stage)</h2>",
              f"<p class=\"note\">Truth: {esc(str(ev.get('camelyon17_truth', '')))}. Predicted "
              "slide class from the largest predicted lesion on the tile grid (macro &gt; 2 mm, "
              "micro &gt; 0.2 mm, else ITC), pN-stage from the patient's slides, "
              "quadratic-weighted Cohen kappa. 'All splits' <b>includes training data</b> and is "
              "shown only so the score is not degenerate on a small test split. Submission "
              "files: camelyon17/&lt;method&gt;_submission.csv (reference: "
              "camelyon17/reference.csv).</p>",
              _table(["Method", f"kappa ({ev['split']})", "stage accuracy (%)",
                      "slide class accuracy (%)", "patients", "kappa (all splits, includes "
                      "training data)", "patients (all)"], c17_rows)]
    if c17_details:
        first = next(iter(c17_details.values()))
        pats = sorted(first["patient_true"])
        parts.append(_table(["Patient", "truth"] + [labels.get(mm, mm) for mm in c17_details],
                            [[p, first["patient_true"][p]]
                             + [c17_details[mm]["patient_pred"][p] for mm in c17_details]
                             for p in pats]))
        parts.append(_table(
            ["Slide", "truth"] + [labels.get(mm, mm) for mm in c17_details],
            [[s, first["slide_true"][s]] + [c17_details[mm]["slide_pred"][s]
                                            for mm in c17_details]
             for s in sorted(first["slide_true"])]))

    # training
    if training:
        parts.append("<h2>Training</h2>")
        for name, d in training.items():
            parts.append(f"<h3>{esc(name)}</h3>")
            parts.append(_table(["metric", "value"], [[k, fmt(v) if isinstance(v, float) else v]
                                                       for k, v in d.items()]))

    # figures
    parts += ["<h2>Prediction maps</h2>",
              "<p class=\"note\">Left to right: slide, ground truth, then each method (red "
              "tumor, gray normal, purple nolabel, white background). Below each: tumor "
              "probability heat maps with the annotated tumor tiles outlined.</p>"]
    for f in slide_figs:
        parts.append(f"<h3>{esc(f['slide_id'])}</h3>"
                     f"<img src=\"{esc(f['map'])}\" alt=\"{esc(f['slide_id'])} maps\"><br>"
                     f"<img src=\"{esc(f['heatmap'])}\" alt=\"{esc(f['slide_id'])} heat map\">")
    parts.append("<p class=\"note\">Metrics: metrics.json; per slide and method: "
                 "evaluate_slides.csv.</p></body></html>\n")
    write_text_atomic(path, "\n".join(parts))
