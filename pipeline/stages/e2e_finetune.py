"""Stage `e2e-finetune`: End-to-End Learning (paper §3.2.2) from the Separate Learning weights.

For every train slide (seeded order per epoch): stream its patches in chunks of e2e.chunk_size
from the tile index (DataLoader workers prefetch the next chunk), forward the extractor without
a graph, lay the 16-d features on the map, U-Net forward/backward, keep dL/dx, re-stream the
same chunks WITH a graph and backprop L' = sum <dL/dx, x>; then one Adam step per model
(lr e2e.lr_fe / e2e.lr_seg). The gradient is exact (pipeline/e2e.py says how: extractor
BatchNorm frozen, dropout and augmentation replayed per chunk). The U-Net runs in eval mode
(frozen BatchNorm statistics, like the extractor): a lone slide map is a batch of one, whose
statistics would otherwise overwrite the running ones learned on batches of maps.

Writes models/e2e_extractor.pt, models/e2e_unet.pt, reports/e2e.json (metrics),
reports/e2e.csv (per-epoch loss), data/features_e2e/<slide>.h5 (features of the finetuned
extractor), data/predictions/e2e/<slide>.h5 and reports/timings/e2e-finetune.json (wall times,
kept out of the metrics).

Under `torchrun --nproc_per_node=W` (docs/distributed.md) a step is W slides, one per rank, from
the same seeded epoch order (rank r takes positions r, r + W, ...): both models' gradients are
averaged over the ranks before the optimizers step, so every rank holds the same weights; the
plain run is W = 1. Rank 0 writes the checkpoints and metrics; the post-training feature
extraction and prediction writing are split over the ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import typer
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Sampler
from torchvision.transforms import v2

from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, color_transform, geometric_transform
from pipeline.data import DataError, SlidePatchDataset, loader_kwargs, slide_loader
from pipeline.distributed import (
    all_reduce_mean_grads,
    all_reduce_sum,
    barrier,
    check_in_sync,
    init_if_needed,
    relaunch_if_requested,
    shard,
)
from pipeline.e2e import ChunkSource, chunk_indices, e2e_slide_step
from pipeline.extraction import extract_all
from pipeline.featuremap import MapLayout
from pipeline.io import sha256_file, write_timings
from pipeline.log import get_logger, progress
from pipeline.manifest import load_manifest
from pipeline.models import load_extractor, load_unet, save_checkpoint
from pipeline.params import Params, load_params
from pipeline.paths import Paths
from pipeline.runtime import TrainingError, check_finite, pick_device, seed_everything
from pipeline.segment import (
    load_slide_maps,
    predict_tiles,
    write_curves,
    write_metrics,
    write_predictions,
)

log = get_logger("pipeline.e2e_finetune")
STAGE = "e2e-finetune"


def pixel_fn(crop_px: int, augment: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, 3, S, S) float pixels in 0..255 -> normalised model input. augment=False: centre crop
    (as at inference); True: the paper's train augmentation, drawn per patch from torch's RNG
    (e2e replays that RNG per chunk, so both passes see the same pixels)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    geo, col = geometric_transform(crop_px), color_transform()

    def fn(px: torch.Tensor) -> torch.Tensor:
        px = px / 255.0
        if augment:
            px = torch.stack([col(geo(p)) for p in px])
        else:
            px = v2.functional.center_crop(px, [crop_px, crop_px])
        return (px - mean.to(px)) / std.to(px)

    return fn


def loader_chunks(tile_file: Path, chunk_size: int, workers: int, cache_file: Path | None):
    """A chunk source for e2e: a DataLoader over the requested tiles in order, batch =
    chunk_size (consecutive runs, as e2e requires), uint8 pixels as float."""

    def chunks(indices: np.ndarray) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        loader = slide_loader(tile_file, indices, chunk_size, workers, None, cache_file)
        for px, idx in loader:
            yield idx.numpy(), px.float()

    return chunks


class _RequestedChunks(Sampler[list[int]]):
    """A DataLoader batch sampler whose batches are set before each pass: the chunks
    (`chunk_indices`) of the requested tiles of one slide, as positions in the concatenation
    of all slides. A DataLoader re-iterates its batch sampler at every `iter()`."""

    def __init__(self, sizes: np.ndarray, tile_files: Sequence[Path]):
        self.sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.tile_files = list(tile_files)
        self.batches: list[list[int]] = []

    def request(self, k: int, indices: np.ndarray, chunk_size: int) -> None:
        bad = indices[(indices < 0) | (indices >= self.sizes[k])]
        if bad.size:  # would silently read another slide's tile through the concatenation
            raise DataError(f"{self.tile_files[k]}: tile index {int(bad[0])} out of range "
                            f"0..{int(self.sizes[k]) - 1}")
        self.batches = [(int(self.offsets[k]) + part).tolist()
                        for part in chunk_indices(indices, chunk_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ChunkReader:
    """The chunk sources of all train slides over ONE DataLoader with persistent workers.

    Why: every e2e step streams its slide twice (pass 1 without a graph, pass 2 with one); a
    DataLoader per pass forked its workers twice per slide per epoch. Here the workers start
    once for the stage and each pass only sets the tiles to read. Yields exactly what
    `loader_chunks` yields (same chunks, same pixels)."""

    def __init__(self, tile_files: Sequence[Path], chunk_size: int, workers: int,
                 cache_files: Sequence[Path | None]):
        parts = [SlidePatchDataset(tf, None, None, c)
                 for tf, c in zip(tile_files, cache_files, strict=True)]
        sizes = np.array([len(d) for d in parts], dtype=np.int64)
        self.chunk_size = int(chunk_size)
        self.sampler = _RequestedChunks(sizes, tile_files)
        self.loader: DataLoader | None = DataLoader(
            ConcatDataset(parts), batch_sampler=self.sampler,
            **loader_kwargs(workers, persistent=True))

    def close(self) -> None:
        """Stop the persistent workers (dropping the loader drops its iterator)."""
        self.loader = None

    def source(self, k: int) -> ChunkSource:
        """The chunk source of slide k (its position in `tile_files`)."""

        def chunks(indices: np.ndarray) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
            if self.loader is None:
                raise RuntimeError("ChunkReader used after close()")
            self.sampler.request(k, np.asarray(indices, dtype=np.int64), self.chunk_size)
            for px, idx in self.loader:
                yield idx.numpy(), px.float()

        return chunks


@dataclass
class SlideJob:
    """One slide's inputs to `e2e_step`: its chunk source, map layouts, labels and step seed."""

    chunks: ChunkSource
    layouts: Sequence[MapLayout]
    labels: np.ndarray
    seed: int


def step_seed(seed: int, epoch: int, k: int) -> int:
    """Seed of the e2e step on train slide number k in `epoch` (dropout / augmentation replay);
    it depends on the slide, not on which rank runs it."""
    return seed * 1_000_003 + epoch * 10_007 + int(k)


def step_plan(order: Sequence[int], world: int) -> list[list[int]]:
    """The epoch's steps: step s holds the slides at positions s*world .. s*world + world - 1
    of `order` (rank r runs position s*world + r, i.e. positions r, r + world, ...); the last
    step may hold fewer (its spare ranks run an empty step). world=1: one slide per step."""
    order = [int(k) for k in order]
    return [order[a:a + world] for a in range(0, len(order), world)]


def e2e_step(
    extractor: nn.Module, unet: nn.Module, opt_fe: torch.optim.Optimizer,
    opt_seg: torch.optim.Optimizer, job: SlideJob | None, chunk_size: int, *,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    backprop_fraction: float = 1.0, epoch: int = 0, step: int = 0,
) -> tuple[dict | None, float]:
    """One optimizer step: this rank's slide gradients (two-block method, `e2e_slide_step`),
    then both models' gradients averaged over the ranks whose slide has labelled tiles, then
    one Adam step per model on every rank (identical updates, so the ranks stay identical).

    In a plain run that is the per-slide step (skipped when the slide has no labelled tile);
    with W ranks it is the step on the mean of up to W slides' loss gradients, i.e. what one
    process gets by accumulating those slides' gradients and dividing by their number.
    job=None (no slide left for this rank in the last step) contributes nothing but still
    takes part. Returns (e2e_slide_step's dict or None, number of slides averaged)."""
    opt_fe.zero_grad(set_to_none=True)
    opt_seg.zero_grad(set_to_none=True)
    out, weight = None, 0.0
    if job is not None:
        out = e2e_slide_step(
            extractor, unet, job.chunks, job.layouts, job.labels, chunk_size, seed=job.seed,
            augment=augment, backprop_fraction=backprop_fraction,
        )
        check_finite(torch.tensor(out["loss"]), "e2e-finetune", epoch, step)
        weight = 1.0 if out["n_labelled"] > 0 else 0.0
    n_slides = all_reduce_mean_grads(extractor, unet, weight=weight)
    if n_slides > 0:
        opt_fe.step()
        opt_seg.step()
    return out, n_slides


def run(params: Params, paths: Paths) -> dict:
    t0 = time.time()
    p = params.e2e
    rank, world, _ = init_if_needed()
    main = rank == 0
    seed_everything(params.seed)
    device = pick_device()
    extractor, ext_meta = load_extractor(paths.models / "extractor.pt")
    unet, unet_meta = load_unet(paths.models / "unet.pt")
    extractor.to(device)
    unet.to(device).eval()
    opt_fe = torch.optim.Adam(extractor.parameters(), lr=p.lr_fe)
    opt_seg = torch.optim.Adam(unet.parameters(), lr=p.lr_seg)
    manifest = load_manifest(params.data.manifest)
    train_ids = list(manifest.loc[manifest["split"] == "train", "slide_id"])
    if not train_ids:
        raise TrainingError(f"{params.data.manifest}: no train slides for e2e-finetune")
    maps = {sid: load_slide_maps(paths.feature_file(sid), sid, params) for sid in train_ids}
    augment = pixel_fn(params.extractor.crop_px, p.augment)
    if p.backprop_fraction < 1:
        log.warning("e2e.backprop_fraction=%.3f: the extractor gradient is an unbiased "
                    "APPROXIMATION (a random subset of patches is re-forwarded)",
                    p.backprop_fraction)
    if world > 1:
        log.info("rank %d of %d: %d slides per step (mean of their loss gradients), "
                 "%d steps per epoch", rank, world, world, math.ceil(len(train_ids) / world))
    caches = [paths.pixel_cache_file(sid) if params.tile.cache_pixels else None
              for sid in train_ids]
    reader = ChunkReader([paths.tile_file(sid) for sid in train_ids], p.chunk_size,
                         params.extractor.workers, caches)
    rows = []
    rng = np.random.default_rng(params.seed)
    for epoch in range(p.epochs):
        order = rng.permutation(len(train_ids))  # the same on every rank
        losses, n_ref, n_pat = [], 0, 0
        plan = step_plan(order, world)
        for step, slides in enumerate(progress(plan, desc=f"e2e epoch {epoch + 1}/{p.epochs}",
                                               unit="step" if world > 1 else "slide",
                                               disable=not main)):
            job = None
            if rank < len(slides):
                k = slides[rank]
                sid = train_ids[k]
                m = maps[sid]
                job = SlideJob(reader.source(k), m.layouts, m.labels,
                               step_seed(params.seed, epoch, k))
            out, _ = e2e_step(extractor, unet, opt_fe, opt_seg, job, p.chunk_size,
                              augment=augment, backprop_fraction=p.backprop_fraction,
                              epoch=epoch, step=step)
            if out is None or out["n_labelled"] == 0:
                continue
            losses.append(out["loss"])
            n_ref += out["n_reforwarded"]
            n_pat += out["n_patches"]
        loss_sum, n_loss, n_pat, n_ref = all_reduce_sum(
            [float(np.sum(losses)), len(losses), n_pat, n_ref], device)
        if world == 1:  # the plain run's float arithmetic, unchanged
            mean_loss = float(np.mean(losses)) if losses else float("nan")
        else:
            mean_loss = loss_sum / n_loss if n_loss else float("nan")
        rows.append((epoch, mean_loss, int(n_pat), int(n_ref)))
        check_in_sync(extractor, unet, where=f"e2e-finetune epoch {epoch}")
        log.info("e2e epoch %d: mean slide loss %.5f, %d patches forwarded, %d re-forwarded",
                 epoch, rows[-1][1], n_pat, n_ref)

    reader.close()  # its workers would otherwise idle through the feature extraction below
    ext_ckpt, unet_ckpt = paths.models / "e2e_extractor.pt", paths.models / "e2e_unet.pt"
    if main:
        extra = {"world_size": world} if world > 1 else {}
        save_checkpoint(ext_ckpt, extractor.cpu(), {**_keep(ext_meta), "e2e_params_json":
                                                    params.section_json("e2e"), **extra})
        save_checkpoint(unet_ckpt, unet.cpu(), {**_keep(unet_meta), "e2e_params_json":
                                                params.section_json("e2e"), **extra})
    barrier()  # the checkpoints exist for every rank
    unet.to(device)
    # Evaluation needs every slide's features from the finetuned extractor, and its U-Net maps;
    # both are split over the ranks (slide i -> rank i % world).
    feat_summary = extract_all(params, paths, ext_ckpt, variant="e2e")
    sha = sha256_file(unet_ckpt)
    for sid in shard(list(manifest["slide_id"]), rank, world):
        ms = load_slide_maps(paths.feature_file(sid, "e2e"), sid, params)
        prob = predict_tiles(unet, ms.features, ms.layouts, device)
        write_predictions(paths.prediction_file("e2e", sid), prob, "e2e", sid,
                          params.section_hash("featuremap", "unet", "e2e"), sha)
        del ms, prob
    barrier()
    metrics = {
        "train_loss_first_epoch": rows[0][1] if rows else float("nan"),
        "train_loss_last_epoch": rows[-1][1] if rows else float("nan"),
        "epochs": p.epochs, "lr_fe": p.lr_fe, "lr_seg": p.lr_seg,
        "n_train_slides": len(train_ids),
    }
    if world > 1:
        metrics["world_size"] = world
    # wall times: the summary and reports/timings only (the metrics would change every run)
    timings = {"seconds": round(time.time() - t0, 3),
               "feature_extraction_seconds": feat_summary["seconds"]}
    if main:
        write_curves(paths.reports / "e2e.csv", rows, "epoch,train_loss,n_patches,n_reforwarded")
        write_metrics(paths.reports / "e2e.json", metrics)
        write_timings(paths, STAGE, **timings)
        log.info("wrote %s, %s, data/features_e2e, data/predictions/e2e, reports/e2e.{json,csv} "
                 "in %.1f s", ext_ckpt, unet_ckpt, timings["seconds"])
    barrier()
    return {**metrics, **timings}


def _keep(meta: dict) -> dict:
    """Meta of the source checkpoint minus the architecture keys save_checkpoint re-derives."""
    return {k: v for k, v in meta.items() if k not in {"kind"}}


def cli(
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
) -> None:
    """End-to-End finetuning of extractor + U-Net with the exact two-block gradient.

    Reads: models/extractor.pt, models/unet.pt, the manifest, data/tiles/*.h5, data/features/*.h5
    (labels and map layouts), the slides (or pixel caches); params seed, e2e.*, featuremap.*,
    unet.depth, extractor.crop_px/workers, tile.cache_pixels.
    Writes: models/e2e_extractor.pt, models/e2e_unet.pt, reports/e2e.json, reports/e2e.csv,
    data/features_e2e/*.h5, data/predictions/e2e/*.h5, reports/timings/e2e-finetune.json.
    Data-parallel under torchrun.
    """
    relaunch_if_requested()
    run(load_params(params_file), Paths())
