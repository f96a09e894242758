"""Compressed-tile reads for decoding on the model's device (`extractor.decode: device`).

Why: on a GPU box, host JPEG decoding is what limits feature extraction (docs/benchmarks.md:
~13 000 tiles/s on 16 cores against 17 000 tiles/s for GoogLeNet in bf16). In this mode a
DataLoader worker does no pixel work at all: it looks up which TIFF tiles a patch overlaps
(offsets already parsed by pipeline/tiffread.py), `os.pread`s their bytes and returns them with
a *placement plan*; the main process decodes a whole batch's JPEG streams at once with
`torchvision.io.decode_jpeg(..., device=model_device)` (nvJPEG on CUDA, libjpeg-turbo on CPU)
and stitches the patches on the device.

Served here: slides whose levels `TiledTiffLevels` serves (generic TIFF, Aperio), JPEG-compressed
pages (YCbCr-coded, or RGB-coded as Aperio writes them: such streams get an Adobe APP14 marker
saying "no colour transform", which is how a standalone decoder learns what the TIFF tag says),
tiles read at the level's own resolution (no resampling), whole-pixel coordinates, and every
needed tile present and complete. Anything else (LZW / JPEG 2000 pages, resampled tiles, pixel
caches, damaged tiles) is decoded in the worker exactly as in `decode: cpu`; a batch may mix
both kinds.

On CPU (libjpeg-turbo in torchvision) the result is bit-identical to `decode: cpu`
(tests/test_jpegtiles.py, demo TIFF and a real Aperio SVS). nvJPEG's IDCT/upsampling may differ
by a few grey levels. Self-check, as Slide does for direct TIFF reads: in each worker the first
served patch of every slide level also carries its host-decoded pixels, and `assemble` stops with
DecodeMismatchError naming the slide when the device decode is off by more than
DEVICE_MEAN_ABS_TOLERANCE on average (a wrong colour transform is off by ~50).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.tiffread import TiledTiffLevels, _whole_jpeg

JPEG = 7  # TIFF Compression tag value for (new-style) JPEG
RGB, YCBCR = 2, 6  # TIFF PhotometricInterpretation tag values
# APP14 "Adobe" segment with transform 0: the components are RGB, not YCbCr (libjpeg, nvJPEG).
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
# Mean |device decode - host decode| per pixel channel (grey levels) accepted by the self-check.
DEVICE_MEAN_ABS_TOLERANCE = 2.0


class DecodeMismatchError(PipelineError):
    """The device's JPEG decoder disagrees with the host's on a slide."""


@dataclass(frozen=True)
class Piece:
    """One TIFF tile's part of a patch: rows/cols [y0, y1) x [x0, x1) of the decoded tile go to
    rows/cols starting at (dst_y, dst_x) of the patch."""

    key: tuple[int, int]  # (level, tile number): identifies the stream within a batch
    y0: int
    y1: int
    x0: int
    x1: int
    dst_y: int
    dst_x: int


@dataclass
class CompressedPatch:
    """A patch as the worker hands it over: complete JPEG streams (tables merged) keyed like the
    pieces, and where each piece goes. Pixels outside the level are white, as in Slide."""

    size_px: int
    streams: dict[tuple[int, int], bytes]
    pieces: list[Piece]
    slide: str = ""
    reference: np.ndarray | None = None  # host-decoded (S, S, 3) pixels, for the self-check


def merge_tables(jpegtables: bytes | None, data: bytes, rgb: bool = False) -> bytes:
    """A TIFF JPEG tile is an abbreviated stream whose quantisation/Huffman tables live in the
    page's JPEGTables tag (SOI, tables, EOI). A standalone decoder needs them inline: the
    tables without their EOI, then the tile without its SOI (what libjpeg does when it reads
    the tables first, as tifffile/imagecodecs and OpenSlide do). `rgb`: RGB-coded components
    (TIFF photometric RGB), announced with an Adobe marker right after SOI."""
    if not data.startswith(b"\xff\xd8"):
        raise ValueError("tile stream without SOI marker")
    body = data[2:]
    if jpegtables:
        if not (jpegtables.startswith(b"\xff\xd8") and jpegtables.endswith(b"\xff\xd9")):
            raise ValueError("JPEGTables without SOI/EOI markers")
        body = jpegtables[2:-2] + body
    return b"\xff\xd8" + (ADOBE_RGB if rgb else b"") + body


def plan_pieces(level: int, width: int, height: int, tile_w: int, tile_h: int,
                tiles_across: int, x: int, y: int, size: int) -> list[Piece]:
    """The tile parts covering the square patch at level pixels (x, y), `size` wide: pure grid
    geometry, row-major over the tiles; parts outside the level are left out (white)."""
    pieces: list[Piece] = []
    xa0, ya0 = max(x, 0), max(y, 0)
    xb0, yb0 = min(x + size, width), min(y + size, height)
    if xa0 >= xb0 or ya0 >= yb0:
        return pieces
    for ty in range(ya0 // tile_h, (yb0 - 1) // tile_h + 1):
        for tx in range(xa0 // tile_w, (xb0 - 1) // tile_w + 1):
            gx, gy = tx * tile_w, ty * tile_h
            xa, xb = max(xa0, gx), min(xb0, gx + tile_w)
            ya, yb = max(ya0, gy), min(yb0, gy + tile_h)
            pieces.append(Piece((level, ty * tiles_across + tx), ya - gy, yb - gy, xa - gx,
                                xb - gx, ya - y, xa - x))
    return pieces


class CompressedReader:
    """Per-slide reader of compressed patches; `read` returns None where the patch must be
    decoded on the host instead (see the module docstring for what is served)."""

    def __init__(self, levels: TiledTiffLevels):
        self._levels = levels
        self._fd = os.open(levels.path, os.O_RDONLY)

    @classmethod
    def open(cls, path, vendor: str,
             level_dimensions: Sequence[tuple[int, int]]) -> CompressedReader | None:
        levels = TiledTiffLevels.open(path, vendor, level_dimensions)
        if levels is None:
            return None
        levels.close()  # only its parsed offsets are used; this reader has its own descriptor
        return cls(levels)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def serves(self, level: int) -> bool:
        lv = self._levels.levels.get(level)
        return lv is not None and lv.compression == JPEG and lv.photometric in (RGB, YCBCR)

    def read(self, level: int, x_level: int, y_level: int, size: int) -> CompressedPatch | None:
        if not self.serves(level):
            return None
        lv = self._levels.levels[level]
        pieces = plan_pieces(level, lv.width, lv.height, lv.tile_w, lv.tile_h, lv.tiles_across,
                             x_level, y_level, size)
        streams: dict[tuple[int, int], bytes] = {}
        for p in pieces:
            if p.key in streams:
                continue
            k = p.key[1]
            if k >= lv.offsets.size or lv.bytecounts[k] <= 0:
                return None  # a missing tile: the host path (OpenSlide) decides what it is
            data = os.pread(self._fd, int(lv.bytecounts[k]), int(lv.offsets[k]))
            if not _whole_jpeg(data):
                return None  # damaged: the host path raises OpenSlide's error
            streams[p.key] = merge_tables(lv.jpegtables, data, rgb=lv.photometric == RGB)
        return CompressedPatch(size, streams, pieces, slide=str(self._levels.path))


# -- the batch side (main process) --------------------------------------------------------------

Decoder = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def torchvision_decoder(device: torch.device) -> Decoder:
    """Batched JPEG decode to (3, h, w) uint8 tensors on `device` (nvJPEG on CUDA)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(streams: list[torch.Tensor]) -> list[torch.Tensor]:
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which has no
        # batched nvJPEG decode of TIFF tile streams yet; the call itself is unchanged.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if device.type == "cuda":
                return decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)
            return [decode_jpeg(s, mode=ImageReadMode.RGB) for s in streams]

    return decode


def collate_patches(items: Sequence[tuple[np.ndarray | CompressedPatch, int]]
                    ) -> tuple[list, torch.Tensor]:
    """DataLoader collate for mixed batches: (patches as returned by the workers, tile rows)."""
    return [p for p, _ in items], torch.as_tensor([i for _, i in items], dtype=torch.int64)


def assemble(patches: Sequence[np.ndarray | CompressedPatch], device: torch.device,
             decoder: Decoder) -> torch.Tensor:
    """A batch of patches -> uint8 (B, 3, S, S) on `device`. Streams shared by several patches
    (a 512-px TIFF tile holds four 256-px tiles) are decoded once."""
    size = _patch_size(patches[0])
    if any(_patch_size(p) != size for p in patches):
        raise ValueError(f"a batch mixes patch sizes: {sorted({_patch_size(p) for p in patches})}")
    out = torch.full((len(patches), 3, size, size), 255, dtype=torch.uint8, device=device)
    keys: dict[tuple[int, int], int] = {}
    streams: list[torch.Tensor] = []
    for p in patches:
        if isinstance(p, CompressedPatch):
            for key, data in p.streams.items():
                if key not in keys:
                    keys[key] = len(streams)
                    streams.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    decoded = decoder(streams) if streams else []
    for b, p in enumerate(patches):
        if isinstance(p, CompressedPatch):
            _paste(out[b], p, decoded, keys)
            _self_check(out[b], p)
        else:
            out[b] = torch.from_numpy(np.ascontiguousarray(p)).to(device).permute(2, 0, 1)
    return out


def _paste(dst: torch.Tensor, p: CompressedPatch, decoded: list[torch.Tensor],
           keys: dict[tuple[int, int], int]) -> None:
    for q in p.pieces:
        img = decoded[keys[q.key]]
        h, w = q.y1 - q.y0, q.x1 - q.x0
        dst[:, q.dst_y:q.dst_y + h, q.dst_x:q.dst_x + w] = img[:, q.y0:q.y1, q.x0:q.x1]


def _self_check(patch: torch.Tensor, p: CompressedPatch) -> None:
    if p.reference is None:
        return
    ref = torch.from_numpy(np.ascontiguousarray(p.reference)).permute(2, 0, 1)
    diff = (patch.cpu().int() - ref.int()).abs().float().mean().item()
    if diff > DEVICE_MEAN_ABS_TOLERANCE:
        raise DecodeMismatchError(
            f"{p.slide}: JPEG decoding on the device differs from the host's by {diff:.1f} grey "
            f"levels on average (> {DEVICE_MEAN_ABS_TOLERANCE}); set extractor.decode: cpu")


def _patch_size(p: np.ndarray | CompressedPatch) -> int:
    return p.size_px if isinstance(p, CompressedPatch) else int(p.shape[0])


# -- the worker side (DataLoader dataset) ------------------------------------------------------


def centre_crop_offsets(h: int, w: int, crop_px: int) -> tuple[int, int]:
    """torchvision CenterCrop's (top, left), so crops match eval_transform exactly."""
    return int(round((h - crop_px) / 2.0)), int(round((w - crop_px) / 2.0))


# (slide, level) pairs whose first served patch carried a host-decoded reference (this process)
_CHECKED: set[tuple[str, int]] = set()


class _NotServed:
    """Handle-cache entry for a slide this module cannot serve (decoded on the host instead)."""

    def read(self, *args) -> None:
        return None

    def close(self) -> None:
        pass


def _open_reader(slide_path) -> CompressedReader | _NotServed:
    from pipeline.slide import Slide

    with Slide(slide_path) as slide:  # vendor + level sizes as OpenSlide reports them
        reader = CompressedReader.open(slide.path, slide.vendor, slide.level_dimensions)
    return reader if reader is not None else _NotServed()


class CompressedCentreCrops:
    """One slide's tiles in order as (patch, tile row): the centre crop as a CompressedPatch
    where this module serves it, else the uint8 (crop, crop, 3) HWC crop decoded in the worker
    (the same pixels as `decode: cpu`). Used with `collate_patches` and `assemble`."""

    def __init__(self, host: torch.utils.data.Dataset, crop_px: int):
        # host: the `decode: cpu` dataset of the same tiles, used for everything not served
        self.host, self.crop_px = host, int(crop_px)
        self.index, self.indices = host.index, host.indices
        geom = self.index.geometry
        # once per slide, not per tile: resampled tiles and pixel caches are decoded on the host;
        # the handle key is the host reader's (path + file identity, one stat)
        self._served = (geom.read_size_px == geom.tile_size_px
                        and host._reader.cache_files[0] is None)
        self._key = "jpeg\0" + host._reader._keys[0] if self._served else ""
        self._offset = centre_crop_offsets(geom.tile_size_px, geom.tile_size_px, self.crop_px)

    def __len__(self) -> int:
        return len(self.host)

    def __getitem__(self, j: int):
        patch = self._compressed(int(self.indices[j]))
        if patch is None:
            return self.host[j]
        level = self.index.geometry.level
        if (patch.slide, level) not in _CHECKED:  # once per slide level and worker process
            _CHECKED.add((patch.slide, level))
            patch.reference = np.asarray(self.host[j][0])
        return patch, int(self.indices[j])

    def _compressed(self, i: int) -> CompressedPatch | None:
        from pipeline.data import _SLIDE_HANDLES

        if not self._served:
            return None
        geom = self.index.geometry
        reader = _SLIDE_HANDLES.get(self._key, lambda _k: _open_reader(self.index.slide_path))
        x0, y0 = (int(v) for v in self.index.coords[i])
        ds = geom.level_downsample
        xl, yl = x0 / ds, y0 / ds
        if not (xl.is_integer() and yl.is_integer()):
            return None
        top, left = self._offset
        return reader.read(geom.level, int(xl) + left, int(yl) + top, self.crop_px)
