"""Stage `extract-features`: every tile's 16-d feature and tumor probability, per slide.

For every tile of every manifest slide (nolabel tiles too), batch inference of the trained
extractor in eval mode on the centre crop: `features` = f_{n-1} (the feature layer), `tumor_prob`
= softmax of f_n. Output data/features/<slide_id>.h5 per pipeline/schema.py, stamped with the
checkpoint's sha256 and the tile params; a rerun skips slides whose file is current, so a killed
run resumes. `extract_slide` is also used by e2e-finetune and the frozen-feature baseline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import typer
from torch import nn

from pipeline.augment import eval_transform
from pipeline.data import slide_loader
from pipeline.errors import PipelineError
from pipeline.io import atomic_h5, h5_is_current, sha256_file
from pipeline.log import get_logger, progress
from pipeline.manifest import load_manifest
from pipeline.models import PatchClassifier, load_extractor
from pipeline.params import Params, load_params
from pipeline.paths import Paths
from pipeline.runtime import autocast, pick_device
from pipeline.schema import (
    COORDS,
    FEATURE_DTYPES,
    FEATURES,
    GRID,
    LABEL,
    LUMP_ID,
    TUMOR_PROB,
)
from pipeline.tileindex import read_tile_index

log = get_logger("pipeline.extract_features")

BATCH_SIZE = 128


def feature_params_hash(params: Params, extractor_sha256: str) -> str:
    """What makes a feature file current: the tile/label params, crop and the checkpoint."""
    tile_label = params.section_hash("tile", "label")
    return f"{tile_label}-{params.extractor.crop_px}-{extractor_sha256[:16]}"


@torch.no_grad()
def infer_slide(
    model: PatchClassifier, tile_file: Path, crop_px: int, device: torch.device, workers: int,
    amp: bool = False, pixel_cache_file: Path | None = None, desc: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, tumor_prob (N,) float32) for every tile, in tile order."""
    model.eval()
    loader = slide_loader(tile_file, None, BATCH_SIZE, workers, eval_transform(crop_px),
                          pixel_cache_file)
    n = len(loader.dataset)
    feats = np.empty((n, model.feature_dim), np.float32)
    probs = np.empty(n, np.float32)
    for x, idx in progress(loader, desc=desc, unit="batch", leave=False):
        x = x.to(device, non_blocking=True)
        with autocast(device, amp):
            f = model.features(x)
            logits = model.head(f)
        feats[idx.numpy()] = f.float().cpu().numpy()
        probs[idx.numpy()] = torch.softmax(logits.float(), 1)[:, 1].cpu().numpy()
    return feats, probs


def extract_slide(
    model: nn.Module, slide_id: str, paths: Paths, out_file: Path, params: Params,
    params_hash: str, extractor_sha256: str, device: torch.device,
) -> int:
    """Write out_file for one slide; returns the number of tiles."""
    tile_file, label_file = paths.tile_file(slide_id), paths.label_file(slide_id)
    index = read_tile_index(tile_file)
    with h5py.File(label_file, "r") as f:
        labels = np.asarray(f[LABEL][...], np.int8)
    if labels.shape[0] != index.n:
        raise PipelineError(f"{label_file}: {labels.shape[0]} labels for {index.n} tiles; "
                            "rerun the label stage")
    cache = paths.pixel_cache_file(slide_id) if params.tile.cache_pixels else None
    feats, probs = infer_slide(model, tile_file, params.extractor.crop_px, device,
                               params.extractor.workers, params.extractor.amp, cache,
                               desc=slide_id)
    with atomic_h5(out_file) as f:
        data = {FEATURES: feats, TUMOR_PROB: probs, COORDS: index.coords, GRID: index.grid,
                LUMP_ID: index.lump_id, LABEL: labels}
        for name, arr in data.items():
            f.create_dataset(name, data=np.asarray(arr, dtype=FEATURE_DTYPES[name]))
        f.attrs["params_hash"] = params_hash
        f.attrs["extractor_sha256"] = extractor_sha256
        f.attrs["extractor_arch"] = getattr(model, "arch", "")
        f.attrs["feature_dim"] = int(feats.shape[1])
        f.attrs["tile_params_json"] = params.section_json("tile")
        f.attrs["slide_id"] = slide_id
    return index.n


def extract_all(
    params: Params, paths: Paths, checkpoint: Path, variant: str = "",
    shard: tuple[int, int] | None = None,
) -> dict:
    """Features for every manifest slide with the extractor in `checkpoint`, into
    paths.feature_file(slide, variant). Skips slides whose file is current."""
    t0 = time.time()
    device = pick_device()
    model, _ = load_extractor(checkpoint)
    model.to(device)
    sha = sha256_file(checkpoint)
    phash = feature_params_hash(params, sha)
    manifest = load_manifest(params.data.manifest)
    slide_ids = list(manifest["slide_id"])
    if shard is not None:
        i, n = shard
        slide_ids = slide_ids[i::n]
    done = skipped = n_tiles = 0
    for sid in progress(slide_ids, desc=f"features{'/' + variant if variant else ''}",
                        unit="slide"):
        out = paths.feature_file(sid, variant)
        if h5_is_current(out, phash, extractor_sha256=sha):
            skipped += 1
            continue
        n_tiles += extract_slide(model, sid, paths, out, params, phash, sha, device)
        done += 1
    summary = {"checkpoint": str(checkpoint), "extractor_sha256": sha, "n_slides": len(slide_ids),
               "n_extracted": done, "n_current": skipped, "n_tiles": n_tiles,
               "seconds": round(time.time() - t0, 1)}
    log.info("read %s; wrote %d feature files to %s (%d already current): %s", checkpoint, done,
             paths.feature_file("x", variant).parent, skipped, json.dumps(summary))
    return summary


def run(params: Params, paths: Paths, shard: tuple[int, int] | None = None) -> dict:
    return extract_all(params, paths, paths.models / "extractor.pt", "", shard)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise typer.BadParameter(f"--shard must look like i/n, got {text!r}") from None
    if not 0 <= i < n:
        raise typer.BadParameter(f"--shard {text}: need 0 <= i < n")
    return i, n


def cli(
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
    shard: str = typer.Option(None, "--shard", help="i/n: only slides i, i+n, ... (array jobs)"),
) -> None:
    """Compute every tile's 16-d feature and tumor probability with the trained extractor.

    Reads: models/extractor.pt, the manifest, data/tiles/*.h5, data/labels/*.h5, the slides (or
    pixel caches); params tile.*, label.*, extractor.crop_px/workers/amp.
    Writes: data/features/<slide_id>.h5 (features, tumor_prob, coords, grid, label, lump_id).
    """
    run(load_params(params_file), Paths(), parse_shard(shard))
