"""The segmentation model on whole-slide feature maps: loading a slide's features onto its
map(s), training the U-Net, and predicting every tile. Shared by train-unet, the frozen-feature
baseline, e2e-finetune, evaluate and predict, so the placement and prediction code exists once;
`train_and_predict` is the whole of Separate Learning's step 2 (train-unet, train-frozen).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.featuremap import (
    MapLayout,
    build_layouts,
    gather,
    label_map,
    masked_ce_sum_count,
    place,
    random_crop,
)
from pipeline.io import atomic_h5, sha256_file, write_json_atomic, write_text_atomic
from pipeline.log import get_logger, progress
from pipeline.manifest import load_manifest
from pipeline.models import save_checkpoint, training_settings
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.runtime import TrainingError, check_finite, pick_device, seed_everything
from pipeline.schema import FEATURES, GRID, LABEL, LUMP_ID, TUMOR_PROB
from pipeline.trainstate import TrainState, fingerprint, select_weights
from pipeline.unet import UNet

log = get_logger("pipeline.segment")


@dataclass
class SlideMaps:
    """One slide's features and labels, and where its tiles sit on its map(s)."""

    slide_id: str
    features: np.ndarray  # (N, D) float32, tile order
    labels: np.ndarray  # (N,) int8 schema labels
    grid: np.ndarray  # (N, 2)
    tumor_prob: np.ndarray  # (N,) the extractor's own probability
    layouts: list[MapLayout]

    @property
    def n_outside(self) -> int:
        return sum(lay.n_outside for lay in self.layouts)


def slide_layouts(grid: np.ndarray, lump_id: np.ndarray, params: Params) -> list[MapLayout]:
    fm = params.featuremap
    return build_layouts(grid, lump_id, fm.size, fm.mode, fm.per_lump, params.unet.depth)


def load_slide_maps(feature_file: Path, slide_id: str, params: Params) -> SlideMaps:
    if not feature_file.is_file():
        raise PipelineError(f"{feature_file}: feature file not found; run extract-features")
    with h5py.File(feature_file, "r") as f:
        feats = np.asarray(f[FEATURES][...], np.float32)
        labels = np.asarray(f[LABEL][...], np.int8)
        grid = np.asarray(f[GRID][...])
        lump = np.asarray(f[LUMP_ID][...])
        prob = np.asarray(f[TUMOR_PROB][...], np.float32)
    layouts = slide_layouts(grid, lump, params)
    maps = SlideMaps(slide_id, feats, labels, grid, prob, layouts)
    if maps.n_outside:
        log.warning("slide %s: %d of %d tissue tiles fall outside the %dx%d canvas "
                    "(featuremap.mode=centered); use featuremap.mode=full or a larger size",
                    slide_id, maps.n_outside, len(grid), params.featuremap.size,
                    params.featuremap.size)
    return maps


def map_tensors(maps: SlideMaps) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(feature map (D, H, W), target (H, W)) per layout."""
    x = torch.from_numpy(maps.features)
    return [(place(x[lay.tile_index], lay), label_map(maps.labels[lay.tile_index], lay))
            for lay in maps.layouts]


def _dihedral(x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
    """Random rot90 / flip of a map and its target: the tile grid has no preferred orientation."""
    k = int(torch.randint(4, (1,), generator=g))
    x, y = torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))
    if int(torch.randint(2, (1,), generator=g)):
        x, y = torch.flip(x, (-1,)), torch.flip(y, (-1,))
    return x, y


def _batches(pairs, batch_size: int, crop: int | None, g: torch.Generator, augment: bool):
    order = torch.randperm(len(pairs), generator=g).tolist()
    for s in range(0, len(order), batch_size):
        xs, ys = [], []
        for i in order[s : s + batch_size]:
            x, y = pairs[i]
            if crop is not None:
                x, y = random_crop(x, y, crop, g)
            if augment:
                x, y = _dihedral(x, y, g)
            xs.append(x)
            ys.append(y)
        yield torch.stack(xs), torch.stack(ys)


def _loss_over(unet: UNet, pairs, device) -> float:
    """Mean CE over all labelled positions of the given maps (eval mode, one map at a time since
    full-mode maps differ in size)."""
    unet.eval()
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for x, y in pairs:
            s, c = masked_ce_sum_count(unet(x[None].to(device)), y[None].to(device))
            tot, cnt = tot + s.item(), cnt + int(c)
    return tot / cnt if cnt else float("nan")


@dataclass
class Fit:
    """A finished segmenter training: per-epoch rows (epoch, train_loss, val_loss), the epoch of
    the lowest val loss, the epoch whose weights the model holds (`select`), and the training
    state, to `discard()` once the stage's outputs are written."""

    rows: list[tuple]
    best_epoch: int
    selected_epoch: int
    select: str
    state: TrainState


def _segmenter_epoch(unet: UNet, opt: torch.optim.Optimizer, train_pairs, val_pairs, epoch: int,
                     batch_size: int, crop: int | None, augment: bool, g: torch.Generator,
                     device: torch.device, desc: str) -> tuple[int, float, float, int]:
    """One epoch: (epoch, train loss, val loss, optimizer steps)."""
    unet.train()
    tot, cnt, steps = 0.0, 0, 0
    for b, (x, y) in enumerate(_batches(train_pairs, batch_size, crop, g, augment)):
        s, c = masked_ce_sum_count(unet(x.to(device)), y.to(device))
        loss = s / c.clamp(min=1)
        check_finite(loss, desc, epoch, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tot, cnt, steps = tot + s.item(), cnt + int(c), steps + 1
    train_loss = tot / max(cnt, 1)
    val_loss = _loss_over(unet, val_pairs, device) if val_pairs else train_loss
    return epoch, train_loss, val_loss, steps


def fit_segmenter(
    unet: UNet, opt: torch.optim.Optimizer, train_pairs, val_pairs, *, epochs: int,
    batch_size: int, crop: int | None, augment: bool, generator: torch.Generator,
    device: torch.device, desc: str, select: str = "best_val", state_path: Path | None = None,
    params_hash: str = "",
) -> Fit:
    """The U-Net training loop shared by every segmenter (feature maps, the seg-only image):
    shuffled batches of (input, target) pairs (random crops / dihedral augmentation when asked),
    masked softmax CE, NaN check. `unet` ends with the weights `select` asks for: "best_val" the
    epoch with the lowest val loss (train loss without val pairs; the last epoch if every val
    loss is NaN), "last" the final epoch's.

    Resumable (pipeline/trainstate.py): with `state_path`, every epoch writes the training state
    there, and a run whose `params_hash`, loop settings and (train, val) tensors match the
    file's goes on after its last epoch with bit-identical results (CPU)."""
    fp = fingerprint(params_hash, epochs, batch_size, crop, augment, select,
                     train_pairs, val_pairs)
    ts = TrainState(state_path, fp, models={"unet": unet}, optimizers={"opt": opt},
                    generators={"batches": generator}, keep_best=select == "best_val")
    prog = ts.resume()
    for epoch in progress(range(prog.epoch, epochs), desc=desc, unit="epoch",
                          initial=prog.epoch, total=epochs):
        *row, steps = _segmenter_epoch(unet, opt, train_pairs, val_pairs, epoch, batch_size,
                                       crop, augment, generator, device, desc)
        prog.rows.append(tuple(row))
        prog.consider(row[2], epoch, ts.models)
        prog.epoch, prog.step = epoch + 1, prog.step + steps
        ts.save(prog, force=epoch == epochs - 1)
    best_epoch = prog.best_epoch if prog.best_epoch >= 0 else len(prog.rows) - 1
    selected = select_weights(prog, select, ts.models)
    log.info("%s: best epoch %d (val loss %.4f); kept epoch %d (select=%s, last train loss "
             "%.4f)", desc, best_epoch, prog.rows[best_epoch][2], selected, select,
             prog.rows[-1][1])
    return Fit(prog.rows, best_epoch, selected, select, ts)


def train_unet(
    train_maps: Sequence[SlideMaps], val_maps: Sequence[SlideMaps], params: Params,
    device: torch.device, desc: str = "unet", state_path: Path | None = None,
) -> tuple[UNet, Fit]:
    """Train the U-Net (Adam, masked softmax CE) on the train maps; keep the weights
    unet.select asks for. Returns (model on CPU, the Fit). `state_path`: see fit_segmenter."""
    up = params.unet
    in_ch = train_maps[0].features.shape[1]
    torch.manual_seed(params.seed)
    g = torch.Generator().manual_seed(params.seed)
    unet = UNet(in_channels=in_ch, depth=up.depth, width=up.width).to(device)
    opt = torch.optim.Adam(unet.parameters(), lr=up.lr)
    train_pairs = [p for m in train_maps for p in map_tensors(m)]
    val_pairs = [p for m in val_maps for p in map_tensors(m)]
    train_pairs = [p for p in train_pairs if bool((p[1] >= 0).any())]
    if not train_pairs:
        raise TrainingError("train-unet: no labelled tiles on any train feature map")
    crop = params.featuremap.crop if params.featuremap.mode == "full" else None
    fit = fit_segmenter(unet, opt, train_pairs, val_pairs, epochs=up.epochs,
                        batch_size=up.batch_size, crop=crop, augment=up.augment, generator=g,
                        device=device, desc=desc, select=up.select, state_path=state_path,
                        params_hash=params.section_hash("seed", "featuremap", "unet"))
    return unet.cpu(), fit


@torch.no_grad()
def predict_tiles(
    unet: UNet, features: np.ndarray, layouts: Sequence[MapLayout], device: torch.device
) -> np.ndarray:
    """U-Net tumor probability for every tile (N,), NaN for tiles on no map. Every tile on a map
    gets a prediction, nolabel ones included (paper §4.1)."""
    unet.eval()
    out = np.full(features.shape[0], np.nan, np.float32)
    x = torch.from_numpy(np.asarray(features, np.float32))
    for lay in layouts:
        fmap = place(x[lay.tile_index], lay)[None].to(device)
        prob = torch.softmax(unet(fmap)[0].float(), 0)
        out[lay.tile_index] = gather(prob, lay)[:, 1].cpu().numpy()
    return out


def write_predictions(
    path: Path, tumor_prob: np.ndarray, method: str, slide_id: str, params_hash: str,
    model_sha256: str, extra_attrs: dict | None = None,
) -> None:
    with atomic_h5(path) as f:
        f.create_dataset(TUMOR_PROB, data=np.asarray(tumor_prob, np.float32))
        f.attrs["params_hash"] = params_hash
        f.attrs["method"] = method
        f.attrs["model_sha256"] = model_sha256
        f.attrs["slide_id"] = slide_id
        f.attrs["n_unpredicted"] = int(np.isnan(tumor_prob).sum())
        f.attrs.update(extra_attrs or {})


def write_curves(path: Path, rows: Sequence[tuple], header: str) -> None:
    """Per-epoch rows as CSV, written once at the end from the rows the training state carries.
    Hand-made rather than DVCLive: DVCLive appends each step to its .tsv files as it goes (a
    killed and resumed run would need them rebuilt from the state anyway), picks up its files
    "without declarations" only by rewriting dvc.yaml from inside a running stage, and opens the
    Git/DVC repository when it starts; a CSV declared under `plots:` gives `dvc plots show /
    diff` the same curves (and the metrics JSON beside it is what `dvc exp show` lists)."""
    write_text_atomic(path, header + "\n" + "".join(
        ",".join(f"{v:.6f}" if isinstance(v, float) else str(v) for v in r) + "\n" for r in rows))


def write_metrics(path: Path, metrics: dict) -> None:
    write_json_atomic(path, metrics)


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
        # the maps' scale and layout: the tile/crop of the features and the featuremap params
        "settings": training_settings(params.model_dump(mode="json")),
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
