"""Stage `e2e-finetune`: End-to-End Learning (paper §3.2.2) from the Separate Learning weights.

For every train slide (seeded order per epoch): stream its patches in chunks of e2e.chunk_size
from the tile index (DataLoader workers prefetch the next chunk), forward the extractor without
a graph, lay the 16-d features on the map, U-Net forward/backward, keep dL/dx, re-stream the
same chunks WITH a graph and backprop L' = sum <dL/dx, x>; then one Adam step per model
(lr e2e.lr_fe / e2e.lr_seg). The gradient is exact (pipeline/e2e.py says how: extractor
BatchNorm frozen, dropout and augmentation replayed per chunk). The U-Net runs in eval mode
(frozen BatchNorm statistics, like the extractor): a lone slide map is a batch of one, whose
statistics would otherwise overwrite the running ones learned on batches of maps.

Adam's master weights are float64 by default (e2e.master_dtype, pipeline/e2e_train.py): at
lr 1e-9 a float32 Adam step is below half an ulp of most weights and would be rounded away.

Writes models/e2e_extractor.pt, models/e2e_unet.pt, reports/e2e.json (metrics, including how
far each model moved from its starting checkpoint: fraction of trained parameter elements that
changed and relative L2 of the change, after the last epoch and per epoch), reports/e2e.csv
(per-epoch loss and movement), data/features_e2e/<slide>.h5 (features of the finetuned
extractor), data/predictions/e2e/<slide>.h5 and reports/timings/e2e-finetune.json (wall times,
kept out of the metrics).

Resume: every e2e.state_every_slides train slides and after each epoch, an atomic training
state (both models, both optimizers with their master weights, epoch, the epoch's slide order
and position, loss sums, RNG states) goes to models/state/e2e-finetune/state.pt
(pipeline/trainstate.py; not a DVC output, deleted once the outputs are written). A rerun with
the same params and inputs continues from it and ends bit-identical to an uninterrupted run
(CPU); other params or inputs start from scratch with a log line saying so.

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
import pandas as pd
import torch
import typer
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Sampler
from torchvision.transforms import v2

from pipeline.augment import (
    IMAGENET_PREPROCESS,
    Preprocess,
    color_transform,
    geometric_transform,
    interpolation_mode,
)
from pipeline.data import DataError, SlidePatchDataset, loader_kwargs, slide_loader
from pipeline.distributed import (
    all_reduce_mean_grads,
    all_reduce_sum,
    barrier,
    check_in_sync,
    gather_objects,
    init_if_needed,
    relaunch_if_requested,
    shard,
)
from pipeline.e2e import ChunkSource, chunk_indices, e2e_slide_step
from pipeline.e2e_train import (
    StepOptimizer,
    make_optimizer,
    movement,
    snapshot,
    val_slide_loss,
)
from pipeline.extraction import extract_all
from pipeline.featuremap import MapLayout
from pipeline.io import sha256_file, write_timings
from pipeline.log import get_logger, progress
from pipeline.manifest import load_manifest
from pipeline.models import load_extractor, load_unet, save_checkpoint
from pipeline.params import E2EParams, Params, load_params
from pipeline.paths import Paths
from pipeline.runtime import TrainingError, check_finite, pick_device, seed_everything
from pipeline.segment import (
    load_slide_maps,
    predict_tiles,
    write_curves,
    write_metrics,
    write_predictions,
)
from pipeline.trainstate import Progress, TrainState, fingerprint, select_weights, state_file

log = get_logger("pipeline.e2e_finetune")
STAGE = "e2e-finetune"


def pixel_fn(crop_px: int, augment: bool, prep: Preprocess = IMAGENET_PREPROCESS,
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, 3, S, S) float pixels in 0..255 -> model input as the extractor expects it (`prep`:
    its mean/std, and resize for a fixed-size encoder). augment=False: centre crop (as at
    inference); True: the paper's train augmentation, drawn per patch from torch's RNG (e2e
    replays that RNG per chunk, so both passes see the same pixels)."""
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    geo, col = geometric_transform(crop_px), color_transform()

    def fn(px: torch.Tensor) -> torch.Tensor:
        px = px / 255.0
        if augment:
            px = torch.stack([col(geo(p)) for p in px])
        else:
            px = v2.functional.center_crop(px, [crop_px, crop_px])
        if prep.input_px is not None:
            px = v2.functional.resize(px, [prep.input_px, prep.input_px], antialias=True,
                                      interpolation=interpolation_mode(prep.interpolation))
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
    extractor: nn.Module, unet: nn.Module, opt_fe: StepOptimizer,
    opt_seg: StepOptimizer, job: SlideJob | None, chunk_size: int, *,
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


@dataclass
class _Run:
    """What the training loop of one e2e-finetune run works with."""

    extractor: nn.Module
    unet: nn.Module
    opt_fe: StepOptimizer
    opt_seg: StepOptimizer
    reader: ChunkReader
    maps: dict
    train_ids: list[str]
    augment: Callable[[torch.Tensor], torch.Tensor]
    start: dict[str, dict[str, torch.Tensor]]  # trained parameters at the start, per model
    rank: int
    world: int
    device: torch.device
    val_jobs: list[SlideJob]  # this rank's val slides (select=best_val only)
    val_reader: ChunkReader | None
    crop_px: int


def _fingerprint(params: Params, paths: Paths, slide_ids: Sequence[str]) -> str:
    """What the training trajectory depends on: the params e2e reads (state_every_slides and
    worker counts aside), the two starting checkpoints, the train (and, for best_val, val)
    slides and their inputs."""
    inputs = [(sid, paths.feature_file(sid), paths.tile_file(sid)) for sid in slide_ids]
    return fingerprint(
        params.section_hash("seed", "e2e", "featuremap", "tile", "label"),
        params.extractor.crop_px, params.unet.depth,
        paths.models / "extractor.pt", paths.models / "unet.pt", inputs)


def _moved(r: _Run) -> dict[str, float]:
    fe, seg = movement(r.extractor, r.start["fe"]), movement(r.unet, r.start["seg"])
    return {"fe_moved_fraction": fe["moved_fraction"], "fe_rel_l2": fe["rel_l2"],
            "seg_moved_fraction": seg["moved_fraction"], "seg_rel_l2": seg["rel_l2"]}


def _save_due(step: int, world: int, every: int) -> bool:
    """True when step `step` (0-based) of an epoch completes a multiple of `every` slides."""
    return every > 0 and ((step + 1) * world) // every > (step * world) // every


def _val_loss(r: _Run) -> float:
    """Mean slide loss over the val slides with labelled tiles (all ranks), at inference."""
    total, n = 0.0, 0
    prepare = pixel_fn(r.crop_px, False, r.extractor.preprocess)
    for job in r.val_jobs:
        loss, n_labelled = val_slide_loss(r.extractor, r.unet, job.chunks, job.layouts,
                                          job.labels, prepare)
        if n_labelled:
            total, n = total + loss, n + 1
    total, n = all_reduce_sum([total, n], r.device)
    return total / n if n else float("nan")


def _train(r: _Run, p: E2EParams, seed: int, ts: TrainState, prog: Progress) -> list[tuple]:
    """The epochs (from where `prog` stands): one e2e step per slide (per W slides under DDP),
    the state saved every e2e.state_every_slides slides and after each epoch; with
    select=best_val the val loss after each epoch. Returns the per-epoch rows (epoch, loss,
    val loss, n_patches, n_reforwarded, *movement)."""
    rng = np.random.default_rng(seed)
    for _ in range(prog.epoch):  # the orders of the epochs already done
        rng.permutation(len(r.train_ids))
    main = r.rank == 0
    for epoch in range(prog.epoch, p.epochs):
        order = rng.permutation(len(r.train_ids))  # the same on every rank
        losses, n_pat, n_ref, first = [], 0, 0, 0
        if prog.extra.get("order") is not None:  # resuming inside this epoch
            order = prog.extra["order"].numpy()
            first = int(prog.extra["next_step"])
            losses, n_pat, n_ref = prog.extra["acc"][r.rank]
            losses = list(losses)
            log.info("resuming e2e epoch %d at step %d of %d", epoch, first,
                     len(step_plan(order, r.world)))
        plan = step_plan(order, r.world)
        bar = progress(range(first, len(plan)), desc=f"e2e epoch {epoch + 1}/{p.epochs}",
                       unit="step" if r.world > 1 else "slide", disable=not main)
        for step in bar:
            out = _one_step(r, p, plan[step], epoch, step, seed)
            prog.step += 1
            if out is not None and out["n_labelled"] > 0:
                losses.append(out["loss"])
                n_ref += out["n_reforwarded"]
                n_pat += out["n_patches"]
            if _save_due(step, r.world, p.state_every_slides) and step + 1 < len(plan):
                prog.extra = {"order": torch.from_numpy(np.asarray(order, np.int64)),
                              "next_step": step + 1,
                              "acc": gather_objects((list(losses), n_pat, n_ref), r.world)}
                ts.save(prog, force=True)  # e2e's cadence is e2e.state_every_slides
        loss_sum, n_loss, n_pat, n_ref = all_reduce_sum(
            [float(np.sum(losses)), len(losses), n_pat, n_ref], r.device)
        if r.world == 1:  # the plain run's float arithmetic, unchanged
            mean_loss = float(np.mean(losses)) if losses else float("nan")
        else:
            mean_loss = loss_sum / n_loss if n_loss else float("nan")
        check_in_sync(r.extractor, r.unet, where=f"e2e-finetune epoch {epoch}")
        moved = _moved(r)
        val_loss = _val_loss(r) if p.select == "best_val" else float("nan")
        prog.consider(val_loss, epoch, ts.models)  # NaN (select=last) is never the best
        prog.rows.append((epoch, mean_loss, val_loss, int(n_pat), int(n_ref), *moved.values()))
        log.info("e2e epoch %d: mean slide loss %.5f%s, %d patches forwarded, %d "
                 "re-forwarded; moved: extractor %.4f of weights (rel L2 %.3g), U-Net %.4f "
                 "(rel L2 %.3g)", epoch, mean_loss,
                 f" (val {val_loss:.5f})" if p.select == "best_val" else "", n_pat, n_ref,
                 *moved.values())
        prog.epoch, prog.extra = epoch + 1, {}
        ts.save(prog, force=True)
    return prog.rows


def _one_step(r: _Run, p: E2EParams, slides: list[int], epoch: int, step: int,
              seed: int) -> dict | None:
    job = None
    if r.rank < len(slides):
        k = slides[r.rank]
        m = r.maps[r.train_ids[k]]
        job = SlideJob(r.reader.source(k), m.layouts, m.labels, step_seed(seed, epoch, k))
    out, _ = e2e_step(r.extractor, r.unet, r.opt_fe, r.opt_seg, job, p.chunk_size,
                      augment=r.augment, backprop_fraction=p.backprop_fraction,
                      epoch=epoch, step=step)
    return out


def _val_jobs(params: Params, paths: Paths, manifest: pd.DataFrame, rank: int,
              world: int) -> tuple[list[SlideJob], ChunkReader | None]:
    """This rank's share of the val slides (select=best_val), over their own reader."""
    val_ids = shard(list(manifest.loc[manifest["split"] == "val", "slide_id"]), rank, world)
    if not val_ids:
        return [], None
    caches = [paths.pixel_cache_file(sid) if params.tile.cache_pixels else None
              for sid in val_ids]
    reader = ChunkReader([paths.tile_file(sid) for sid in val_ids], params.e2e.chunk_size,
                         params.extractor.workers, caches)
    jobs = []
    for k, sid in enumerate(val_ids):
        m = load_slide_maps(paths.feature_file(sid), sid, params)
        jobs.append(SlideJob(reader.source(k), m.layouts, m.labels, 0))
    return jobs, reader


def _setup(params: Params, paths: Paths, manifest: pd.DataFrame, rank: int, world: int,
           device: torch.device) -> tuple[_Run, dict, dict]:
    """Models (from the Separate Learning checkpoints), optimizers, train slides, reader."""
    p = params.e2e
    extractor, ext_meta = load_extractor(paths.models / "extractor.pt")
    unet, unet_meta = load_unet(paths.models / "unet.pt")
    start = {"fe": snapshot(extractor), "seg": snapshot(unet)}
    extractor.to(device)
    unet.to(device).eval()
    opt_fe = make_optimizer(extractor, p.lr_fe, p.master_dtype)
    opt_seg = make_optimizer(unet, p.lr_seg, p.master_dtype)
    train_ids = list(manifest.loc[manifest["split"] == "train", "slide_id"])
    if not train_ids:
        raise TrainingError(f"{params.data.manifest}: no train slides for e2e-finetune")
    maps = {sid: load_slide_maps(paths.feature_file(sid), sid, params) for sid in train_ids}
    augment = pixel_fn(params.extractor.crop_px, p.augment, extractor.preprocess)
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
    val_jobs, val_reader = (_val_jobs(params, paths, manifest, rank, world)
                            if p.select == "best_val" else ([], None))
    r = _Run(extractor, unet, opt_fe, opt_seg, reader, maps, train_ids,
             augment, start, rank, world, device,
             val_jobs, val_reader, params.extractor.crop_px)
    return r, ext_meta, unet_meta


def run(params: Params, paths: Paths) -> dict:
    t0 = time.time()
    p = params.e2e
    rank, world, _ = init_if_needed()
    main = rank == 0
    seed_everything(params.seed)
    device = pick_device()
    manifest = load_manifest(params.data.manifest)
    r, ext_meta, unet_meta = _setup(params, paths, manifest, rank, world, device)
    val_ids = (list(manifest.loc[manifest["split"] == "val", "slide_id"])
               if p.select == "best_val" else [])  # every rank's: one fingerprint
    ts = TrainState(state_file(paths, STAGE), _fingerprint(params, paths, r.train_ids + val_ids),
                    models={"extractor": r.extractor, "unet": r.unet},
                    optimizers={"fe": r.opt_fe, "seg": r.opt_seg},
                    keep_best=p.select == "best_val")
    prog = ts.resume(device)
    rows = _train(r, p, params.seed, ts, prog)
    selected = select_weights(prog, p.select, ts.models) if rows else -1
    r.reader.close()  # its workers would otherwise idle through the feature extraction below
    if r.val_reader is not None:
        r.val_reader.close()
    moved = _moved(r)  # of the weights written below (the selected epoch's)
    extractor, unet = r.extractor, r.unet
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
    feat_summary = extract_all(params, paths, ext_ckpt, variant="e2e", manifest=manifest)
    sha = sha256_file(unet_ckpt)
    for sid in shard(list(manifest["slide_id"]), rank, world):
        ms = load_slide_maps(paths.feature_file(sid, "e2e"), sid, params)
        prob = predict_tiles(unet, ms.features, ms.layouts, device)
        write_predictions(paths.prediction_file("e2e", sid), prob, "e2e", sid,
                          params.section_hash("featuremap", "unet", "e2e"), sha)
        del ms, prob
    barrier()
    metrics = _metrics(rows, p, len(r.train_ids), world, selected, moved)
    # wall times: the summary and reports/timings only (the metrics would change every run)
    timings = {"seconds": round(time.time() - t0, 3),
               "feature_extraction_seconds": feat_summary["seconds"]}
    if main:
        write_curves(paths.reports / "e2e.csv", rows, CSV_HEADER)
        write_metrics(paths.reports / "e2e.json", metrics)
        write_timings(paths, STAGE, **timings)
        log.info("wrote %s, %s, data/features_e2e, data/predictions/e2e, reports/e2e.{json,csv} "
                 "in %.1f s", ext_ckpt, unet_ckpt, timings["seconds"])
    barrier()
    ts.discard()  # every output is written: a rerun starts from scratch
    return {**metrics, **timings}


CSV_HEADER = ("epoch,train_loss,val_loss,n_patches,n_reforwarded,fe_moved_fraction,fe_rel_l2,"
              "seg_moved_fraction,seg_rel_l2")
MOVED_KEYS = ("fe_moved_fraction", "fe_rel_l2", "seg_moved_fraction", "seg_rel_l2")


def _metrics(rows: list[tuple], p: E2EParams, n_train: int, world: int, selected: int,
             moved: dict[str, float]) -> dict:
    """reports/e2e.json: losses, the selected epoch, and how far each model moved from its
    starting checkpoint (fraction of trained parameter elements that differ; relative L2 of
    the change): of the written weights (top level, for `dvc exp show`) and per epoch."""
    nan = float("nan")
    metrics = {
        "train_loss_first_epoch": rows[0][1] if rows else nan,
        "train_loss_last_epoch": rows[-1][1] if rows else nan,
        "epochs": p.epochs, "lr_fe": p.lr_fe, "lr_seg": p.lr_seg,
        "n_train_slides": n_train, "selected_epoch": selected, **moved,
        "moved_per_epoch": {str(row[0]): dict(zip(MOVED_KEYS, row[5:], strict=True))
                            for row in rows},
    }
    if p.select == "best_val":
        metrics["val_loss"] = rows[selected][2] if rows else nan
    if world > 1:
        metrics["world_size"] = world
    return metrics


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
