"""The patch data path: torch Datasets that stream tiles from the slides, an optional pixel
cache, class-balanced epoch sampling and the (slide, tile, label) lists of a split.

Pixels come from the slide itself at the coordinates in the tile index (data/tiles/<id>.h5):
`Slide.read_tile` reads `read_size_px` at the stored pyramid level and resamples to
`tile_size_px` when no level was exact. All HDF5 metadata is read once at construction into
numpy arrays, so a dataset pickles to DataLoader workers; slide (and pixel-cache) handles are
opened lazily per process in a small LRU and are never shared across a fork.

Optional pixel cache (tile.cache_pixels): data/tiles/<id>.pixels.h5 holds the same uint8 tiles,
one tile per HDF5 chunk, so a read is one chunk decompression instead of a JPEG tile decode per
overlapped slide tile (plus a resample). It gives bit-identical pixels to the slide path.
Default off: the cache is ~5x the size of a JPEG slide while reading an exactly-matching pyramid
level is only ~3x slower than the cache (benchmarks/data_path.py); it pays off for slides that
need resampling (~7x) and for many epochs when disk is cheap.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.errors import PipelineError
from pipeline.io import atomic_h5
from pipeline.log import get_logger, progress
from pipeline.paths import Paths
from pipeline.schema import (
    COORDS,
    LABEL,
    LABEL_NAMES,
    LABEL_NOLABEL,
    PIXELS,
    SCHEMA_VERSION,
)
from pipeline.slide import Slide
from pipeline.tileindex import TileIndex, attr_value, geometry_from_attrs, read_tile_index  # noqa: F401

log = get_logger("pipeline.data")

# Pixel cache filter, chosen by benchmarks/data_path.py (16-core run, demo-like JPEG q85
# slide): decoded JPEG tiles barely compress (KiB/tile of 192 raw: lzf 170, gzip-1 139, gzip-4
# 147), and the cache exists for speed: lzf reads ~1.6x faster than gzip-1 (1045 vs 648 tiles/s
# in one process; the slide itself 366) and writes ~1.5x faster, for 23 % more disk.
CACHE_COMPRESSION: tuple[str | None, int | None] = ("lzf", None)
# Open slide / cache handles kept per process (each OpenSlide handle holds decoder state).
MAX_OPEN_HANDLES = 8
# Diagnostics: when set to a file, every handle a process opens (slide, pixel cache, compressed-
# tile reader) appends "<pid>\t<key>" to it (key: [jpeg|]path|inode|mtime_ns|size), so
# benchmarks/extraction.py and the tests count which process opened which slide how often
# (DataLoader workers included).
OPEN_LOG_ENV = "PIPELINE_OPEN_LOG"

class DataError(PipelineError):
    """A tile index, label file or pixel cache cannot be used; one line naming file and cause."""


def pixel_cache_path(tile_file: str | Path) -> Path:
    """data/tiles/<id>.h5 -> data/tiles/<id>.pixels.h5 (as `Paths.pixel_cache_file`)."""
    tile_file = Path(tile_file)
    return tile_file.with_name(f"{tile_file.stem}.pixels.h5")


def check_pixel_cache(cache_path: str | Path, index: TileIndex) -> None:
    """Raise DataError unless `cache_path` is a complete cache of exactly this tile index."""
    cache_path = Path(cache_path)
    if not cache_path.is_file():
        raise DataError(f"{cache_path}: pixel cache not found; rerun tile with cache_pixels: true")
    try:
        with h5py.File(cache_path, "r") as f:
            shape = f[PIXELS].shape if PIXELS in f else None
            phash = str(attr_value(f.attrs.get("params_hash", "")))
            fingerprint = str(attr_value(f.attrs.get("slide_fingerprint", "")))
            version = int(f.attrs.get("schema_version", -1))
    except OSError as exc:
        raise DataError(f"{cache_path}: cannot read pixel cache: {exc}") from None
    s = index.geometry.tile_size_px
    want_fp = str(index.attrs.get("slide_fingerprint", ""))
    if (version != SCHEMA_VERSION or phash != index.params_hash or fingerprint != want_fp
            or shape != (index.n, s, s, 3)):
        raise DataError(
            f"{cache_path}: pixel cache is stale (shape {shape}, params_hash {phash!r}) for tile "
            f"index {index.path} ({index.n} tiles of {s} px, params_hash {index.params_hash!r}); "
            "rerun the tile stage"
        )


def write_pixel_cache(
    tile_index_path: str | Path,
    cache_path: str | Path,
    compression: tuple[str | None, int | None] = CACHE_COMPRESSION,
) -> None:
    """Read every tile of a tile index from its slide and store the uint8 tiles (N, S, S, 3),
    one tile per chunk, in `cache_path` (written atomically; attrs params_hash copied from the
    index, n, tile_size_px)."""
    index = read_tile_index(tile_index_path)
    s = index.geometry.tile_size_px
    algo, level = compression
    with Slide(index.slide_path) as slide, atomic_h5(cache_path) as f:
        f.attrs["params_hash"] = index.params_hash
        # the slide content the pixels came from: a slide replaced in place makes the cache stale
        f.attrs["slide_fingerprint"] = str(index.attrs.get("slide_fingerprint", ""))
        f.attrs["slide_id"] = index.slide_id
        f.attrs["n"] = index.n
        f.attrs["tile_size_px"] = s
        f.attrs["compression"] = f"{algo}-{level}" if level is not None else str(algo or "none")
        ds = f.create_dataset(
            PIXELS, shape=(index.n, s, s, 3), dtype=np.uint8, chunks=(1, s, s, 3),
            maxshape=(None, s, s, 3),  # h5py refuses a chunk larger than a 0-tile dataset
            compression=algo, compression_opts=level,
        )
        for i in progress(range(index.n), desc=f"cache {index.slide_id}", unit="tile",
                          disable=index.n < 256):
            x0, y0 = index.coords[i]
            ds[i] = slide.read_tile(int(x0), int(y0), index.geometry)
    log.info("wrote pixel cache %s (%d tiles) from %s", cache_path, index.n, index.slide_path)


class _HandleCache:
    """Per-process LRU of open handles (OpenSlide slides, h5py files).

    Handles never cross a process boundary: pickling drops them, and a fork is detected by the
    pid, after which the inherited handles are closed in the child (only the child's copies) and
    reopened on demand."""

    def __init__(self, max_open: int = MAX_OPEN_HANDLES):
        self.max_open = max_open
        self._pid = os.getpid()
        self._open: OrderedDict[str, Any] = OrderedDict()

    def __getstate__(self) -> dict:
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_open"])

    def get(self, key: str, opener: Callable[[str], Any]) -> Any:
        if os.getpid() != self._pid:
            self.close_all()
            self._pid = os.getpid()
        h = self._open.get(key)
        if h is not None:
            self._open.move_to_end(key)
            return h
        h = opener(key)
        _log_open(key)
        self._open[key] = h
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            _close_quietly(old)
        return h

    def close_all(self) -> None:
        while self._open:
            _, h = self._open.popitem()
            _close_quietly(h)


def _log_open(key: str) -> None:
    log_file = os.environ.get(OPEN_LOG_ENV)
    if log_file:  # one short O_APPEND write per open: lines of concurrent processes never mix
        with open(log_file, "a") as f:
            f.write(f"{os.getpid()}\t{key.replace(chr(0), '|')}\n")


def read_open_log(log_file: str | Path) -> list[tuple[int, str]]:
    """(pid, handle key) per open recorded under OPEN_LOG_ENV, in the order written."""
    path = Path(log_file)
    if not path.is_file():
        return []
    rows = [line.split("\t", 1) for line in path.read_text().splitlines() if line]
    return [(int(pid), key) for pid, key in rows]


def _close_quietly(h: Any) -> None:
    try:
        h.close()
    except Exception:  # closing a stale handle must never mask the real work
        pass


class _CacheFile:
    """An open pixel cache: the file (closed by the LRU) and its pixels dataset."""

    def __init__(self, path: str):
        self.file = h5py.File(path, "r")
        self.pixels = self.file[PIXELS]

    def close(self) -> None:
        self.file.close()


# Open handles of this process, shared by every dataset: a loader over thousands of slides (one
# dataset each) keeps MAX_OPEN_HANDLES open, not one per slide (each slide handle holds a file
# descriptor and up to tiffread.TILE_CACHE_BYTES of decoded tiles).
_SLIDE_HANDLES = _HandleCache()
_CACHE_HANDLES = _HandleCache()


def _file_key(path: Path) -> str:
    """Handle key: the path and the file's identity, so a file replaced in place (same path, new
    content) gets a new handle in readers made after the replacement."""
    st = path.stat()
    return f"{path}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_size}"


class _TileReader:
    """Reads tile `i` of slide `k` (of a fixed list of tile indices) as (S, S, 3) uint8."""

    def __init__(self, indices: Sequence[TileIndex], cache_files: Sequence[Path | None]):
        self.indices = list(indices)
        self.cache_files = [None if c is None else str(c) for c in cache_files]
        self._keys: list[str] = []
        for index, cache in zip(self.indices, self.cache_files, strict=True):
            if cache is not None:
                check_pixel_cache(cache, index)
                self._keys.append(_file_key(Path(cache)))
            elif not index.slide_path.exists():
                raise DataError(f"{index.path}: slide {index.slide_path} not found")
            else:
                self._keys.append(_file_key(index.slide_path))

    def read(self, k: int, i: int) -> np.ndarray:
        index = self.indices[k]
        cache = self.cache_files[k]
        if cache is not None:
            arr = _CACHE_HANDLES.get(self._keys[k], lambda _key: _CacheFile(cache)).pixels[i]
        else:
            slide = _SLIDE_HANDLES.get(self._keys[k], lambda _key: Slide(index.slide_path))
            x0, y0 = index.coords[i]
            arr = slide.read_tile(int(x0), int(y0), index.geometry)
        return arr


def _to_chw(arr: np.ndarray) -> torch.Tensor:
    if not arr.flags.writeable:  # PIL-backed arrays are read-only; torch wants writable memory
        arr = arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@dataclass(frozen=True, eq=False)
class PatchItems:
    """A compact list of patches over several slides: item j is tile `tile_idx[j]` of
    `tile_files[slide_no[j]]`, with `labels[j]` (None when unknown)."""

    tile_files: tuple[Path, ...]
    slide_no: np.ndarray  # (N,) int32
    tile_idx: np.ndarray  # (N,) int64
    labels: np.ndarray | None = None  # (N,) int8
    slide_ids: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.slide_no.shape[0])

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str | Path, int]]) -> PatchItems:
        """From (tile_file, tile_idx) pairs; slides numbered in order of first appearance."""
        files: dict[Path, int] = {}
        slide_no = np.empty(len(pairs), dtype=np.int32)
        tile_idx = np.empty(len(pairs), dtype=np.int64)
        for j, (tf, i) in enumerate(pairs):
            slide_no[j] = files.setdefault(Path(tf), len(files))
            tile_idx[j] = int(i)
        return cls(tuple(files), slide_no, tile_idx, None)

    def select(self, which: np.ndarray | Sequence[int]) -> PatchItems:
        """The items at positions / boolean mask `which` (same slide list)."""
        which = np.asarray(which)
        return PatchItems(
            self.tile_files, self.slide_no[which], self.tile_idx[which],
            None if self.labels is None else self.labels[which], self.slide_ids,
        )


def _check_rows(index: TileIndex, rows: np.ndarray) -> None:
    bad = rows[(rows < 0) | (rows >= index.n)]
    if bad.size:
        raise DataError(f"{index.path}: tile index {int(bad[0])} out of range 0..{index.n - 1}")


class PatchDataset(Dataset):
    """Patches from many slides. Item j -> (image, label, j) where image is the CHW uint8 tile
    (or `transform(tile)`), label the int class (LABEL_NOLABEL when the items carry none) and j
    the position in `items` (map back with items.slide_no[j], items.tile_idx[j]).
    With return_label=False, items are (image, j).

    pixel_cache=True reads each slide's tiles from its pixel cache (<id>.pixels.h5 next to the
    tile index) instead of the slide; a missing or stale cache is an error, not a fallback."""

    def __init__(
        self,
        items: PatchItems | Sequence[tuple[str | Path, int]],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        pixel_cache: bool = False,
        return_label: bool = True,
    ):
        if not isinstance(items, PatchItems):
            items = PatchItems.from_pairs(list(items))
        self.items = items
        self.transform = transform
        self.return_label = return_label
        indices = [read_tile_index(tf) for tf in items.tile_files]
        for k, index in enumerate(indices):
            _check_rows(index, items.tile_idx[items.slide_no == k])
        caches = [pixel_cache_path(tf) if pixel_cache else None for tf in items.tile_files]
        self._reader = _TileReader(indices, caches)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int):
        img = _to_chw(self._reader.read(int(self.items.slide_no[j]), int(self.items.tile_idx[j])))
        if self.transform is not None:
            img = self.transform(img)
        if not self.return_label:
            return img, int(j)
        label = LABEL_NOLABEL if self.items.labels is None else int(self.items.labels[j])
        return img, label, int(j)


class SlidePatchDataset(Dataset):
    """The tiles of one slide in order (all, or `indices`). Item j -> (image, tile_idx) where
    tile_idx is the tile's row in the tile index (and in every aligned per-slide file).
    `pixel_cache_file` reads from that pixel cache instead of the slide. `tile_file` may be the
    path or the already-read TileIndex."""

    def __init__(
        self,
        tile_file: str | Path | TileIndex,
        indices: Sequence[int] | np.ndarray | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        pixel_cache_file: str | Path | None = None,
    ):
        # an index the caller has already read is not read again
        self.index = (tile_file if isinstance(tile_file, TileIndex)
                      else read_tile_index(tile_file))
        self.indices = (np.arange(self.index.n, dtype=np.int64) if indices is None
                        else np.asarray(indices, dtype=np.int64).reshape(-1))
        _check_rows(self.index, self.indices)
        self.transform = transform
        cache = None if pixel_cache_file is None else Path(pixel_cache_file)
        self._reader = _TileReader([self.index], [cache])

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, j: int):
        i = int(self.indices[j])
        img = _to_chw(self._reader.read(0, i))
        if self.transform is not None:
            img = self.transform(img)
        return img, i


def loader_kwargs(workers: int, prefetch_factor: int = 2, persistent: bool = False) -> dict:
    """DataLoader settings shared by every loader here: `workers` processes, pinned memory
    when CUDA is present, prefetch/persistence only when there are workers."""
    kw: dict[str, Any] = {"num_workers": workers, "pin_memory": torch.cuda.is_available(),
                          "persistent_workers": persistent and workers > 0}
    if workers > 0:
        kw["prefetch_factor"] = prefetch_factor
    return kw


def slide_loader(
    tile_file: str | Path,
    indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 64,
    workers: int = 0,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    pixel_cache_file: str | Path | None = None,
) -> DataLoader:
    """Stream one slide's tiles in order as batches (images, tile_idx): shuffle off, no
    persistent workers, prefetch factor 2, pinned memory when CUDA is present."""
    ds = SlidePatchDataset(tile_file, indices, transform, pixel_cache_file)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, **loader_kwargs(workers))


def patch_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int = 0,
    sampler: Sampler | None = None,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over `dataset` in `sampler` order (or in order); worker RNG streams (and
    hence random augmentation) are seeded from `seed`, so a run is reproducible."""
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      drop_last=drop_last, generator=g, **loader_kwargs(workers))


# -- class balance -----------------------------------------------------------------------------
def epoch_indices(labels: np.ndarray, seed: int, epoch: int, balance: bool = True) -> np.ndarray:
    """Positions into `labels` to train on in `epoch`, shuffled, seeded by (seed, epoch).

    balance=True (paper, CAMELYON): every patch of the minority class plus an equal-size random
    subset of each other class, a fresh subset each epoch. balance=False (paper, stomach): all
    labelled patches. nolabel (negative labels) never appears."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
    labelled = np.flatnonzero(labels >= 0)
    if balance:
        classes = np.unique(labels[labelled])
        if classes.size < 2:
            present = ", ".join(LABEL_NAMES.get(int(c), str(c)) for c in classes) or "none"
            raise DataError(
                f"cannot balance classes: labelled patches are only of class(es) {present} "
                f"({labelled.size} patches); set extractor.balance: false or check the labels"
            )
        per_class = [labelled[labels[labelled] == c] for c in classes]
        n_min = min(p.size for p in per_class)
        picked = [p if p.size == n_min else rng.choice(p, size=n_min, replace=False)
                  for p in per_class]
        labelled = np.concatenate(picked)
    return rng.permutation(labelled).astype(np.int64)


class BalancedSampler(Sampler[int]):
    """Sampler over `epoch_indices`; call `set_epoch(e)` before each epoch (as with
    DistributedSampler) to get that epoch's subset and order."""

    def __init__(self, labels: np.ndarray, seed: int, balance: bool = True, epoch: int = 0):
        self.labels = np.asarray(labels)
        self.seed = int(seed)
        self.balance = balance
        self.epoch = int(epoch)
        self._len = int(epoch_indices(self.labels, self.seed, 0, balance).size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_indices(self.labels, self.seed, self.epoch, self.balance).tolist())

    def __len__(self) -> int:
        return self._len


def balanced_sampler(
    labels: np.ndarray, seed: int, epoch: int = 0, balance: bool = True
) -> BalancedSampler:
    """A `BalancedSampler` positioned at `epoch` (see `epoch_indices`)."""
    return BalancedSampler(labels, seed, balance, epoch)


# -- split lists -------------------------------------------------------------------------------
def collect_labelled(
    manifest: pd.DataFrame,
    paths: Paths,
    splits: str | Sequence[str] = "train",
    include_nolabel: bool = False,
) -> PatchItems:
    """All labelled patches (slide, tile, label) of the manifest's slides in `splits`, read from
    data/tiles/<id>.h5 and data/labels/<id>.h5 (rows aligned). nolabel patches are dropped
    unless include_nolabel."""
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    rows = manifest[manifest["split"].isin(splits)]
    tile_files: list[Path] = []
    slide_ids: list[str] = []
    slide_no, tile_idx, labels = [], [], []
    for sid in rows["slide_id"]:
        tile_file, label_file = paths.tile_file(sid), paths.label_file(sid)
        n_tiles = _n_tiles(tile_file)
        lab = _read_labels(label_file)
        if lab.shape[0] != n_tiles:
            raise DataError(
                f"{label_file}: {lab.shape[0]} labels but {tile_file} has {n_tiles} tiles; "
                "rerun the label stage"
            )
        keep = np.flatnonzero(lab != LABEL_NOLABEL) if not include_nolabel else np.arange(n_tiles)
        k = len(tile_files)
        tile_files.append(tile_file)
        slide_ids.append(str(sid))
        slide_no.append(np.full(keep.size, k, dtype=np.int32))
        tile_idx.append(keep.astype(np.int64))
        labels.append(lab[keep])
    items = PatchItems(
        tuple(tile_files),
        np.concatenate(slide_no) if slide_no else np.empty(0, np.int32),
        np.concatenate(tile_idx) if tile_idx else np.empty(0, np.int64),
        np.concatenate(labels) if labels else np.empty(0, np.int8),
        tuple(slide_ids),
    )
    counts = {name: int((items.labels == code).sum()) for code, name in LABEL_NAMES.items()}
    log.info("split %s: %d slides, %d patches %s", "+".join(splits), len(tile_files),
             len(items), counts)
    return items


def _n_tiles(tile_file: Path) -> int:
    if not tile_file.is_file():
        raise DataError(f"{tile_file}: tile index not found; run the tile stage")
    try:
        with h5py.File(tile_file, "r") as f:
            return int(f[COORDS].shape[0])
    except (OSError, KeyError) as exc:
        raise DataError(f"{tile_file}: cannot read '{COORDS}': {exc}") from None


def _read_labels(label_file: Path) -> np.ndarray:
    if not label_file.is_file():
        raise DataError(f"{label_file}: label file not found; run the label stage")
    try:
        with h5py.File(label_file, "r") as f:
            return np.asarray(f[LABEL][...], dtype=np.int8)
    except (OSError, KeyError) as exc:
        raise DataError(f"{label_file}: cannot read '{LABEL}': {exc}") from None

