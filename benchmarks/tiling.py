"""Time the `tile` stage on a generated slide: python benchmarks/tiling.py [--side-mm 5].

Writes a pyramidal TIFF at 0.25 um/px with random elliptical tissue lumps (side x side mm) to a
temp folder, tiles it at tile.mpp 0.5 and prints the seconds per stage part. Not a test: the
numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from skimage.draw import ellipse

from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.stages.tile import read_tile_index, run
from pipeline.tiff import write_pyramidal_tiff


def make_slide(path: Path, side_mm: float, mpp: float, seed: int = 0) -> None:
    side_px = int(side_mm * 1000 / mpp)
    rng = np.random.default_rng(seed)
    rgb = np.full((side_px, side_px, 3), 240, np.uint8)
    for _ in range(6):
        r, c = rng.integers(side_px // 6, 5 * side_px // 6, 2)
        a, b = rng.integers(side_px // 20, side_px // 6, 2)
        rr, cc = ellipse(r, c, a, b, shape=rgb.shape[:2], rotation=rng.uniform(0, np.pi))
        rgb[rr, cc] = (215, 120, 185)
    write_pyramidal_tiff(path, rgb, mpp=mpp, n_levels=6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side-mm", type=float, default=5.0)
    ap.add_argument("--mpp", type=float, default=0.25)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_slide(root / "bench.tiff", args.side_mm, args.mpp)
        t1 = time.perf_counter()
        (root / "manifest.csv").write_text(
            "slide_id,slide_path,annotation_path,split\nbench,bench.tiff,,train\n"
        )
        raw = Params().model_dump(mode="json")
        raw["data"]["manifest"] = str(root / "manifest.csv")
        raw["tile"].update({"mpp": 0.5, "workers": 1})
        params = Params.model_validate(raw)
        run(params, Paths(root=root))
        t2 = time.perf_counter()
        idx = read_tile_index(Paths(root=root).tile_file("bench"))
        print(f"slide {args.side_mm:g} mm at {args.mpp} um/px: write {t1 - t0:.1f} s; "
              f"tile {t2 - t1:.2f} s -> {idx.n_tiles} tiles, {idx.attrs['n_lumps']} lumps, "
              f"grid {idx.attrs['grid_rows']}x{idx.attrs['grid_cols']}")


if __name__ == "__main__":
    main()
