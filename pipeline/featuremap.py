"""Whole-slide feature maps: where each tile's feature vector goes on the U-Net's canvas.

The ONE placement implementation, used by train-unet, e2e-finetune, evaluate and predict, so a
tile sits at the same canvas cell in all of them.

A tile at grid (row, col) lands at canvas (row + offset_r, col + offset_c). Modes:
- "centered" (the paper, §4.1): a fixed size x size canvas of zeros with the group's grid
  bounding box centred on it, offset = (size - extent) // 2 - min. Tiles that land outside the
  canvas are dropped from the map (counted in `n_outside`); the paper picks a size that fits
  almost every slide.
- "full": the canvas is the group's bounding box padded up to a multiple of 2**depth (at least
  2 * 2**depth), the box centred in the padding, so no tile is dropped; training uses random
  crops.
With per_lump, each tissue lump (lump_id) gets its own map (the paper's stomach setting); else
one map per slide.

Label maps: tumor 1, normal 0, everything else (nolabel tiles, background cells) IGNORE_INDEX,
which `masked_cross_entropy` skips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.schema import IGNORE_INDEX, LABEL_NORMAL, LABEL_TUMOR

Mode = Literal["centered", "full"]
# Class indices of the U-Net's output channels.
CLASS_NORMAL = 0
CLASS_TUMOR = 1


class FeatureMapError(PipelineError):
    """The tiles or params cannot form a feature map (message names the cause)."""


@dataclass(frozen=True)
class MapLayout:
    """Where a group of a slide's tiles sits on one canvas.

    tile_index: (n,) int64 rows of the slide's tile index that are on this map, ascending.
    canvas_rc:  (n, 2) int64 (row, col) of each of those tiles on the canvas.
    shape:      (H, W) of the canvas.
    n_outside:  tiles of this group that fell off the canvas (centered mode only).
    group:      lump id of the group (per_lump), 0 for a whole-slide map.
    offset_rc:  canvas position = grid position + offset_rc.
    """

    tile_index: np.ndarray
    canvas_rc: np.ndarray
    shape: tuple[int, int]
    n_outside: int = 0
    group: int = 0
    offset_rc: tuple[int, int] = (0, 0)

    @property
    def n_tiles(self) -> int:
        return int(len(self.tile_index))


def build_layouts(
    grid: np.ndarray,
    lump_id: np.ndarray,
    size: int,
    mode: Mode,
    per_lump: bool,
    depth: int,
) -> list[MapLayout]:
    """Lay out a slide's tiles ((N, 2) grid row, col; (N,) lump ids) on one canvas per slide
    (or per lump). Returns [] for a slide without tiles."""
    grid = np.asarray(grid)
    lump_id = np.asarray(lump_id)
    if grid.ndim != 2 or grid.shape[1] != 2 or lump_id.shape != (len(grid),):
        raise FeatureMapError(
            f"feature map: grid must be (N, 2) and lump_id (N,), got {grid.shape} and "
            f"{lump_id.shape}"
        )
    multiple = 2**depth
    if mode == "centered" and (size < multiple or size % multiple):
        raise FeatureMapError(
            f"featuremap.size={size} must be a multiple of 2**unet.depth={multiple}"
        )
    if mode not in ("centered", "full"):
        raise FeatureMapError(f"featuremap.mode must be 'centered' or 'full', got {mode!r}")
    if len(grid) == 0:
        return []
    grid = grid.astype(np.int64)
    if len(np.unique(grid, axis=0)) != len(grid):
        raise FeatureMapError("feature map: two tiles share one grid position")
    if per_lump:
        groups = [(int(g), np.flatnonzero(lump_id == g)) for g in np.unique(lump_id)]
    else:
        groups = [(0, np.arange(len(grid)))]

    layouts = []
    for group, idx in groups:
        rc = grid[idx]
        lo = rc.min(axis=0)
        extent = rc.max(axis=0) - lo + 1
        if mode == "centered":
            shape = np.array([size, size])
        else:
            # At least 2 * 2**depth: the U-Net's bottom level is then >= 2x2, which BatchNorm in
            # train mode needs for a lone map (more than one value per channel).
            shape = np.maximum(-(-extent // multiple) * multiple, 2 * multiple)
        # Floor division: when the box is larger than the canvas, it sticks out on both sides.
        offset = (shape - extent) // 2 - lo
        pos = rc + offset
        inside = np.all((pos >= 0) & (pos < shape), axis=1)
        layouts.append(
            MapLayout(
                tile_index=idx[inside].astype(np.int64),
                canvas_rc=pos[inside].astype(np.int64),
                shape=(int(shape[0]), int(shape[1])),
                n_outside=int((~inside).sum()),
                group=group,
                offset_rc=(int(offset[0]), int(offset[1])),
            )
        )
    return layouts


def _flat_index(layout: MapLayout, device: torch.device) -> torch.Tensor:
    rc = torch.as_tensor(layout.canvas_rc, dtype=torch.long, device=device)
    return rc[:, 0] * layout.shape[1] + rc[:, 1]


def place(features: torch.Tensor, layout: MapLayout) -> torch.Tensor:
    """(n, D) features of the layout's tiles (in layout.tile_index order) -> (D, H, W) map,
    zeros elsewhere; differentiable w.r.t. `features`."""
    n = layout.n_tiles
    if features.ndim != 2 or features.shape[0] != n:
        raise ValueError(f"place: expected ({n}, D) features, got {tuple(features.shape)}")
    h, w = layout.shape
    d = features.shape[1]
    flat = features.new_zeros(h * w, d)
    flat = flat.index_put((_flat_index(layout, features.device),), features)
    return flat.t().reshape(d, h, w)


def gather(maps: torch.Tensor, layout: MapLayout) -> torch.Tensor:
    """(C, H, W) map -> (n, C) values at the layout's tiles (in layout.tile_index order)."""
    if maps.ndim != 3 or tuple(maps.shape[-2:]) != layout.shape:
        raise ValueError(f"gather: expected (C, {layout.shape[0]}, {layout.shape[1]}) map, "
                         f"got {tuple(maps.shape)}")
    rc = torch.as_tensor(layout.canvas_rc, dtype=torch.long, device=maps.device)
    return maps[:, rc[:, 0], rc[:, 1]].t()


def label_map(labels: np.ndarray, layout: MapLayout) -> torch.Tensor:
    """(n,) int8 schema labels of the layout's tiles -> (H, W) long target: tumor 1, normal 0,
    nolabel and background IGNORE_INDEX."""
    labels = np.asarray(labels)
    if labels.shape != (layout.n_tiles,):
        raise ValueError(f"label_map: expected ({layout.n_tiles},) labels, got {labels.shape}")
    target = np.full(layout.shape, IGNORE_INDEX, dtype=np.int64)
    cls = np.full(labels.shape, IGNORE_INDEX, dtype=np.int64)
    cls[labels == LABEL_TUMOR] = CLASS_TUMOR
    cls[labels == LABEL_NORMAL] = CLASS_NORMAL
    target[layout.canvas_rc[:, 0], layout.canvas_rc[:, 1]] = cls
    return torch.from_numpy(target)


def random_crop(
    feature_map: torch.Tensor,
    target: torch.Tensor,
    crop: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop x crop window of a (D, H, W) map and its (H, W) target (mode full training).
    A side smaller than `crop` is padded (features 0, target IGNORE_INDEX) first."""
    h, w = feature_map.shape[-2:]
    if tuple(target.shape) != (h, w):
        raise ValueError(f"random_crop: target {tuple(target.shape)} != map {(h, w)}")
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        feature_map = F.pad(feature_map, (0, pw, 0, ph))
        target = F.pad(target, (0, pw, 0, ph), value=IGNORE_INDEX)
        h, w = h + ph, w + pw
    r0 = int(torch.randint(h - crop + 1, (1,), generator=generator))
    c0 = int(torch.randint(w - crop + 1, (1,), generator=generator))
    return (
        feature_map[..., r0 : r0 + crop, c0 : c0 + crop],
        target[r0 : r0 + crop, c0 : c0 + crop],
    )


def masked_ce_sum_count(
    logits: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of softmax CE over labelled positions, number of labelled positions) for
    (B, C, H, W) logits and (B, H, W) targets. A position is labelled when its target is a class
    index 0..C-1; anything else (IGNORE_INDEX, raw nolabel codes) is ignored."""
    n_classes = logits.shape[1]
    valid = (target >= 0) & (target < n_classes)
    safe = torch.where(valid, target, torch.zeros_like(target))
    ce = F.cross_entropy(logits, safe, reduction="none")
    # where(), not multiply: a masked position's CE cannot leak NaN/inf into the sum.
    total = torch.where(valid, ce, torch.zeros_like(ce)).sum()
    return total, valid.sum()


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross entropy over labelled positions of (B, 2, H, W) logits vs (B, H, W)
    targets; 0 (still differentiable, zero gradient) when nothing is labelled."""
    total, count = masked_ce_sum_count(logits, target)
    return total / count.clamp(min=1).to(total.dtype)
