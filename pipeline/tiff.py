"""Write OpenSlide-readable pyramidal tiled TIFFs (JPEG tiles, mpp in the resolution tags).

Used by the demo generator and by tests that need slides of known geometry. OpenSlide's generic
TIFF reader reports `openslide.mpp-x` from XResolution when ResolutionUnit is centimetre.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


def pyramid(rgb: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Level 0 plus 2x box-downsampled levels."""
    levels = [rgb]
    for _ in range(n_levels - 1):
        prev = levels[-1]
        h, w = prev.shape[0] // 2, prev.shape[1] // 2
        if h < 1 or w < 1:
            break
        levels.append(np.asarray(Image.fromarray(prev).resize((w, h), Image.Resampling.BOX)))
    return levels


def write_pyramidal_tiff(
    path: str | Path,
    rgb: np.ndarray,
    mpp: float | None,
    n_levels: int = 3,
    tile_px: int = 256,
    jpeg_quality: int = 85,
) -> None:
    """Write `rgb` (H, W, 3 uint8) as a tiled, JPEG-compressed pyramid. `mpp=None` writes no
    resolution tags (a slide without mpp metadata, for tests)."""
    path = Path(path)
    levels = pyramid(np.ascontiguousarray(rgb, dtype=np.uint8), n_levels)
    with tifffile.TiffWriter(path, bigtiff=rgb.size > 2**31) as tif:
        for i, lvl in enumerate(levels):
            kw = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * (2**i))
                kw = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                lvl,
                photometric="rgb",
                tile=(tile_px, tile_px),
                compression="jpeg",
                compressionargs={"level": jpeg_quality},
                subfiletype=0 if i == 0 else 1,
                metadata=None,
                **kw,
            )
