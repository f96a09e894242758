"""Stage `fetch-weights`: put the encoder weights that `extractor.pretrained` names into
models/pretrained/, so they are a DVC-tracked input of every stage that builds an encoder
(train-extractor, train-frozen) and dvc.lock records their hash. Without it the same commit
could give different Table 1 rows on two machines (whatever one's torch hub cache held).

- none: only models/pretrained/weights.json ({"pretrained": "none"}): the demo runs offline;
- imagenet: torchvision's file for extractor.arch (e.g. googlenet-1378be20.pth), taken from the
  torch hub cache, downloaded there first by torchvision's weights API when online;
- hf-hub:<owner>/<repo>: model.safetensors or pytorch_model.bin of that repo (HF cache, or
  downloaded when online and the user has access);
- a path: that file, copied.
Offline without the file: a one-line error naming the file, its URL and where to put it.

Writes models/pretrained/<file> and models/pretrained/weights.json (arch, pretrained, file,
sha256, bytes; no machine-specific paths, so the folder hashes the same everywhere) and
reports/timings/fetch-weights.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pipeline.encoders import PRETRAINED_DIR, fetch_weights
from pipeline.io import write_timings
from pipeline.log import get_logger
from pipeline.params import Params, load_params
from pipeline.paths import Paths

log = get_logger("pipeline.fetch_weights")
STAGE = "fetch-weights"


def run(params: Params, paths: Paths) -> dict:
    t0 = time.time()
    arch, pretrained = params.extractor.arch, params.extractor.pretrained
    info = fetch_weights(arch, pretrained, paths.models / PRETRAINED_DIR)
    seconds = round(time.time() - t0, 3)
    write_timings(paths, STAGE, seconds=seconds)
    if info["file"]:
        log.info("%s weights for %s: %s (%d bytes, sha256 %s)", pretrained, arch,
                 paths.models / PRETRAINED_DIR / info["file"], info["bytes"], info["sha256"][:16])
    else:
        log.info("extractor.pretrained=none: no weights to fetch")
    return {**info, "seconds": seconds}


def cli(
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
) -> None:
    """Copy the encoder weights named by extractor.pretrained into models/pretrained/.

    Reads: params extractor.arch/pretrained; the torch hub cache, the Hugging Face cache or the
    named file (downloads only where torchvision / the HF hub would, when online).
    Writes: models/pretrained/<weights file>, models/pretrained/weights.json,
    reports/timings/fetch-weights.json.
    """
    run(load_params(params_file), Paths())
