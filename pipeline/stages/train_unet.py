"""Stage `train-unet`: Separate Learning, step 2 — the U-Net on whole-slide feature maps.

Reads data/features/<slide>.h5 (the frozen extractor's features), lays each slide's (or lump's)
features on its canvas (featuremap.*), trains the U-Net with softmax CE on tumor/normal tiles
(nolabel and background ignored), keeps the weights with the lowest val loss, and predicts
every tile of every slide (nolabel ones too).

Writes models/unet.pt, reports/train_unet.json (metrics), reports/train_unet.csv (per-epoch),
data/predictions/separate/<slide>.h5 and reports/timings/train-unet.json (wall time, kept out
of the metrics). `train_and_predict` also serves the frozen-feature baseline (features from an
untrained/ImageNet extractor).
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipeline.io import sha256_file, write_timings
from pipeline.log import get_logger, progress
from pipeline.manifest import load_manifest
from pipeline.models import save_checkpoint
from pipeline.params import Params, load_params
from pipeline.paths import Paths
from pipeline.runtime import TrainingError, pick_device, seed_everything
from pipeline.segment import (
    load_slide_maps,
    predict_tiles,
    train_unet,
    write_curves,
    write_metrics,
    write_predictions,
)
from pipeline.trainstate import state_file

log = get_logger("pipeline.train_unet")
STAGE = "train-unet"


def train_and_predict(
    params: Params, paths: Paths, feature_variant: str, method: str, checkpoint: Path,
    report_name: str, extra_attrs: dict | None = None, state_path: Path | None = None,
) -> dict:
    """Train a U-Net on paths.feature_file(·, feature_variant) maps, save it to `checkpoint`,
    write per-epoch curves/metrics under reports/<report_name>.*, and predictions for every
    slide to data/predictions/<method>/. Returns the metrics plus `seconds` (wall time, which
    the metrics file leaves out: it would change every run). `state_path`: the per-epoch
    training state (resume after a kill; pipeline/trainstate.py), deleted once all is written."""
    t0 = time.time()
    seed_everything(params.seed)
    device = pick_device()
    manifest = load_manifest(params.data.manifest)
    maps = {}
    for row in progress(list(manifest.itertuples()), desc="load maps", unit="slide"):
        maps[row.slide_id] = load_slide_maps(
            paths.feature_file(row.slide_id, feature_variant), row.slide_id, params)
    by_split = {s: [maps[r.slide_id] for r in manifest.itertuples() if r.split == s]
                for s in ("train", "val", "test")}
    if not by_split["train"]:
        raise TrainingError(f"{params.data.manifest}: no train slides for the U-Net")
    unet, fit = train_unet(by_split["train"], by_split["val"], params, device, desc=method,
                           state_path=state_path)
    rows = fit.rows
    save_checkpoint(checkpoint, unet, {
        "params_json": params.section_json("seed", "featuremap", "unet"),
        "feature_variant": feature_variant, "best_epoch": fit.best_epoch,
        "select": fit.select, "selected_epoch": fit.selected_epoch,
    })
    sha = sha256_file(checkpoint)
    off_canvas = {}  # slide -> tissue tiles that fell off its canvas (centered mode)
    for sid, m in maps.items():
        prob = predict_tiles(unet, m.features, m.layouts, device)
        write_predictions(paths.prediction_file(method, sid), prob, method, sid,
                          params.section_hash("featuremap", "unet"), sha, extra_attrs)
        if m.n_outside:
            off_canvas[sid] = m.n_outside
    write_curves(paths.reports / f"{report_name}.csv", rows, "epoch,train_loss,val_loss")
    metrics = {"best_epoch": fit.best_epoch, "select": fit.select,
               "selected_epoch": fit.selected_epoch, "val_loss": rows[fit.selected_epoch][2],
               "train_loss_last": rows[-1][1], "n_train_slides": len(by_split["train"]),
               "n_val_slides": len(by_split["val"]), "tiles_off_canvas": sum(off_canvas.values()),
               "tiles_off_canvas_by_slide": off_canvas}
    write_metrics(paths.reports / f"{report_name}.json", metrics)
    fit.state.discard()  # every output is written: the training state has served its purpose
    seconds = round(time.time() - t0, 3)
    log.info("wrote %s, predictions for %d slides to %s, %s.{json,csv} in %.1f s", checkpoint,
             len(maps), paths.prediction_file(method, "x").parent, paths.reports / report_name,
             seconds)
    return {**metrics, "seconds": seconds}


def run(params: Params, paths: Paths) -> dict:
    summary = train_and_predict(params, paths, "", "separate", paths.models / "unet.pt",
                                "train_unet", state_path=state_file(paths, STAGE))
    write_timings(paths, STAGE, seconds=summary["seconds"])
    return summary


def cli(
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
) -> None:
    """Train the U-Net on whole-slide feature maps (Separate Learning) and predict every tile.

    Reads: the manifest, data/features/*.h5; params seed, featuremap.*, unet.*.
    Writes: models/unet.pt, reports/train_unet.json, reports/train_unet.csv,
    data/predictions/separate/<slide_id>.h5, reports/timings/train-unet.json.
    """
    run(load_params(params_file), Paths())


