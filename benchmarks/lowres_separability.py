"""How much of the tumor/normal answer a low-resolution colour summary gives away.

The probe: every labelled tile (tumor / normal, nolabel dropped) of the project's data is
shrunk to 1/`--downsample` of its resolution (area average; 256 px tiles at 1 um/px become a
16 x 16 thumbnail of 16 um pixels) and described by colour only: mean and std over the
thumbnail's pixels of R, G, B and HSV saturation (8 numbers). A logistic regression (features
z-scored) is fitted on the train split and scored on `--split` (default test). Its ROC-AUC and
PR-AUC (trapezoidal, as in Table 1: pipeline/metrics.py) are printed next to the patch
classifier's on the same tiles (the extractor's own tumor_prob in data/features/<slide>.h5),
and next to the evaluate stage's `classifier` row of reports/metrics.json when there is one.
A second probe is fitted and scored on the tiles without glass only (tissue_fraction 1): the
tissue-border tiles, nearly all normal, are brighter and noisier, which can hide a colour
difference between tumor and normal inside the tissue.

If the probe comes close to the classifier, the data set gives the answer away at low
resolution and the comparison with the segmentation-only baseline (paper Table 1) means little.

Reads, relative to --source (a project after `dvc repro extract-features`): params.yaml, the
manifest, data/tiles, data/labels, data/features. Prints a table and writes
reports/bench/lowres_separability.json (git-ignored; results worth keeping go to docs/).

    .venv/bin/python benchmarks/lowres_separability.py [--source .] [--split test]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.data import collect_labelled
from pipeline.io import write_json_atomic
from pipeline.manifest import load_manifest
from pipeline.metrics import patch_metrics
from pipeline.params import load_params
from pipeline.paths import Paths
from pipeline.schema import LABEL, LABEL_TUMOR, TUMOR_PROB
from pipeline.slide import Slide
from pipeline.tileindex import read_tile_index

FEATURE_NAMES = ("mean_r", "mean_g", "mean_b", "mean_sat", "std_r", "std_g", "std_b", "std_sat")


def thumbnail_features(tile: np.ndarray, downsample: int = 16) -> np.ndarray:
    """(8,) colour statistics of an (S, S, 3) uint8 tile shrunk by `downsample` (box filter):
    mean and std of R, G, B and HSV saturation over the thumbnail's pixels."""
    side = max(1, tile.shape[0] // downsample)
    thumb = np.asarray(Image.fromarray(tile).resize((side, side), Image.Resampling.BOX),
                       dtype=np.float64) / 255.0
    mx, mn = thumb.max(-1), thumb.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-12), 0.0)
    chans = np.concatenate([thumb.reshape(-1, 3), sat.reshape(-1, 1)], axis=1)
    return np.concatenate([chans.mean(0), chans.std(0)])


def split_features(source: Path, split: str, downsample: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[str, int]]]:
    """Probe features X (n, 8), labels y (n,) 1 = tumor, tissue fraction (n,) and (slide_id,
    tile row) of every labelled tile of the manifest's `split`, read from the slides through
    the tile index."""
    params = load_params(source / "params.yaml")
    paths = Paths(source)
    manifest = load_manifest(source / params.data.manifest)
    items = collect_labelled(manifest, paths, split)
    feats, keys, tissue = [], [], []
    for k, tile_file in enumerate(items.tile_files):
        index = read_tile_index(tile_file)
        rows = items.tile_idx[items.slide_no == k]
        with Slide(index.slide_path) as slide:
            for i in rows:
                x, y = index.coords[i]
                feats.append(thumbnail_features(slide.read_tile(x, y, index.geometry), downsample))
                keys.append((items.slide_ids[k], int(i)))
                tissue.append(float(index.tissue_fraction[i]))
    y = (items.labels == LABEL_TUMOR).astype(np.int8)
    return np.asarray(feats).reshape(-1, len(FEATURE_NAMES)), y, np.asarray(tissue), keys


def classifier_probs(source: Path, keys: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The extractor's own tumor probability and label of the tiles `keys`, from
    data/features/<slide>.h5 (written by extract-features)."""
    paths = Paths(source)
    probs, labels, cache = [], [], {}
    for sid, i in keys:
        if sid not in cache:
            with h5py.File(paths.feature_file(sid), "r") as f:
                cache = {sid: (f[TUMOR_PROB][...], f[LABEL][...])}
        p, lab = cache[sid]
        probs.append(float(p[i]))
        labels.append(int(lab[i] == LABEL_TUMOR))
    return np.asarray(labels, np.int8), np.asarray(probs)


def _auc_row(m: dict) -> dict:
    return {k: m[k] for k in ("roc_auc", "pr_auc", "average_precision", "accuracy", "n",
                              "n_tumor")}


def _probe(seed: int):
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))


def run(source: Path, split: str, downsample: int, seed: int, classifier: bool = True) -> dict:
    t0 = time.perf_counter()
    x_tr, y_tr, f_tr, _ = split_features(source, "train", downsample)
    x_te, y_te, f_te, keys = split_features(source, split, downsample)
    probe = _probe(seed).fit(x_tr, y_tr)
    # the same probe on tiles with no glass: tissue-border tiles (almost all normal) are
    # brighter and add noise that can hide a colour difference inside the tissue
    full_tr, full_te = f_tr >= 1.0, f_te >= 1.0
    inner = _probe(seed).fit(x_tr[full_tr], y_tr[full_tr])
    result: dict = {
        "split": split,
        "downsample": downsample,
        "features": list(FEATURE_NAMES),
        "n_train": int(y_tr.size),
        "n_train_tumor": int(y_tr.sum()),
        "probe": _auc_row(patch_metrics(y_te, probe.predict_proba(x_te)[:, 1])),
        "probe_train": _auc_row(patch_metrics(y_tr, probe.predict_proba(x_tr)[:, 1])),
        "probe_full_tissue": _auc_row(patch_metrics(
            y_te[full_te], inner.predict_proba(x_te[full_te])[:, 1])),
    }
    if classifier and Paths(source).features.is_dir():
        y_cls, p_cls = classifier_probs(source, keys)
        if not np.array_equal(y_cls, y_te):
            raise SystemExit(f"{source}/data/features: labels differ from data/labels; "
                             "rerun extract-features")
        result["classifier"] = _auc_row(patch_metrics(y_cls, p_cls))
    metrics_file = source / "reports" / "metrics.json"
    if classifier and metrics_file.is_file():
        row = json.loads(metrics_file.read_text()).get("patch", {}).get("classifier")
        if row:
            result["metrics_json_classifier"] = _auc_row(row)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=Path("."), help="project root to read")
    ap.add_argument("--split", default="test", help="split the probe is scored on")
    ap.add_argument("--downsample", type=int, default=16, help="tile px per thumbnail px")
    ap.add_argument("--seed", type=int, default=0, help="logistic regression random_state")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output (default <source>/reports/bench/lowres_separability.json)")
    ap.add_argument("--probe-only", action="store_true",
                    help="skip the classifier columns (data/features not yet rebuilt)")
    args = ap.parse_args()
    res = run(args.source, args.split, args.downsample, args.seed, not args.probe_only)
    print(f"split {res['split']}: {res['probe']['n']} tiles ({res['probe']['n_tumor']} tumor); "
          f"probe trained on {res['n_train']} train tiles ({res['n_train_tumor']} tumor)")
    print(f"{'model':<44} {'ROC-AUC':>8} {'PR-AUC':>8} {'tiles':>6} {'tumor':>6}")
    rows = [(f"colour probe, 1/{res['downsample']} res, 8 features", res["probe"]),
            ("  (same probe on its own train split)", res["probe_train"]),
            ("  (fit and scored on tiles without glass)", res["probe_full_tissue"])]
    if "classifier" in res:
        rows.append(("patch classifier (data/features tumor_prob)", res["classifier"]))
    if "metrics_json_classifier" in res:
        rows.append(("patch classifier (reports/metrics.json)", res["metrics_json_classifier"]))
    for name, m in rows:
        print(f"{name:<44} {m['roc_auc']:>8.4f} {m['pr_auc']:>8.4f} {m['n']:>6} {m['n_tumor']:>6}")
    out = args.out or args.source / "reports" / "bench" / "lowres_separability.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, res)
    print(f"wrote {out} ({res['seconds']} s)")


if __name__ == "__main__":
    main()
