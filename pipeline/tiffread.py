"""Direct tile decoding for slides whose pyramid levels are plain tiled TIFF pages.

Why: OpenSlide's `read_region` spends ~1.3 ms per 256-px tile on top of the ~0.25 ms JPEG
decode (ARGB painting, premultiplication, a PIL image per call), which made feature extraction
tile-decode bound (docs/benchmarks.md). For generic tiled TIFF (CAMELYON16 .tif, the demo) and
Aperio SVS the level *is* a grid of compressed tiles, so a region is the stitched decode of the
tiles it overlaps: `os.pread` of each tile's bytes + tifffile's own decoder for that page
(imagecodecs: libjpeg-turbo, OpenJPEG, ...), the same libraries OpenSlide uses.

Used only where the result should be OpenSlide's: the vendor is generic-tiff or aperio, the
level is a tiled, 8-bit, 3-sample, contiguous page of exactly the level's size, the region's
level coordinates are whole numbers (OpenSlide resamples fractional ones), and every tile it
needs is present and, for JPEG, complete (a damaged tile goes to OpenSlide, which reports it).
`Slide` compares the first non-uniform region of each level with OpenSlide, per handle, and
falls back for that slide if a single byte differs: a decoder that disagrees with OpenSlide's
on intact tiles cannot change results.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Vendors whose levels OpenSlide reads as a plain grid of TIFF tiles (no overlaps, no
# per-tile offsets), so the stitched decode equals read_region.
FAST_VENDORS = frozenset({"generic-tiff", "aperio"})
# TIFF compressions decoded here (none, LZW, JPEG, deflate, Adobe deflate, Aperio JPEG 2000).
FAST_COMPRESSIONS = frozenset({1, 5, 7, 8, 32946, 33003, 33005})
# Decoded tiles kept per slide handle, for regions that straddle tile borders (e.g. 256-px
# reads of Aperio's 240-px tiles): neighbouring reads then decode each tile ~once.
TILE_CACHE_BYTES = 16 << 20


@dataclass
class _Level:
    width: int
    height: int
    tile_w: int
    tile_h: int
    tiles_across: int
    offsets: np.ndarray
    bytecounts: np.ndarray
    decode: Callable
    jpegtables: bytes | None
    compression: int
    photometric: int = 2  # TIFF PhotometricInterpretation (2 RGB, 6 YCbCr)


class TiledTiffLevels:
    """The tiled TIFF pages behind a slide's OpenSlide levels; `read` stitches decoded tiles.

    Open with `TiledTiffLevels.open(...)`, which returns None when no level qualifies."""

    def __init__(self, path: Path, levels: dict[int, _Level], fd: int):
        self.path = path
        self.levels = levels
        self._fd = fd
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._tile_bytes = 0

    @classmethod
    def open(cls, path: str | Path, vendor: str,
             level_dimensions: Sequence[tuple[int, int]]) -> TiledTiffLevels | None:
        """Map each OpenSlide level to a qualifying TIFF page of the same size, or None."""
        if vendor not in FAST_VENDORS:
            return None
        import tifffile

        path = Path(path)
        try:
            with tifffile.TiffFile(path) as tf:
                pages = [p for p in tf.pages if _qualifies(p)]
                levels: dict[int, _Level] = {}
                for k, (w, h) in enumerate(level_dimensions):
                    page = next((p for p in pages
                                 if (p.imagewidth, p.imagelength) == (w, h)), None)
                    if page is None:
                        continue
                    levels[k] = _Level(
                        width=w, height=h, tile_w=page.tilewidth, tile_h=page.tilelength,
                        tiles_across=-(-w // page.tilewidth),
                        offsets=np.asarray(page.dataoffsets, dtype=np.int64),
                        bytecounts=np.asarray(page.databytecounts, dtype=np.int64),
                        # the decoder closes over the page's tags, not the open file
                        decode=page.decode, jpegtables=page.jpegtables,
                        compression=int(page.compression),
                        photometric=int(page.photometric),
                    )
            if not levels:
                return None
            return cls(path, levels, os.open(path, os.O_RDONLY))
        except Exception:  # anything tifffile cannot parse or open is left to OpenSlide
            return None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tiles.clear()
        self._tile_bytes = 0

    def read(self, level: int, x_level: int, y_level: int, w: int, h: int) -> np.ndarray | None:
        """(h, w, 3) uint8 of `level` with top-left (x_level, y_level) in that level's pixels;
        outside the level is white (OpenSlide's transparent, composited on white). None when
        this level or a tile the region needs (missing / empty) is not served here."""
        lv = self.levels.get(level)
        if lv is None:
            return None
        tx0, ty0 = max(x_level, 0) // lv.tile_w, max(y_level, 0) // lv.tile_h
        tx1 = min(x_level + w, lv.width) - 1
        ty1 = min(y_level + h, lv.height) - 1
        if tx1 < 0 or ty1 < 0 or x_level >= lv.width or y_level >= lv.height:
            return np.full((h, w, 3), 255, np.uint8)
        tx1, ty1 = tx1 // lv.tile_w, ty1 // lv.tile_h
        if (tx0 == tx1 and ty0 == ty1 and x_level == tx0 * lv.tile_w
                and y_level == ty0 * lv.tile_h and (w, h) == (lv.tile_w, lv.tile_h)
                and x_level + w <= lv.width and y_level + h <= lv.height):
            # exactly one whole tile (a grid aligned with the TIFF's): decoded once, not cached
            k = ty0 * lv.tiles_across + tx0
            tile = self._tile(level, lv, k, cache=False)
            # a cached tile is shared with later reads: the caller gets its own copy
            return tile.copy() if tile is not None and (level, k) in self._tiles else tile
        out = np.full((h, w, 3), 255, np.uint8)
        for ty in range(ty0, ty1 + 1):
            for tx in range(tx0, tx1 + 1):
                # parts of tiles: neighbouring reads need the rest of this tile, keep it
                tile = self._tile(level, lv, ty * lv.tiles_across + tx, cache=True)
                if tile is None:
                    return None
                # intersection of the tile, the level and the region, in level pixels
                gx0, gy0 = tx * lv.tile_w, ty * lv.tile_h
                xa, xb = max(x_level, gx0), min(x_level + w, gx0 + lv.tile_w, lv.width)
                ya, yb = max(y_level, gy0), min(y_level + h, gy0 + lv.tile_h, lv.height)
                out[ya - y_level:yb - y_level, xa - x_level:xb - x_level] = \
                    tile[ya - gy0:yb - gy0, xa - gx0:xb - gx0]
        return out

    def _tile(self, level: int, lv: _Level, k: int, cache: bool) -> np.ndarray | None:
        key = (level, k)
        hit = self._tiles.get(key)
        if hit is not None:
            self._tiles.move_to_end(key)
            return hit
        if k >= lv.offsets.size or lv.bytecounts[k] <= 0:
            return None
        data = os.pread(self._fd, int(lv.bytecounts[k]), int(lv.offsets[k]))
        if lv.compression == 7 and not _whole_jpeg(data):
            return None  # OpenSlide reports the damaged tile (libjpeg-turbo here only warns)
        try:
            arr = lv.decode(data, k, jpegtables=lv.jpegtables)[0]
            tile = arr.reshape(lv.tile_h, lv.tile_w, -1)
        except Exception:  # a tile tifffile cannot decode: OpenSlide reports it properly
            return None
        if tile.shape[2] != 3 or tile.dtype != np.uint8:
            return None
        if not tile.flags.writeable:  # e.g. uncompressed tiles: a view of the read-only bytes
            tile = tile.copy()
        if cache:
            self._tiles[key] = tile
            self._tile_bytes += tile.nbytes
            while self._tile_bytes > TILE_CACHE_BYTES and self._tiles:
                _, old = self._tiles.popitem(last=False)
                self._tile_bytes -= old.nbytes
        return tile


def _whole_jpeg(data: bytes) -> bool:
    """A tile's JPEG stream ends at its only end-of-image marker. A truncated or cut-short
    stream decodes here with a warning and a grey remainder, where OpenSlide raises; such tiles
    are left to OpenSlide. (Entropy-coded data never contains FF D9: 0xFF bytes are stuffed.)"""
    return data.endswith(b"\xff\xd9") and data.find(b"\xff\xd9") == len(data) - 2


def _qualifies(page) -> bool:
    try:
        return bool(page.is_tiled and page.bitspersample == 8 and page.samplesperpixel == 3
                    and page.planarconfig == 1 and int(page.compression) in FAST_COMPRESSIONS
                    and page.imagedepth == 1
                    # YCbCr only inside JPEG, where the codec converts it as libjpeg does
                    and (page.photometric == 2
                         or (page.photometric == 6 and int(page.compression) == 7)))
    except Exception:
        return False
