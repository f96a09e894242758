"""What the evaluation reads: each slide's tile grid and ground truth (SlideTruth) and each
method's per-tile tumor probabilities (MethodPredictions).

Methods (pipeline.schema.METHODS) and where their per-tile tumor probabilities come from:
  classifier  `tumor_prob` of data/features/<slide>.h5 (the patch CNN on its own)
  separate, e2e, seg_only, frozen   data/predictions/<method>/<slide>.h5 `tumor_prob`
A method with no file for any slide of the evaluated split is "not run"; one with files for only
some of them stops the stage (a half-finished or stale run must not be scored). Tiles a method
did not predict (NaN, off a centered canvas) count as predicted normal (`filled`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.paths import Paths
from pipeline.schema import LABEL, TUMOR_FRACTION, TUMOR_PROB
from pipeline.tileindex import attr_value, grid_origin_px_level0, read_tile_index

NOT_RUN = "not run"


class EvaluateError(PipelineError):
    """Inputs of the evaluate stage are missing, partial or inconsistent (one line)."""


@dataclass
class SlideTruth:
    """One slide's tile grid and ground truth (everything but the predictions)."""

    slide_id: str
    split: str
    patient_id: str
    slide_label: str  # manifest CAMELYON17 slide class, "" when absent
    annotation_path: str
    slide_path: str
    grid: np.ndarray  # (N, 2) row, col
    grid_shape: tuple[int, int]  # (rows, cols)
    origin_xy_px_level0: tuple[float, float]  # level-0 x, y of grid cell (0, 0)'s corner
    pitch_px_level0: float  # tile side on the slide
    mpp: float  # level-0 um/px, NaN when unknown
    slide_wh_px_level0: tuple[int, int]
    label: np.ndarray  # (N,) int8 schema labels
    tumor_fraction: np.ndarray  # (N,) float32
    _raster: Any = field(default=None, repr=False)  # annotation.AnnotationTruth cache

    @property
    def n(self) -> int:
        return int(self.grid.shape[0])

    @property
    def pitch_um(self) -> float:
        return self.pitch_px_level0 * self.mpp  # NaN when mpp unknown

    @property
    def true_tumor(self) -> np.ndarray:
        """Tiles with any annotated tumor: a prediction touching them is not a 'tumor point'."""
        return self.tumor_fraction > 0

    def to_grid(self, values: np.ndarray, fill: Any) -> np.ndarray:
        """(rows, cols) array with `values` at the tiles' grid cells and `fill` elsewhere."""
        values = np.asarray(values)
        out = np.full(self.grid_shape, fill, dtype=np.result_type(values.dtype, np.asarray(fill)))
        out[self.grid[:, 0], self.grid[:, 1]] = values
        return out

    def grid_extent(self) -> tuple[float, float, float, float]:
        """(left, right, bottom, top) of the tile grid in level-0 px, for matplotlib's imshow."""
        ox, oy = self.origin_xy_px_level0
        rows, cols = self.grid_shape
        return (ox, ox + cols * self.pitch_px_level0, oy + rows * self.pitch_px_level0, oy)


def filled(prob: np.ndarray) -> np.ndarray:
    """NaN (not predicted) -> 0.0, i.e. predicted normal."""
    return np.nan_to_num(np.asarray(prob, np.float64), nan=0.0)


def predicted_grid(t: SlideTruth, prob: np.ndarray) -> np.ndarray:
    """Tile probabilities on the grid, NaN off tissue / unpredicted."""
    return t.to_grid(np.asarray(prob, np.float64), np.nan)


def _read_datasets(path: Path, names: Sequence[str], what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise EvaluateError(f"{path}: {what} not found")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in names if k not in f]
            if missing:
                raise EvaluateError(f"{path}: {what} lacks dataset(s) {', '.join(missing)}")
            out = {k: np.asarray(f[k][...]) for k in names}
            out["_attrs"] = {k: attr_value(v) for k, v in f.attrs.items()}  # type: ignore[assignment]
            return out
    except OSError as exc:
        raise EvaluateError(f"{path}: cannot read HDF5 ({exc})") from None


def load_truth(paths: Paths, row: Any) -> SlideTruth:
    """Tile index + labels of one manifest row."""
    idx = read_tile_index(paths.tile_file(row.slide_id))
    lab = _read_datasets(paths.label_file(row.slide_id), (LABEL, TUMOR_FRACTION), "label file")
    if lab[LABEL].shape[0] != idx.n_tiles:
        raise EvaluateError(
            f"{paths.label_file(row.slide_id)}: {lab[LABEL].shape[0]} labels but the tile index "
            f"has {idx.n_tiles} tiles; rerun `label`"
        )
    a = idx.attrs
    pitch = float(a["tile_size_px_level0"])
    grid = idx.grid.astype(np.int64)
    origin = grid_origin_px_level0(idx.coords, grid, pitch)
    return SlideTruth(
        slide_id=row.slide_id, split=row.split, patient_id=row.patient_id,
        slide_label=str(row.slide_label), annotation_path=str(row.annotation_path),
        slide_path=str(row.slide_path) or str(a.get("slide_path", "")), grid=grid,
        grid_shape=(int(a["grid_rows"]), int(a["grid_cols"])),
        origin_xy_px_level0=(float(origin[0]), float(origin[1])), pitch_px_level0=pitch,
        mpp=float(a["mpp"]),
        slide_wh_px_level0=(int(a["slide_width_px_level0"]), int(a["slide_height_px_level0"])),
        label=lab[LABEL].astype(np.int8), tumor_fraction=lab[TUMOR_FRACTION].astype(np.float32),
    )


def method_file(paths: Paths, method: str, slide_id: str) -> Path:
    """Where a method's per-tile tumor probabilities of a slide live."""
    if method == "classifier":
        return paths.feature_file(slide_id)
    return paths.prediction_file(method, slide_id)


@dataclass
class MethodPredictions:
    method: str
    probs: dict[str, np.ndarray]  # slide id -> (N,) float32, NaN = not predicted
    attrs: dict[str, Any]  # attrs of the first file read (e.g. frozen_extractor)
    status: str  # "ok" or NOT_RUN


def load_method(paths: Paths, method: str, truths: Mapping[str, SlideTruth],
                split_ids: Sequence[str]) -> MethodPredictions:
    """Read a method's predictions for every slide that has them. NOT_RUN when none of the
    split's slides has a file; EvaluateError when only some do."""
    have = {sid: method_file(paths, method, sid).is_file() for sid in truths}
    in_split = [sid for sid in split_ids if have[sid]]
    if not in_split:
        return MethodPredictions(method, {}, {}, NOT_RUN)
    if len(in_split) != len(split_ids):
        missing = next(sid for sid in split_ids if not have[sid])
        raise EvaluateError(
            f"{method_file(paths, method, missing)}: missing while {len(in_split)} other "
            f"{truths[missing].split} slides have {method} predictions; rerun the stage that "
            "writes them"
        )
    probs: dict[str, np.ndarray] = {}
    attrs: dict[str, Any] = {}
    for sid in (s for s, ok in have.items() if ok):
        path = method_file(paths, method, sid)
        d = _read_datasets(path, (TUMOR_PROB,), f"{method} predictions")
        p = np.asarray(d[TUMOR_PROB], np.float32).ravel()
        if p.shape[0] != truths[sid].n:
            raise EvaluateError(
                f"{path}: {p.shape[0]} tile predictions but the tile index has {truths[sid].n} "
                "tiles (stale predictions); rerun the stage that writes them"
            )
        probs[sid] = p
        if not attrs:
            attrs = dict(d["_attrs"])  # type: ignore[arg-type]
    return MethodPredictions(method, probs, attrs, "ok")
