"""Tiling one slide: tissue mask + non-overlapping tile grid -> data/tiles/<slide_id>.h5.

Per slide (see pipeline/schema.py for the file format):
- tile geometry from `Slide.tile_geometry` (pyramid level, read size, grid pitch in level-0 px);
  a slide without mpp metadata falls back to `tile.fallback_mpp` / `tile.fallback_level` with a
  warning naming it;
- Otsu tissue mask on an overview at `tile.mask_mpp` (pipeline/tissue.py), read window by
  window so that memory does not grow with the slide's area;
- grid: origin level-0 (0, 0), pitch p = tile_size_px_level0, tile (row, col) at level-0
  (round(col * p), round(row * p)), only whole tiles (floor(W / p) x floor(H / p)); a tile is
  kept when its tissue area fraction is >= `tile.min_tissue` (and > 0);
- lump_id: the 8-connected tissue component covering most of the tile, renumbered 1..K over the
  kept tiles (in raster order of the components' first pixel).

Also writes reports/tiles/<slide_id>.png (overview, tissue outline in blue, kept tiles in green).
Used by the `tile` stage (every manifest slide) and by `predict` (one new slide at a time).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import PipelineError
from pipeline.io import atomic_h5, atomic_path, h5_is_current
from pipeline.log import get_logger
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.schema import (
    COORDS,
    GRID,
    LUMP_ID,
    SCHEMA_VERSION,
    TILE_ATTRS,
    TILE_DTYPES,
    TISSUE_FRACTION,
)
from pipeline.slide import Slide, TileGeometry, slide_fingerprint, tile_geometry_for
from pipeline.tileindex import read_tile_index
from pipeline.tissue import COLOUR_SPACE, TissueMask, tissue_mask_from_overview

log = get_logger("pipeline.tile")

# mpp unknown: the mask is read at the coarsest level whose shorter side is at least this...
MIN_MASK_SIDE_PX = 512
# ...and that still has at least this many mask pixels across one tile.
MIN_MASK_PX_PER_TILE = 4
THUMB_MAX_PX = 2048  # longest side of reports/tiles/<id>.png
GRID_BAND_TILES = 16_384  # grid tiles scored at a time
TISSUE_RGB = (0, 90, 255)
TILE_RGB = (0, 170, 0)


class NoTissueError(PipelineError):
    """A slide yields no tile: no tissue found, or every tile below `tile.min_tissue`."""


# -- one slide ---------------------------------------------------------------------------------


def grid_positions(
    width_px_level0: int, height_px_level0: int, pitch_px_level0: float, row0: int = 0,
    row1: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """All whole tiles of the grid in row-major order (of grid rows [row0, row1) when given):
    (grid (M, 2) row/col, coords (M, 2) level-0 x/y, grid_rows, grid_cols)."""
    rows = int(math.floor(height_px_level0 / pitch_px_level0))
    cols = int(math.floor(width_px_level0 / pitch_px_level0))
    rr, cc = np.meshgrid(np.arange(row0, rows if row1 is None else min(row1, rows)),
                         np.arange(cols), indexing="ij")
    grid = np.stack([rr.ravel(), cc.ravel()], axis=1)
    # np.rint rounds half to even, like Python's round()
    coords = np.rint(grid[:, ::-1] * pitch_px_level0).astype(np.int64)
    return grid, coords, rows, cols


def _mask_downsample(slide: Slide, geom: TileGeometry, tp) -> tuple[float, float]:
    """(requested level-0 px per mask px, level-0 um per px assumed for the clean-up areas)."""
    if math.isfinite(geom.mpp):
        return max(1.0, tp.mask_mpp / geom.mpp), geom.mpp
    # mpp unknown: the coarsest level that is neither tiny nor coarser than a quarter tile.
    # Clean-up areas assume the user's intent: the fallback level is at tile.mpp.
    ds = 1.0
    for (lw, lh), d in zip(slide.level_dimensions, slide.level_downsamples, strict=True):
        if min(lw, lh) >= MIN_MASK_SIDE_PX and d <= geom.tile_size_px_level0 / MIN_MASK_PX_PER_TILE:
            ds = max(ds, d)
    return ds, tp.mpp / geom.level_downsample


def _tissue_mask(slide: Slide, geom: TileGeometry, tp, thumbnail: bool
                 ) -> tuple[TissueMask, np.ndarray | None, int]:
    """(tissue mask, overview shrunk by `scale` for the thumbnail or None, scale). The overview is
    read window by window (pipeline/tissue.py): memory does not grow with the slide."""
    ds_req, mpp_for_areas = _mask_downsample(slide, geom, tp)
    ov = slide.overview(ds_req)
    scale = max(1, math.ceil(max(ov.shape) / THUMB_MAX_PX))
    thumb = (np.empty((-(-ov.shape[0] // scale), -(-ov.shape[1] // scale), 3), np.uint8)
             if thumbnail else None)

    def shrink(r0: int, c0: int, rgb: np.ndarray) -> None:
        # reads start at multiples of scale, so reducing each is reducing the whole overview
        small = np.asarray(Image.fromarray(rgb).reduce(scale)) if scale > 1 else rgb
        thumb[r0 // scale:r0 // scale + small.shape[0],
              c0 // scale:c0 // scale + small.shape[1]] = small

    tm = tissue_mask_from_overview(ov, ov.downsample_x * mpp_for_areas, tp.min_object_um2,
                                   tp.max_hole_um2, shrink if thumbnail else None, scale)
    return tm, thumb, scale


def _thumbnail(img: np.ndarray, scale: int, tm: TissueMask, coords: np.ndarray,
               pitch: float) -> np.ndarray:
    """The overview shrunk by `scale` with the tissue outline and the kept tiles' outlines."""
    from skimage.segmentation import find_boundaries

    for w in tm.windows:  # a window's border is glass: its outline is the whole mask's there
        r, c = -w.y0 % scale, -w.x0 % scale
        edge = find_boundaries(w.mask, mode="inner")[r::scale, c::scale]
        ty, tx = (w.y0 + r) // scale, (w.x0 + c) // scale
        img[ty:ty + edge.shape[0], tx:tx + edge.shape[1]][edge] = TISSUE_RGB
    sx, sy = tm.downsample_x * scale, tm.downsample_y * scale
    # PIL draws the outlines in C (skimage's rectangle_perimeter per tile took 0.2 ms each: 2.3 s
    # for a level-0 CAMELYON grid); the same pixels: the ring just outside each tile's box.
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    for x, y in coords:
        r0, c0 = round(y / sy), round(x / sx)
        r1, c1 = round((y + pitch) / sy - 1), round((x + pitch) / sx - 1)
        draw.rectangle((c0 - 1, r0 - 1, c1 + 1, r1 + 1), outline=TILE_RGB)
    return np.asarray(pil)


def _warn_geometry(slide_id: str, slide_path: Path, geom: TileGeometry, tp) -> None:
    if geom.mpp_source == "fallback_mpp":
        log.warning("slide %s (%s): no usable mpp in metadata; assuming tile.fallback_mpp = "
                    "%g um/px", slide_id, slide_path, geom.mpp)
    elif geom.mpp_source == "unknown":
        log.warning("slide %s (%s): no mpp in metadata and tile.fallback_mpp unset; tiling "
                    "pyramid level %d (tile.fallback_level) with tile mpp unknown",
                    slide_id, slide_path, geom.level)
    elif geom.read_size_px < geom.tile_size_px:
        log.warning("slide %s: tile.mpp %g is finer than the slide's %g um/px; tiles are "
                    "upsampled", slide_id, tp.mpp, geom.mpp)


def _kept_tiles(slide_id: str, slide_path: Path, tm: TissueMask, width: int, height: int,
                pitch: float, min_tissue: float):
    """(grid, coords, tissue fraction, lump id) of the tiles with enough tissue. The grid is
    scored in bands of ~GRID_BAND_TILES tiles: a level-0 grid of a CAMELYON slide is ~10^5-10^6
    tiles, whose coordinates and per-tile temporaries would grow with the slide."""
    _, _, rows, cols = grid_positions(width, height, pitch, 0, 0)
    band = max(1, GRID_BAND_TILES // max(cols, 1))
    kept, best = [], 0.0
    for r0 in range(0, rows, band):
        grid, coords, _, _ = grid_positions(width, height, pitch, r0, r0 + band)
        frac = tm.box_fractions(coords[:, 0], coords[:, 1], pitch)
        keep = (frac >= min_tissue) & (frac > 0)
        best = max(best, float(frac.max()))
        kept.append((grid[keep], coords[keep], frac[keep]))
    grid, coords, frac = (np.concatenate(a) for a in zip(*kept, strict=True))
    if not len(frac):
        cause = ("no tissue found" if tm.n_components == 0
                 else f"no tile has tissue fraction >= {min_tissue:g} (best {best:.2f})")
        raise NoTissueError(
            f"slide {slide_id} ({slide_path}): {cause} (Otsu threshold {tm.threshold:.3f} on "
            f"{COLOUR_SPACE}, raw {tm.otsu_threshold:.3f}; 0 of {rows * cols} tiles "
            f">= {min_tissue:g} tissue)"
        )
    component = tm.box_majority_labels(coords[:, 0], coords[:, 1], pitch)
    if (component == 0).any():  # cannot happen: frac > 0 means some mask pixel is covered
        raise RuntimeError(f"slide {slide_id}: kept tile without a tissue component")
    _, lump = np.unique(component, return_inverse=True)
    return grid, coords, frac, lump.reshape(-1) + 1


def tile_slide(slide_id: str, slide_path: str | Path, params: Params, paths: Paths,
               thumbnail: bool = True) -> dict:
    """Tile one slide and write its tile index and (unless `thumbnail` is False) thumbnail;
    returns its reports/tiles.csv row. Raises NoTissueError / SlideError naming the slide when
    it yields no tile."""
    t0 = time.perf_counter()
    tp = params.tile
    slide_path = Path(slide_path).resolve()
    with Slide(slide_path) as slide:
        geom = tile_geometry_for(slide, tp)  # raises on implausible mpp
        _warn_geometry(slide_id, slide_path, geom, tp)
        width, height = slide.dimensions
        pitch = geom.tile_size_px_level0
        _, _, rows, cols = grid_positions(width, height, pitch, 0, 0)
        if rows * cols == 0:
            raise NoTissueError(f"slide {slide_id} ({slide_path}): {width}x{height} px is smaller "
                                f"than one tile ({pitch:.1f} level-0 px)")
        tm, thumb, scale = _tissue_mask(slide, geom, tp, thumbnail)
    grid, coords, frac, lump = _kept_tiles(slide_id, slide_path, tm, width, height, pitch,
                                           tp.min_tissue)
    n_lumps = int(lump.max())

    attrs = {
        "schema_version": SCHEMA_VERSION,
        "params_hash": params.section_hash("tile"),
        "params_json": params.section_json("tile"),
        "slide_id": slide_id,
        "slide_path": paths.recorded(slide_path, paths.tile_file(slide_id).parent),
        "slide_fingerprint": slide_fingerprint(slide_path),
        "slide_width_px_level0": int(width),
        "slide_height_px_level0": int(height),
        "mpp": float(geom.mpp),
        "mpp_source": geom.mpp_source,
        "tile_mpp": float(geom.tile_mpp),
        "level": int(geom.level),
        "level_downsample": float(geom.level_downsample),
        "read_size_px": int(geom.read_size_px),
        "tile_size_px": int(geom.tile_size_px),
        "tile_size_px_level0": float(pitch),
        "grid_rows": rows,
        "grid_cols": cols,
        "n_lumps": n_lumps,
    }
    assert set(attrs) == set(TILE_ATTRS)
    out = paths.tile_file(slide_id)
    arrays = {COORDS: coords, GRID: grid, TISSUE_FRACTION: frac, LUMP_ID: lump}
    with atomic_h5(out) as f:
        for name, dtype in TILE_DTYPES.items():
            f.create_dataset(name, data=np.asarray(arrays[name], dtype=dtype))
        for k in TILE_ATTRS:
            f.attrs[k] = attrs[k]
    if thumb is not None:
        with atomic_path(thumb_file(paths, slide_id)) as tmp:
            Image.fromarray(_thumbnail(thumb, scale, tm, coords, pitch)).save(tmp, format="PNG")
    if tp.cache_pixels:
        write_cache(out, paths.pixel_cache_file(slide_id))
    seconds = time.perf_counter() - t0
    log.info("slide %s: %d tiles, %d lumps (grid %dx%d, level %d, read %d px, tile %.3g um/px, "
             "mask threshold %.3f) -> %s (%.1f s)", slide_id, len(coords), n_lumps, rows, cols,
             geom.level, geom.read_size_px, geom.tile_mpp, tm.threshold, out, seconds)
    return csv_row(attrs, len(coords), seconds, "tiled")


def write_cache(tile_index: Path, cache: Path) -> None:
    from pipeline.data import write_pixel_cache  # heavy (reads every tile); only when asked

    write_pixel_cache(tile_index, cache)


def thumb_file(paths: Paths, slide_id: str) -> Path:
    """reports/tiles/<slide_id>.png: the overview with the tissue outline and kept tiles."""
    return paths.reports / "tiles" / f"{slide_id}.png"


def csv_row(attrs: dict, n_tiles: int, seconds: float, status: str) -> dict:
    """One slide's reports/tiles.csv row (+ this run's seconds and status)."""
    return {"slide_id": attrs["slide_id"], "n_tiles": n_tiles, "grid_rows": attrs["grid_rows"],
            "grid_cols": attrs["grid_cols"], "mpp": attrs["mpp"], "mpp_source": attrs["mpp_source"],
            "level": attrs["level"], "tile_mpp": attrs["tile_mpp"], "seconds": seconds,
            "status": status}


def tile_or_cache(slide_id: str, slide_path: str, params: Params, paths: Paths,
                  only_cache: bool) -> dict:
    """Worker entry: the full slide, or only the pixel cache when the index is current."""
    if only_cache:
        t0 = time.perf_counter()
        out = paths.tile_file(slide_id)
        write_cache(out, paths.pixel_cache_file(slide_id))
        idx = read_tile_index(out)
        return csv_row(idx.attrs, idx.n_tiles, time.perf_counter() - t0, "cached")
    return tile_slide(slide_id, slide_path, params, paths)


def fingerprint_or_unreadable(slide_path: str) -> str:
    """The slide's fingerprint, or "unreadable" (never equal to a recorded one)."""
    try:
        return slide_fingerprint(slide_path)
    except OSError:
        return "unreadable"


def index_current(paths: Paths, slide_id: str, slide_path: str, params_hash: str) -> bool:
    """True when the slide's tile index was written from this slide file with these params."""
    try:
        fingerprint = slide_fingerprint(slide_path)
    except OSError:
        return False  # unreadable: let tile_slide raise the proper error
    out = paths.tile_file(slide_id)
    return h5_is_current(out, params_hash, slide_path=paths.recorded(slide_path, out.parent),
                         slide_fingerprint=fingerprint)
