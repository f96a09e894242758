"""The paper's CAMELYON configuration end to end on CAMELYON-shaped slides: seconds, peak memory
and tiles per stage, at 1x, 2x and 4x the tissue area.

For each scale s, in a fresh temp project (its own params.yaml, data/, models/, reports/):
  synth        `python -m pipeline synth-camelyon`: --n-slides slides (train, test[, val]) at
               0.243 um/px, W x H = (64000 x 32000) * sqrt(s) px, two tissue lumps of
               --lump-mm * sqrt(s) each, tumor in the first (s x the tissue area, same share
               of the slide); 9-10 pyramid levels, mostly glass
  tile         tile.mpp 0.25 (reads level 0 at 0.243 and resizes), 256 px, mask at 8 um/px
  label
  train-extractor  GoogLeNet, ImageNet-layout weights (torchvision's googlenet with
               aux_logits=True, init_weights=True: its state_dict has torchvision's exact keys,
               aux classifiers included) given as extractor.pretrained: <file>; 1 epoch,
               class-balanced, so the epoch is a subsample: every tumor patch + as many normal
  extract-features
  train-unet   featuremap.size 512 (the paper's CAMELYON canvas), centered; unet.epochs 1
  e2e-finetune 1 epoch over the 1 train slide = 1 step (two-block exact gradient)
  evaluate
  predict      the test slide(s), with the e2e models
Every stage is its own subprocess `python -m pipeline <stage>` run in the project folder, like
DVC runs it. Peak memory: `peak_rss_mib` is os.wait4's ru_maxrss of that subprocess (the largest
RSS of the stage process or of any worker process it reaped, each on its own);
`peak_tree_rss_mib` polls psutil every 0.2 s for the summed RSS of the process tree (workers
included; shared pages counted once per process, so an upper bound). This parent imports
neither torch nor numpy: a forked child inherits the parent's RSS as its starting peak.

Sizing: at 1x each slide has ~140 tissue tiles, more than one extraction batch (128, the
stage's constant) and the train-extractor epoch more than one batch (32): below that a stage's
memory grows with its batch, which fills up with the slide, and the ratio would not say whether
memory follows the slide. --quick (0.3 mm lumps) is below it: a smoke test, not a flatness test.

Flat memory: per stage, peak_rss at the largest scale / at 1x must be <= 1.2. Linear time:
per stage, seconds / tiles must not grow (seconds at s over seconds at 1x <= tiles at s over
tiles at 1x, with 20 % slack for noise; fixed start-up costs make it sublinear).

    python benchmarks/camelyon_scale.py                 # 1x, 2x, 4x (est. 20-30 min, 2 quiet cores)
    python benchmarks/camelyon_scale.py --quick         # 1x, 2x of small lumps: a smoke test
    # on a shared machine: one process per scale, then combine (memory is per process)
    python benchmarks/camelyon_scale.py --scales 4 --out /tmp/s4.json   # likewise 1 and 2
    python benchmarks/camelyon_scale.py --merge /tmp/s1.json /tmp/s2.json /tmp/s4.json
    # only the first stages (each needs the ones before it): e.g. the data stages
    python benchmarks/camelyon_scale.py --scales 1,4 --stages tile,label

Prints a table and writes reports/bench/camelyon_scale.json (copy results worth keeping to
docs/bench/). Needs no network and no GPU (uses one when present).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tile", "label", "train-extractor", "extract-features", "train-unet", "e2e-finetune",
          "evaluate", "predict")
FLAT_MAX = 1.2  # allowed peak-RSS ratio largest scale / 1x
LINEAR_SLACK = 1.2  # allowed (seconds ratio) / (tiles ratio)
BASE_W, BASE_H = 64_000, 32_000  # level-0 px at scale 1


def params_for(manifest: str, pretrained: str, workers: int) -> dict:
    """The benchmark's params.yaml (every other key: the schema's default). The paper's
    CAMELYON settings where this CPU can afford them; epochs cut to 1-2."""
    return {
        "seed": 0,
        "data": {"manifest": manifest, "track": manifest},
        "tile": {"size_px": 256, "mpp": 0.25, "mask_mpp": 8.0, "min_tissue": 0.8,
                 "workers": workers},
        "extractor": {"arch": "googlenet", "pretrained": pretrained, "feature_dim": 16,
                      "crop_px": 224, "epochs": 1, "batch_size": 32, "lr": 1e-4,
                      "balance": True, "workers": workers, "amp": True},
        "featuremap": {"size": 512, "mode": "centered", "per_lump": False},
        "unet": {"depth": 3, "width": 32, "epochs": 1, "batch_size": 1, "lr": 1e-4},
        "e2e": {"lr_fe": 1e-9, "lr_seg": 1e-7, "epochs": 1, "chunk_size": 32},
        "evaluate": {"threshold": 0.5, "split": "test"},
    }


# -- running one measured subprocess -----------------------------------------------------------
def _tree_rss_poller(pid: int, out: dict, stop: threading.Event) -> None:
    try:
        import psutil
    except ImportError:
        return
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return
    peak = 0
    while not stop.is_set():
        try:
            procs = [proc, *proc.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
        except psutil.Error:
            break
        stop.wait(0.2)
    out["peak_tree_rss_mib"] = round(peak / 2**20, 1)


def run_measured(cmd: list[str], cwd: Path, log: Path, env: dict) -> dict:
    """Run `cmd`; seconds, peak RSS (wait4) and polled tree RSS. Exits on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        polled: dict = {}
        stop = threading.Event()
        th = threading.Thread(target=_tree_rss_poller, args=(proc.pid, polled, stop),
                              daemon=True)
        th.start()
        _, status, ru = os.wait4(proc.pid, 0)
        stop.set()
        th.join()
    seconds = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} exited {rc} in {cwd}; log tail:\n{log.read_text()[-3000:]}")
    kib = ru.ru_maxrss if platform.system() != "Darwin" else ru.ru_maxrss / 1024
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(kib / 1024, 1), **polled}


# -- children (run with this script's --child-* flags; they may import torch) ------------------
def child_weights(path: str) -> None:
    """Save torchvision's GoogLeNet state_dict (its exact key layout, aux classifiers included)
    and check that the pipeline's loader accepts it; if the aux keys are refused, save the
    file without them and say so (the weights API rework makes the full layout load)."""
    import torch
    import torchvision

    from pipeline.models import ModelError, build_extractor

    torch.manual_seed(0)
    net = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    state = net.state_dict()
    torch.save(state, path)
    note = "torchvision layout with aux classifiers loads as is"
    try:
        build_extractor("googlenet", 16, path)
    except ModelError as exc:
        state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
        torch.save(state, path)
        build_extractor("googlenet", 16, path)
        why = str(exc).split(": ", 1)[-1]  # the message without the file path
        note = f"aux1/aux2 keys stripped: the loader refused them ({why})"
    print(json.dumps({"note": note, "n_keys": len(state)}))


def child_count(project: str) -> None:
    """Tiles per split, labelled tiles, tumor tiles, and tiles predicted, as JSON."""
    import h5py
    import numpy as np
    import openslide

    from pipeline.manifest import load_manifest
    from pipeline.params import load_params
    from pipeline.paths import Paths
    from pipeline.schema import LABEL, LABEL_TUMOR

    root = Path(project)
    params = load_params(root / "params.yaml")
    paths = Paths(root)
    df = load_manifest(root / params.data.manifest)
    out: dict = {"slides": {}}
    for r in df.itertuples():
        with h5py.File(paths.label_file(r.slide_id), "r") as f:
            lab = np.asarray(f[LABEL][...])
        s = openslide.OpenSlide(r.slide_path)
        out["slides"][r.slide_id] = {
            "split": r.split, "tiles": int(lab.size), "labelled": int((lab >= 0).sum()),
            "tumor": int((lab == LABEL_TUMOR).sum()), "size_px": list(s.dimensions),
            "levels": s.level_count, "mpp": float(s.properties["openslide.mpp-x"]),
            "file_mib": round(Path(r.slide_path).stat().st_size / 2**20, 1)}
    print(json.dumps(out))


# -- one scale ---------------------------------------------------------------------------------
def stage_tiles(counts: dict) -> dict[str, int]:
    """Tiles each stage processes (what its time should be linear in)."""
    sl = counts["slides"].values()
    total = sum(s["tiles"] for s in sl)
    by = {sp: sum(s["tiles"] for s in sl if s["split"] == sp) for sp in ("train", "val", "test")}
    tumor_train = sum(s["tumor"] for s in sl if s["split"] == "train")
    return {
        "tile": total, "label": total,
        # balanced epoch: every train tumor patch + as many normal, plus every val patch
        "train-extractor": 2 * tumor_train + by["val"],
        "extract-features": total,
        "train-unet": total,
        # forward without graph + re-forward with graph of the train slide, then all slides
        "e2e-finetune": 2 * by["train"] + total,
        "evaluate": by["test"],
        "predict": by["test"],
    }


def run_scale(scale: float, args, work: Path, weights: Path, env: dict, save) -> dict:
    """All stages at one scale in a fresh project; `save(res)` after each (partial results
    survive an interrupted run)."""
    proj = work / f"scale_{scale:g}"
    (proj / "logs").mkdir(parents=True)
    splits = ["train", "test", "val"][: args.n_slides]
    synth = [sys.executable, "-m", "pipeline", "synth-camelyon", "--out", "slides",
             "--n-slides", str(args.n_slides), "--scale", str(scale), "--seed", "0",
             "--width-px", str(BASE_W), "--height-px", str(BASE_H), "--lump-mm",
             str(args.lump_mm), "--n-lumps", "2", "--tumor-fraction", "0.5",
             "--splits", ",".join(splits)]
    res: dict = {"scale": scale, "stages": {}}
    res["synth"] = run_measured(synth, proj, proj / "logs" / "synth.log", env)
    params = params_for("slides/manifest.csv", str(weights), args.workers)
    # JSON is YAML 1.2: the pipeline's ruamel loader reads it as params.yaml
    (proj / "params.yaml").write_text(json.dumps(params, indent=1) + "\n")
    tiles: dict[str, int] = {}
    if "train-extractor" in args.stages:
        # the weights file into models/pretrained (where train-extractor reads it): a copy,
        # unmeasured
        subprocess.run([sys.executable, "-m", "pipeline", "fetch-weights"], cwd=proj, env=env,
                       check=True, capture_output=True)
    for stage in args.stages:
        cmd = [sys.executable, "-m", "pipeline", stage]
        if stage == "predict":
            test = sorted((proj / "slides").glob("tumor_*.tif"))[1:2]  # the test slide
            cmd += [str(p) for p in test] + ["--out", "predict_out", "--method", "e2e"]
        print(f"  scale {scale:g}: {stage} ...", end="", flush=True)
        r = run_measured(cmd, proj, proj / "logs" / f"{stage}.log", env)
        print(f" {r['seconds']:.0f} s, {r['peak_rss_mib']:.0f} MiB", flush=True)
        if stage == "label":  # tiles and labels are known from here on
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()),
                                  "--child-count", str(proj)], capture_output=True, text=True,
                                 env=env, check=True)
            res["counts"] = json.loads(out.stdout.strip().splitlines()[-1])
            tiles = stage_tiles(res["counts"])
            for done in res["stages"]:
                res["stages"][done]["tiles"] = tiles[done]
        res["stages"][stage] = {**r, **({"tiles": tiles[stage]} if tiles else {})}
        save(res)
    return res


# -- summary -----------------------------------------------------------------------------------
def checks(runs: list[dict]) -> dict:
    """Per stage: 1x against the largest scale that ran it (an interrupted run may not have
    reached every stage at every scale)."""
    base = runs[0]
    out = {}
    for stage in STAGES:
        have = [r for r in runs[1:] if stage in r["stages"]]
        if stage not in base["stages"] or not have:
            continue
        b, top = base["stages"][stage], have[-1]
        t = top["stages"][stage]
        mem = t["peak_rss_mib"] / b["peak_rss_mib"]
        tiles = t["tiles"] / max(b["tiles"], 1)
        secs = t["seconds"] / b["seconds"]
        out[stage] = {"vs_scale": top["scale"], "rss_ratio": round(mem, 3),
                      "flat": mem <= FLAT_MAX, "tiles_ratio": round(tiles, 2),
                      "seconds_ratio": round(secs, 2),
                      "at_most_linear": secs <= LINEAR_SLACK * tiles}
    return out


def print_table(runs: list[dict], chk: dict) -> None:
    scales = [r["scale"] for r in runs]
    head = f"{'stage':17s}" + "".join(f" | {f'{s:g}x: s / MiB / tiles':>24s}" for s in scales)
    print("\n" + head + f" | {'RSS ratio':>13s} | {'s ratio / tiles ratio':>21s}")
    print("-" * len(head) + "-" * 42)
    for stage in STAGES:
        cells = ""
        for r in runs:
            st = r["stages"].get(stage)
            cells += (f" | {st['seconds']:8.1f} / {st['peak_rss_mib']:6.0f} / "
                      f"{st.get('tiles', 0):5d}" if st else f" | {'-':>24s}")
        c = chk.get(stage)
        tail = (f" | {c['rss_ratio']:5.2f} at {c['vs_scale']:g}x{'' if c['flat'] else '!'} | "
                f"{c['seconds_ratio']:8.2f} / {c['tiles_ratio']:<8.2f}"
                f"{'' if c['at_most_linear'] else ' !'}" if c else "")
        print(f"{stage:17s}{cells}{tail}")
    for r in runs:
        sl = r.get("counts", {}).get("slides", {})
        if not sl:
            continue
        first = next(iter(sl.values()))
        print(f"scale {r['scale']:g}: slides {first['size_px'][0]} x {first['size_px'][1]} px, "
              f"{first['levels']} levels, mpp {first['mpp']:.3f}, "
              f"{sum(s['file_mib'] for s in sl.values()):.0f} MiB written in "
              f"{r['synth']['seconds']:.1f} s (peak {r['synth']['peak_rss_mib']:.0f} MiB); "
              f"tiles per slide {[s['tiles'] for s in sl.values()]}")


def summarize(runs: list[dict], meta: dict, out: Path) -> dict:
    """Checks over the runs (sorted by scale), the table, and the JSON written to `out`."""
    runs = sorted(runs, key=lambda r: r["scale"])
    chk = checks(runs) if len(runs) > 1 else {}
    if chk:
        print_table(runs, chk)
    complete = all(st in r["stages"] for r in runs for st in STAGES)
    result = {**meta, "runs": runs, "checks": chk, "complete": complete,
              "all_flat": bool(chk) and all(c["flat"] for c in chk.values()),
              "all_at_most_linear": bool(chk) and all(c["at_most_linear"] for c in chk.values())}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    tmp_out.replace(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="scales 1,2 and 0.3 mm lumps")
    ap.add_argument("--scales", default=None, help="comma list (default 1,2,4; quick 1,2)")
    ap.add_argument("--lump-mm", type=float, default=None,
                    help="lump diameter at 1x (default 0.75; quick 0.3)")
    ap.add_argument("--n-slides", type=int, default=2, choices=(2, 3),
                    help="2: train + test, 3: + val")
    ap.add_argument("--workers", type=int, default=1, help="tile.workers / extractor.workers")
    ap.add_argument("--work", type=Path, default=None, help="keep the projects here")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="comma list: the first stages, in order (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "camelyon_scale.json")
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="combine the JSONs of runs made one scale each (e.g. in parallel)")
    ap.add_argument("--child-weights", help=argparse.SUPPRESS)
    ap.add_argument("--child-count", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_weights:
        return child_weights(args.child_weights)
    if args.child_count:
        return child_count(args.child_count)
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        meta = {k: v for k, v in parts[0].items()
                if k not in ("runs", "checks", "complete", "all_flat", "all_at_most_linear")}
        meta["command"] = [p["command"] for p in parts]
        meta["host"] = [p["host"] for p in parts]
        meta["total_seconds"] = [p["total_seconds"] for p in parts]
        result = summarize([r for p in parts for r in p["runs"]], meta, args.out)
        print(f"complete: {result['complete']}; flat memory: {result['all_flat']}; time at "
              f"most linear in tiles: {result['all_at_most_linear']} -> {args.out}")
        return None
    scales = [float(s) for s in (args.scales or ("1,2" if args.quick else "1,2,4")).split(",")]
    args.stages = args.stages.split(",")
    if args.stages != list(STAGES[:len(args.stages)]):
        raise SystemExit(f"--stages must be the first stages of {', '.join(STAGES)}")
    args.lump_mm = args.lump_mm or (0.3 if args.quick else 0.75)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    meta: dict = {
        "benchmark": "camelyon_scale",
        "command": " ".join(["python", "benchmarks/camelyon_scale.py", *sys.argv[1:]]),
        "lump_mm_at_1x": args.lump_mm, "n_slides": args.n_slides, "workers": args.workers,
        "params": params_for("slides/manifest.csv", "<weights>", args.workers),
        "stages": args.stages,
    }
    runs: list[dict] = []

    def save(current: dict) -> None:
        meta["host"] = {"machine": platform.machine(), "cpus": os.cpu_count(),
                        "load_avg_now": [round(x, 1) for x in os.getloadavg()],
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
        meta["total_seconds"] = round(time.perf_counter() - t0, 1)
        out_runs = runs + ([current] if current not in runs else [])
        out_runs = sorted(out_runs, key=lambda r: r["scale"])
        complete = len(out_runs) == len(scales) and all(
            st in r["stages"] for r in out_runs for st in args.stages)
        tmp_out = args.out.with_suffix(".json.tmp")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out.write_text(json.dumps({**meta, "runs": out_runs, "complete": complete},
                                      indent=1) + "\n")
        tmp_out.replace(args.out)

    with tempfile.TemporaryDirectory(prefix="camelyon_scale_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        weights = work / "googlenet_imagenet_layout.pt"
        if "train-extractor" in args.stages:
            w = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-weights",
                                str(weights)], capture_output=True, text=True, env=env,
                               check=True)
            meta["weights"] = json.loads(w.stdout.strip().splitlines()[-1])
            print(f"weights: {meta['weights']['note']}")
        for scale in scales:
            runs.append(run_scale(scale, args, work, weights, env, save))
    save(runs[-1])
    result = summarize(runs, meta, args.out)
    print(f"\n{meta['total_seconds']:.0f} s in all; flat memory: {result['all_flat']}; "
          f"time at most linear in tiles: {result['all_at_most_linear']} -> {args.out}")


if __name__ == "__main__":
    main()
