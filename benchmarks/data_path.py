"""Patch data path throughput: tiles streamed from the slide vs from the pixel cache.

Builds one demo-like slide (pipeline.synth, the demo generator, at 1 um/px with a JPEG q85
pyramid; 10 mm square by default, the demo's are 5 mm), tiles it with the real tile stage,
writes pixel caches with several HDF5 filters, then times full passes of `slide_loader` over
all tiles (batch 32, raw uint8, no transform; then with the training augmentation) at each
--workers count of DataLoader workers. Two slide scenarios:

  exact      slide mpp 1.0, tile mpp 1.0: read 256 px at level 0 (the demo)
  resampled  same pixels tagged 0.65 um/px: read 394 px at level 0, BOX-resampled to 256
             (like CAMELYON's 0.243 um/px at tile mpp 1.0: no level within 2 %)

"slide" reads tiles the default way (tiled TIFF levels decoded directly, pipeline/tiffread.py);
"slide OpenSlide" forces every read through OpenSlide's read_region (PIPELINE_SLIDE_READER).

Prints a table and writes reports/bench/data_path.json. Files are read from the OS page cache
after the first pass (best of --repeats), i.e. this measures decode cost, not cold disk I/O.

    .venv/bin/python benchmarks/data_path.py [--repeats 2] [--out reports/bench/data_path.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.augment import train_transform
from pipeline.data import read_tile_index, slide_loader, write_pixel_cache
from pipeline.io import write_json_atomic
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.slide import READER_ENV
from pipeline.synth import n_levels_for, plan_slide, render_slide
from pipeline.tiff import write_pyramidal_tiff
from pipeline.tiling import tile_slide

CACHE_FILTERS: dict[str, tuple[str | None, int | None]] = {
    "none": (None, None),
    "lzf": ("lzf", None),
    "gzip-1": ("gzip", 1),
    "gzip-4": ("gzip", 4),
}
SCENARIOS = {"exact": 1.0, "resampled": 0.65}  # slide mpp written into the TIFF
WORKERS = (0, 1, 2)  # default --workers
BATCH = 32


def _pass(tile_file: Path, workers: int, cache: Path | None, transform=None,
          reader: str = "auto") -> float:
    # the reader choice travels to the DataLoader workers through the environment (fork)
    old = os.environ.get(READER_ENV)
    os.environ[READER_ENV] = reader
    try:
        t0 = time.perf_counter()
        for _ in slide_loader(tile_file, batch_size=BATCH, workers=workers,
                              transform=transform, pixel_cache_file=cache):
            pass
        return time.perf_counter() - t0
    finally:
        if old is None:
            os.environ.pop(READER_ENV, None)
        else:
            os.environ[READER_ENV] = old


def _best_rate(tile_file: Path, workers: int, cache: Path | None, repeats: int,
               transform=None, reader: str = "auto") -> float:
    best = min(_pass(tile_file, workers, cache, transform, reader) for _ in range(repeats))
    return read_tile_index(tile_file).n / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--slide-mm", type=float, default=10.0,
                    help="slide side (demo: 5 mm); larger gives passes long enough for workers")
    ap.add_argument("--out", type=Path, default=Path("reports/bench/data_path.json"))
    ap.add_argument("--workers", default=",".join(map(str, WORKERS)),
                    help="comma-separated DataLoader worker counts")
    args = ap.parse_args()
    workers_list = tuple(int(w) for w in args.workers.split(","))
    torch.set_num_threads(1)

    rgb = render_slide(plan_slide("macro", args.slide_mm * 1000.0, 1.0, np.random.default_rng(0)))
    params = Params()
    results: dict = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "slide": {"size_px": list(rgb.shape[:2]), "jpeg_quality": 85,
                  "tile_size_px": params.tile.size_px, "tile_mpp": params.tile.mpp},
        "batch_size": BATCH, "repeats": args.repeats, "workers": list(workers_list),
        "cache": [], "read": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        paths = Paths(Path(tmp))
        for scen, slide_mpp in SCENARIOS.items():
            slide_path = Path(tmp) / f"{scen}.tiff"
            write_pyramidal_tiff(slide_path, rgb, slide_mpp, n_levels=n_levels_for(rgb.shape[0]),
                                 jpeg_quality=85)
            tile_slide(scen, slide_path, params, paths)
            tf = paths.tile_file(scen)
            index = read_tile_index(tf)
            n = index.n
            slide_bytes = slide_path.stat().st_size
            print(f"\n[{scen}] {n} tiles, read {index.geometry.read_size_px} px at level "
                  f"{index.geometry.level} -> {index.geometry.tile_size_px} px; slide file "
                  f"{slide_bytes / 2**20:.1f} MiB")
            caches: dict[str, Path] = {}
            raw_bytes = n * index.geometry.tile_size_px ** 2 * 3
            for name, filt in CACHE_FILTERS.items():
                cp = Path(tmp) / f"{scen}.{name}.pixels.h5"
                t0 = time.perf_counter()
                write_pixel_cache(tf, cp, compression=filt)
                write_s = time.perf_counter() - t0
                size = cp.stat().st_size
                caches[name] = cp
                results["cache"].append({
                    "scenario": scen, "filter": name, "write_s": round(write_s, 2),
                    "bytes": size, "kib_per_tile": round(size / n / 1024, 1),
                    "ratio_to_raw": round(size / raw_bytes, 3),
                    "ratio_to_slide_file": round(size / slide_bytes, 2),
                })
            for workers in workers_list:
                sources: list[tuple[str, Path | None, str]] = [
                    ("slide", None, "auto"), ("slide OpenSlide", None, "openslide")]
                sources += [(f"cache {k}", v, "auto") for k, v in caches.items()]
                for src, cp, reader in sources:
                    rate = _best_rate(tf, workers, cp, args.repeats, reader=reader)
                    results["read"].append({"scenario": scen, "source": src, "workers": workers,
                                            "patches_per_s": round(rate, 1), "n_tiles": n})
                if scen != "exact":
                    continue
                # the training path: + paper augmentation (crop 224, rot, flip, colour, sharpness)
                aug = train_transform(params.extractor.crop_px)
                for src, cp, reader in (
                        ("slide", None, "auto"), ("slide OpenSlide", None, "openslide"),
                        ("cache none", caches["none"], "auto"),
                        ("cache lzf", caches["lzf"], "auto"),
                        ("cache gzip-1", caches["gzip-1"], "auto")):
                    torch.manual_seed(0)
                    rate = _best_rate(tf, workers, cp, args.repeats, aug, reader)
                    results["read"].append({"scenario": scen, "source": src + " +aug",
                                            "workers": workers, "patches_per_s": round(rate, 1),
                                            "n_tiles": n})
    _print_tables(results)
    write_json_atomic(args.out, results)
    print(f"\nwrote {args.out}")


def _print_tables(r: dict) -> None:
    print("\npixel cache files")
    print(f"{'scenario':<10} {'filter':<7} {'write s':>8} {'KiB/tile':>9} {'vs raw':>7} "
          f"{'vs slide':>9}")
    for c in r["cache"]:
        print(f"{c['scenario']:<10} {c['filter']:<7} {c['write_s']:>8.2f} "
              f"{c['kib_per_tile']:>9.1f} {c['ratio_to_raw']:>7.3f} "
              f"{c['ratio_to_slide_file']:>9.2f}")
    print("\nread throughput, patches/s (batch 32, uint8, best of repeats)")
    ws = r["workers"]
    print(f"{'scenario':<10} {'source':<24} " + " ".join(f"{'w=' + str(w):>8}" for w in ws))
    keys = dict.fromkeys((x["scenario"], x["source"]) for x in r["read"])
    for scen, src in keys:
        rates = {x["workers"]: x["patches_per_s"] for x in r["read"]
                 if x["scenario"] == scen and x["source"] == src}
        print(f"{scen:<10} {src:<24} " + " ".join(f"{rates[w]:>8.0f}" for w in ws))


if __name__ == "__main__":
    main()
