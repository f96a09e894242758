"""Reading a tile index (data/tiles/<slide_id>.h5, written by the `tile` stage) back: the one
reader every later stage and the data path use. Plain numpy + Python values, so it pickles to
DataLoader workers; no h5py handle is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.paths import resolve_recorded
from pipeline.schema import (
    COORDS,
    GRID,
    LUMP_ID,
    SCHEMA_VERSION,
    TILE_ATTRS,
    TILE_DTYPES,
    TISSUE_FRACTION,
)
from pipeline.slide import TileGeometry


class TileIndexError(PipelineError):
    """A tile index file is missing, unreadable or not of this schema."""


_GEOMETRY_FIELDS: dict[str, Callable[[Any], Any]] = {
    "level": int,
    "level_downsample": float,
    "read_size_px": int,
    "tile_size_px": int,
    "tile_size_px_level0": float,
    "tile_mpp": float,
    "mpp": float,
    "mpp_source": str,
}


def attr_value(v: Any) -> Any:
    """An HDF5 attr as a plain Python value (bytes -> str, numpy scalar -> int/float)."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def geometry_from_attrs(attrs: Mapping[str, Any], source: str = "tile index") -> TileGeometry:
    """Rebuild the `TileGeometry` the tile stage used from the tile index's HDF5 attrs."""
    missing = [k for k in _GEOMETRY_FIELDS if k not in attrs]
    if missing:
        raise TileIndexError(f"{source}: attrs missing {', '.join(missing)}; rerun the tile stage")
    return TileGeometry(**{k: conv(attr_value(attrs[k])) for k, conv in _GEOMETRY_FIELDS.items()})


def grid_origin_px_level0(coords: np.ndarray, grid: np.ndarray, pitch_px_level0: float,
                          whole_px: bool = False) -> np.ndarray:
    """Level-0 (x, y) of grid vertex (0, 0) for tiles at level-0 top-left `coords` (x, y) and
    `grid` (row, col): the median of coords - (col, row) * pitch, so the tile stage's rounding
    of coords to whole pixels does not shift it. whole_px rounds each tile's grid offset and the
    result to whole pixels (corners that are the tiles' own integer corners). (0, 0) if no tiles.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if not len(coords):
        return np.zeros(2)
    offsets = np.asarray(grid, dtype=np.float64).reshape(-1, 2)[:, ::-1] * float(pitch_px_level0)
    if whole_px:
        return np.rint(np.median(coords - np.rint(offsets), axis=0))
    return np.median(coords - offsets, axis=0)


@dataclass(frozen=True, eq=False)
class TileIndex:
    """The contents of data/tiles/<slide_id>.h5: row i of every array is tile i."""

    path: Path
    coords: np.ndarray  # (N, 2) int64 level-0 x, y of the top-left corner
    grid: np.ndarray  # (N, 2) int32 row, col
    tissue_fraction: np.ndarray  # (N,) float32
    lump_id: np.ndarray  # (N,) int32, 1..n_lumps
    attrs: dict[str, Any]  # TILE_ATTRS as Python scalars / str
    geometry: TileGeometry  # how the tiles are read: Slide.read_tile(x, y, geometry)

    @property
    def n(self) -> int:
        return int(self.coords.shape[0])

    @property
    def n_tiles(self) -> int:
        return self.n

    @property
    def params_hash(self) -> str:
        return str(self.attrs["params_hash"])

    @property
    def slide_id(self) -> str:
        return str(self.attrs["slide_id"])

    @property
    def slide_path(self) -> Path:
        return resolve_recorded(str(self.attrs["slide_path"]), self.path)

    @property
    def slide_size_px_level0(self) -> tuple[int, int]:
        return int(self.attrs["slide_width_px_level0"]), int(self.attrs["slide_height_px_level0"])


def read_tile_index(path: str | Path) -> TileIndex:
    """Read a tile index; TileIndexError (one line naming the file) if it is not a current one."""
    path = Path(path)
    if not path.is_file():
        raise TileIndexError(f"{path}: tile index not found (run the `tile` stage)")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: attr_value(f.attrs[k]) for k in f.attrs}
            missing = [k for k in TILE_DTYPES if k not in f]
            missing += [k for k in TILE_ATTRS if k not in attrs]
            if missing:
                raise TileIndexError(f"{path}: not a tile index, missing {', '.join(missing)}")
            arrays = {k: np.asarray(f[k][...], dtype=dt) for k, dt in TILE_DTYPES.items()}
    except OSError as exc:
        raise TileIndexError(f"{path}: cannot read HDF5 ({exc})") from None
    if int(attrs["schema_version"]) != SCHEMA_VERSION:
        raise TileIndexError(
            f"{path}: schema_version {attrs['schema_version']} != {SCHEMA_VERSION}; rerun `tile`"
        )
    return TileIndex(path=path, coords=arrays[COORDS].reshape(-1, 2),
                     grid=arrays[GRID].reshape(-1, 2), tissue_fraction=arrays[TISSUE_FRACTION],
                     lump_id=arrays[LUMP_ID], attrs=attrs,
                     geometry=geometry_from_attrs(attrs, source=str(path)))
