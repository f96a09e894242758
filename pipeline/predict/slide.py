"""One slide from tiling to its summary: tile it (in a work folder), predict every tile, lay
the probabilities on the tile grid, write regions, heatmap, overlay, and the summary last.

Regions are the 8-connected components of tiles with prob >= evaluate.threshold (as in the
CAMELYON evaluation), outlined exactly on tile corners.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.camelyon import SLIDE_NEGATIVE, slide_class_from_mask, slide_class_of_diameter
from pipeline.io import remove_stale_temps, write_json_atomic
from pipeline.log import get_logger
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.predict.export import finite_or_none, write_heatmap, write_regions
from pipeline.predict.infer import TileProbs, predict_tile_probs
from pipeline.predict.models import PredictModels
from pipeline.predict.overlay import write_overlay
from pipeline.predict.summary import OUTPUT_VERSION, SlideOutputs, is_current, params_key
from pipeline.slide import TileGeometry
from pipeline.tileindex import TileIndex, grid_origin_px_level0, read_tile_index
from pipeline.tiling import tile_slide

log = get_logger("pipeline.predict")

WORK_PREFIX = ".work-"  # DIR/.work-<stem>-XXXX: the slide's tile index while it is predicted


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
    key = params_key(params, mpp)
    if is_current(out, slide_path, models, key):
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


def _tile_and_infer(slide_path: Path, out: SlideOutputs, models: PredictModels, params: Params,
                    mpp: float | None, workers: int | None) -> tuple[TileIndex, TileProbs]:
    """Tile the slide into a work folder (removed afterwards) and predict every tile.
    --mpp reaches the tiling as tile.fallback_mpp: it applies to slides without mpp metadata;
    no pixel cache for a one-off pass."""
    tile_update: dict[str, Any] = {"cache_pixels": False}
    if mpp is not None:
        tile_update["fallback_mpp"] = mpp
    tparams = params.model_copy(update={"tile": params.tile.model_copy(update=tile_update)})
    out.folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{WORK_PREFIX}{out.stem}-",
                                     dir=out.folder.parent) as work:
        paths = Paths(root=Path(work))
        tile_slide(out.stem, slide_path, tparams, paths, thumbnail=False)  # the overlay is ours
        index = read_tile_index(paths.tile_file(out.stem))
        n_workers = params.extractor.workers if workers is None else workers
        return index, predict_tile_probs(models, index, params, n_workers)


def _mpp_warnings(geom: TileGeometry, mpp: float | None, stem: str) -> list[str]:
    """What the summary says about where the slide's scale came from."""
    if geom.mpp_source == "fallback_mpp":
        return [f"no usable mpp in the slide metadata; assumed {geom.mpp:g} um/px "
                f"({'--mpp' if mpp is not None else 'tile.fallback_mpp'})"]
    if geom.mpp_source == "unknown":
        return ["no mpp in the slide metadata and no --mpp: tiles read at "
                f"level {geom.level}, physical sizes unknown"]
    if mpp is not None and abs(geom.mpp - mpp) > 0.02 * mpp:
        msg = (f"slide metadata says {geom.mpp:g} um/px; --mpp {mpp:g} applies only to slides "
               "without mpp metadata, so the metadata was used")
        log.warning("slide %s: %s", stem, msg)
        return [msg]
    return []


def _heatmap(index: TileIndex, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(heat (rows, cols) float32 on the tile grid, NaN where no tile; level-0 x, y of grid
    vertex (0, 0)). The tile stage puts the vertex at (0, 0); it is derived from the coords so
    that polygon corners are the tiles' own corners."""
    pitch_px = float(index.geometry.tile_size_px_level0)
    rows, cols = int(index.attrs["grid_rows"]), int(index.attrs["grid_cols"])
    grid = index.grid.astype(np.int64)
    heat = np.full((rows, cols), np.nan, np.float32)
    heat[grid[:, 0], grid[:, 1]] = prob
    origin = grid_origin_px_level0(index.coords, grid, pitch_px, whole_px=True)
    return heat, origin


def _predict_slide(slide_path: Path, out: SlideOutputs, models: PredictModels, params: Params,
                   mpp: float | None, key: str, workers: int | None) -> dict:
    index, probs = _tile_and_infer(slide_path, out, models, params, mpp, workers)
    geom = index.geometry
    warnings = probs.warnings + _mpp_warnings(geom, mpp, out.stem)
    pitch_px = float(geom.tile_size_px_level0)
    pitch_um = pitch_px * geom.mpp if math.isfinite(geom.mpp) else math.nan
    heat, origin = _heatmap(index, probs.prob)
    threshold = float(params.evaluate.threshold)
    with np.errstate(invalid="ignore"):
        tumor = heat >= threshold  # NaN (off-tissue, unpredicted) is never tumor
    lesions, shapes = write_regions(out.geojson, out.asap_xml, tumor, heat, pitch_px, pitch_um,
                                    origin)
    n_tumor = int(tumor.sum())
    # the largest lesion's diameter in grid pitches, measured once (at pitch 1 the diameter is
    # the tile count: the products below are the ones slide_class_from_mask would make)
    largest_tiles = slide_class_from_mask(tumor, 1.0)[1]
    if math.isfinite(pitch_um):
        largest_um = float(largest_tiles * pitch_um)
        slide_class = slide_class_of_diameter(largest_um) if n_tumor else SLIDE_NEGATIVE
        area_mm2: float | None = n_tumor * pitch_um**2 / 1e6
    else:
        slide_class, largest_um, area_mm2 = None, None, None
        warnings.append("mpp unknown: no tumor area, lesion diameter or CAMELYON17 class")
    largest_px = float(largest_tiles * pitch_px) if n_tumor else 0.0
    write_heatmap(out.heatmap_h5, heat, index, probs.prob, {
        "slide_id": out.stem, "slide_path": str(slide_path), "method": models.method,
        "extractor_sha256": models.sha256["extractor"],
        "unet_sha256": models.sha256.get("unet", ""),
        "mpp": float(geom.mpp), "mpp_source": geom.mpp_source,
        "tile_size_px_level0": pitch_px, "tile_size_px": int(geom.tile_size_px),
        "tile_mpp": float(geom.tile_mpp), "level": int(geom.level),
        "slide_width_px_level0": int(index.attrs["slide_width_px_level0"]),
        "slide_height_px_level0": int(index.attrs["slide_height_px_level0"]),
        "origin_xy_px_level0": origin.astype(np.float64), "threshold": threshold,
        "featuremap_mode": probs.featuremap_mode or "", "params_key": key,
    })
    title = (f"{out.stem}: {models.method}, {len(lesions)} region(s) with p >= {threshold:g}"
             + (f", {slide_class}" if slide_class else ""))
    rings = [s.exterior for s in shapes] + [h for s in shapes for h in s.holes]
    write_overlay(out.heatmap_png, slide_path, heat, pitch_px, origin, rings, title)
    n_unpredicted = int(np.isnan(probs.prob).sum())
    return {
        "output_version": OUTPUT_VERSION, "slide": out.stem, "slide_path": str(slide_path),
        "method": models.method, "model_sha256": models.sha256, "params_key": key,
        "mpp": finite_or_none(geom.mpp), "mpp_source": geom.mpp_source,
        "tile_mpp": finite_or_none(geom.tile_mpp), "tile_size_px_level0": pitch_px,
        "pitch_um": finite_or_none(pitch_um), "featuremap_mode": probs.featuremap_mode,
        "threshold": threshold, "n_tiles": int(index.n), "n_unpredicted": n_unpredicted,
        "n_tumor_tiles": n_tumor,
        "max_tumor_prob": finite_or_none(float(np.nanmax(probs.prob)))
        if n_unpredicted < index.n else None,
        "tumor_area_mm2": area_mm2, "n_lesions": len(lesions),
        "largest_lesion_diameter_um": largest_um,
        "largest_lesion_diameter_px_level0": float(largest_px),
        "camelyon17_class": slide_class, "lesions": lesions,
        "outputs": {k: getattr(out, k).name
                    for k in ("heatmap_h5", "heatmap_png", "geojson", "asap_xml")},
        "warnings": warnings,
    }
