"""Stage `train-unet`: Separate Learning, step 2 — the U-Net on whole-slide feature maps.

Reads data/features/<slide>.h5 (the frozen extractor's features), lays each slide's (or lump's)
features on its canvas (featuremap.*), trains the U-Net with softmax CE on tumor/normal tiles
(nolabel and background ignored), keeps the weights with the lowest val loss, and predicts
every tile of every slide (nolabel ones too).

Writes models/unet.pt, reports/train_unet.json (metrics), reports/train_unet.csv (per-epoch),
data/predictions/separate/<slide>.h5 and reports/timings/train-unet.json (wall time, kept out
of the metrics). The core, `pipeline.segment.train_and_predict`, also serves the frozen-feature
baseline (features from an untrained/ImageNet extractor).
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.io import write_timings
from pipeline.log import get_logger
from pipeline.params import Params, load_params
from pipeline.paths import Paths
from pipeline.segment import train_and_predict

log = get_logger("pipeline.train_unet")
STAGE = "train-unet"


def run(params: Params, paths: Paths) -> dict:
    summary = train_and_predict(params, paths, "", "separate", paths.models / "unet.pt",
                                "train_unet")
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


