"""Figures and the static HTML report of the evaluate stage (matplotlib Agg, no JS, no CDN).

Figure 5 style maps (paper): slide thumbnail | ground truth | one panel per method, tiles
coloured red = tumor, gray = normal, purple = nolabel, white = background; probability heat maps
with the annotated tumor outlined; PR / ROC curves of all methods. `write_index_html` puts the
metric tables (paper Table 1 form first), CAMELYON16/17 tables, training metrics and the images
(relative links) on one page that opens offline.

The page is a Jinja2 template (pipeline/templates/index.html.j2, package data): the layout lives
there, the functions here only turn metrics into table cells. The figures stay hand-made
matplotlib: they are paper-specific panels no plotting template provides.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
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
    if ax.get_legend_handles_labels()[0]:  # an empty table (no curve) gets no legend
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


def _table1_rows(metrics: Mapping[str, Any], methods: Sequence[str],
                 labels: Mapping[str, str]) -> list[list[Any]]:
    rows = []
    for mm in methods:
        pm = metrics["patch"][mm]
        if pm.get("status") != "ok":
            rows.append([labels.get(mm, mm), "not run", "not run", "", "", "", "", ""])
            continue
        rows.append([labels.get(mm, mm), fmt(pm["accuracy"], True), fmt(pm["pr_auc"], True),
                     fmt(pm["average_precision"], True), fmt(pm["roc_auc"], True),
                     pm["n_tumor"], pm["n_normal"], pm["n_unpredicted"]])
    return rows


def _tumor_point_tables(metrics: Mapping[str, Any], ran: Sequence[str], labels: Mapping[str, str],
                        slide_rows: Sequence[Mapping[str, Any]]) -> tuple[list, dict[str, list]]:
    """(per-method table rows, per-slide table {header, rows})."""
    tp = metrics["tumor_points"]
    rows = [[labels.get(mm, mm), fmt(tp[mm]["mean_per_slide"]), tp[mm]["total"],
             tp[mm]["max_per_slide"]] for mm in ran]
    per = {(r["slide_id"], r["method"]): r for r in slide_rows}
    slides = sorted({r["slide_id"] for r in slide_rows})
    return rows, {"header": ["Slide"] + [labels.get(mm, mm) for mm in ran],
                  "rows": [[s] + [per[(s, mm)]["tumor_points"] for mm in ran] for s in slides]}


def _camelyon16_rows(metrics: Mapping[str, Any], ran: Sequence[str],
                     labels: Mapping[str, str]) -> tuple[list[list[Any]], Mapping | None]:
    """(table rows, the lesion counts of the first method scored, for the note)."""
    rows = []
    for mm in ran:
        c = metrics["camelyon16"][mm]
        if "froc" not in c:
            rows.append([labels.get(mm, mm), c.get("status", "n/a")] + [""] * 8)
            continue
        rows.append([labels.get(mm, mm), fmt(c["slide_auc_max_prob"], True),
                     fmt(c["slide_auc_area"], True), fmt(c["froc"], digits=3)]
                    + [fmt(c[k], digits=3) for k in ("fp_0_25", "fp_0_5", "fp_1", "fp_2",
                                                     "fp_4", "fp_8")])
    counts = next((metrics["camelyon16"][mm] for mm in ran
                   if "froc" in metrics["camelyon16"][mm]), None)
    return rows, counts


def _kappa_cell(d: Mapping[str, Any]) -> str:
    return fmt(d.get("kappa"), digits=3) if "kappa" in d else str(d.get("status", "n/a"))


def _camelyon17_rows(metrics: Mapping[str, Any], ran: Sequence[str],
                     labels: Mapping[str, str]) -> list[list[Any]]:
    rows = []
    for mm in ran:
        c = metrics["camelyon17"][mm]
        sp, al = c.get("evaluated_split", {}), c.get("all_splits", {})
        rows.append([labels.get(mm, mm), fmt(sp.get("kappa"), digits=3),
                     fmt(sp.get("stage_accuracy"), True), fmt(sp.get("slide_class_accuracy"),
                                                              True),
                     sp.get("n_patients", ""), _kappa_cell(al), al.get("n_patients", "")])
    return rows


def _forest_cells(d: Mapping[str, Any]) -> list[str]:
    """kappa, fold mean ± std, folds of one random-forest scope."""
    if "kappa" not in d:
        return [str(d.get("status", "n/a")), "", ""]
    spread = (f"{fmt(d['kappa_fold_mean'], digits=3)} ± {fmt(d['kappa_fold_std'], digits=3)}"
              if d.get("n_folds_scored") else "n/a")
    return [fmt(d["kappa"], digits=3), spread,
            f"{d.get('folds', d['n_folds'])}; {d['n_folds_scored']} scored"]


def _random_forest_rows(metrics: Mapping[str, Any], ran: Sequence[str],
                        labels: Mapping[str, str]) -> list[list[Any]]:
    """Rule-based and random-forest kappa side by side, evaluated split then all splits."""
    rows = []
    for mm in ran:
        c = metrics["camelyon17"][mm]
        rf = c.get("random_forest", {})
        rows.append([labels.get(mm, mm), _kappa_cell(c.get("evaluated_split", c))]
                    + _forest_cells(rf.get("evaluated_split", rf))
                    + [_kappa_cell(c.get("all_splits", c))]
                    + _forest_cells(rf.get("all_splits", rf)))
    return rows


def _camelyon17_detail_tables(c17_details: Mapping[str, Mapping[str, Any]],
                              labels: Mapping[str, str]) -> list[dict[str, list]]:
    """Per patient and per slide: truth and each method's rule-based prediction."""
    if not c17_details:
        return []
    first = next(iter(c17_details.values()))
    names = [labels.get(mm, mm) for mm in c17_details]
    patients = sorted(first["patient_true"])
    slides = sorted(first["slide_true"])
    return [
        {"header": ["Patient", "truth"] + names,
         "rows": [[p, first["patient_true"][p]]
                  + [d["patient_pred"][p] for d in c17_details.values()] for p in patients]},
        {"header": ["Slide", "truth"] + names,
         "rows": [[s, first["slide_true"][s]] + [d["slide_pred"][s] for d in c17_details.values()]
                  for s in slides]},
    ]


def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline", "templates"), autoescape=True,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined)
    return env.get_template("index.html.j2")


def _cells(rows: Sequence[Sequence[Any]]) -> list[list[str]]:
    return [[str(c) for c in r] for r in rows]


def write_index_html(
    path: Path, metrics: Mapping[str, Any], labels: Mapping[str, str],
    slide_rows: Sequence[Mapping[str, Any]], c17_details: Mapping[str, Mapping[str, Any]],
    slide_figs: Sequence[Mapping[str, str]], curve_figs: Mapping[str, str],
    training: Mapping[str, Mapping[str, Any]], rf: Mapping[str, Any] | None = None,
) -> None:
    """The one static page a reader opens (reports/index.html; template
    pipeline/templates/index.html.j2); image links are relative. `rf`: the evaluate.rf params
    (n_estimators, thresholds) named in the random-forest note."""
    ev = metrics["evaluation"]
    methods = [mm for mm in TABLE_ORDER if mm in metrics["patch"]]
    ran = [mm for mm in methods if metrics["patch"][mm].get("status") == "ok"]
    tp_rows, tp_slides = _tumor_point_tables(metrics, ran, labels, slide_rows)
    c16_rows, c16_counts = _camelyon16_rows(metrics, ran, labels)
    text = _template().render(
        ev=ev, threshold=f"{ev['threshold']:g}",
        frozen_extractor=str(ev.get("frozen_extractor") or "unknown") if "frozen" in ran else "",
        table1=_cells(_table1_rows(metrics, methods, labels)), curve_figs=curve_figs,
        tumor_points=_cells(tp_rows),
        tumor_points_slides={"header": tp_slides["header"], "rows": _cells(tp_slides["rows"])},
        camelyon16=_cells(c16_rows), c16_counts=c16_counts,
        camelyon17=_cells(_camelyon17_rows(metrics, ran, labels)),
        camelyon17_details=[{"header": t["header"], "rows": _cells(t["rows"])}
                            for t in _camelyon17_detail_tables(c17_details, labels)],
        random_forest=_cells(_random_forest_rows(metrics, ran, labels)),
        rf={"n_estimators": (rf or {}).get("n_estimators", "?"),
            "thresholds": ", ".join(f"{t:g}" for t in (rf or {}).get("thresholds", ()))},
        training={name: _cells([[k, fmt(v) if isinstance(v, float) else v]
                                for k, v in d.items()]) for name, d in training.items()},
        slide_figs=slide_figs)
    write_text_atomic(path, text)
