"""Stage `train-frozen`: the frozen-feature baseline of the paper's Table 1 ("Imagenet feature").

Paper (§4.2): the feature extractor is not trained on patches; the U-Net is trained on features
of an ImageNet-trained GoogLeNet. Here the extractor is `build_extractor(extractor.arch,
extractor.feature_dim, extractor.pretrained)` with the weights `fetch-weights` put in
models/pretrained/ (a DVC-tracked input: the params, never a file's presence in some cache,
decide which row this is), after `torch.manual_seed(seed)`:
- pretrained imagenet (the paper's row; GoogLeNet's file from torchvision's weights API): its
  new backbone->feature_dim Linear (1024 -> 16 for GoogLeNet) is random (seeded), so the
  features are a fixed random projection of the ImageNet features. The paper's f_{n-1} is that
  layer after training on patches; a random projection keeps the ImageNet information only
  approximately (16 of 1024 directions), the price of keeping the map 16 channels wide like the
  other methods. With extractor.feature_dim=native the encoder's own features go to the U-Net;
- pretrained hf-hub:<repo> or a file with a timm:<model> arch: "frozen foundation-model
  features + U-Net", the same way;
- pretrained none: an untrained extractor, random-init features, the weakest possible baseline.
Which one was used is recorded as attr `frozen_extractor` ("imagenet" | "untrained" |
"pretrained:<repo or file name>") in every prediction file, in reports/train_frozen.json and in
the extractor checkpoint's meta.

Feature standardisation (on by default; `frozen.standardize` in params when that key exists). A
random feature layer gives features whose tile-to-tile spread is tiny next to their offset from
zero (demo, untrained small_cnn: std ~1e-3 against means ~0.05), while the U-Net's canvas is zero
off tissue: the tumor signal is then ~50x below the tissue/background contrast and the U-Net at
lr 1e-4 never finds it (demo test PR-AUC 0.10, although a logistic regression on the same
standardised features reaches ROC-AUC 0.96). So the per-channel mean and std of the features
over a seeded sample of train-slide tiles (STATS_TILES_PER_SLIDE per slide, labels unused) are
folded into the feature Linear (W / std, (b - mean) / std): the saved extractor outputs
standardised features, extract_all and the U-Net are unchanged, and nothing is trained.

Then: features of every tile with that extractor (`extract_all`, variant "frozen"), a U-Net
trained on them exactly as in Separate Learning (`train_and_predict`: featuremap.*, unet.*),
and predictions for every tile.

Writes models/frozen_extractor.pt, models/frozen_unet.pt, data/features_frozen/<slide>.h5,
data/predictions/frozen/<slide>.h5, reports/train_frozen.json, reports/train_frozen.csv, and
reports/timings/train-frozen.json (wall times, kept out of the metrics).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import typer

from pipeline.augment import eval_transform
from pipeline.data import slide_loader
from pipeline.encoders import HF_PREFIX, PRETRAINED_DIR
from pipeline.errors import PipelineError
from pipeline.extraction import BATCH_SIZE, extract_all
from pipeline.io import write_timings
from pipeline.log import get_logger
from pipeline.manifest import load_manifest
from pipeline.models import (
    ChannelAffine,
    PatchClassifier,
    build_extractor,
    load_extractor,
    save_checkpoint,
)
from pipeline.params import Params, load_params
from pipeline.paths import Paths
from pipeline.runtime import pick_device
from pipeline.segment import train_and_predict, write_metrics
from pipeline.tileindex import read_tile_index
from pipeline.trainstate import state_file

log = get_logger("pipeline.train_frozen")

STAGE = "train-frozen"
METHOD = "frozen"
VARIANT = "frozen"
REPORT_NAME = "train_frozen"
ATTR = "frozen_extractor"
ATTR_STANDARDIZED = "frozen_standardized"
IMAGENET = "imagenet"
UNTRAINED = "untrained"
# Tiles per train slide whose features give the standardisation statistics.
STATS_TILES_PER_SLIDE = 64


def frozen_source(pretrained: str) -> str:
    """The frozen_extractor label of extractor.pretrained."""
    if pretrained in ("none", IMAGENET):
        return UNTRAINED if pretrained == "none" else IMAGENET
    name = pretrained[len(HF_PREFIX):] if pretrained.startswith(HF_PREFIX) else Path(
        pretrained).name
    return f"pretrained:{name}"


def frozen_extractor(params: Params, weights_dir: Path | None) -> tuple[PatchClassifier, str]:
    """(extractor, frozen_extractor label) built from extractor.arch/pretrained/feature_dim
    with the weights in `weights_dir` (models/pretrained, filled by fetch-weights; None: the
    torch hub / HF caches, for use outside the pipeline)."""
    p = params.extractor
    # Seed before building: the new Linear layers (and the whole net when untrained) are random.
    torch.manual_seed(params.seed)
    model = build_extractor(p.arch, p.feature_dim, p.pretrained, timm_kwargs=p.timm_kwargs,
                            weights_dir=weights_dir)
    model.set_trainable_blocks(0)  # the checkpoint then says so: a frozen encoder, not "all"
    source = frozen_source(p.pretrained)
    log.info("frozen extractor: %s %s", source, p.arch)
    return model, source


@torch.no_grad()
def feature_stats(
    model: PatchClassifier, params: Params, paths: Paths, slide_ids: list[str],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, std, n tiles) per feature channel over a seeded sample of up to
    STATS_TILES_PER_SLIDE tiles (any label) of each slide, eval mode, centre crops."""
    model.eval().to(device)
    rng = np.random.default_rng(params.seed)
    feats = []
    for sid in slide_ids:
        n = read_tile_index(paths.tile_file(sid)).n
        rows = np.sort(rng.choice(n, size=min(n, STATS_TILES_PER_SLIDE), replace=False))
        cache = paths.pixel_cache_file(sid) if params.tile.cache_pixels else None
        loader = slide_loader(paths.tile_file(sid), rows, BATCH_SIZE, params.extractor.workers,
                              eval_transform(params.extractor.crop_px, model.preprocess), cache)
        feats += [model.features(x.to(device)).float().cpu() for x, _ in loader]
    if not feats:
        raise PipelineError(f"{params.data.manifest}: no train tiles to standardise the frozen "
                            "features on")
    f = torch.cat(feats)
    return f.mean(0), f.std(0, unbiased=False), int(f.shape[0])


@torch.no_grad()
def fold_standardization(model: PatchClassifier, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make model.features(x) return (features - mean) / std by rescaling the feature Linear
    (or, feature_dim native, the fixed per-channel affine map in its place)."""
    layer = model.feature
    if isinstance(layer, ChannelAffine):
        std = std.clamp_min(1e-12).to(layer.scale)
        layer.scale.div_(std)
        layer.shift.sub_(mean.to(std)).div_(std)
        return
    std = std.clamp_min(1e-12).to(layer.weight)
    layer.weight.div_(std[:, None])
    layer.bias.sub_(mean.to(std)).div_(std)


def _standardize_setting(params: Params) -> bool:
    return params.frozen.standardize


def _same_checkpoint(path: Path, model: PatchClassifier, meta: dict) -> bool:
    """True when `path` already holds exactly these weights and meta. torch.save output is not
    byte-stable (it embeds the temp file's name), so rewriting an identical extractor would
    change its sha256 and make extract_all redo every slide."""
    if not path.is_file():
        return False
    try:
        old, old_meta = load_extractor(path)
    except PipelineError:
        return False
    if any(old_meta.get(k) != v for k, v in meta.items()):
        return False
    new_state, old_state = model.state_dict(), old.state_dict()
    return new_state.keys() == old_state.keys() and all(
        torch.equal(new_state[k], old_state[k]) for k in new_state)


def run(params: Params, paths: Paths, standardize: bool | None = None) -> dict:
    """Build (and save) the frozen extractor, extract features of every slide with it, train
    the U-Net on them and predict every tile; returns the metrics written to
    reports/train_frozen.json plus wall `seconds` and `feature_seconds` (which the file leaves
    out). `standardize` None: params `frozen.standardize` (default True)."""
    t0 = time.time()
    if standardize is None:
        standardize = _standardize_setting(params)
    manifest = load_manifest(paths.root / params.data.manifest)
    model, source = frozen_extractor(params, paths.models / PRETRAINED_DIR)
    n_stats = 0
    if standardize:
        train_ids = list(manifest["slide_id"][manifest["split"] == "train"])
        mean, std, n_stats = feature_stats(model, params, paths, train_ids, pick_device())
        fold_standardization(model.cpu(), mean, std)
        log.info("standardised the frozen features with mean/std of %d train tiles "
                 "(std %.3g..%.3g)", n_stats, float(std.min()), float(std.max()))
    ckpt = paths.models / "frozen_extractor.pt"
    meta = {ATTR: source, ATTR_STANDARDIZED: bool(standardize),
            "params_json": params.section_json("seed", "tile", "extractor")}
    if _same_checkpoint(ckpt, model, meta):
        log.info("%s already holds this extractor; kept (features stay current)", ckpt)
    else:
        save_checkpoint(ckpt, model, meta)
        log.info("wrote %s", ckpt)
    feat = extract_all(params, paths, ckpt, variant=VARIANT)
    unet = train_and_predict(params, paths, VARIANT, METHOD, paths.models / "frozen_unet.pt",
                             REPORT_NAME, {ATTR: source, ATTR_STANDARDIZED: int(standardize)},
                             state_path=state_file(paths, STAGE))
    metrics = {**{k: v for k, v in unet.items() if k != "seconds"}, ATTR: source,
               ATTR_STANDARDIZED: bool(standardize), "n_standardization_tiles": n_stats,
               "extractor_arch": params.extractor.arch,
               "encoder": {"arch": params.extractor.arch,
                           "pretrained": params.extractor.pretrained, **model.encoder_meta()}}
    write_metrics(paths.reports / f"{REPORT_NAME}.json", metrics)
    # wall times: the summary and reports/timings only (the metrics would change every run)
    timings = {"feature_seconds": feat["seconds"], "unet_seconds": unet["seconds"],
               "seconds": round(time.time() - t0, 3)}
    write_timings(paths, STAGE, **timings)
    log.info("frozen baseline (%s extractor): %s", source, json.dumps({**metrics, **timings}))
    return {**metrics, **timings}


def cli(
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
) -> None:
    """Frozen-feature baseline ("Imagenet feature"): U-Net on features of an extractor never
    trained on patches (extractor.pretrained: ImageNet, a foundation model's weights, or none).

    Reads: the manifest, data/tiles/*.h5, data/labels/*.h5, the slides (or pixel caches),
    models/pretrained/ (fetch-weights); params seed, tile.*, label.*,
    extractor.arch/timm_kwargs/pretrained/feature_dim/crop_px/workers/amp,
    featuremap.*, unet.*, frozen.standardize (when present; default true).
    Writes: models/frozen_extractor.pt, models/frozen_unet.pt, data/features_frozen/*.h5,
    data/predictions/frozen/<slide_id>.h5, reports/train_frozen.json, reports/train_frozen.csv,
    reports/timings/train-frozen.json.
    """
    run(load_params(params_file), Paths())
