"""Feature extraction: every tile's 16-d feature and tumor probability, per slide.

For every tile of every manifest slide (nolabel tiles too), batch inference of the trained
extractor in eval mode on the centre crop: `features` = f_{n-1} (the feature layer), `tumor_prob`
= softmax of f_n. One DataLoader streams all the slides to do (`slides_loader`: workers start
once and each reads its own contiguous run of the slides, so each slide is opened by one
worker; uint8 crops, normalised on the device; benchmarks/extraction.py measures it).
Output data/features/<slide_id>.h5 per pipeline/schema.py, stamped with the checkpoint's
sha256 and the tile params; a rerun skips slides whose file is current, so a killed run resumes.
`extract_all` serves the extract-features stage, e2e-finetune and the frozen-feature baseline;
`infer_slide(s)` also serves predict.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info

from pipeline.augment import normalize_only
from pipeline.data import SlidePatchDataset, loader_kwargs
from pipeline.distributed import barrier, gather_objects, init_if_needed, summary_sum
from pipeline.distributed import shard as shard_of
from pipeline.errors import PipelineError
from pipeline.io import atomic_h5, h5_is_current, sha256_file
from pipeline.jpegtiles import (
    CompressedCentreCrops,
    Decoder,
    assemble,
    centre_crop_offsets,
    collate_patches,
    torchvision_decoder,
)
from pipeline.log import get_logger, progress
from pipeline.manifest import load_manifest
from pipeline.models import PatchClassifier, extractor_expectations, load_extractor
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.runner import SlideRun, on_error_mode, one_line, selected
from pipeline.runtime import autocast, memory_format, pick_device
from pipeline.schema import (
    COORDS,
    FEATURE_DTYPES,
    FEATURES,
    GRID,
    LABEL,
    LUMP_ID,
    TUMOR_PROB,
)
from pipeline.tileindex import TileIndex, read_tile_index

log = get_logger("pipeline.extract_features")

BATCH_SIZE = 128
# Tiles streamed by one DataLoader (its workers start once per group of slides): bounds the
# per-slide tile indices held at once (~50 MB per 10^6 tiles) when a shard has thousands of
# slides, without restarting the workers every few small slides.
TILES_PER_LOADER = 1_000_000


def feature_params_hash(params: Params, extractor_sha256: str) -> str:
    """What makes a feature file current: the tile/label params, crop, AMP (bf16 changes the
    numbers on a GPU) and the checkpoint; the slide's inputs are checked by inputs_sha256."""
    tile_label = params.section_hash("tile", "label")
    amp = int(params.extractor.amp)
    # decode: device decodes with nvJPEG on CUDA (other pixels); on CPU it is the same bits
    decode = "" if params.extractor.decode == "cpu" else f"-{params.extractor.decode}"
    compiled = "-compile" if params.extractor.compile else ""  # fused kernels: other last bits
    return (f"{tile_label}-{params.extractor.crop_px}-{amp}-{extractor_sha256[:16]}{decode}"
            f"{compiled}")


def inputs_sha256(paths: Paths, slide_id: str) -> str:
    """Content hash of the slide's tile index + label file: a re-tiled or relabelled slide gets
    new features (and a new label copy) even when the checkpoint is byte-identical."""
    parts = []
    for f in (paths.tile_file(slide_id), paths.label_file(slide_id)):
        parts.append(sha256_file(f) if f.is_file() else "missing")
    return hashlib.sha256("-".join(parts).encode()).hexdigest()


def plan_batches(sizes: Sequence[int], batch_size: int) -> Iterator[tuple[int, int, int]]:
    """The batches as (slide k, first row, end row): slide by slide, in tile order, batch_size
    at a time, cut at each slide's end, i.e. exactly the batches of one DataLoader per slide
    (so the model sees the same batches and gives the same bits however they are streamed).
    Generated lazily: a big group has thousands of batches."""
    for k, n in enumerate(sizes):
        for a in range(0, int(n), batch_size):
            yield k, a, min(a + batch_size, int(n))


def n_batches(sizes: Sequence[int], batch_size: int) -> int:
    return sum(math.ceil(int(n) / batch_size) for n in sizes)


def worker_batches(sizes: Sequence[int], batch_size: int, worker: int,
                   n_workers: int) -> Iterator[tuple[int, int, int]]:
    """Worker `worker`'s share of `plan_batches`: the plan cut into n_workers contiguous runs
    whose lengths differ by at most one batch. A worker so reads only the slides of its run,
    each from one place onwards, and opens each once; a slide is shared by two workers only
    where a cut falls inside it (at most n_workers - 1 slides), which keeps the workers evenly
    loaded when slides are few or differ in size (whole slides per worker would leave workers
    idle at the end of a run)."""
    total = n_batches(sizes, batch_size)
    lo, hi = total * worker // n_workers, total * (worker + 1) // n_workers
    return itertools.islice(plan_batches(sizes, batch_size), lo, hi)


class Batch(NamedTuple):
    """One batch from `slides_loader`: `x` is uint8 (B, crop, crop, 3) centre crops (or, with
    decode="device", a list of patches), `rows` their tile rows (B,), `slide` the position of
    their slide in the loader's list."""

    x: Any
    rows: torch.Tensor
    slide: int


class _SlideBatches(IterableDataset):
    """The batches of several slides, each DataLoader worker streaming its own contiguous run of
    them (`worker_batches`) and collating its batches itself. Why not a map-style dataset with
    a batch sampler: the DataLoader deals its batches to the workers in turn, so every worker
    opened (and, on its first tile, verified against OpenSlide) every slide of the loader."""

    def __init__(self, parts: Sequence[Dataset], batch_size: int, collate: Callable):
        self.parts, self.batch_size, self.collate = list(parts), int(batch_size), collate
        self.sizes = [len(d) for d in self.parts]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for k, a, b in worker_batches(self.sizes, self.batch_size, worker, n_workers):
            part = self.parts[k]
            x, rows = self.collate([part[j] for j in range(a, b)])
            yield Batch(x, rows, k)


def _as_is(batch: Batch) -> Batch:
    """DataLoader collate_fn for batches the dataset already collated."""
    return batch


class _CentreCrops(SlidePatchDataset):
    """One slide's tiles in order as (uint8 (crop, crop, 3) centre crop, tile row). HWC as read:
    a CHW copy per tile in the worker cost a third of its time; the batch is permuted on the
    device instead (`model_input`), which on a GPU is already the channels_last layout."""

    def __init__(self, tile_file: Path | TileIndex, crop_px: int,
                 pixel_cache_file: Path | None = None):
        super().__init__(tile_file, None, None, pixel_cache_file)
        self.crop_px = int(crop_px)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        i = int(self.indices[j])
        arr = self._reader.read(0, i)
        h, w, c = arr.shape[0], arr.shape[1], self.crop_px
        if c > min(h, w):
            raise PipelineError(f"{self.index.path}: extractor.crop_px {c} is larger than the "
                                f"{h}x{w} px tiles")
        # torchvision's CenterCrop offsets, so features match eval_transform exactly
        top, left = centre_crop_offsets(h, w, c)
        crop = np.ascontiguousarray(arr[top:top + c, left:left + c])
        if not crop.flags.writeable:  # a read-only decoder buffer when the crop is the whole tile
            crop = crop.copy()
        return torch.from_numpy(crop), i


def slides_loader(
    tile_files: Sequence[Path | TileIndex], crop_px: int, workers: int,
    pixel_cache_files: Sequence[Path | None] | None = None, batch_size: int = BATCH_SIZE,
    decode: str = "cpu",
) -> DataLoader:
    """ONE DataLoader over the tiles of several slides: `Batch`es of uint8 (B, crop, crop, 3)
    centre crops, their tile rows and slide; a batch never spans two slides (`plan_batches`).
    `model_input` turns a batch into the model's input. The loader's `dataset.sizes` are the
    slides' tile counts.

    Order: with workers, each takes a contiguous run of the batches (`worker_batches`: each
    slide is opened by one worker, two where a run boundary falls inside it) and the loader
    yields the workers' batches in turn, so slides are in flight on every worker at once and
    finish out of list order (the order is fixed by the plan, not by timing); without workers
    the batches come in plan order. Every batch holds the same tiles either way, so the model
    gives the same bits.

    Why one loader, not one per slide: its workers start once and keep prefetching across
    slide boundaries; a loader per slide forks its workers per slide and drains the pipeline
    at every slide's end (a demo slide is ~1.3 batches). Why uint8: the float conversion and
    normalisation run batched on the model's device (`normalize_only`, the same ops as
    eval_transform after its crop, so the same bits), and a uint8 batch is 4x less to move
    from the workers.

    decode="device": the workers hand over compressed TIFF tiles instead (pipeline/jpegtiles.py;
    a batch's `x` is then a list of patches, see `device_model_input`)."""
    caches = list(pixel_cache_files) if pixel_cache_files is not None else [None] * len(tile_files)
    parts: list[Dataset] = [_CentreCrops(tf, crop_px, c)
                            for tf, c in zip(tile_files, caches, strict=True)]
    collate: Callable = default_collate
    if decode == "device":
        parts = [CompressedCentreCrops(d, crop_px) for d in parts]
        collate = collate_patches
    return DataLoader(_SlideBatches(parts, batch_size, collate), batch_size=None,
                      collate_fn=_as_is, **loader_kwargs(workers, prefetch_factor=4))


def model_input(x: torch.Tensor, device: torch.device, norm: Callable) -> torch.Tensor:
    """A `slides_loader` batch (uint8 B, H, W, 3) -> normalised float (B, 3, H, W) on `device`
    in its memory format (`pipeline.runtime.memory_format`: the permuted batch already is
    channels_last; on CPU it is made contiguous NCHW, as the model always saw there)."""
    fmt = memory_format(device)
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2)
    if fmt == torch.contiguous_format:  # reorder the uint8 bytes, not 4x as many floats
        x = x.contiguous()
    return norm(x).contiguous(memory_format=fmt)


def device_model_input(patches: list, device: torch.device, norm: Callable,
                       decoder: Decoder) -> torch.Tensor:
    """A decode="device" batch (compressed patches, some host-decoded) -> the same normalised
    float (B, 3, H, W) on `device` as `model_input` gives for decode="cpu"."""
    x = assemble(patches, device, decoder)
    fmt = memory_format(device)
    if fmt != torch.contiguous_format:
        x = x.contiguous(memory_format=fmt)
    return norm(x).contiguous(memory_format=fmt)


def _padded(x: torch.Tensor, batch_size: int, always: bool = False) -> torch.Tensor:
    """On CUDA (or, with `always`, anywhere: a compiled forward) a slide's last, partial batch
    is padded with zeros to the full batch size: one input shape for the whole run (cuDNN picks
    its algorithms once, torch.compile compiles once; nothing is re-planned per slide). The
    padding rows are dropped from the results. On CPU without compiling nothing is padded:
    the bits stay those of one DataLoader per slide."""
    if (x.device.type != "cuda" and not always) or x.shape[0] == batch_size:
        return x
    pad = x.new_zeros((batch_size - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad]).contiguous(memory_format=memory_format(x.device))


# torch.compile backend of `extractor.compile` (tests swap in a recording backend)
COMPILE_BACKEND: Any = "inductor"


def _forward(model: PatchClassifier, compiled: bool) -> Callable:
    """(features, logits) of a batch: the model's own modules, or (`compiled`) the same two
    calls through torch.compile with static shapes (the batches are padded to one shape).
    torch.compile caches by code and guards, not by this wrapper: a later call (the next loader
    group, another model of the same architecture) reuses the compiled graph."""
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = model.features(x)
        return f, model.head(f)

    return torch.compile(forward, backend=COMPILE_BACKEND, dynamic=False) if compiled else forward


@torch.no_grad()
def infer_slides(
    model: PatchClassifier, tile_files: Sequence[Path | TileIndex], crop_px: int,
    device: torch.device,
    workers: int, amp: bool = False, pixel_cache_files: Sequence[Path | None] | None = None,
    decode: str = "cpu", compiled: bool = False,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (k, features (N_k, D) float32, tumor_prob (N_k,) float32) once for every
    tile_files[k], as soon as its last batch is through the model (one `slides_loader`):
    slides without tiles first, then in the order their last batches arrive, which is fixed by
    the batch plan and the number of workers (see `slides_loader`), not by timing.
    `decode`: "cpu" (workers decode) or "device" (pipeline/jpegtiles.py). `compiled`: the
    forward through torch.compile (`extractor.compile`), every batch padded to one shape."""
    if not tile_files:  # every slide already current: nothing to stream
        return
    model.eval()
    fmt = memory_format(device)
    model.to(memory_format=fmt)
    batch_size = BATCH_SIZE
    loader = slides_loader(tile_files, crop_px, workers, pixel_cache_files, batch_size, decode)
    sizes = loader.dataset.sizes
    norm = normalize_only(model.preprocess)  # the encoder's own mean/std (and input size)
    decoder = torchvision_decoder(device) if decode == "device" else None
    forward = _forward(model, compiled)

    def launched() -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, Any]]:
        for x, idx, k in loader:
            x = (model_input(x, device, norm) if decoder is None
                 else device_model_input(x, device, norm, decoder))
            with autocast(device, amp):
                f, logits = forward(_padded(x, batch_size, always=compiled))
            f, p = f[:len(idx)].float(), torch.softmax(logits[:len(idx)].float(), 1)[:, 1]
            yield k, idx, *_to_host_async(f, p, device)

    for k, n in enumerate(sizes):
        if n == 0:
            yield k, *_no_rows(model.feature_dim)
    left = {k for k, n in enumerate(sizes) if n}
    # Read a batch's results only after the next batch is launched. On a GPU its results are
    # copied into pinned host memory right behind its kernels (an event marks the copy done),
    # so waiting for them never waits for the next batch, which keeps the device busy while
    # the host fetches and launches the one after. On CPU the order of work is unchanged.
    # Slides in flight (about one per worker): k -> (features, probs, rows filled).
    in_flight: dict[int, tuple[np.ndarray, np.ndarray, list[int]]] = {}
    pending = None
    for item in itertools.chain(launched(), [None]):
        if pending is not None:
            k, idx, f, p, copied = pending
            if copied is not None:
                copied.synchronize()
            if k not in in_flight:
                in_flight[k] = (np.empty((sizes[k], model.feature_dim), np.float32),
                                np.empty(sizes[k], np.float32), [0])
            feats, probs, done = in_flight[k]
            feats[idx.numpy()] = f.numpy()
            probs[idx.numpy()] = p.numpy()
            done[0] += len(idx)
            if done[0] == sizes[k]:
                del in_flight[k]
                left.discard(k)
                yield k, feats, probs
        pending = item
    if left:  # a loader that ended early: never silently short
        raise PipelineError(f"feature extraction: slides {sorted(left)} of {len(sizes)} did not "
                            "get all their tiles from the loader")


def _to_host_async(
    f: torch.Tensor, p: torch.Tensor, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(features, probs) on the host. On CUDA: pinned buffers filled by non-blocking copies
    queued on the current stream, plus the event to synchronize on before reading them."""
    if device.type != "cuda":
        return f, p, None
    f_host = torch.empty(f.shape, dtype=f.dtype, pin_memory=True)
    p_host = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
    f_host.copy_(f, non_blocking=True)
    p_host.copy_(p, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(device))
    return f_host, p_host, copied


def _no_rows(dim: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((0, dim), np.float32), np.empty(0, np.float32)


def infer_slide(
    model: PatchClassifier, tile_file: Path, crop_px: int, device: torch.device, workers: int,
    amp: bool = False, pixel_cache_file: Path | None = None, desc: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, tumor_prob (N,) float32) for every tile, in tile order.
    (`desc` is kept for callers; extraction of many slides should use `infer_slides`.)"""
    results = infer_slides(model, [tile_file], crop_px, device, workers, amp, [pixel_cache_file])
    try:
        _, feats, probs = next(results)
    finally:
        results.close()  # shuts the loader's workers down now
    return feats, probs


def _slide_inputs(paths: Paths, slide_id: str) -> tuple[TileIndex, np.ndarray]:
    """The slide's tile index and labels, checked to be aligned."""
    tile_file, label_file = paths.tile_file(slide_id), paths.label_file(slide_id)
    index = read_tile_index(tile_file)
    with h5py.File(label_file, "r") as f:
        labels = np.asarray(f[LABEL][...], np.int8)
    if labels.shape[0] != index.n:
        raise PipelineError(f"{label_file}: {labels.shape[0]} labels for {index.n} tiles; "
                            "rerun the label stage")
    return index, labels


def _write_features(
    out_file: Path, slide_id: str, index: TileIndex, labels: np.ndarray, feats: np.ndarray,
    probs: np.ndarray, model: nn.Module, params: Params, params_hash: str,
    extractor_sha256: str, inputs_sha256_value: str,
) -> None:
    with atomic_h5(out_file) as f:
        data = {FEATURES: feats, TUMOR_PROB: probs, COORDS: index.coords, GRID: index.grid,
                LUMP_ID: index.lump_id, LABEL: labels}
        for name, arr in data.items():
            f.create_dataset(name, data=np.asarray(arr, dtype=FEATURE_DTYPES[name]))
        f.attrs["params_hash"] = params_hash
        f.attrs["extractor_sha256"] = extractor_sha256
        f.attrs["extractor_arch"] = getattr(model, "arch", "")
        f.attrs["feature_dim"] = int(feats.shape[1])
        if isinstance(model, PatchClassifier):  # the encoder and its preprocessing, by name
            f.attrs["encoder_json"] = json.dumps(model.encoder_meta(), sort_keys=True)
        f.attrs["tile_params_json"] = params.section_json("tile")
        f.attrs["slide_id"] = slide_id
        f.attrs["inputs_sha256"] = inputs_sha256_value


def extract_all(
    params: Params, paths: Paths, checkpoint: Path, variant: str = "",
    shard: tuple[int, int] | None = None, on_error: str = "stop",
    manifest: pd.DataFrame | None = None,
) -> dict:
    """Features for every manifest slide with the extractor in `checkpoint`, into
    paths.feature_file(slide, variant). Skips slides whose file is current. `manifest`: the
    caller's loaded params.data.manifest (else it is loaded here).

    `shard` (i, n) keeps slides i, i+n, ... (array jobs). Under torchrun each rank then takes
    its part of those (slide -> rank by position, `pipeline.distributed.shard`), writes its own
    files, and waits for the others at a barrier; the returned summary counts all ranks.
    `on_error` (pipeline/runner.py): with "skip" a failing slide is left out and listed in the
    summary's `failed` (every rank's)."""
    t0 = time.time()
    rank, world, _ = init_if_needed()
    device = pick_device()
    # Refuse features from a checkpoint trained under other tile/extractor params (names the key).
    model, _ = load_extractor(checkpoint, expected=extractor_expectations(params))
    model.to(device)
    sha = sha256_file(checkpoint)
    phash = feature_params_hash(params, sha)
    if manifest is None:
        manifest = load_manifest(params.data.manifest)
    slide_ids = selected(manifest["slide_id"], shard)
    n_slides = len(slide_ids)
    slide_ids = shard_of(slide_ids, rank, world)
    in_sha = {sid: inputs_sha256(paths, sid) for sid in slide_ids}  # hashed once, stamped below
    todo = [sid for sid in slide_ids
            if not h5_is_current(paths.feature_file(sid, variant), phash, extractor_sha256=sha,
                                 inputs_sha256=in_sha[sid])]
    skipped = len(slide_ids) - len(todo)
    job = _Extraction(model, params, paths, variant, phash, sha, in_sha, device)
    done = SlideRun(on_error_mode(on_error), log)
    bar = progress(total=len(todo), unit="slide", disable=rank != 0,
                   desc=f"features{'/' + variant if variant else ''}")
    for group, inputs in _loader_groups(paths, todo, done):
        job.group(group, inputs, done, bar)
    bar.close()
    n_tiles = sum(done.results.values())
    if world > 1:
        log.info("rank %d: wrote %d feature files (%d tiles), %d already current", rank,
                 len(done.results), n_tiles, skipped)
    barrier()  # every rank's files exist once this returns
    summary = {"checkpoint": str(checkpoint), "extractor_sha256": sha, "n_slides": n_slides,
               "n_extracted": len(done.results), "n_current": skipped, "n_tiles": n_tiles,
               "n_failed": len(done.failed), "seconds": round(time.time() - t0, 3)}
    summary = summary_sum(summary, ("n_extracted", "n_current", "n_tiles", "n_failed"), device)
    summary["failed"] = _all_ranks(done.failed, world)
    if rank == 0:
        log.info("read %s; wrote %d feature files to %s (%d already current, %d failed): %s",
                 checkpoint, summary["n_extracted"], paths.feature_file("x", variant).parent,
                 summary["n_current"], summary["n_failed"], json.dumps(summary))
    return summary


@dataclass
class _Extraction:
    """What every slide of one extract_all call shares: the model, where and how to write."""

    model: PatchClassifier
    params: Params
    paths: Paths
    variant: str
    phash: str
    sha: str
    in_sha: dict[str, str]
    device: torch.device

    def _stream(self, group: list[str], inputs: list[tuple[TileIndex, np.ndarray]],
                written: Callable[[str, int], None]) -> None:
        """One loader over the group's slides; each slide's file is written once it is done."""
        crop_px, workers = self.params.extractor.crop_px, self.params.extractor.workers
        amp = self.params.extractor.amp
        caches = [self.paths.pixel_cache_file(sid) if self.params.tile.cache_pixels else None
                  for sid in group]
        decode, compiled = self.params.extractor.decode, self.params.extractor.compile
        for k, feats, probs in infer_slides(self.model, [index for index, _ in inputs],
                                            crop_px, self.device, workers, amp, caches, decode,
                                            compiled):
            index, labels = inputs[k]
            _write_features(self.paths.feature_file(group[k], self.variant), group[k], index,
                            labels, feats, probs, self.model, self.params, self.phash, self.sha,
                            self.in_sha[group[k]])
            written(group[k], index.n)

    def group(self, group: list[str], inputs: list[tuple[TileIndex, np.ndarray]],
              run: SlideRun, bar: Any) -> None:
        """Stream the group; when a slide breaks the stream (an unreadable tile) and failures
        are skipped, redo the group's unfinished slides one loader each, so that only the
        broken slide is listed."""
        def written(sid: str, n_tiles: int) -> None:
            run.ok(sid, n_tiles)
            bar.update(1)

        try:
            self._stream(group, inputs, written)
        except Exception as exc:
            if run.mode == "stop":
                raise
            log.warning("a slide failed in a group of %d (%s); redoing its unfinished slides "
                        "one by one", len(group), one_line(exc))
            for sid, one in zip(group, inputs, strict=True):
                if sid in run.results:
                    continue
                try:
                    self._stream([sid], [one], written)
                except Exception as exc_one:
                    run.fail(sid, exc_one)
                    bar.update(1)


def _all_ranks(failed: dict[str, str], world: int) -> dict[str, str]:
    """Every rank's failures (slide_id -> error), in rank order."""
    return {k: v for part in gather_objects(failed, world) for k, v in part.items()}


def _loader_groups(
    paths: Paths, slide_ids: Sequence[str], run: SlideRun,
) -> Iterator[tuple[list[str], list[tuple[TileIndex, np.ndarray]]]]:
    """Consecutive slides with at most TILES_PER_LOADER tiles together (at least one slide),
    with their checked inputs (a bad label file fails before its group is streamed; with
    --on-error skip that slide is left out)."""
    group: list[str] = []
    inputs: list[tuple[TileIndex, np.ndarray]] = []
    n = 0
    for sid in slide_ids:
        try:
            one = _slide_inputs(paths, sid)
        except Exception as exc:
            run.fail(sid, exc)
            continue
        if group and n + one[0].n > TILES_PER_LOADER:
            yield group, inputs
            group, inputs, n = [], [], 0
        group.append(sid)
        inputs.append(one)
        n += one[0].n
    if group:
        yield group, inputs
