"""Feature extraction throughput: `extract-features` end to end vs the model alone.

End to end = `extract_all` (the stage's core): tile index -> slide tiles (TIFF tiles decoded
directly, pipeline/tiffread.py; PIPELINE_SLIDE_READER=openslide for OpenSlide) -> centre crop +
normalise -> extractor -> one HDF5 per slide, written atomically.
Model only = the same extractor on a random batch of the same size (the stage's BATCH_SIZE)
already on the device, in the stage's memory format (channels_last on CUDA) and precision, the
same forward (features, head, softmax, copy to numpy), the same torch threads.
The target is end to end >= 80 % of model only: the data path must keep the model busy.

By default a demo-like project is built in a temp dir with the real stages (demo-data, tile,
label: 10 slides of 5 mm at 1 um/px, 256 px tiles, ~170 tiles per slide like the demo; a
random-init extractor of the params' arch). With --source DIR the project there is used
read-only (after `dvc repro extract-features`: data/tiles, data/labels, models/extractor.pt,
params.yaml); feature files go to a temp project whose data/tiles and data/labels link to it.
Each repeat extracts every slide afresh (nothing is "current"); the median of --repeats is
reported. "data path only" streams the same batches (`slides_loader` + normalisation) without
the model: end to end can only approach model only when the data path is faster than the model
on CPU cores the model does not use (on a GPU machine), not when both share two cores.

Each end-to-end row also counts the slide handles opened (`pipeline.data.OPEN_LOG_ENV`: in
total, and the most processes that opened one file: 1 when every slide has one worker).
`--compiles false,true` adds rows with extractor.compile (torch.compile of the forward; the
model-only rate is then compiled too).

Prints a table and writes reports/bench/extraction.json.

    .venv/bin/python benchmarks/extraction.py [--repeats 3] [--workers 0,2] [--source .]
    .venv/bin/python benchmarks/extraction.py --arch timm:vit_base_patch16_224 \
        --timm-kwargs '{"dynamic_img_size": true}'   # a foundation-model-sized encoder
(random init: throughput does not depend on the weights; the input is the encoder's own size,
`PatchClassifier.preprocess.input_px`, e.g. 224 for a ViT).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline import extraction as extract_features
from pipeline.data import OPEN_LOG_ENV, read_open_log
from pipeline.io import write_json_atomic
from pipeline.log import get_logger
from pipeline.manifest import load_manifest
from pipeline.models import build_extractor, load_extractor, save_checkpoint
from pipeline.params import Params, load_params
from pipeline.paths import Paths
from pipeline.slide import READER_ENV
from pipeline.tileindex import read_tile_index

log = get_logger("bench.extraction")


def _add_copies(manifest_csv: Path, copies: int) -> None:
    """Append `copies - 1` more entries per slide whose slide file is a symlink to the original:
    more tiles to time (decode cost is the same; the files come from the OS page cache either
    way) without rendering more synthetic slides."""
    import pandas as pd

    df = pd.read_csv(manifest_csv, dtype=str, keep_default_na=False)
    rows = [df]
    for j in range(1, copies):
        c = df.copy()
        for r in c.itertuples():
            src = manifest_csv.parent / r.slide_path
            link = src.with_name(f"{src.stem}_copy{j}{src.suffix}")
            if not link.exists():
                os.symlink(src.resolve(), link)
            c.loc[r.Index, "slide_path"] = str(link.relative_to(manifest_csv.parent))
        c["slide_id"] = c["slide_id"] + f"_copy{j}"
        c["patient_id"] = c["patient_id"] + f"_copy{j}"
        rows.append(c)
    pd.concat(rows).to_csv(manifest_csv, index=False)


def _demo_project(root: Path, arch: str | None = None, tile_workers: int = 2,
                  n_patients: int = 2, copies: int = 1,
                  slide_mm: float = 5.0, timm_kwargs: dict | None = None) -> tuple[Params, Paths]:
    """A demo-like project (5 slides of `slide_mm` per patient at 1 um/px, 256 px tiles; each
    slide listed `copies` times), random extractor of `arch` (default: the params' arch)."""
    from pipeline.stages import demo_data, label, tile

    raw = Params().model_dump(mode="json")
    raw["demo"].update(n_patients=n_patients, slides_per_patient=5, slide_mm=slide_mm,
                       split_patients=[n_patients - 1, 0, 1])
    raw["data"]["manifest"] = str(root / "data" / "demo" / "manifest.csv")
    raw["tile"].update(workers=tile_workers)
    if arch:
        raw["extractor"].update(arch=arch, timm_kwargs=timm_kwargs or {})
    params = Params.model_validate(raw)
    paths = Paths(root)
    demo_data.run(params, paths)
    if copies > 1:
        _add_copies(Path(params.data.manifest), copies)
    tile.run(params, paths)
    label.run(params, paths)
    torch.manual_seed(0)
    model = build_extractor(params.extractor.arch, params.extractor.feature_dim,
                            timm_kwargs=params.extractor.timm_kwargs)
    # the meta train-extractor writes, which extract-features checks against the params
    save_checkpoint(paths.models / "extractor.pt", model,
                    {"params_json": params.section_json("seed", "extractor", "tile")})
    return params, paths


def _linked_project(source: Path, root: Path) -> tuple[Params, Paths]:
    """A temp project that reads tiles/labels/checkpoint from `source` and writes features here."""
    params = load_params(source / "params.yaml")
    manifest = Path(params.data.manifest)
    if not manifest.is_absolute():
        manifest = (source / manifest).resolve()
    raw = params.model_dump(mode="json")
    raw["data"]["manifest"] = str(manifest)
    params = Params.model_validate(raw)
    (root / "data").mkdir(parents=True)
    (root / "models").mkdir()
    for name in ("tiles", "labels"):
        os.symlink((source / "data" / name).resolve(), root / "data" / name)
    os.symlink((source / "models" / "extractor.pt").resolve(), root / "models" / "extractor.pt")
    return params, Paths(root)


def _with_workers(params: Params, workers: int, decode: str | None = None,
                  compiled: bool | None = None) -> Params:
    raw = params.model_dump(mode="json")
    raw["extractor"]["workers"] = workers
    if decode is not None:
        raw["extractor"]["decode"] = decode
    if compiled is not None:
        raw["extractor"]["compile"] = compiled
    return Params.model_validate(raw)


def _end_to_end(params: Params, paths: Paths) -> tuple[float, int, dict]:
    """(seconds, n_tiles, handle opens) of one full extract_all into an empty features folder.
    Opens: every slide / compressed-tile reader / pixel-cache handle any process opened
    (`pipeline.data.OPEN_LOG_ENV`): in total, and the most processes that opened one file."""
    shutil.rmtree(paths.features, ignore_errors=True)
    log_file = paths.root / "open_log.tsv"
    log_file.unlink(missing_ok=True)
    os.environ[OPEN_LOG_ENV] = str(log_file)
    try:
        t0 = time.perf_counter()
        summary = extract_features.extract_all(params, paths, paths.models / "extractor.pt")
        secs = time.perf_counter() - t0
    finally:
        os.environ.pop(OPEN_LOG_ENV, None)
    opens = read_open_log(log_file)
    pids_per_key: dict[str, set[int]] = {}
    for pid, key in opens:
        pids_per_key.setdefault(key, set()).add(pid)
    return secs, int(summary["n_tiles"]), {
        "handle_opens": len(opens), "handles": len(pids_per_key),
        "max_processes_per_handle": max((len(p) for p in pids_per_key.values()), default=0)}


def _data_only(params: Params, paths: Paths, device: torch.device) -> float:
    """Seconds to stream every slide's batches (uint8 crops -> device -> the encoder's
    preprocessing: resize to its input size, normalise) with the stage's loader and no model."""
    from pipeline.augment import normalize_only
    from pipeline.jpegtiles import torchvision_decoder

    sids = list(load_manifest(params.data.manifest)["slide_id"])
    norm = normalize_only(load_extractor(paths.models / "extractor.pt")[0].preprocess)
    decode = params.extractor.decode
    decoder = torchvision_decoder(device)
    t0 = time.perf_counter()
    loader = extract_features.slides_loader([paths.tile_file(s) for s in sids],
                                            params.extractor.crop_px, params.extractor.workers,
                                            batch_size=extract_features.BATCH_SIZE,
                                            decode=decode)
    for x, _, _ in loader:
        if decode == "device":
            extract_features.device_model_input(x, device, norm, decoder)
        else:
            extract_features.model_input(x, device, norm)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _profile(params: Params, paths: Paths, top: int = 25) -> None:
    """cProfile of one extract_all in the main process: waiting on the DataLoader's queue
    (`_try_get_data`, `poll`) means data-bound; launching kernels or waiting in `.cpu()`
    means model-bound; the rest is per-slide bookkeeping."""
    import cProfile
    import pstats

    shutil.rmtree(paths.features, ignore_errors=True)
    prof = cProfile.Profile()
    prof.runcall(extract_features.extract_all, params, paths, paths.models / "extractor.pt")
    print(f"\nmain-process profile, {params.extractor.workers} workers (top {top} by own time)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


@torch.no_grad()
def _model_only(ckpt: Path, crop_px: int, n_batches: int, device: torch.device,
                amp: bool = True, compiled: bool = False) -> float:
    """Seconds per batch of BATCH_SIZE random patches through the extractor: the input already
    on the device in the stage's memory format (channels_last on CUDA) and bf16 autocast when
    extractor.amp, the same forward and outputs as infer_slides, results copied to the host
    at the end: the model's own speed, an upper bound for end to end. `compiled`: through the
    stage's torch.compile forward (extractor.compile; compiled during the warm-up)."""
    from pipeline.runtime import autocast, memory_format

    model, _ = load_extractor(ckpt)
    fmt = memory_format(device)
    model.to(device).eval().to(memory_format=fmt)
    side = model.preprocess.input_px or crop_px  # a fixed-size encoder's (ViT) own input
    x = torch.randn(extract_features.BATCH_SIZE, 3, side, side, device=device)
    x = x.contiguous(memory_format=fmt)
    forward = extract_features._forward(model, compiled)
    with autocast(device, amp):
        for _ in range(3):  # warm-up: allocator, oneDNN primitive cache, cuDNN autotune
            forward(x)[1].float().cpu()
        t0 = time.perf_counter()
        outs = []
        for _ in range(n_batches):
            f, logits = forward(x)
            outs.append((f.float(), torch.softmax(logits.float(), 1)[:, 1]))
        for f, prob in outs:
            f.cpu().numpy(), prob.cpu().numpy()
    return (time.perf_counter() - t0) / n_batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="",
                    help="comma-separated extractor.workers to try (default: the params value)")
    ap.add_argument("--source", type=Path, default=None,
                    help="use this project (data/tiles, data/labels, models/extractor.pt, "
                    "params.yaml) instead of building a demo-like one")
    ap.add_argument("--out", type=Path, default=Path("reports/bench/extraction.json"))
    ap.add_argument("--arch", default=None, help="extractor arch (default: the params' arch), "
                    "e.g. timm:vit_tiny_patch16_224")
    ap.add_argument("--timm-kwargs", default="{}", type=json.loads,
                    help="JSON dict of timm.create_model kwargs for a timm: arch")
    ap.add_argument("--tile-workers", type=int, default=2, help="processes to tile the project")
    ap.add_argument("--patients", type=int, default=2, help="demo patients (5 slides each)")
    ap.add_argument("--slide-mm", type=float, default=5.0,
                    help="side of the demo slides (5 mm: ~170 tiles each; 10 mm: ~700)")
    ap.add_argument("--profile", action="store_true",
                    help="profile one end-to-end run (last reader, most workers) in the main "
                    "process and print where its time goes")
    ap.add_argument("--batch-sizes", default="",
                    help="comma-separated inference batch sizes to try (default: the stage's)")
    ap.add_argument("--readers", default="auto",
                    help="comma-separated slide readers: auto (direct TIFF tiles where they "
                    "apply) and/or openslide (every read through OpenSlide)")
    ap.add_argument("--decodes", default="cpu",
                    help="comma-separated extractor.decode values: cpu (workers decode) and/or "
                    "device (compressed tiles decoded on the model's device, nvJPEG on CUDA)")
    ap.add_argument("--compiles", default="false",
                    help="comma-separated extractor.compile values: false and/or true "
                    "(torch.compile of the forward; compiling takes minutes on a small CPU)")
    ap.add_argument("--copies", type=int, default=1,
                    help="list each demo slide this many times (symlinks): a longer run")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory(prefix="bench_extraction_") as tmp:
        root = Path(tmp)
        src = args.source
        have_source = src is not None
        params, paths = (_linked_project(src, root) if have_source
                         else _demo_project(root, args.arch, args.tile_workers, args.patients,
                                           args.copies, args.slide_mm, args.timm_kwargs))
        manifest = load_manifest(params.data.manifest)
        n_tiles = sum(read_tile_index(paths.tile_file(s)).n for s in manifest["slide_id"])
        workers_list = ([int(w) for w in args.workers.split(",")] if args.workers
                        else [params.extractor.workers])
        ckpt = paths.models / "extractor.pt"
        input_px = load_extractor(ckpt)[0].preprocess.input_px
        rows = []
        model_rates: dict[str, float] = {}  # "<batch>" or "<batch>-compile"
        compiles = [c.strip().lower() in ("true", "1", "yes") for c in args.compiles.split(",")]
        default_batch = extract_features.BATCH_SIZE
        batch_sizes = ([int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes
                       else [extract_features.BATCH_SIZE])
        data_only: dict[tuple, list[float]] = {}  # the data path does not depend on compile
        for bs in batch_sizes:
            extract_features.BATCH_SIZE = bs  # the stage reads it at call time
            n_batches = max(3, min(20, n_tiles // bs))
            for comp in compiles:
                key = f"{bs}-compile" if comp else str(bs)
                model_s = [_model_only(ckpt, params.extractor.crop_px, n_batches, device,
                                       params.extractor.amp, comp)
                           for _ in range(args.repeats)]
                model_rate = model_rates[key] = bs / statistics.median(model_s)
                for reader, decode in [(r, d) for r in args.readers.split(",")
                                       for d in args.decodes.split(",")]:
                    # DataLoader workers fork after this, so they read the slides the same way
                    os.environ[READER_ENV] = reader
                    for w in workers_list:
                        pw = _with_workers(params, w, decode, comp)
                        runs = [_end_to_end(pw, paths) for _ in range(args.repeats)]
                        secs = [s for s, _, _ in runs]
                        rate = runs[0][1] / statistics.median(secs)
                        data_s = data_only.setdefault(
                            (bs, reader, decode, w),
                            [_data_only(pw, paths, device) for _ in range(args.repeats)])
                        rows.append({"batch_size": bs, "compile": comp, "model_key": key,
                                     "reader": reader, "decode": decode, "workers": w,
                                     "seconds": secs, "patches_per_s": rate,
                                     "model_only_patches_per_s": model_rate,
                                     "model_only_seconds_per_batch": model_s,
                                     "fraction_of_model_only": rate / model_rate,
                                     "data_only_seconds": data_s,
                                     "data_only_patches_per_s":
                                         n_tiles / statistics.median(data_s),
                                     **runs[0][2]})
                        print(f"batch {bs}{', compiled' if comp else ''}, {reader}, decode "
                              f"{decode}, {w} workers: model only {model_rate:.0f}/s, "
                              f"end to end {rate:.0f}/s, data path only "
                              f"{rows[-1]['data_only_patches_per_s']:.0f}/s; "
                              f"{rows[-1]['handle_opens']} handle opens of "
                              f"{rows[-1]['handles']} files (at most "
                              f"{rows[-1]['max_processes_per_handle']} processes each)",
                              flush=True)
        extract_features.BATCH_SIZE = default_batch
        if args.profile:
            _profile(_with_workers(params, max(workers_list)), paths)
        os.environ.pop(READER_ENV, None)

    result = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "device": str(device),
                    "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                    else platform.processor()),
                    "torch_threads": torch.get_num_threads()},
        "project": "source " + str(src.resolve()) if have_source else "built demo-like project",
        "n_slides": len(manifest), "n_tiles": n_tiles, "arch": params.extractor.arch,
        "timm_kwargs": params.extractor.timm_kwargs,
        "model_input_px": input_px or params.extractor.crop_px,
        "crop_px": params.extractor.crop_px, "stage_batch_size": default_batch,
        "amp": params.extractor.amp, "repeats": args.repeats,
        "model_only": model_rates,
        "end_to_end": rows,
        "note": "median of repeats; end to end includes checkpoint load/sha256 and HDF5 writes",
    }
    write_json_atomic(args.out, result)
    print(f"\n{len(manifest)} slides, {n_tiles} tiles, {params.extractor.arch} crop "
          f"{params.extractor.crop_px} (model input {input_px or params.extractor.crop_px} px), "
          f"device {device}, {torch.get_num_threads()} torch threads, median of {args.repeats}")
    print(f"{'path':<56}{'patches/s':>12}{'% of model':>12}")
    for key, model_rate in model_rates.items():
        bs, comp = key.split("-")[0], ", compiled" if key.endswith("-compile") else ""
        print(f"{f'model only, batch {bs}{comp}':<56}{model_rate:>12.0f}{100.0:>11.0f}%")
        for r in (r for r in rows if r["model_key"] == key):
            w, how = r["workers"], comp + ("" if r["reader"] == "auto" else f", {r['reader']}")
            how += "" if r["decode"] == "cpu" else f", {r['decode']} decode"
            print(f"{f'end to end, batch {bs}, {w} workers{how}':<56}{r['patches_per_s']:>12.0f}"
                  f"{100 * r['fraction_of_model_only']:>11.0f}%")
            print(f"{f'data path only, batch {bs}, {w} workers{how}':<56}"
                  f"{r['data_only_patches_per_s']:>12.0f}"
                  f"{100 * r['data_only_patches_per_s'] / model_rate:>11.0f}%")
    best = max(rows, key=lambda r: r["fraction_of_model_only"])
    if best["fraction_of_model_only"] < 0.8:
        data, model = best["data_only_patches_per_s"], best["model_only_patches_per_s"]
        slower = "data path" if data < model else "model"
        share = best["patches_per_s"] / min(data, model)
        why = (f"so the {slower} alone is the bound" if share >= 0.8 else
               "as expected on CPU, where model and data path share the same cores"
               if device.type == "cpu" else
               "so the two do not overlap fully: the main process (kernel launches, pinned "
               "copies, HDF5 writes) is the bound too (see --profile)")
        print(f"below the 80 % target: end to end reaches {100 * share:.0f} % of the slower of "
              f"data path and model alone, {why}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
