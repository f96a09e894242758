"""Where artifacts live, relative to the project root (DVC runs stages from there)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")

    def _p(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def demo(self) -> Path:
        return self._p("data", "demo")

    @property
    def tiles(self) -> Path:
        return self._p("data", "tiles")

    @property
    def labels(self) -> Path:
        return self._p("data", "labels")

    @property
    def features(self) -> Path:
        return self._p("data", "features")

    @property
    def models(self) -> Path:
        return self._p("models")

    @property
    def reports(self) -> Path:
        return self._p("reports")

    def tile_file(self, slide_id: str) -> Path:
        return self.tiles / f"{slide_id}.h5"

    def pixel_cache_file(self, slide_id: str) -> Path:
        return self.tiles / f"{slide_id}.pixels.h5"

    def label_file(self, slide_id: str) -> Path:
        return self.labels / f"{slide_id}.h5"

    def feature_file(self, slide_id: str, variant: str = "") -> Path:
        """variant "" = Separate Learning features; "e2e" / "frozen" = those extractors'."""
        folder = self.features if not variant else self._p("data", f"features_{variant}")
        return folder / f"{slide_id}.h5"

    def prediction_file(self, method: str, slide_id: str) -> Path:
        return self._p("data", "predictions", method, f"{slide_id}.h5")

    def timings_file(self, stage: str) -> Path:
        """reports/timings/<stage>.json: a stage's wall-clock seconds (`stage` = its dvc.yaml
        name). Kept out of the metrics JSONs so `dvc metrics diff` moves only with results."""
        return self._p("reports", "timings", f"{stage}.json")

    def recorded(self, input_path: str | Path, out_folder: Path) -> str:
        """How an output file in `out_folder` records an input file's path: relative to that
        folder when the input lies inside the project, so a cloned or moved project writes
        byte-identical outputs (and the same dvc.lock); absolute otherwise (slides on a data
        volume). '' (no file) stays ''. Read back with `resolve_recorded`."""
        if not str(input_path):
            return ""
        p = Path(input_path).resolve()
        if p.is_relative_to(self.root.resolve()):
            return os.path.relpath(p, out_folder.resolve())
        return str(p)


def resolve_recorded(recorded: str, out_file: str | Path) -> Path:
    """The input path recorded in `out_file` (see `Paths.recorded`) as an absolute path."""
    p = Path(recorded)
    if p.is_absolute():
        return p
    return Path(os.path.normpath(Path(out_file).resolve().parent / p))

