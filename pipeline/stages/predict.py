"""Command `predict`: tumor heatmaps, regions and summaries for new slides.

For slides that are not in the manifest and need no annotation: tile -> features -> U-Net with
the trained models, loaded once for the whole batch. Per slide, DIR/<slide_stem>/ gets

  <stem>.heatmap.h5     tumor_prob (rows, cols) float32 on the tile grid, NaN off-tissue; coords
                        (N, 2) level-0 x, y; grid (N, 2) row, col; tile_prob (N,); attrs mpp,
                        tile_size_px_level0, tile_mpp, method, model sha256s, threshold, ...
  <stem>.heatmap.png    the heatmap over the slide thumbnail, predicted regions outlined
  <stem>.tumor.geojson  predicted tumor regions for QuPath (level-0 px, class "Tumor")
  <stem>.tumor.xml      the same for ASAP (CAMELYON16 layout: tumor `_0`, holes `_2`)
  <stem>.summary.json   tumor area, lesions, largest lesion diameter, CAMELYON17 slide class,
                        ... — written LAST: a slide folder is complete only when it exists.

Regions are the 8-connected components of tiles with prob >= evaluate.threshold (as in the
CAMELYON evaluation), outlined exactly on tile corners (pipeline/vectorize.py), so our own label
stage rasterises the exported polygons back to exactly the predicted tiles.

Methods: auto = E2E (models/e2e_extractor.pt + e2e_unet.pt) when both exist, else Separate
(extractor.pt + unet.pt), else the patch classifier alone (extractor.pt, its own tumor_prob).
The U-Net uses the params' featuremap settings; a slide whose tiles would fall off the centered
canvas is predicted with mode `full` instead (the U-Net is fully convolutional), with a warning.

A rerun skips slides whose summary is current (same slide path, method, model sha256s and
params); others are redone. Work files (the tile index) live in a temporary folder in DIR.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import typer
from scipy import ndimage as ndi

from pipeline.annotations import Polygon, write_asap_xml, write_qupath_geojson
from pipeline.camelyon import slide_class_from_mask
from pipeline.errors import PipelineError
from pipeline.io import (
    atomic_h5,
    atomic_path,
    remove_stale_temps,
    sha256_file,
    write_json_atomic,
)
from pipeline.log import get_logger, progress
from pipeline.models import PatchClassifier, load_extractor, load_unet
from pipeline.params import Params, TileParams, load_params
from pipeline.paths import Paths
from pipeline.runtime import pick_device
from pipeline.schema import COORDS, GRID, TUMOR_PROB
from pipeline.segment import predict_tiles, slide_layouts
from pipeline.slide import Slide, tile_geometry_for
from pipeline.stages.extract_features import infer_slide
from pipeline.stages.tile import tile_slide
from pipeline.tileindex import TileIndex, read_tile_index
from pipeline.unet import UNet
from pipeline.vectorize import GridPolygon, asap_exclusions, mask_polygons, to_level0

log = get_logger("pipeline.predict")

METHODS = ("auto", "e2e", "separate", "classifier")
ON_ERROR = ("fail", "skip")
# method -> (extractor checkpoint, U-Net checkpoint or None) under the models folder
CHECKPOINTS: dict[str, tuple[str, str | None]] = {
    "e2e": ("e2e_extractor.pt", "e2e_unet.pt"),
    "separate": ("extractor.pt", "unet.pt"),
    "classifier": ("extractor.pt", None),
}
# Bumped when the output files change meaning: older summaries are then not current.
OUTPUT_VERSION = 1
TILE_PROB = "tile_prob"  # per-tile probability in the heatmap file (N,), tile-index order
THUMB_MAX_PX = 1600  # longest side of the overlay's slide thumbnail
HEATMAP_ALPHA = 0.45
FAILURES_CSV = "failures.csv"
WORK_PREFIX = ".work-"  # DIR/.work-<stem>-XXXX: the slide's tile index while it is predicted


class PredictError(PipelineError):
    """predict cannot go on (bad arguments, missing models); one line naming the cause."""


# -- models ------------------------------------------------------------------------------------


@dataclass
class PredictModels:
    """The models of one method, on `device`, with the checkpoints' sha256."""

    method: str
    extractor: PatchClassifier
    unet: UNet | None
    checkpoints: dict[str, Path]  # "extractor" / "unet" -> file
    sha256: dict[str, str]  # "extractor" / "unet" -> sha256 of the file
    metas: dict[str, dict]
    device: torch.device


def resolve_method(models_dir: Path, method: str) -> str:
    """The concrete method for `method` ("auto": the best whose checkpoints all exist)."""
    if method not in METHODS:
        raise PredictError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "auto":
        return method
    for m in ("e2e", "separate", "classifier"):
        if all((models_dir / f).is_file() for f in CHECKPOINTS[m] if f is not None):
            return m
    raise PredictError(
        f"{models_dir}: no models found (need e2e_extractor.pt + e2e_unet.pt, extractor.pt + "
        "unet.pt, or extractor.pt; train them or pass --models)"
    )


def load_models(models_dir: str | Path, method: str = "auto",
                device: torch.device | None = None) -> PredictModels:
    """Load the checkpoints of `method` (resolved from "auto") once, in eval mode on `device`."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise PredictError(f"{models_dir}: models folder not found (pass --models)")
    concrete = resolve_method(models_dir, method)
    device = device or pick_device()
    ext_name, unet_name = CHECKPOINTS[concrete]
    files = {"extractor": models_dir / ext_name}
    if unet_name is not None:
        files["unet"] = models_dir / unet_name
    extractor, ext_meta = load_extractor(files["extractor"])  # ModelError names a missing file
    metas = {"extractor": ext_meta}
    unet = None
    if "unet" in files:
        unet, metas["unet"] = load_unet(files["unet"])
        if unet.in_channels != extractor.feature_dim:
            raise PredictError(
                f"{files['unet']}: U-Net takes {unet.in_channels} channels but "
                f"{files['extractor']} gives {extractor.feature_dim}-d features"
            )
        unet.to(device).eval()
    extractor.to(device).eval()
    sha = {k: sha256_file(p) for k, p in files.items()}
    how = "chosen by --method" if method != "auto" else "auto: best method with all checkpoints"
    log.info("predict: method %s (%s): read %s on %s", concrete, how,
             ", ".join(str(p) for p in files.values()), device)
    return PredictModels(concrete, extractor, unet, files, sha, metas, device)


def _training_mismatches(models: PredictModels, params: Params) -> list[str]:
    """Params that differ from those the checkpoints were trained with (from their meta)."""
    out = []
    checks = {"extractor": (("tile", "size_px"), ("tile", "mpp"), ("extractor", "crop_px")),
              "unet": (("featuremap", "size"), ("featuremap", "mode"), ("featuremap", "per_lump"))}
    for kind, keys in checks.items():
        meta = models.metas.get(kind)
        if not meta or "params_json" not in meta:
            continue
        try:
            trained = json.loads(meta["params_json"])
        except (TypeError, ValueError):
            continue
        for section, key in keys:
            want = trained.get(section, {}).get(key)
            have = getattr(getattr(params, section), key)
            if want is not None and want != have:
                out.append(f"{section}.{key} is {have!r} but {models.checkpoints[kind].name} "
                           f"was trained with {want!r}")
    return out


# -- one slide -----------------------------------------------------------------------------------


@dataclass
class SlideOutputs:
    """The files of one slide under DIR/<stem>/."""

    folder: Path
    stem: str

    def _f(self, suffix: str) -> Path:
        return self.folder / f"{self.stem}{suffix}"

    @property
    def heatmap_h5(self) -> Path:
        return self._f(".heatmap.h5")

    @property
    def heatmap_png(self) -> Path:
        return self._f(".heatmap.png")

    @property
    def geojson(self) -> Path:
        return self._f(".tumor.geojson")

    @property
    def asap_xml(self) -> Path:
        return self._f(".tumor.xml")

    @property
    def summary(self) -> Path:
        return self._f(".summary.json")

    def files(self) -> list[Path]:
        return [self.heatmap_h5, self.heatmap_png, self.geojson, self.asap_xml, self.summary]


@dataclass
class TileProbs:
    """Per-tile tumor probability of one slide and how it was obtained."""

    prob: np.ndarray  # (N,) float32, NaN for tiles no map covered (never with the mode switch)
    featuremap_mode: str | None  # None for the classifier
    warnings: list[str] = field(default_factory=list)


def predict_tile_probs(models: PredictModels, index: TileIndex, params: Params,
                       workers: int) -> TileProbs:
    """Tumor probability of every tile of a tiled slide: the extractor's own softmax
    (classifier) or the U-Net on the slide's feature map(s)."""
    feats, probs = infer_slide(models.extractor, index.path, params.extractor.crop_px,
                               models.device, workers, params.extractor.amp, None,
                               desc=index.slide_id)
    if models.unet is None:
        return TileProbs(probs, None)
    # The layout must fit the network actually loaded (canvas divisible by 2**its depth).
    p = params.model_copy(update={"unet": params.unet.model_copy(
        update={"depth": models.unet.depth})})
    layouts = slide_layouts(index.grid, index.lump_id, p)
    warnings = []
    n_out = sum(lay.n_outside for lay in layouts)
    if n_out:
        msg = (f"{n_out} of {index.n} tiles fall off the {p.featuremap.size}x{p.featuremap.size} "
               f"centered canvas; predicting with featuremap.mode=full instead")
        log.warning("slide %s: %s", index.slide_id, msg)
        warnings.append(msg)
        p = p.model_copy(update={"featuremap": p.featuremap.model_copy(update={"mode": "full"})})
        layouts = slide_layouts(index.grid, index.lump_id, p)
    prob = predict_tiles(models.unet, feats, layouts, models.device)
    return TileProbs(prob, p.featuremap.mode, warnings)


def _params_key(params: Params, mpp: float | None) -> str:
    """What makes a slide's outputs current besides the slide and the models."""
    blob = json.dumps({"sections": params.section_json("tile", "featuremap", "evaluate"),
                       "crop_px": params.extractor.crop_px, "mpp": mpp,
                       "version": OUTPUT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _is_current(out: SlideOutputs, slide_path: Path, models: PredictModels, key: str) -> bool:
    if not all(f.is_file() for f in out.files()):
        return False
    try:
        s = json.loads(out.summary.read_text())
    except (OSError, ValueError):
        return False
    return (s.get("output_version") == OUTPUT_VERSION and s.get("slide_path") == str(slide_path)
            and s.get("method") == models.method and s.get("model_sha256") == models.sha256
            and s.get("params_key") == key)


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _lesions(regions: np.ndarray, heat: np.ndarray, polys: Sequence[GridPolygon], pitch_px: float,
             pitch_um: float, origin: np.ndarray) -> list[dict]:
    """Per 8-connected region: tiles, area, probability max / mean, diameter, centre."""
    out = []
    n_parts = np.bincount([p.region for p in polys], minlength=int(regions.max(initial=0)) + 1)
    for k, sl in enumerate(ndi.find_objects(regions), start=1):
        if sl is None:
            continue
        own = regions[sl] == k
        vals = heat[sl][own]
        rows, cols = np.nonzero(own)
        _, diam_px = slide_class_from_mask(own, pitch_px)
        centre = origin + (np.array([cols.mean() + sl[1].start, rows.mean() + sl[0].start])
                           + 0.5) * pitch_px
        out.append({
            "id": k,
            "n_tiles": int(own.sum()),
            "n_parts": int(n_parts[k]),
            "area_um2": _finite_or_none(own.sum() * pitch_um**2),
            "probability_max": float(vals.max()),
            "probability_mean": float(vals.mean()),
            "diameter_um": _finite_or_none(diam_px / pitch_px * pitch_um),
            "centre_xy_px_level0": [round(float(c), 1) for c in centre],
        })
    return out


def _feature_properties(poly: GridPolygon, lesion: dict) -> dict:
    """GeoJSON properties of one polygon: its region's numbers (top level for scripts, and as
    QuPath `measurements`, which QuPath shows in its measurement table)."""
    name = f"Tumor {lesion['id']}"
    if lesion["n_parts"] > 1:
        name += f" (part {poly.part})"
    numbers = {"probability_max": lesion["probability_max"],
               "probability_mean": lesion["probability_mean"],
               "area_um2": lesion["area_um2"], "n_tiles": lesion["n_tiles"]}
    return {"name": name, "id": lesion["id"], "part": poly.part, "n_parts": lesion["n_parts"],
            **numbers,
            "measurements": {k: v for k, v in numbers.items() if v is not None}}


def write_regions(
    geojson_path: Path, asap_xml_path: Path, tumor: np.ndarray, heat: np.ndarray,
    pitch_px_level0: float, pitch_um: float, origin_xy_px_level0: np.ndarray,
) -> tuple[list[dict], list[Polygon]]:
    """Write the predicted tumor tiles (`tumor` (rows, cols) bool on the tile grid) as QuPath
    GeoJSON and ASAP XML, outlined exactly on tile corners. `heat` gives the per-region
    probabilities. Returns (per-region dicts, the level-0 polygons written)."""
    polys, regions = mask_polygons(tumor)
    lesions = _lesions(regions, heat, polys, pitch_px_level0, pitch_um, origin_xy_px_level0)
    by_id = {les["id"]: les for les in lesions}
    shapes = [Polygon(to_level0(p.exterior, pitch_px_level0, origin_xy_px_level0),
                      tuple(to_level0(h, pitch_px_level0, origin_xy_px_level0) for h in p.holes))
              for p in polys]
    write_qupath_geojson(geojson_path, shapes, "Tumor",
                         [_feature_properties(p, by_id[p.region]) for p in polys])
    # ASAP has no holes: exteriors in `_0`, holes as `_2` exclusions (islands kept, see
    # pipeline.vectorize.asap_exclusions)
    write_asap_xml(asap_xml_path, [s.exterior for s in shapes],
                   [to_level0(r, pitch_px_level0, origin_xy_px_level0)
                    for r in asap_exclusions(polys, tumor)])
    return lesions, shapes


def _write_overlay(path: Path, slide_path: Path, heat: np.ndarray, pitch_px: float,
                   origin: np.ndarray, rings_px: Sequence[np.ndarray], title: str) -> None:
    """The heatmap over the slide thumbnail with region outlines and a colour bar, as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with Slide(slide_path) as slide:
        w, h = slide.dimensions
        rgb, _ = slide.low_res_image(max(1.0, max(w, h) / THUMB_MAX_PX))
    th, tw = rgb.shape[:2]
    fig = Figure(figsize=(tw / 100 + 1.6, th / 100 + 0.7), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(rgb, extent=(0, w, h, 0), interpolation="nearest")
    rows, cols = heat.shape
    im = ax.imshow(np.ma.masked_invalid(heat), cmap="jet", vmin=0.0, vmax=1.0,
                   alpha=HEATMAP_ALPHA, interpolation="nearest",
                   extent=(origin[0], origin[0] + cols * pitch_px,
                           origin[1] + rows * pitch_px, origin[1]))
    for ring in rings_px:
        closed = np.vstack([ring, ring[:1]])
        ax.plot(closed[:, 0], closed[:, 1], color="black", linewidth=1.2)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02, label="tumor probability")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def predict_slide(
    slide_path: Path, out_dir: Path, models: PredictModels, params: Params,
    mpp: float | None = None, workers: int | None = None,
) -> dict:
    """Predict one slide and write its folder (summary last). Returns the summary dict
    (status "predicted" or "current"). On error, this slide's outputs are removed."""
    t0 = time.perf_counter()
    slide_path = Path(slide_path).resolve()
    stem = slide_path.stem
    out = SlideOutputs(out_dir / stem, stem)
    key = _params_key(params, mpp)
    if _is_current(out, slide_path, models, key):
        log.info("slide %s: %s is current, skipped", stem, out.summary)
        return {**json.loads(out.summary.read_text()), "status": "current"}
    out.summary.unlink(missing_ok=True)  # the folder is incomplete from here until rewritten
    # leftovers of a killed run on this slide: temp files of its outputs, its work folder
    remove_stale_temps(out.files())
    for stale in out_dir.glob(f"{WORK_PREFIX}{stem}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        summary = _predict_slide(slide_path, out, models, params, mpp, key, workers)
    except BaseException:
        for f in out.files():
            f.unlink(missing_ok=True)
        if out.folder.is_dir() and not any(out.folder.iterdir()):
            out.folder.rmdir()
        raise
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(out.summary, summary)
    log.info("slide %s: %d tiles, %d tumor tiles in %d lesions (%s) -> %s (%.1f s)", stem,
             summary["n_tiles"], summary["n_tumor_tiles"], summary["n_lesions"],
             summary["camelyon17_class"], out.folder, summary["seconds"])
    return {**summary, "status": "predicted"}


def _predict_slide(slide_path: Path, out: SlideOutputs, models: PredictModels, params: Params,
                   mpp: float | None, key: str, workers: int | None) -> dict:
    stem = out.stem
    warnings: list[str] = []
    # --mpp reaches the tile stage as tile.fallback_mpp: it applies to slides without mpp
    # metadata; no pixel cache for a one-off pass.
    tile_update: dict[str, Any] = {"cache_pixels": False}
    if mpp is not None:
        tile_update["fallback_mpp"] = mpp
    tparams = params.model_copy(update={"tile": params.tile.model_copy(update=tile_update)})
    out.folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{WORK_PREFIX}{stem}-", dir=out.folder.parent) as work:
        paths = Paths(root=Path(work))
        tile_slide(stem, slide_path, tparams, paths)
        index = read_tile_index(paths.tile_file(stem))
        n_workers = params.extractor.workers if workers is None else workers
        probs = predict_tile_probs(models, index, params, n_workers)
    geom = index.geometry
    warnings += probs.warnings
    if geom.mpp_source == "fallback_mpp":
        warnings.append(f"no usable mpp in the slide metadata; assumed {geom.mpp:g} um/px "
                        f"({'--mpp' if mpp is not None else 'tile.fallback_mpp'})")
    elif geom.mpp_source == "unknown":
        warnings.append("no mpp in the slide metadata and no --mpp: tiles read at "
                        f"level {geom.level}, physical sizes unknown")
    elif mpp is not None and abs(geom.mpp - mpp) > 0.02 * mpp:
        msg = (f"slide metadata says {geom.mpp:g} um/px; --mpp {mpp:g} applies only to slides "
               "without mpp metadata, so the metadata was used")
        log.warning("slide %s: %s", stem, msg)
        warnings.append(msg)

    # heatmap on the tile grid
    pitch_px = float(geom.tile_size_px_level0)
    pitch_um = pitch_px * geom.mpp if math.isfinite(geom.mpp) else math.nan
    rows, cols = int(index.attrs["grid_rows"]), int(index.attrs["grid_cols"])
    grid = index.grid.astype(np.int64)
    heat = np.full((rows, cols), np.nan, np.float32)
    heat[grid[:, 0], grid[:, 1]] = probs.prob
    # level-0 position of grid vertex (0, 0): the tile stage puts it at (0, 0); derived from
    # the coords so that polygon corners are the tiles' own corners
    origin = np.rint(np.median(index.coords - np.rint(grid[:, ::-1] * pitch_px), axis=0))
    threshold = float(params.evaluate.threshold)
    with np.errstate(invalid="ignore"):
        tumor = heat >= threshold  # NaN (off-tissue, unpredicted) is never tumor

    lesions, shapes = write_regions(out.geojson, out.asap_xml, tumor, heat, pitch_px, pitch_um,
                                    origin)

    n_tumor = int(tumor.sum())
    if math.isfinite(pitch_um):
        slide_class, largest_um = slide_class_from_mask(tumor, pitch_um)
        area_mm2: float | None = n_tumor * pitch_um**2 / 1e6
    else:
        slide_class, largest_um, area_mm2 = None, None, None
        warnings.append("mpp unknown: no tumor area, lesion diameter or CAMELYON17 class")
    largest_px = slide_class_from_mask(tumor, pitch_px)[1] if n_tumor else 0.0

    with atomic_h5(out.heatmap_h5) as f:
        f.create_dataset(TUMOR_PROB, data=heat, compression="gzip")
        f.create_dataset(COORDS, data=index.coords.astype(np.int64))
        f.create_dataset(GRID, data=index.grid.astype(np.int32))
        f.create_dataset(TILE_PROB, data=np.asarray(probs.prob, np.float32))
        attrs = {
            "slide_id": stem, "slide_path": str(slide_path), "method": models.method,
            "extractor_sha256": models.sha256["extractor"],
            "unet_sha256": models.sha256.get("unet", ""),
            "mpp": float(geom.mpp), "mpp_source": geom.mpp_source,
            "tile_size_px_level0": pitch_px, "tile_size_px": int(geom.tile_size_px),
            "tile_mpp": float(geom.tile_mpp), "level": int(geom.level),
            "slide_width_px_level0": int(index.attrs["slide_width_px_level0"]),
            "slide_height_px_level0": int(index.attrs["slide_height_px_level0"]),
            "origin_xy_px_level0": origin.astype(np.float64), "threshold": threshold,
            "featuremap_mode": probs.featuremap_mode or "", "params_key": key,
        }
        for k, v in attrs.items():
            f.attrs[k] = v
    title = (f"{stem}: {models.method}, {len(lesions)} region(s) with p >= {threshold:g}"
             + (f", {slide_class}" if slide_class else ""))
    rings = [s.exterior for s in shapes] + [h for s in shapes for h in s.holes]
    _write_overlay(out.heatmap_png, slide_path, heat, pitch_px, origin, rings, title)

    n_unpredicted = int(np.isnan(probs.prob).sum())
    return {
        "output_version": OUTPUT_VERSION,
        "slide": stem,
        "slide_path": str(slide_path),
        "method": models.method,
        "model_sha256": models.sha256,
        "params_key": key,
        "mpp": _finite_or_none(geom.mpp),
        "mpp_source": geom.mpp_source,
        "tile_mpp": _finite_or_none(geom.tile_mpp),
        "tile_size_px_level0": pitch_px,
        "pitch_um": _finite_or_none(pitch_um),
        "featuremap_mode": probs.featuremap_mode,
        "threshold": threshold,
        "n_tiles": int(index.n),
        "n_unpredicted": n_unpredicted,
        "n_tumor_tiles": n_tumor,
        "max_tumor_prob": _finite_or_none(float(np.nanmax(probs.prob)))
        if n_unpredicted < index.n else None,
        "tumor_area_mm2": area_mm2,
        "n_lesions": len(lesions),
        "largest_lesion_diameter_um": largest_um,
        "largest_lesion_diameter_px_level0": float(largest_px),
        "camelyon17_class": slide_class,
        "lesions": lesions,
        "outputs": {k: getattr(out, k).name
                    for k in ("heatmap_h5", "heatmap_png", "geojson", "asap_xml")},
        "warnings": warnings,
    }


# -- the command ---------------------------------------------------------------------------------


def _one_line(exc: BaseException, slide_path: Path) -> str:
    """A one-line message naming the slide: errors re-raised from DataLoader workers carry a
    traceback in their text; keep its last line (the original message)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    msg = lines[-1] if lines else type(exc).__name__
    name = type(exc).__name__
    for prefix in (f"{type(exc).__module__}.{name}: ", f"{name}: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if not isinstance(exc, PipelineError):
        msg = f"{name}: {msg}"
    return msg if str(slide_path) in msg else f"{slide_path}: {msg}"


def _check_slide(path: Path, tp: TileParams) -> None:
    """Open the slide once (cheap: header only) so that a bad path or implausible mpp metadata
    fails before any work or output."""
    with Slide(path) as slide:
        tile_geometry_for(slide, tp)


def run(
    params: Params,
    paths: Paths,
    slides: Sequence[str | Path],
    out_dir: str | Path,
    models_dir: str | Path | None = None,
    method: str = "auto",
    mpp: float | None = None,
    on_error: str = "fail",
    workers: int | None = None,
) -> dict:
    """Predict every slide into out_dir/<stem>/ with the models in `models_dir` (default
    paths.models), loaded once. on_error="fail" raises the first slide's error (one line,
    naming the slide); "skip" logs it, lists it in out_dir/failures.csv (slide, error) and
    completes the other slides. Returns a summary dict."""
    t0 = time.perf_counter()
    if on_error not in ON_ERROR:
        raise PredictError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if method not in METHODS:
        raise PredictError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise PredictError(f"--mpp must be a positive number of um per level-0 pixel, got {mpp}")
    if not slides:
        raise PredictError("predict: no slides given")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PredictError(f"{out_dir}: --out exists and is not a folder")
    slide_paths = [Path(s).resolve() for s in slides]
    seen: dict[str, Path] = {}
    for p in slide_paths:
        if p.stem in seen and seen[p.stem] != p:
            raise PredictError(f"{p}: same name as {seen[p.stem]}; their outputs would share "
                               f"{out_dir / p.stem} (predict them into different --out folders)")
        seen[p.stem] = p
    slide_paths = list(dict.fromkeys(slide_paths))

    failed: dict[str, str] = {}

    def _fail(p: Path, exc: BaseException) -> None:
        if on_error == "fail":
            if isinstance(exc, PipelineError):
                raise PredictError(_one_line(exc, p)) from exc
            raise exc  # a bug or an unexpected library error: keep the traceback
        msg = _one_line(exc, p)
        log.error("slide %s failed: %s", p, msg, exc_info=not isinstance(exc, PipelineError))
        failed[str(p)] = msg

    todo = []
    tp = params.tile if mpp is None else params.tile.model_copy(update={"fallback_mpp": mpp})
    for p in slide_paths:  # bad paths and metadata fail before the models load
        try:
            _check_slide(p, tp)
            todo.append(p)
        except Exception as exc:
            _fail(p, exc)
    models = load_models(models_dir if models_dir is not None else paths.models, method)
    for msg in _training_mismatches(models, params):
        log.warning("predict: %s", msg)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in progress(todo, desc=f"predict/{models.method}", unit="slide"):
        try:
            s = predict_slide(p, out_dir, models, params, mpp, workers)
        except Exception as exc:
            _fail(p, exc)
            continue
        rows.append({k: s.get(k) for k in ("slide", "status", "n_tiles", "n_tumor_tiles",
                                           "n_lesions", "tumor_area_mm2", "camelyon17_class",
                                           "seconds")})
    failures_csv = out_dir / FAILURES_CSV
    if on_error == "skip":
        with atomic_path(failures_csv) as tmp:
            pd.DataFrame([{"slide": s, "error": m} for s, m in failed.items()],
                         columns=["slide", "error"]).to_csv(tmp, index=False)
        if failed:
            log.warning("predict: %d slide(s) failed, listed in %s", len(failed), failures_csv)
    log.info("predict: wrote %d slide folder(s) under %s", len(rows), out_dir)
    return {
        "method": models.method,
        "model_sha256": models.sha256,
        "out_dir": str(out_dir),
        "n_slides": len(slide_paths),
        "n_predicted": sum(r["status"] == "predicted" for r in rows),
        "n_current": sum(r["status"] == "current" for r in rows),
        "n_failed": len(failed),
        "failed": failed,
        "failures_csv": str(failures_csv) if on_error == "skip" else None,
        "slides": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def cli(
    slides: list[Path] = typer.Argument(..., help="slide files (any format OpenSlide reads)"),
    out: Path = typer.Option(..., "--out", help="output folder; one subfolder per slide"),
    models: Path = typer.Option(Path("models"), "--models", help="folder with the checkpoints"),
    mpp: float | None = typer.Option(
        None, "--mpp", help="um per level-0 pixel for slides without mpp metadata "
        "(otherwise tile.fallback_mpp / tile.fallback_level apply, with a warning)"),
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
    on_error: str = typer.Option(
        "fail", "--on-error", help="fail: stop at the first bad slide; skip: list it in "
        "OUT/failures.csv and predict the others"),
    method: str = typer.Option(
        "auto", "--method", help="auto (e2e, else separate, else classifier) | e2e | separate | "
        "classifier"),
) -> None:
    """Predict tumor on new slides (no manifest, no annotation): heatmap (PNG + HDF5), tumor
    regions as QuPath GeoJSON and ASAP XML, and a JSON summary per slide.

    Reads the slides, the checkpoints in --models and params tile.*, extractor.crop_px/workers/
    amp, featuremap.*, evaluate.threshold. Writes OUT/<slide_stem>/<stem>.{heatmap.h5,
    heatmap.png, tumor.geojson, tumor.xml, summary.json} (summary last: a folder is complete when
    it exists; a rerun skips current ones) and, with --on-error skip, OUT/failures.csv.
    """
    params = load_params(params_file)
    s = run(params, Paths(), slides, out, models, method, mpp, on_error)
    typer.echo(f"predict ({s['method']}): {s['n_predicted']} predicted, {s['n_current']} current, "
               f"{s['n_failed']} failed -> {s['out_dir']}"
               + (f" (see {s['failures_csv']})" if s["n_failed"] else ""))

