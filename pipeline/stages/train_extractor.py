"""Stage `train-extractor`: train the patch classifier (paper §3.1 "feature extractor model").

Reads the train/val tiles (data/tiles, data/labels; nolabel tiles never train), streams their
pixels from the slides (or the pixel cache), trains with the paper's augmentation, Adam and
class balancing, keeps the checkpoint with the lowest validation loss.

Writes models/extractor.pt (weights + the params that made them), reports/train_extractor.json
(DVC metrics) and reports/train_extractor.csv (per-epoch curves, DVC plots).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import typer
from torch import nn

from pipeline.augment import eval_transform, train_transform
from pipeline.data import BalancedSampler, PatchDataset, collect_labelled, patch_loader
from pipeline.io import write_json_atomic, write_text_atomic
from pipeline.log import get_logger, progress
from pipeline.manifest import load_manifest
from pipeline.models import build_extractor, save_checkpoint
from pipeline.params import Params, load_params
from pipeline.paths import Paths
from pipeline.runtime import TrainingError, autocast, check_finite, pick_device, seed_everything

log = get_logger("pipeline.train_extractor")

CHECKPOINT = "extractor.pt"
METRICS = "train_extractor.json"
CURVES = "train_extractor.csv"


def _evaluate(model: nn.Module, loader, device, amp: bool) -> tuple[float, float, int]:
    """Mean CE loss and accuracy over a loader (eval mode, no grad)."""
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
    return (total / n if n else float("nan")), (correct / n if n else float("nan")), n


def run(params: Params, paths: Paths) -> dict:
    t0 = time.time()
    p = params.extractor
    seed_everything(params.seed)
    device = pick_device()
    manifest = load_manifest(params.data.manifest)
    train = collect_labelled(manifest, paths, "train")
    val = collect_labelled(manifest, paths, "val")
    if len(train) == 0:
        raise TrainingError(f"{params.data.manifest}: the train split has no labelled tiles")

    model = build_extractor(p.arch, p.feature_dim, p.pretrained).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=p.lr)
    cache = params.tile.cache_pixels
    sampler = BalancedSampler(train.labels, params.seed, balance=p.balance)
    train_loader = patch_loader(
        PatchDataset(train, transform=train_transform(p.crop_px), pixel_cache=cache),
        p.batch_size, p.workers, sampler=sampler, seed=params.seed,
    )
    val_loader = None
    if len(val):
        val_loader = patch_loader(
            PatchDataset(val, transform=eval_transform(p.crop_px), pixel_cache=cache),
            p.batch_size, p.workers, seed=params.seed,
        )
    else:
        log.warning("val split has no labelled tiles: best checkpoint chosen by train loss")
    log.info("device %s, arch %s (pretrained=%s), %d train patches/epoch (of %d), %d val",
             device, p.arch, p.pretrained, len(sampler), len(train), len(val))

    rows, best, best_state, best_epoch = [], float("inf"), None, -1
    for epoch in range(p.epochs):
        sampler.set_epoch(epoch)
        model.train()
        tot, correct, n = 0.0, 0, 0
        bar = progress(train_loader, desc=f"epoch {epoch + 1}/{p.epochs}", unit="batch")
        for b, (x, y, _) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, p.amp):
                logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
            check_finite(loss, "train-extractor", epoch, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() * y.numel()
            correct += int((logits.argmax(1) == y).sum())
            n += int(y.numel())
        train_loss, train_acc = tot / n, correct / n
        if val_loader is not None:
            val_loss, val_acc, _ = _evaluate(model, val_loader, device, p.amp)
        else:
            val_loss, val_acc = train_loss, train_acc
        rows.append((epoch, train_loss, train_acc, val_loss, val_acc))
        log.info("epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f",
                 epoch, train_loss, train_acc, val_loss, val_acc)
        if val_loss < best:
            best, best_epoch = val_loss, epoch
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})

    model.load_state_dict(best_state)
    ckpt = paths.models / CHECKPOINT
    save_checkpoint(ckpt, model.cpu(), {
        "params_json": params.section_json("seed", "extractor", "tile"),
        "best_epoch": best_epoch, "val_loss": best,
    })
    _, _, _, best_val_loss, best_val_acc = rows[best_epoch]
    metrics = {
        "best_epoch": best_epoch,
        "val_loss": best_val_loss,
        "val_accuracy": best_val_acc,
        "train_loss_last": rows[-1][1],
        "n_train_patches": len(train),
        "n_val_patches": len(val),
        "seconds": round(time.time() - t0, 1),
    }
    write_json_atomic(paths.reports / METRICS, metrics)
    csv = "epoch,train_loss,train_accuracy,val_loss,val_accuracy\n" + "".join(
        f"{e},{a:.6f},{b:.6f},{c:.6f},{d:.6f}\n" for e, a, b, c, d in rows
    )
    write_text_atomic(paths.reports / CURVES, csv)
    log.info("wrote %s (best epoch %d, val loss %.4f), %s, %s", ckpt, best_epoch, best,
             paths.reports / METRICS, paths.reports / CURVES)
    return metrics


def cli(
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
) -> None:
    """Train the patch classifier (GoogLeNet / ResNet-18 / small CNN + 16-d feature layer).

    Reads: the manifest's train/val slides, data/tiles/*.h5, data/labels/*.h5 (and the slides
    or pixel caches); params seed, extractor.*, tile.cache_pixels.
    Writes: models/extractor.pt, reports/train_extractor.json, reports/train_extractor.csv.
    """
    run(load_params(params_file), Paths())

