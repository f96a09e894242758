"""Tiling throughput, seconds per slide and peak memory of the `tile` stage.

Two slide sets, each tiled by the real stage (`pipeline.stages.tile.run`, default tile params
unless said otherwise) in a temp project (Paths(root=tmp), a manifest CSV), with 1 and N
(= os.cpu_count()) slide worker processes:

  demo   demo-like slides: --demo-slides of them built with the demo generator
         (pipeline.stages.demo_data.run, 5 mm at 1 um/px, like `make demo`), or the slides of
         an existing demo folder with --demo DIR (e.g. data/demo)
  large  one generated slide of --large-mm (default 10.24 mm = 40960 px square at 0.25 um/px,
         CAMELYON's level-0 resolution), pyramidal JPEG TIFF down to ~320 px. One slide gives
         the seconds per slide; --copies symlinks of it in one manifest show the speed-up of
         several worker processes (they share the file, so it is read from the page cache).

The large slide is written with bounded memory: its content is rendered by the demo generator
at 2 um/px (5120 px square, 79 MB), the levels finer than that are streamed to tifffile tile by
tile from strips upsampled on the fly (one 256-px strip of level 0 is 31 MB), the coarser ones
are box-downsampled from the 2 um/px image.

Every measurement runs in a fresh subprocess (this script with --child), so its peak RSS is
that of the stage alone: os.wait4 returns the largest RSS of the child and of the worker
processes it waited for (RUSAGE_CHILDREN semantics, per child). The slides are built in
subprocesses too, so this parent stays small (exec records the parent's peak RSS in the child's).
The child wraps the stage's internals with timers (Slide.low_res_image, compute_tissue_mask,
TissueMask.box_fractions / box_majority_labels, the HDF5 write, the thumbnail draw and PNG) and
logs which pyramid level each slide's tissue-mask overview was read from, to confirm level 0 is
never read for the mask. The probes reach the worker processes because they are forked.

Prints the tables and writes reports/bench/tiling.json. Times are from the OS page cache (the
slides were just written), i.e. decode and compute, not cold disk I/O.

    .venv/bin/python benchmarks/tiling.py [--demo data/demo] [--repeats 2] [--large-mm 10.24]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

LARGE_MPP = 0.25  # level-0 um/px of the generated large slide (CAMELYON level 0)
LARGE_SRC_MPP = 2.0  # resolution its content is rendered at, then upsampled
TILE_PX = 256  # TIFF tile side
JPEG_QUALITY = 85
MIN_LEVEL_PX = 256  # the pyramid goes down until its shorter side is about this
MANIFEST_HEAD = "slide_id,slide_path,annotation_path,split\n"
# Stage parts timed by the probes, in table order; "other" = the rest of tile_slide.
PARTS = ("overview read", "tissue mask", "tile fractions", "tile lumps", "HDF5 write",
         "thumbnail draw", "thumbnail PNG", "other")


# -- the large slide ---------------------------------------------------------------------------


def _upsampled_tiles(src: np.ndarray, factor: int, tile_px: int) -> Iterator[np.ndarray]:
    """Tiles (row-major) of `src` bilinearly upsampled by `factor`, one strip at a time; the
    strip's source box extends past its rows so consecutive strips join seamlessly."""
    from PIL import Image

    img = Image.fromarray(src)
    h_src, w_src = src.shape[:2]
    height, width = h_src * factor, w_src * factor
    for r0 in range(0, height, tile_px):
        r1 = min(r0 + tile_px, height)
        strip = np.asarray(img.resize((width, r1 - r0), Image.Resampling.BILINEAR,
                                      box=(0, r0 / factor, w_src, r1 / factor)))
        for c0 in range(0, width, tile_px):
            tile = strip[:, c0:c0 + tile_px]
            if tile.shape[:2] != (tile_px, tile_px):  # edge tile: pad with glass
                pad = ((0, tile_px - tile.shape[0]), (0, tile_px - tile.shape[1]), (0, 0))
                tile = np.pad(tile, pad, constant_values=255)
            yield np.ascontiguousarray(tile)


def write_large_slide(path: Path, side_mm: float, seed: int = 0) -> dict:
    """A pyramidal JPEG TIFF of a macro-metastasis lymph node, `side_mm` square at LARGE_MPP,
    written with memory bounded by the 2 um/px source image plus one strip of level 0."""
    import tifffile
    from PIL import Image

    from pipeline.synth import plan_slide, render_slide

    src_ds = int(round(LARGE_SRC_MPP / LARGE_MPP))  # level-0 px per source px (8)
    t0 = time.perf_counter()
    spec = plan_slide("macro", side_mm * 1000.0, LARGE_SRC_MPP, np.random.default_rng(seed))
    src = render_slide(spec)
    render_s = time.perf_counter() - t0
    side_px = src.shape[0] * src_ds
    n_levels = 1 + int(np.floor(np.log2(side_px / MIN_LEVEL_PX)))
    levels = []
    coarse = src
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i in range(n_levels):
            ds = 2**i
            px_per_cm = 1e4 / (LARGE_MPP * ds)
            kw = dict(photometric="rgb", tile=(TILE_PX, TILE_PX), compression="jpeg",
                      compressionargs={"level": JPEG_QUALITY}, subfiletype=0 if i == 0 else 1,
                      metadata=None, resolution=(px_per_cm, px_per_cm),
                      resolutionunit="CENTIMETER")
            if ds < src_ds:  # finer than the source: streamed, upsampled strip by strip
                f = src_ds // ds
                shape = (src.shape[0] * f, src.shape[1] * f, 3)
                tif.write(_upsampled_tiles(src, f, TILE_PX), shape=shape, dtype=np.uint8, **kw)
            else:
                if ds > src_ds:
                    h, w = coarse.shape[0] // 2, coarse.shape[1] // 2
                    coarse = np.asarray(Image.fromarray(coarse).resize(
                        (w, h), Image.Resampling.BOX))
                shape = coarse.shape
                tif.write(coarse, **kw)
            levels.append([int(shape[1]), int(shape[0])])
    return {"side_mm": side_mm, "mpp": LARGE_MPP, "size_px": [side_px, side_px],
            "levels_wh": levels, "source_mpp": LARGE_SRC_MPP, "render_s": round(render_s, 1),
            "write_s": round(time.perf_counter() - t0 - render_s, 1),
            "file_mib": round(path.stat().st_size / 2**20, 1)}


# -- slide sets and manifests ------------------------------------------------------------------


def build_demo(root: Path, n_slides: int) -> list[tuple[str, Path]]:
    """n_slides demo slides (demo generator, the demo's 5 mm at 1 um/px) under root/data/demo."""
    from pipeline.manifest import load_manifest
    from pipeline.params import Params
    from pipeline.paths import Paths
    from pipeline.stages import demo_data

    per_patient = min(5, n_slides)
    n_patients = -(-n_slides // per_patient)
    raw = Params().model_dump(mode="json")
    raw["demo"].update({"n_patients": n_patients, "slides_per_patient": per_patient,
                        "split_patients": [n_patients, 0, 0]})
    summary = demo_data.run(Params.model_validate(raw), Paths(root=root))
    df = load_manifest(summary["manifest"])
    return [(r.slide_id, Path(r.slide_path)) for r in df.itertuples()][:n_slides]


def existing_demo(folder: Path, n_slides: int) -> list[tuple[str, Path]]:
    from pipeline.manifest import load_manifest

    df = load_manifest(folder / "manifest.csv")
    return [(r.slide_id, Path(r.slide_path)) for r in df.itertuples()][:n_slides]


def write_manifest(path: Path, slides: list[tuple[str, Path]]) -> Path:
    path.write_text(MANIFEST_HEAD + "".join(f"{sid},{p},,train\n" for sid, p in slides))
    return path


# -- one measurement: a fresh subprocess -------------------------------------------------------


def run_self(flag: str, spec: dict, work: Path, name: str) -> tuple[dict, int]:
    """Run this script with `flag` on `spec` in a fresh subprocess; returns (its result JSON,
    its peak RSS in KiB: its own or its largest reaped worker's, from os.wait4)."""
    run_dir = work / name
    run_dir.mkdir()
    spec = {**spec, "result": str(run_dir / "result.json")}
    spec_file = run_dir / "spec.json"
    spec_file.write_text(json.dumps(spec))
    log_file = run_dir / "child.log"
    with open(log_file, "w") as logf:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), flag,
                                 str(spec_file)], stdout=logf, stderr=subprocess.STDOUT)
        # wait4, not proc.wait: it returns this child's rusage (its own peak RSS and that of the
        # workers it reaped), which RUSAGE_CHILDREN would mix with earlier children
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise SystemExit(f"{name}: child exited {proc.returncode}; log tail:\n{tail}")
    return json.loads(Path(spec["result"]).read_text()), ru.ru_maxrss


def measure(name: str, manifest: Path, workers: int, tile_mpp: float | None, work: Path,
            repeats: int) -> dict:
    """Tile every slide of `manifest` in a fresh subprocess, `repeats` times (fresh output root
    each time); best stage seconds, largest peak RSS."""
    best: dict | None = None
    peak_kib = 0
    for k in range(repeats):
        run_dir = work / f"{name}.{k}.out"
        records = run_dir / "records.jsonl"
        spec = {"manifest": str(manifest), "root": str(run_dir), "workers": workers,
                "tile_mpp": tile_mpp, "records": str(records)}
        t0 = time.perf_counter()
        res, kib = run_self("--child", spec, work, f"{name}.{k}")
        res["subprocess_wall_s"] = round(time.perf_counter() - t0, 2)
        res["records"] = [json.loads(line) for line in records.read_text().splitlines()]
        peak_kib = max(peak_kib, kib)
        if best is None or res["stage_s"] < best["stage_s"]:
            best = res
    assert best is not None
    best["peak_rss_mib"] = round(peak_kib / 1024, 1)
    return best


def summarise(name: str, res: dict, workers: int) -> dict:
    """One table row from a child's result: rates, memory, mask levels, mean part times."""
    recs = res["records"]
    n = res["n_slides"]
    ov = [r["overview"] for r in recs]
    mask_levels = sorted({o["level"] for o in ov})
    # pixels the mask overview read vs level 0, worst (largest) slide ratio
    frac = max((o["level_wh"][0] * o["level_wh"][1]) / (o["level0_wh"][0] * o["level0_wh"][1])
               for o in ov) if ov else float("nan")
    parts = {p: round(float(np.mean([r["parts"].get(p, 0.0) for r in recs])), 4) if recs else None
             for p in PARTS}
    # most slides in flight at once: did the worker processes really overlap?
    events = sorted([(r["start"], 1) for r in recs] + [(r["end"], -1) for r in recs])
    in_flight = np.cumsum([e for _, e in events]) if events else np.zeros(1)
    return {
        "case": name, "workers": workers, "max_slides_in_flight": int(in_flight.max()),
        "worker_pids": len({r["pid"] for r in recs}), "n_slides": n, "n_tiles": res["n_tiles"],
        "tile_mpp": res["tile_mpp"], "stage_s": round(res["stage_s"], 3),
        "stage_cpu_s": round(res["stage_cpu_s"], 3),
        "cores_used": round(res["stage_cpu_s"] / res["stage_s"], 2),
        "s_per_slide": round(res["stage_s"] / n, 3),
        "tiles_per_s": round(res["n_tiles"] / res["stage_s"], 1),
        "slides_per_min": round(60 * n / res["stage_s"], 1),
        "subprocess_wall_s": res["subprocess_wall_s"],
        "peak_rss_mib": res["peak_rss_mib"],
        "main_rss_after_imports_mib": round(res["rss_after_imports_kib"] / 1024, 1),
        "main_peak_rss_mib": round(res["self_peak_kib"] / 1024, 1),
        "worker_peak_rss_mib": round(res["children_peak_kib"] / 1024, 1),
        "mask_levels": mask_levels,
        "mask_level0_read": 0 in mask_levels,
        "mask_overview_px_fraction_of_level0": frac,
        "overview": ov[0] if ov else None,
        "probes_recorded": len(recs),
        "tile_slide_s_mean": round(float(np.mean([r["total_s"] for r in recs])), 4)
        if recs else None,
        "parts_s_mean": parts,
    }


# -- the child: run the stage with probes ------------------------------------------------------


_parts: dict[str, float] | None = None  # per-slide part times while inside tile_slide


def _add(part: str, seconds: float) -> None:
    if _parts is not None:
        _parts[part] = _parts.get(part, 0.0) + seconds


def _timed(part: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _add(part, time.perf_counter() - t0)

    return wrapper


def _timed_cm(part: str, factory: Callable) -> Callable:
    @contextlib.contextmanager
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        with factory(*args, **kwargs) as value:
            yield value
        _add(part, time.perf_counter() - t0)

    return wrapper


def _install_probes(records: Path) -> None:
    """Wrap the tile stage's parts with timers; every tile_slide appends one JSON line to
    `records` (O_APPEND: forked workers may write concurrently)."""
    import pipeline.tiling as tile_mod
    from pipeline.slide import Slide
    from pipeline.tissue import TissueMask

    overview: dict = {}
    make_overview = Slide.overview

    def overview_probe(self, downsample):
        ov = make_overview(self, downsample)
        overview.update(level=ov.level, level_wh=list(self.level_dimensions[ov.level]),
                        level0_wh=list(self.dimensions), image_wh=[ov.shape[1], ov.shape[0]],
                        downsample_requested=round(float(downsample), 3))
        return ov

    Slide.overview = overview_probe
    # the overview is read window by window while the mask is computed: one part, timed as
    # "tissue mask" ("overview read" stays 0)
    tile_mod.tissue_mask_from_overview = _timed("tissue mask", tile_mod.tissue_mask_from_overview)
    TissueMask.box_fractions = _timed("tile fractions", TissueMask.box_fractions)
    TissueMask.box_majority_labels = _timed("tile lumps", TissueMask.box_majority_labels)
    tile_mod.atomic_h5 = _timed_cm("HDF5 write", tile_mod.atomic_h5)
    tile_mod._thumbnail = _timed("thumbnail draw", tile_mod._thumbnail)
    # inside tile_slide atomic_path only wraps the thumbnail: draw + PNG encode + rename
    tile_mod.atomic_path = _timed_cm("thumbnail total", tile_mod.atomic_path)
    tile_slide = tile_mod.tile_slide

    def tile_slide_probe(slide_id, *args, **kwargs):
        global _parts
        _parts = {}
        overview.clear()
        t0, start = time.perf_counter(), time.time()
        try:
            row = tile_slide(slide_id, *args, **kwargs)
        finally:
            total = time.perf_counter() - t0
            parts, _parts = _parts, None
        parts["thumbnail PNG"] = parts.pop("thumbnail total", 0.0) - parts.get("thumbnail draw", 0)
        parts["other"] = total - sum(parts.values())
        line = json.dumps({"slide_id": slide_id, "pid": os.getpid(), "start": start,
                           "end": start + total, "total_s": total, "parts": parts,
                           "overview": dict(overview)}) + "\n"
        with open(records, "a") as f:
            f.write(line)
        return row

    tile_mod.tile_slide = tile_slide_probe


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def child(spec_file: Path) -> None:
    """Run the tile stage once as described by `spec_file`; write its result JSON."""
    from pipeline.params import Params
    from pipeline.paths import Paths
    from pipeline.stages import tile as tile_mod

    spec = json.loads(spec_file.read_text())
    rss_after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    records = Path(spec["records"])
    records.parent.mkdir(parents=True, exist_ok=True)
    records.touch()
    _install_probes(records)
    raw = Params().model_dump(mode="json")
    raw["data"]["manifest"] = spec["manifest"]
    raw["tile"]["workers"] = spec["workers"]
    if spec["tile_mpp"] is not None:
        raw["tile"]["mpp"] = spec["tile_mpp"]
    params = Params.model_validate(raw)
    cpu0 = _children_cpu_s()
    t0, p0 = time.perf_counter(), time.process_time()
    summary = tile_mod.run(params, Paths(root=Path(spec["root"])))
    stage_s = time.perf_counter() - t0
    # CPU seconds of the stage: this process + its reaped workers (CPU/wall = cores obtained)
    stage_cpu_s = time.process_time() - p0 + _children_cpu_s() - cpu0
    if summary["n_tiled"] != summary["n_slides"]:
        raise SystemExit(f"tiled {summary['n_tiled']} of {summary['n_slides']} slides")
    Path(spec["result"]).write_text(json.dumps({
        "stage_s": stage_s, "stage_cpu_s": stage_cpu_s, "n_slides": summary["n_slides"],
        "n_tiles": summary["n_tiles"],
        "tile_mpp": params.tile.mpp, "rss_after_imports_kib": rss_after_imports,
        "self_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "children_peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }))


def child_make(kind: str, spec_file: Path) -> None:
    """Build a slide set in this (throw-away) process, so the parent stays small: a process
    started from a big parent inherits its peak RSS (exec records the old image's)."""
    spec = json.loads(spec_file.read_text())
    t0 = time.perf_counter()
    if kind == "large":
        out = write_large_slide(Path(spec["path"]), spec["side_mm"])
    elif spec["existing"] is not None:
        out = {"slides": [[s, str(p)] for s, p in existing_demo(Path(spec["existing"]),
                                                                  spec["n_slides"])]}
    else:
        out = {"slides": [[s, str(p)] for s, p in build_demo(Path(spec["root"]),
                                                               spec["n_slides"])]}
    out["build_s"] = round(time.perf_counter() - t0, 1)
    Path(spec["result"]).write_text(json.dumps(out))


# -- report ------------------------------------------------------------------------------------


def print_tables(r: dict) -> None:
    print(f"\nmachine: {r['machine']['cpu_count']} cores, load average at start "
          f"{r['machine']['loadavg_start']}")
    lg = r["large_slide"]
    print(f"large slide: {lg['size_px'][0]}x{lg['size_px'][1]} px at {lg['mpp']} um/px, "
          f"{len(lg['levels_wh'])} levels, {lg['file_mib']} MiB; rendered in {lg['render_s']} s, "
          f"written in {lg['write_s']} s, generator peak RSS {lg['generator_peak_rss_mib']} MiB")
    print("\ntile stage (fresh subprocess per row; peak = largest process, main or worker; base = "
          "main process after imports)")
    hdr = (f"{'case':<18} {'w':>2} {'slides':>6} {'tiles':>6} {'stage s':>8} {'s/slide':>8} "
           f"{'tiles/s':>8} {'CPU/wall':>8} {'peak MiB':>9} {'base MiB':>9} "
           f"{'mask level (px of level 0)':>28}")
    print(hdr)
    for row in r["runs"]:
        ov = row["overview"]
        lvl = (f"{ov['level']} ({ov['level_wh'][0]}x{ov['level_wh'][1]} of "
               f"{ov['level0_wh'][0]}x{ov['level0_wh'][1]})")
        print(f"{row['case']:<18} {row['workers']:>2} {row['n_slides']:>6} {row['n_tiles']:>6} "
              f"{row['stage_s']:>8.2f} {row['s_per_slide']:>8.3f} {row['tiles_per_s']:>8.0f} "
              f"{row['cores_used']:>8.2f} "
              f"{row['peak_rss_mib']:>9.0f} {row['main_rss_after_imports_mib']:>9.0f} {lvl:>28}")
    print("\nwhere tile_slide spends its time (mean seconds per slide, 1 worker)")
    single = [row for row in r["runs"] if row["workers"] == 1 and row["case"] in r["split_cases"]]
    print(f"{'part':<24}" + "".join(f"{row['case']:>18}" for row in single))
    for p in PARTS:
        print(f"{p:<24}" + "".join(f"{row['parts_s_mean'][p]:>18.3f}" for row in single))
    print(f"{'= tile_slide':<24}" + "".join(f"{row['tile_slide_s_mean']:>18.3f}"
                                           for row in single))
    over = [row["stage_s"] / row["n_slides"] - row["tile_slide_s_mean"] for row in single]
    print(f"{'stage overhead':<24}" + "".join(f"{o:>18.3f}" for o in over))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=None,
                    help="existing demo folder (with manifest.csv) instead of building slides")
    ap.add_argument("--demo-slides", type=int, default=10)
    ap.add_argument("--large-mm", type=float, default=10.24,
                    help="side of the large slide in mm (10.24 mm = 40960 px at 0.25 um/px)")
    ap.add_argument("--large-tile-mpp", default="1.0,0.25",
                    help="tile.mpp values for the single large slide (the first is also used "
                    "for the copies)")
    ap.add_argument("--copies", type=int, default=4, help="large-slide copies for the N-worker run")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N")
    ap.add_argument("--repeats", type=int, default=2, help="best of R subprocess runs per row")
    ap.add_argument("--out", type=Path, default=Path("reports/bench/tiling.json"))
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--make-large", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--make-demo", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child)
        return
    if args.make_large is not None:
        child_make("large", args.make_large)
        return
    if args.make_demo is not None:
        child_make("demo", args.make_demo)
        return

    t_start = time.perf_counter()
    large_mpps = [float(x) for x in args.large_tile_mpp.split(",")]
    worker_counts = sorted({1, args.workers})
    results: dict = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "repeats": args.repeats, "workers": worker_counts, "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench_tiling_") as tmp:
        work = Path(tmp)
        existing = None if args.demo is None else str(args.demo.resolve())
        made, _ = run_self("--make-demo", {"root": str(work / "demo_build"),
                                           "n_slides": args.demo_slides,
                                           "existing": existing}, work, "make_demo")
        demo = [(s, Path(p)) for s, p in made["slides"]]
        results["demo"] = {"source": existing or "built with pipeline.stages.demo_data.run",
                           "build_s": made["build_s"], "n_slides": len(demo)}
        print(f"demo slides: {len(demo)} ({results['demo']['source']})", flush=True)

        large_path = work / "large.tiff"
        info, kib = run_self("--make-large", {"path": str(large_path), "side_mm": args.large_mm},
                             work, "make_large")
        info["generator_peak_rss_mib"] = round(kib / 1024, 1)
        results["large_slide"] = info
        print(f"large slide: {info}", flush=True)
        copies = []
        for k in range(args.copies):
            link = work / f"large_copy{k}.tiff"
            link.symlink_to(large_path)
            copies.append((f"large_copy{k}", link))

        m_demo = write_manifest(work / "demo.csv", demo)
        m_large = write_manifest(work / "large.csv", [("large", large_path)])
        m_copies = write_manifest(work / "copies.csv", copies)
        plan: list[tuple[str, Path, int, float | None]] = []
        plan += [("demo", m_demo, w, None) for w in worker_counts]
        plan += [(f"large @{m:g}um", m_large, 1, m) for m in large_mpps]
        plan += [(f"large x{args.copies} @{large_mpps[0]:g}um", m_copies, w, large_mpps[0])
                 for w in worker_counts]
        results["split_cases"] = ["demo"] + [f"large @{m:g}um" for m in large_mpps]
        for name, manifest, w, mpp in plan:
            key = f"{name.replace(' ', '_').replace('@', '')}.w{w}"
            res = measure(key, manifest, w, mpp, work, args.repeats)
            row = summarise(name, res, w)
            results["runs"].append(row)
            print(f"  {name} w={w}: {row['stage_s']:.2f} s, {row['n_tiles']} tiles, "
                  f"peak {row['peak_rss_mib']:.0f} MiB", flush=True)
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    # every tiled slide must have logged its overview read (probes reach forked workers only)
    unverified = [r["case"] for r in results["runs"] if r["probes_recorded"] != r["n_slides"]]
    level0 = [r["case"] for r in results["runs"] if r["mask_level0_read"]]
    results["mask_level0_read_in"] = level0
    results["mask_level_unverified_in"] = unverified
    print_tables(results)
    from pipeline.io import write_json_atomic

    write_json_atomic(args.out, results)
    print(f"tissue-mask overview read level 0: {', '.join(level0) or 'never'}"
          + (f"; not verified (probes missing) in {', '.join(unverified)}" if unverified else ""))
    print(f"total {results['total_s']} s; wrote {args.out}")
    if level0:
        raise SystemExit(f"the tissue mask read level 0 in: {level0}")


if __name__ == "__main__":
    main()
