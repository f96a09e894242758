"""Stage `train-seg-only`: the segmentation-only baseline of the paper's Table 1.

Paper (§4.2): "we classify the WSI score map with only the segmentation model ... reduce the
input tissue image to 1024x1024 pixels, 1/8 of the original resolution. We use U-Net". Here no
patch extractor is involved: a U-Net sees the slide's RGB pixels at low resolution.

Image / tile alignment. With tile side S px (tile.size_px) and grid pitch p level-0 px, every
tile becomes k = S / seg_only.downsample image pixels wide (paper: downsample 8, so 256 px tiles
-> 32 px); the image is the slide at p / k level-0 px per pixel (`Slide.low_res_image`), cropped
to the bounding box of the slide's tiles plus MARGIN_TILES of context, so that grid (row, col)
covers image pixels [(row - r0) k, (row - r0 + 1) k) x [(col - c0) k, (col - c0 + 1) k) where
(r0, c0) = `SegImage.origin_rc`. Unlike the paper the image is not squeezed to a fixed size: a
fixed 1024 px side would make k depend on the slide; keeping k fixed keeps one tile = one k x k
block everywhere, and the U-Net is fully convolutional.

Target: every pixel of a tile's block gets the tile's class (tumor 1, normal 0), nolabel tiles
and background IGNORE_INDEX; loss = softmax CE averaged over labelled pixels
(featuremap.masked_ce_sum_count). Training: Adam (seg_only.lr), seg_only.epochs epochs, one random
crop of crop_tiles x crop_tiles tiles per train slide per epoch (white glass padding where the
image is smaller), random rot90/flip; the weights with the lowest val loss (whole val images)
are kept. Prediction: the U-Net on the whole (padded) image; a tile's tumor probability is the
mean softmax tumor probability over its k x k block, for every tile (nolabel ones too).

U-Net: `UNet(in_channels=3, depth=5, width=8)` by default. Depth 5 gives a receptive field of
~370 image px (~12 tiles at k = 32, ~23 at k = 16), comparable context to the feature-map U-Net;
width 8 (8..256 channels) keeps CPU training of the demo around a minute. The depth is fixed
rather than unet.depth + log2(k): that would be 8 levels at k = 32, whose doubling widths reach
2048 channels (~100 M parameters) for no gain in context needed here.

Low-res images are cached in memory for the whole run (never written to disk).

Writes models/seg_only.pt, reports/train_seg_only.json (metrics), reports/train_seg_only.csv
(per-epoch losses), data/predictions/seg_only/<slide>.h5 and reports/timings/train-seg-only.json
(wall time, kept out of the metrics).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
import typer

from pipeline.errors import PipelineError
from pipeline.featuremap import MapLayout, gather, label_map
from pipeline.io import sha256_file, write_timings
from pipeline.log import get_logger, progress
from pipeline.manifest import load_manifest
from pipeline.models import extractor_input_normalization, save_checkpoint
from pipeline.params import Params, SegOnlyParams, load_params, short_hash
from pipeline.paths import Paths
from pipeline.runtime import TrainingError, pick_device, seed_everything
from pipeline.schema import IGNORE_INDEX, LABEL
from pipeline.segment import Fit, fit_segmenter, write_curves, write_metrics, write_predictions
from pipeline.slide import Slide
from pipeline.tileindex import read_tile_index
from pipeline.trainstate import state_file
from pipeline.unet import UNet

log = get_logger("pipeline.train_seg_only")

STAGE = "train-seg-only"
METHOD = "seg_only"
REPORT_NAME = "train_seg_only"
# Tiles of context kept around the tiles' bounding box (partial-tissue edges, glass).
MARGIN_TILES = 1
# Padding colour: glass is white on a slide (OpenSlide composites transparency onto white too).
PAD_RGB = 255


class SegOnlyError(PipelineError):
    """The seg-only baseline cannot build its image/target for a slide (message names it)."""


@dataclass
class SegImage:
    """One slide's tile-grid-aligned low-res image, its per-pixel target and its tiles.

    Tile i at grid (r, c) covers image[(r - r0) k : (r - r0 + 1) k, (c - c0) k : (c - c0 + 1) k]
    with (r0, c0) = origin_rc and k = px_per_tile.
    """

    slide_id: str
    image: np.ndarray  # (H, W, 3) uint8
    target: np.ndarray  # (H, W) int64: 1 tumor, 0 normal, IGNORE_INDEX elsewhere
    origin_rc: tuple[int, int]
    px_per_tile: int
    layout: MapLayout  # tiles on the (H / k, W / k) block grid, in tile order

    @property
    def n_tiles(self) -> int:
        return self.layout.n_tiles


def load_seg_image(
    slide_id: str, slide_path: str | Path, tile_file: Path, label_file: Path, downsample: int
) -> SegImage:
    """Read the slide at (grid pitch / k) level-0 px per pixel, k = tile_size_px / downsample,
    crop it to the tiles' bounding box (+ MARGIN_TILES, within the slide) and build the
    per-pixel target from the tile labels."""
    index = read_tile_index(tile_file)
    tile_px = int(index.attrs["tile_size_px"])
    pitch_px_level0 = float(index.attrs["tile_size_px_level0"])
    if tile_px % downsample:
        raise SegOnlyError(f"{tile_file}: tile_size_px {tile_px} is not divisible by "
                           f"seg_only.downsample {downsample}")
    k = tile_px // downsample
    if not label_file.is_file():
        raise SegOnlyError(f"{label_file}: label file not found; run the label stage")
    with h5py.File(label_file, "r") as f:
        labels = np.asarray(f[LABEL][...], np.int8)
    if labels.shape != (index.n,):
        raise SegOnlyError(f"{label_file}: {labels.shape[0]} labels for {index.n} tiles; "
                           "rerun the label stage")
    if index.n == 0:
        raise SegOnlyError(f"{tile_file}: slide has no tiles")
    with Slide(slide_path) as slide:
        rgb, _ = slide.low_res_image(pitch_px_level0 / k)
    grid = index.grid.astype(np.int64)
    rows_avail, cols_avail = rgb.shape[0] // k, rgb.shape[1] // k
    lo = grid.min(axis=0)
    hi = grid.max(axis=0) + 1
    if hi[0] > rows_avail or hi[1] > cols_avail:
        raise SegOnlyError(
            f"{tile_file}: tiles reach grid row/col {hi[0] - 1}/{hi[1] - 1} but {slide_path} "
            f"at 1/{downsample} has only {rows_avail}x{cols_avail} tiles; retile the slide")
    r0, c0 = (int(v) for v in np.maximum(lo - MARGIN_TILES, 0))
    r1 = int(min(hi[0] + MARGIN_TILES, rows_avail))
    c1 = int(min(hi[1] + MARGIN_TILES, cols_avail))
    image = np.ascontiguousarray(rgb[r0 * k:r1 * k, c0 * k:c1 * k])
    layout = MapLayout(tile_index=np.arange(index.n, dtype=np.int64),
                       canvas_rc=grid - np.array([r0, c0]), shape=(r1 - r0, c1 - c0),
                       offset_rc=(-r0, -c0))
    block_target = label_map(labels, layout).numpy()
    target = np.repeat(np.repeat(block_target, k, axis=0), k, axis=1)
    return SegImage(slide_id, image, target, (r0, c0), k, layout)


def _normalise(image: np.ndarray) -> torch.Tensor:
    mean, std = extractor_input_normalization()
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def padded_tensors(
    seg: SegImage, multiple: int, min_px: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised image (3, H', W'), target (H', W')): padded at the bottom/right with glass
    (white) / IGNORE_INDEX to a multiple of `multiple` and at least `min_px` per side, so pixel
    (y, x) keeps its position."""
    h, w = seg.target.shape
    hp = max(-(-h // multiple) * multiple, -(-min_px // multiple) * multiple)
    wp = max(-(-w // multiple) * multiple, -(-min_px // multiple) * multiple)
    img = np.pad(seg.image, ((0, hp - h), (0, wp - w), (0, 0)), constant_values=PAD_RGB)
    tgt = np.pad(seg.target, ((0, hp - h), (0, wp - w)), constant_values=IGNORE_INDEX)
    return _normalise(img), torch.from_numpy(tgt)


def train_seg_unet(
    train: Sequence[SegImage], val: Sequence[SegImage], cfg: SegOnlyParams, seed: int,
    device: torch.device, state_path: Path | None = None, params_hash: str = "",
) -> tuple[UNet, Fit]:
    """Train the image U-Net on random crops of the train images; keep the weights cfg.select
    asks for (best_val: the lowest val loss, train loss when there is no val slide; last).
    Returns (model on CPU, the Fit). `state_path`, `params_hash`: see fit_segmenter."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    unet = UNet(in_channels=3, depth=cfg.depth, width=cfg.width).to(device)
    opt = torch.optim.Adam(unet.parameters(), lr=cfg.lr)
    k = train[0].px_per_tile if train else 1
    crop_px = -(-cfg.crop_tiles * k // unet.multiple) * unet.multiple
    train_pairs = [padded_tensors(s, unet.multiple, crop_px) for s in train
                   if bool((s.target >= 0).any())]
    if not train_pairs:
        raise TrainingError("train-seg-only: no labelled tiles on any train slide")
    val_pairs = [padded_tensors(s, unet.multiple) for s in val]
    fit = fit_segmenter(unet, opt, train_pairs, val_pairs, epochs=cfg.epochs,
                        batch_size=cfg.batch_size, crop=crop_px, augment=cfg.augment,
                        generator=g, device=device, desc=METHOD, select=cfg.select,
                        state_path=state_path, params_hash=params_hash)
    return unet.cpu(), fit


@torch.no_grad()
def predict_seg_image(unet: UNet, seg: SegImage, device: torch.device) -> np.ndarray:
    """(N,) tumor probability of every tile: the mean softmax tumor probability over its k x k
    block of the whole-image prediction."""
    unet.eval()
    x, _ = padded_tensors(seg, unet.multiple)
    prob = torch.softmax(unet.to(device)(x[None].to(device))[0].float(), 0).cpu()
    h, w = seg.target.shape
    blocks = F.avg_pool2d(prob[:, :h, :w], seg.px_per_tile)  # (2, H / k, W / k)
    return gather(blocks, seg.layout)[:, 1].numpy().astype(np.float32)


def seg_only_hash(params: Params, cfg: SegOnlyParams) -> str:
    """What the predictions depend on: seed, tile/label params and the effective config."""
    blob = params.section_json("seed", "tile", "label", "seg_only") + json.dumps(
        cfg.model_dump(mode="json"), sort_keys=True)
    return short_hash(blob)


def run(params: Params, paths: Paths, config: SegOnlyParams | None = None) -> dict:
    """Train the seg-only U-Net on the train slides' low-res images (best on val loss), save
    it, and write predictions for every tile of every manifest slide. `config` overrides the
    settings read from params (tests)."""
    t0 = time.time()
    cfg = config or params.seg_only
    seed_everything(params.seed)
    device = pick_device()
    manifest_path = paths.root / params.data.manifest
    manifest = load_manifest(manifest_path)
    images: dict[str, SegImage] = {}
    for row in progress(list(manifest.itertuples()), desc="seg-only images", unit="slide"):
        images[row.slide_id] = load_seg_image(
            row.slide_id, row.slide_path, paths.tile_file(row.slide_id),
            paths.label_file(row.slide_id), cfg.downsample)
    k = next(iter(images.values())).px_per_tile
    t_load = time.time() - t0
    log.info("read %d slides at 1/%d (%d px per tile) in %.1f s from %s", len(images),
             cfg.downsample, k, t_load, manifest_path)
    by_split = {s: [images[r.slide_id] for r in manifest.itertuples() if r.split == s]
                for s in ("train", "val", "test")}
    if not by_split["train"]:
        raise TrainingError(f"{manifest_path}: no train slides for the seg-only U-Net")
    unet, fit = train_seg_unet(by_split["train"], by_split["val"], cfg, params.seed, device,
                               state_file(paths, STAGE), seg_only_hash(params, cfg))
    rows, best_epoch = fit.rows, fit.best_epoch
    checkpoint = paths.models / "seg_only.pt"
    save_checkpoint(checkpoint, unet, {
        "params_json": params.section_json("seed", "tile", "seg_only"),
        "seg_only_config": cfg.model_dump(mode="json"), "px_per_tile": k, "best_epoch": best_epoch,
        "select": fit.select, "selected_epoch": fit.selected_epoch,
    })
    sha = sha256_file(checkpoint)
    phash = seg_only_hash(params, cfg)
    for sid, seg in progress(list(images.items()), desc="seg-only predict", unit="slide"):
        write_predictions(paths.prediction_file(METHOD, sid), predict_seg_image(unet, seg, device),
                          METHOD, sid, phash, sha)
    write_curves(paths.reports / f"{REPORT_NAME}.csv", rows, "epoch,train_loss,val_loss")
    metrics = {
        "best_epoch": best_epoch, "select": fit.select, "selected_epoch": fit.selected_epoch,
        "val_loss": rows[fit.selected_epoch][2], "train_loss_last": rows[-1][1],
        "n_train_slides": len(by_split["train"]), "n_val_slides": len(by_split["val"]),
        "downsample": cfg.downsample, "px_per_tile": k, "unet_depth": cfg.depth,
        "unet_width": cfg.width, "epochs": cfg.epochs,
        "image_px_mean": float(np.mean([s.image.shape[0] * s.image.shape[1]
                                        for s in images.values()])),
    }
    write_metrics(paths.reports / f"{REPORT_NAME}.json", metrics)
    # wall times: the summary and reports/timings only (the metrics would change every run)
    timings = {"seconds_images": round(t_load, 3), "seconds": round(time.time() - t0, 3)}
    write_timings(paths, STAGE, **timings)
    fit.state.discard()  # every output is written: the training state has served its purpose
    log.info("wrote %s, predictions for %d slides to %s, %s.{json,csv} in %.1f s", checkpoint,
             len(images), paths.prediction_file(METHOD, "x").parent, paths.reports / REPORT_NAME,
             timings["seconds"])
    return {**metrics, **timings}


def cli(
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
) -> None:
    """Segmentation-only baseline: a U-Net on the tissue image at 1/seg_only.downsample
    resolution (no patch extractor), predicting every tile.

    Reads: the manifest, the slides, data/tiles/*.h5, data/labels/*.h5; params seed, tile.*,
    seg_only.*.
    Writes: models/seg_only.pt, reports/train_seg_only.json, reports/train_seg_only.csv,
    data/predictions/seg_only/<slide_id>.h5, reports/timings/train-seg-only.json.
    """
    run(load_params(params_file), Paths())
