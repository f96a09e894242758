"""Stage `train-extractor`: train the patch classifier (paper §3.1 "feature extractor model").

Reads the train/val tiles (data/tiles, data/labels; nolabel tiles never train), streams their
pixels from the slides (or the pixel cache), trains with the paper's augmentation, Adam and
class balancing, keeps the checkpoint with the lowest validation loss.

Writes models/extractor.pt (weights + the params that made them), reports/train_extractor.json
(DVC metrics), reports/train_extractor.csv (per-epoch curves, DVC plots) and
reports/timings/train-extractor.json (wall time, kept out of the metrics).

Under `torchrun --nproc_per_node=K` (pipeline/distributed.py, docs/distributed.md): DDP, each
rank trains on its slice of the same seeded epoch list at batch extractor.batch_size / K (the
params' batch size stays the global batch), the validation sums are all-reduced so every rank
keeps the same best epoch, and rank 0 alone writes the outputs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import typer
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pipeline.augment import eval_transform, train_transform
from pipeline.data import PatchDataset, PatchItems, collect_labelled, patch_loader
from pipeline.distributed import (
    ShardedBalancedSampler,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    check_in_sync,
    init_if_needed,
    rank_seed,
    relaunch_if_requested,
)
from pipeline.encoders import PRETRAINED_DIR
from pipeline.io import write_json_atomic, write_text_atomic, write_timings
from pipeline.log import get_logger, progress
from pipeline.manifest import load_manifest
from pipeline.models import PatchClassifier, build_extractor, save_checkpoint
from pipeline.params import Params, load_params
from pipeline.paths import Paths
from pipeline.runtime import TrainingError, autocast, check_finite, pick_device, seed_everything
from pipeline.trainstate import TrainState, fingerprint, select_weights, state_file

log = get_logger("pipeline.train_extractor")

STAGE = "train-extractor"
CHECKPOINT = "extractor.pt"
METRICS = "train_extractor.json"
CURVES = "train_extractor.csv"


def _eval_sums(model: nn.Module, loader, device, amp: bool) -> tuple[float, int, int]:
    """(summed CE loss, n correct, n) over a loader (eval mode, no grad)."""
    model.eval()
    total, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y, _ in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(x)
            total += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
            n += int(y.numel())
    return total, correct, n


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    device: torch.device, amp: bool, epoch: int = 0, batch: int = 0,
) -> tuple[float, int, int]:
    """One optimizer step on the batch (x, y): mean CE, backward, step. Returns (loss * n,
    n correct, n) for this process's batch. When `model` is DDP-wrapped, backward averages the
    gradients over the ranks, so with equal per-rank batches of B / world the step is the
    single-process step on their union of B (BatchNorm aside: see docs/distributed.md)."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        logits = model(x)
    loss = nn.functional.cross_entropy(logits.float(), y)
    check_finite(loss, "train-extractor", epoch, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item() * y.numel(), int((logits.argmax(1) == y).sum()), int(y.numel())


def per_rank_batch(batch_size: int, world: int) -> int:
    """extractor.batch_size is the global batch; each of `world` ranks takes an equal part."""
    if batch_size % world:
        raise TrainingError(
            f"extractor.batch_size={batch_size} is the global batch and must be divisible by "
            f"the {world} ranks of this torchrun launch"
        )
    return batch_size // world


def _train_epoch(
    net: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, sampler, train_loader,
    val_loader, n_val: int, epoch: int, p, device: torch.device, main: bool,
) -> tuple[int, float, float, float, float]:
    """One epoch of training and validation: (epoch, train loss, train acc, val loss, val acc),
    sums all-reduced over the ranks (val = train without val patches)."""
    sampler.set_epoch(epoch)
    net.train()
    tot, correct, n = 0.0, 0, 0
    bar = progress(train_loader, desc=f"epoch {epoch + 1}/{p.epochs}", unit="batch",
                   disable=not main)
    for b, (x, y, _) in enumerate(bar):
        s, c, k = train_step(net, opt, x, y, device, p.amp, epoch, b)
        tot += s
        correct += c
        n += k
    tot, correct, n = all_reduce_sum([tot, correct, n], device)
    train_loss, train_acc = tot / n, correct / n
    if n_val:
        broadcast_buffers(model)  # every rank evaluates (and rank 0 saves) one model
        sums = (_eval_sums(model, val_loader, device, p.amp) if val_loader is not None
                else (0.0, 0, 0))
        v_tot, v_correct, v_n = all_reduce_sum(sums, device)
        val_loss, val_acc = v_tot / v_n, v_correct / v_n
    else:
        val_loss, val_acc = train_loss, train_acc
    check_in_sync(model, where=f"train-extractor epoch {epoch}")
    log.info("epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f",
             epoch, train_loss, train_acc, val_loss, val_acc)
    return epoch, train_loss, train_acc, val_loss, val_acc


def _fingerprint(params: Params, train: PatchItems, val: PatchItems) -> str:
    """What the training trajectory depends on: the params it reads (workers aside) and the
    train/val patches (tile index files, rows, labels)."""
    return fingerprint(params.section_hash("seed", "extractor", "tile"),
                       [(it.slide_ids, [Path(f) for f in it.tile_files], it.slide_no,
                         it.tile_idx, it.labels) for it in (train, val)])


def _model(params: Params, paths: Paths, device: torch.device, rank: int,
           world: int) -> tuple[PatchClassifier, nn.Module]:
    """(the patch classifier, the module to train: itself, or its DDP wrapper under torchrun)."""
    p = params.extractor
    model = build_extractor(p.arch, p.feature_dim, p.pretrained, timm_kwargs=p.timm_kwargs,
                            weights_dir=paths.models / PRETRAINED_DIR).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.set_trainable_blocks(p.trainable_blocks)  # frozen / last-k / full encoder (before DDP)
    net: nn.Module = model
    if world > 1:
        if device.type == "cuda":  # BatchNorm statistics over the global batch (NCCL only)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model.set_trainable_blocks(p.trainable_blocks)  # the new BN modules too
        # Same initial weights on every rank (seeded above; DDP also broadcasts rank 0's), then
        # a per-rank stream so dropout masks differ between ranks.
        torch.manual_seed(rank_seed(params.seed, rank, world))
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, net


def _loaders(params: Params, model: PatchClassifier, train: PatchItems, val: PatchItems,
             batch_size: int, rank: int, world: int,
             ) -> tuple[ShardedBalancedSampler, DataLoader, DataLoader | None]:
    """(train sampler, train loader, val loader or None when this rank has no val patch)."""
    p = params.extractor
    cache = params.tile.cache_pixels
    loader_seed = rank_seed(params.seed, rank, world)
    sampler = ShardedBalancedSampler(train.labels, params.seed, p.balance, rank, world)
    train_loader = patch_loader(
        PatchDataset(train, transform=train_transform(p.crop_px, model.preprocess),
                     pixel_cache=cache),
        batch_size, p.workers, sampler=sampler, seed=loader_seed,
    )
    # Validation: every val patch exactly once over the ranks (no padding), sums all-reduced.
    my_val = val if world == 1 else val.select(np.arange(len(val))[rank::world])
    val_loader = None
    if len(my_val):
        val_loader = patch_loader(
            PatchDataset(my_val, transform=eval_transform(p.crop_px, model.preprocess),
                         pixel_cache=cache),
            batch_size, p.workers, seed=loader_seed,
        )
    return sampler, train_loader, val_loader


def run(params: Params, paths: Paths) -> dict:
    t0 = time.time()
    p = params.extractor
    rank, world, _ = init_if_needed()
    main = rank == 0
    seed_everything(params.seed)
    device = pick_device()
    manifest = load_manifest(params.data.manifest)
    train = collect_labelled(manifest, paths, "train")
    val = collect_labelled(manifest, paths, "val")
    if len(train) == 0:
        raise TrainingError(f"{params.data.manifest}: the train split has no labelled tiles")
    batch_size = per_rank_batch(p.batch_size, world)
    model, net = _model(params, paths, device, rank, world)
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=p.lr)
    sampler, train_loader, val_loader = _loaders(params, model, train, val, batch_size, rank,
                                                 world)
    if not len(val):
        log.warning("val split has no labelled tiles: best checkpoint chosen by train loss")
    log.info("device %s, arch %s (pretrained=%s), %d train patches/epoch (of %d), %d val%s",
             device, p.arch, p.pretrained, len(sampler), len(train), len(val),
             f"; rank {rank} of {world}, batch {batch_size} per rank" if world > 1 else "")

    ts = TrainState(state_file(paths, STAGE), _fingerprint(params, train, val),
                    models={"model": model}, optimizers={"opt": opt},
                    generators={"train": train_loader.generator,
                                **({"val": val_loader.generator} if val_loader else {})})
    prog = ts.resume(device)
    for epoch in range(prog.epoch, p.epochs):
        row = _train_epoch(net, model, opt, sampler, train_loader, val_loader, len(val), epoch,
                           p, device, main)
        prog.rows.append(row)
        prog.consider(row[3], epoch, ts.models)
        prog.epoch, prog.step = epoch + 1, prog.step + len(train_loader)
        ts.save(prog, force=epoch == p.epochs - 1)
    selected = select_weights(prog, p.select, ts.models)
    metrics = _metrics(params, model, prog.rows, prog.best_epoch, selected, len(train),
                       len(val), world)
    seconds = round(time.time() - t0, 3)  # timings file and summary only, not the metrics
    if main:
        _write_outputs(params, paths, model, metrics, prog.rows, seconds)
    barrier()  # the outputs exist for every rank once this returns
    ts.discard()  # outputs written: the training state has served its purpose
    return {**metrics, "seconds": seconds}


def _metrics(params: Params, model: PatchClassifier, rows: list, best_epoch: int, selected: int,
             n_train: int, n_val: int, world: int) -> dict:
    """reports/train_extractor.json: the selected epoch's validation and the encoder."""
    p = params.extractor
    _, _, _, sel_val_loss, sel_val_acc = rows[selected]
    metrics = {
        "best_epoch": best_epoch,
        "select": p.select,
        "selected_epoch": selected,
        "val_loss": sel_val_loss,
        "val_accuracy": sel_val_acc,
        "train_loss_last": rows[-1][1],
        "n_train_patches": n_train,
        "n_val_patches": n_val,
        # which encoder, from which weights, fed how (the checkpoint records the same)
        "encoder": {"arch": p.arch, "pretrained": p.pretrained, **model.encoder_meta()},
    }
    if world > 1:
        metrics["world_size"] = world
    return metrics


def _write_outputs(params: Params, paths: Paths, model: PatchClassifier, metrics: dict,
                   rows: list, seconds: float) -> None:
    """Rank 0: the checkpoint, the metrics, the per-epoch curves and the wall time."""
    p = params.extractor
    ckpt = paths.models / CHECKPOINT
    extra = {"world_size": metrics["world_size"]} if "world_size" in metrics else {}
    save_checkpoint(ckpt, model.cpu(), {
        "params_json": params.section_json("seed", "extractor", "tile"),
        "best_epoch": metrics["best_epoch"], "select": p.select,
        "selected_epoch": metrics["selected_epoch"], "val_loss": metrics["val_loss"], **extra,
    })
    write_json_atomic(paths.reports / METRICS, metrics)
    csv = "epoch,train_loss,train_accuracy,val_loss,val_accuracy\n" + "".join(
        f"{e},{a:.6f},{b:.6f},{c:.6f},{d:.6f}\n" for e, a, b, c, d in rows
    )
    write_text_atomic(paths.reports / CURVES, csv)
    write_timings(paths, STAGE, seconds=seconds)
    log.info("wrote %s (%s: epoch %d, val loss %.4f), %s, %s in %.1f s", ckpt, p.select,
             metrics["selected_epoch"], metrics["val_loss"], paths.reports / METRICS,
             paths.reports / CURVES, seconds)

def cli(
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
) -> None:
    """Train the patch classifier (GoogLeNet / ResNet-18 / small CNN / timm encoder + 16-d
    feature layer).

    Reads: the manifest's train/val slides, data/tiles/*.h5, data/labels/*.h5 (and the slides
    or pixel caches), models/pretrained/ (fetch-weights); params seed, extractor.*,
    tile.cache_pixels.
    Writes: models/extractor.pt, reports/train_extractor.json, reports/train_extractor.csv,
    reports/timings/train-extractor.json.
    Data-parallel under torchrun (docs/distributed.md).
    """
    relaunch_if_requested()
    run(load_params(params_file), Paths())

