"""A predicted slide's folder DIR/<stem>/ and its summary:

  <stem>.heatmap.h5     tumor_prob (rows, cols) float32 on the tile grid, NaN off-tissue; coords
                        (N, 2) level-0 x, y; grid (N, 2) row, col; tile_prob (N,); attrs mpp,
                        tile_size_px_level0, tile_mpp, method, model sha256s, threshold, ...
  <stem>.heatmap.png    the heatmap over the slide thumbnail, predicted regions outlined
  <stem>.tumor.geojson  predicted tumor regions for QuPath (level-0 px, class "Tumor")
  <stem>.tumor.xml      the same for ASAP (CAMELYON16 layout: tumor `_0`, holes `_2`)
  <stem>.summary.json   tumor area, lesions, largest lesion diameter, CAMELYON17 slide class,
                        ... — written LAST: a slide folder is complete only when it exists.

A folder is current when its summary names the same slide path, method, model sha256s and
params key (`params_key`); a rerun skips it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.params import Params, short_hash
from pipeline.predict.models import PredictModels

# Bumped when the output files change meaning: older summaries are then not current.
OUTPUT_VERSION = 1
CSV_KEYS = ("slide", "status", "n_tiles", "n_tumor_tiles", "n_lesions", "tumor_area_mm2",
            "camelyon17_class", "seconds")  # the command's per-slide summary row


@dataclass
class SlideOutputs:
    """The files of one slide under DIR/<stem>/."""

    folder: Path
    stem: str

    def _f(self, suffix: str) -> Path:
        return self.folder / f"{self.stem}{suffix}"

    @property
    def heatmap_h5(self) -> Path:
        return self._f(".heatmap.h5")

    @property
    def heatmap_png(self) -> Path:
        return self._f(".heatmap.png")

    @property
    def geojson(self) -> Path:
        return self._f(".tumor.geojson")

    @property
    def asap_xml(self) -> Path:
        return self._f(".tumor.xml")

    @property
    def summary(self) -> Path:
        return self._f(".summary.json")

    def files(self) -> list[Path]:
        return [self.heatmap_h5, self.heatmap_png, self.geojson, self.asap_xml, self.summary]


def params_key(params: Params, mpp: float | None) -> str:
    """What makes a slide's outputs current besides the slide and the models."""
    blob = json.dumps({"sections": params.section_json("tile", "featuremap", "evaluate"),
                       "crop_px": params.extractor.crop_px, "mpp": mpp,
                       "version": OUTPUT_VERSION}, sort_keys=True)
    return short_hash(blob)


def is_current(out: SlideOutputs, slide_path: Path, models: PredictModels, key: str) -> bool:
    if not all(f.is_file() for f in out.files()):
        return False
    try:
        s = json.loads(out.summary.read_text())
    except (OSError, ValueError):
        return False
    return (s.get("output_version") == OUTPUT_VERSION and s.get("slide_path") == str(slide_path)
            and s.get("method") == models.method and s.get("model_sha256") == models.sha256
            and s.get("params_key") == key)
