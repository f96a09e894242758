"""What predict writes for one slide's tumor tiles: the regions as QuPath GeoJSON and ASAP XML
(outlined exactly on tile corners, pipeline/vectorize.py, so the label stage rasterises them back
to exactly the predicted tiles) and the heatmap HDF5 file."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from pipeline.annotations import Polygon, write_asap_xml, write_qupath_geojson
from pipeline.camelyon import slide_class_from_mask
from pipeline.io import atomic_h5
from pipeline.schema import COORDS, GRID, TUMOR_PROB
from pipeline.tileindex import TileIndex
from pipeline.vectorize import GridPolygon, asap_exclusions, mask_polygons, to_level0

TILE_PROB = "tile_prob"  # per-tile probability in the heatmap file (N,), tile-index order


def finite_or_none(v: float) -> float | None:
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
            "area_um2": finite_or_none(own.sum() * pitch_um**2),
            "probability_max": float(vals.max()),
            "probability_mean": float(vals.mean()),
            "diameter_um": finite_or_none(diam_px / pitch_px * pitch_um),
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


def write_heatmap(path: Path, heat: np.ndarray, index: TileIndex, tile_prob: np.ndarray,
                  attrs: Mapping[str, Any]) -> None:
    """<stem>.heatmap.h5: tumor_prob (rows, cols) float32 on the tile grid (NaN off-tissue),
    coords (N, 2) level-0 x, y; grid (N, 2) row, col; tile_prob (N,); `attrs`."""
    with atomic_h5(path) as f:
        f.create_dataset(TUMOR_PROB, data=heat, compression="gzip")
        f.create_dataset(COORDS, data=index.coords.astype(np.int64))
        f.create_dataset(GRID, data=index.grid.astype(np.int32))
        f.create_dataset(TILE_PROB, data=np.asarray(tile_prob, np.float32))
        for k, v in attrs.items():
            f.attrs[k] = v
