"""Labelling one slide's tiles (the core of the `label` stage): per-tile tumor / normal
fractions and tumor / normal / nolabel labels from the pathologists' annotations (paper,
Sec. 4: tumor if > 20 % of the tile is annotated tumor; otherwise normal if >= 80 % is
annotated normal; otherwise nolabel).

Reads  the manifest (`data.manifest`), data/tiles/<slide_id>.h5 (coords, grid, geometry attrs)
       and each slide's annotation (ASAP XML, QuPath GeoJSON or mask image; see
       pipeline/annotations.py); params `tile.*` (via the tile index) and `label.*`.
Writes data/labels/<slide_id>.h5 (pipeline/schema.py: tumor_fraction, normal_fraction, label)
       and reports/labels.csv (slide_id, split, n_tiles, n_tumor, n_normal, n_nolabel).

Raster resolution. Each tile is sampled on an n x n grid of raster pixel centres with
n = tile_size_px / label.raster_subsample (rounded, >= 1): one raster pixel per
raster_subsample x raster_subsample output tile pixels, i.e. 32 x 32 = 1024 samples per tile at
the defaults (256 / 8). Raster pitch = tile_size_px_level0 / n level-0 px. A fraction is
(samples inside) / n^2, so it is quantised to 1/n^2 (0.1 % at n = 32); a straight boundary
across a tile is located to within half a raster pixel, so its fraction is off by at most
0.5 / n (1.6 % at n = 32, a half row of samples), and along slanted or curved boundaries the
per-pixel errors largely cancel (typically < 1 %). Tiles on the tile stage's regular grid (the
usual case) map to whole raster blocks, so neighbouring tiles share no samples and miss none.

The slide is rasterised once, in horizontal bands of whole tile rows (~`BAND_PIXELS` raster
pixels each) so memory stays bounded on 10^5-px slides sampled finely.
Regions: tumor = union(tumor polygons minus their holes, mask) minus union(exclusions).
normal = 1 - tumor when the file has no explicit normal regions (CAMELYON16 convention: tumor is
annotated exhaustively); otherwise the fraction inside (normal regions or exclusions) minus tumor.
Slides without an annotation file: every tile normal (tumor 0, normal 1).

Input checks (warnings, the stage goes on): polygons entirely outside the slide (an annotation
of another slide, or not in level-0 px); polygon annotation files in the manifest's annotation
folders that no manifest row references (a slide missing from the manifest). Unknown groups /
classes are listed by pipeline/annotations.py. A killed run's temp files of this run's slides
are removed before work starts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline import schema
from pipeline.annotations import (
    Annotation,
    annotation_format,
    rasterize,
    read_annotation,
    sample_mask,
)
from pipeline.errors import PipelineError
from pipeline.io import atomic_h5, h5_is_current, sha256_file
from pipeline.log import get_logger
from pipeline.params import LabelParams
from pipeline.tileindex import grid_origin_px_level0, read_tile_index

log = get_logger("pipeline.label")

# Raster pixels per band (bool layers + an int64 integral image: ~10 bytes per pixel). Below the
# tiles' box of a 1x CAMELYON-shaped slide (~3 M), so every scale runs at the cap and the stage's
# memory does not grow with the slide (benchmarks/camelyon_scale.py).
BAND_PIXELS = 1_000_000
CSV_COLUMNS = ("slide_id", "split", "n_tiles", "n_tumor", "n_normal", "n_nolabel")


class LabelError(PipelineError):
    """A slide cannot be labelled; the message names the file and the cause."""


# -- pure core -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileRaster:
    """Where each tile's n x n samples sit on a slide-wide raster."""

    n: int  # samples per tile side
    pitch_px_level0: float  # level-0 px per raster px
    origin_xy_px_level0: tuple[float, float]  # level-0 (x, y) of raster pixel (0, 0)'s corner
    start_xy: np.ndarray  # (N, 2) int64 raster (col, row) of each tile's first sample


def tile_raster(
    coords: np.ndarray,
    grid: np.ndarray,
    tile_size_px: int,
    tile_size_px_level0: float,
    raster_subsample: int,
) -> TileRaster:
    """Place tiles (level-0 top-left `coords` (x, y), `grid` (row, col)) on a raster of n x n
    samples per tile, n = round(tile_size_px / raster_subsample). The raster origin is the grid
    origin, so a tile at (row, col) starts at raster (col * n, row * n) exactly even though its
    coords were rounded to integers; off-grid coords still work (nearest raster pixel)."""
    n = max(1, round(tile_size_px / raster_subsample))
    pitch = float(tile_size_px_level0) / n
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    grid = np.asarray(grid, dtype=np.float64).reshape(-1, 2)
    origin = grid_origin_px_level0(coords, grid, tile_size_px_level0)
    start = np.rint((coords - origin) / pitch).astype(np.int64)
    return TileRaster(n, pitch, (float(origin[0]), float(origin[1])), start)


def tile_fractions(
    annotation: Annotation | None,
    raster: TileRaster,
    band_pixels: int = BAND_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """(tumor_fraction, normal_fraction) per tile, float64, from sample counts / n^2."""
    n_tiles = len(raster.start_xy)
    if annotation is None:
        return np.zeros(n_tiles), np.ones(n_tiles)
    n, p = raster.n, raster.pitch_px_level0
    ox, oy = raster.origin_xy_px_level0
    tumor_n = np.zeros(n_tiles, dtype=np.int64)
    normal_n = np.zeros(n_tiles, dtype=np.int64)
    explicit = annotation.has_explicit_normal
    if n_tiles == 0:
        return tumor_n.astype(np.float64), normal_n.astype(np.float64)
    sx, sy = raster.start_xy[:, 0], raster.start_xy[:, 1]
    cx0, cx1 = int(sx.min()), int(sx.max()) + n
    width = cx1 - cx0
    band_rows = max(n, band_pixels // max(width, 1))
    order = np.argsort(sy, kind="stable")
    sy_sorted = sy[order]
    i = 0
    while i < n_tiles:
        b0 = int(sy_sorted[i])
        j = int(np.searchsorted(sy_sorted, b0 + band_rows - n, side="right"))
        j = max(j, i + 1)
        idx = order[i:j]
        b1 = int(sy_sorted[j - 1]) + n
        shape = (b1 - b0, width)
        origin = (ox + cx0 * p, oy + b0 * p)
        tumor = rasterize(annotation.tumor, shape, origin, p)
        if annotation.mask is not None:
            tumor |= sample_mask(annotation.mask, shape, origin, p)
        excl = rasterize(annotation.exclusion, shape, origin, p) if annotation.exclusion else None
        if excl is not None:
            tumor &= ~excl
        r, c = sy[idx] - b0, sx[idx] - cx0
        tumor_n[idx] = _block_sums(tumor, r, c, n)
        if explicit:
            normal = rasterize(annotation.normal, shape, origin, p)
            if excl is not None:
                normal |= excl
            normal &= ~tumor
            normal_n[idx] = _block_sums(normal, r, c, n)
        i = j
    total = float(n * n)
    tumor_fraction = tumor_n / total
    normal_fraction = normal_n / total if explicit else (n * n - tumor_n) / total
    return tumor_fraction, normal_fraction


def _block_sums(layer: np.ndarray, r: np.ndarray, c: np.ndarray, n: int) -> np.ndarray:
    """Number of True pixels in layer[r:r+n, c:c+n] for each (r, c), by an integral image."""
    s = np.zeros((layer.shape[0] + 1, layer.shape[1] + 1), dtype=np.int64)
    np.cumsum(layer, axis=0, dtype=np.int64, out=s[1:, 1:])  # in place: no band-sized temporary
    np.cumsum(s[1:, 1:], axis=1, out=s[1:, 1:])
    return s[r + n, c + n] - s[r, c + n] - s[r + n, c] + s[r, c]


def assign_labels(
    tumor_fraction: np.ndarray, normal_fraction: np.ndarray, tumor_min: float, normal_min: float
) -> np.ndarray:
    """LABEL_TUMOR where tumor_fraction > tumor_min (strict), else LABEL_NORMAL where
    normal_fraction >= normal_min, else LABEL_NOLABEL (int8)."""
    tf, nf = np.asarray(tumor_fraction), np.asarray(normal_fraction)
    out = np.full(tf.shape, schema.LABEL_NOLABEL, dtype=np.int8)
    out[nf >= normal_min] = schema.LABEL_NORMAL
    out[tf > tumor_min] = schema.LABEL_TUMOR
    return out


# -- input checks ----------------------------------------------------------------------------
# Suffixes of polygon annotation files; mask images (.tif/.png) are left out of the
# unreferenced-file check since they look like slides and often share their folder.
_POLYGON_SUFFIXES = (".xml", ".geojson", ".json")


def warn_unreferenced_annotations(manifest_path: Path, rows: list) -> list[Path]:
    """Warn (one line per folder) about polygon annotation files in the manifest's annotation
    folders that no manifest row references: usually a slide missing from the manifest or a
    misspelt annotation_path. Returns them."""
    referenced = {Path(r.annotation_path) for r in rows if r.annotation_path}
    folders = sorted({p.parent for p in referenced})
    found = []
    for folder in folders:
        extra = sorted(p for p in folder.iterdir()
                       if p.suffix.lower() in _POLYGON_SUFFIXES and p.is_file()
                       and p not in referenced)
        if extra:
            names = ", ".join(p.name for p in extra[:5]) + (", ..." if len(extra) > 5 else "")
            log.warning("label: %d annotation file(s) in %s are not referenced by %s (a slide "
                        "missing from the manifest?): %s", len(extra), folder, manifest_path,
                        names)
        found += extra
    return found


def _warn_outside(ann: Annotation, slide_wh: tuple[int, int]) -> int:
    """Warn when polygons lie entirely outside the slide (w x h level-0 px): they label nothing,
    which usually means the annotation belongs to another slide or is not in level-0 px.
    Polygons partly outside are normal (clipped) and not reported. Returns the count."""
    w, h = slide_wh
    counts = {}
    for name in ("tumor", "exclusion", "normal"):
        polys = getattr(ann, name)
        out = sum(1 for p in polys if _bbox_outside(p.bounds(), w, h))
        if out:
            counts[name] = (out, len(polys))
    if counts:
        what = ", ".join(f"{o} of {n} {k}" for k, (o, n) in counts.items())
        log.warning("%s: %s polygon(s) lie entirely outside the %dx%d px slide and label nothing "
                    "(annotation of another slide, or coordinates not in level-0 px?)",
                    ann.path, what, w, h)
    return sum(o for o, _ in counts.values())


def _bbox_outside(bounds: tuple[float, float, float, float], w: int, h: int) -> bool:
    x0, y0, x1, y1 = bounds
    return x1 < 0 or y1 < 0 or x0 > w or y0 > h


# -- one slide -------------------------------------------------------------------------------
def annotation_sha(annotation_path: str) -> str:
    return sha256_file(annotation_path) if annotation_path else ""


def tile_sha(tile_file: Path) -> str:
    return sha256_file(tile_file) if tile_file.is_file() else "missing"


def label_slide(
    slide_id: str,
    tile_file: Path,
    annotation_path: str,
    out_file: Path,
    label_params: LabelParams,
    params_hash: str,
    tile_params_hash: str,
    recorded_annotation_path: str | None = None,
    input_sha256: tuple[str, str] | None = None,
) -> dict:
    """Label one slide's tiles and write `out_file` atomically. Returns its counts.
    `recorded_annotation_path` is what the file records (`Paths.recorded`; default: the
    path as given). `input_sha256`: (annotation_sha, tile_sha) of the inputs if the caller
    has them already (the label stage hashes them to find stale label files)."""
    t0 = time.perf_counter()
    if not h5_is_current(tile_file, tile_params_hash):
        raise LabelError(
            f"{tile_file}: tile index missing or not written with the current tile params; "
            "run `python -m pipeline tile` first"
        )
    idx = read_tile_index(tile_file)
    geom = idx.geometry
    raster = tile_raster(idx.coords, idx.grid, geom.tile_size_px, geom.tile_size_px_level0,
                         label_params.raster_subsample)
    ann = None
    fmt = "none"
    if annotation_path:
        fmt = annotation_format(annotation_path)
        ann = read_annotation(annotation_path, idx.slide_size_px_level0,
                              max_mask_downsample=raster.pitch_px_level0)
        _warn_outside(ann, idx.slide_size_px_level0)
    tumor_f, normal_f = tile_fractions(ann, raster)
    labels = assign_labels(tumor_f, normal_f, label_params.tumor_min, label_params.normal_min)
    raster_um = raster.pitch_px_level0 * idx.geometry.mpp if math.isfinite(idx.geometry.mpp) else \
        raster.pitch_px_level0
    with atomic_h5(out_file) as f:
        f.create_dataset(schema.TUMOR_FRACTION,
                         data=tumor_f.astype(schema.LABEL_DTYPES[schema.TUMOR_FRACTION]))
        f.create_dataset(schema.NORMAL_FRACTION,
                         data=normal_f.astype(schema.LABEL_DTYPES[schema.NORMAL_FRACTION]))
        f.create_dataset(schema.LABEL, data=labels.astype(schema.LABEL_DTYPES[schema.LABEL]))
        f.attrs["params_hash"] = params_hash
        f.attrs["annotation_path"] = (annotation_path if recorded_annotation_path is None
                                      else recorded_annotation_path)
        f.attrs["annotation_sha256"], f.attrs["tile_index_sha256"] = input_sha256 or (
            annotation_sha(annotation_path), sha256_file(tile_file))
        f.attrs["annotation_format"] = fmt
        f.attrs["raster_um"] = float(raster_um)
        f.attrs["tumor_min"] = float(label_params.tumor_min)
        f.attrs["normal_min"] = float(label_params.normal_min)
    counts = _counts(slide_id, labels)
    log.info("%s: read %s%s; wrote %s (%d tiles: %d tumor, %d normal, %d nolabel) in %.1f s",
             slide_id, tile_file, f" + {annotation_path}" if annotation_path else "", out_file,
             counts["n_tiles"], counts["n_tumor"], counts["n_normal"], counts["n_nolabel"],
             time.perf_counter() - t0)
    return counts


def _counts(slide_id: str, labels: np.ndarray) -> dict:
    return {
        "slide_id": slide_id,
        "n_tiles": int(labels.size),
        "n_tumor": int((labels == schema.LABEL_TUMOR).sum()),
        "n_normal": int((labels == schema.LABEL_NORMAL).sum()),
        "n_nolabel": int((labels == schema.LABEL_NOLABEL).sum()),
    }


def counts_from_file(slide_id: str, path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return _counts(slide_id, np.asarray(f[schema.LABEL][...]))
