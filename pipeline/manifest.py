"""The slide manifest CSV: which slides exist, where their annotations are, and their split.

Columns (header required):
  slide_id         unique id, used for every per-slide output file name
  slide_path       slide file; absolute or relative to the CSV's folder
  annotation_path  ASAP XML / QuPath GeoJSON / mask image; empty for slides without annotations
  split            train | val | test
  patient_id       optional; default: the slide_id (one slide per patient)
  slide_label      optional; negative | itc | micro | macro (CAMELYON17 slide class)
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from pipeline.errors import PipelineError

REQUIRED_COLUMNS = ("slide_id", "slide_path", "annotation_path", "split")
OPTIONAL_COLUMNS = ("patient_id", "slide_label")
SPLITS = ("train", "val", "test")
SLIDE_LABELS = ("negative", "itc", "micro", "macro")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


class ManifestError(PipelineError):
    """The manifest is malformed; the message names the file and the cause."""


def load_manifest(path: str | Path, check_files: bool = True) -> pd.DataFrame:
    """Read and validate the manifest; returns it with absolute `slide_path` / `annotation_path`
    ("" where there is no annotation) and filled-in optional columns."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        # pandas' parser messages end in a newline (and may span lines): keep the first line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ManifestError(f"{path}: cannot read CSV: {reason}") from exc
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
    if df.empty:
        raise ManifestError(f"{path}: no slides listed")
    df = df.apply(lambda col: col.str.strip())
    if "patient_id" not in df.columns:
        df["patient_id"] = ""
    df.loc[df["patient_id"] == "", "patient_id"] = df["slide_id"]
    if "slide_label" not in df.columns:
        df["slide_label"] = ""
    dup = df["slide_id"][df["slide_id"].duplicated()].unique().tolist()
    if dup:
        raise ManifestError(f"{path}: duplicate slide_id {', '.join(dup[:5])}")
    no_path = df.loc[df["slide_path"] == "", "slide_id"].tolist()
    if no_path:
        # an empty path would resolve to the CSV's own folder and pass the existence check
        raise ManifestError(f"{path}: slide {no_path[0]}: slide_path is empty")
    bad_ids = [s for s in df["slide_id"] if not _SAFE_ID.match(s)]
    if bad_ids:
        raise ManifestError(
            f"{path}: slide_id {bad_ids[0]!r} has characters other than letters, digits, . _ -"
        )
    bad_split = sorted(set(df["split"]) - set(SPLITS))
    if bad_split:
        raise ManifestError(f"{path}: unknown split {bad_split} (expected {', '.join(SPLITS)})")
    labels = df["slide_label"].str.lower()
    bad_label = sorted(set(labels) - set(SLIDE_LABELS) - {""})
    if bad_label:
        raise ManifestError(f"{path}: unknown slide_label {bad_label} (expected {SLIDE_LABELS})")
    df["slide_label"] = labels
    base = path.resolve().parent

    def _abs(p: str) -> str:
        return "" if p == "" else str((base / p).resolve()) if not Path(p).is_absolute() else p

    df["slide_path"] = df["slide_path"].map(_abs)
    df["annotation_path"] = df["annotation_path"].map(_abs)
    if check_files:
        for row in df.itertuples():
            if not Path(row.slide_path).exists():
                raise ManifestError(
                    f"{path}: slide {row.slide_id}: file not found: {row.slide_path}"
                )
            if row.annotation_path and not Path(row.annotation_path).is_file():
                raise ManifestError(
                    f"{path}: slide {row.slide_id}: annotation not found: {row.annotation_path}"
                )
    return df.reset_index(drop=True)
