"""On-disk HDF5 formats, defined once. Every stage reads and writes through these names.

Per slide, aligned row for row (tile i is row i in every file of that slide):

data/tiles/<slide_id>.h5      written by `tile`
  coords          (N, 2) int64   level-0 x, y of the tile's top-left corner
  grid            (N, 2) int32   row, col of the tile on the slide's tile grid
  tissue_fraction (N,)   float32 fraction of the tile that is tissue (Otsu mask)
  lump_id         (N,)   int32   connected tissue component the tile belongs to (1..K)
  attrs: see TILE_ATTRS

data/tiles/<slide_id>.pixels.h5   optional pixel cache (tile.cache_pixels)
  pixels          (N, S, S, 3) uint8, chunked one tile per chunk, gzip

data/labels/<slide_id>.h5     written by `label`
  tumor_fraction  (N,) float32   fraction of the tile inside tumor (exclusions removed)
  normal_fraction (N,) float32   1 - tumor fraction restricted to annotated-or-negative tissue
  label           (N,) int8      LABEL_NORMAL / LABEL_TUMOR / LABEL_NOLABEL
  attrs: see LABEL_ATTRS

data/features/<slide_id>.h5   written by `extract-features` (and by e2e for its extractor)
  features        (N, D) float32 the extractor's f_{n-1} output
  tumor_prob      (N,)   float32 the extractor's own softmax tumor probability
  coords, grid, lump_id           copied from the tile index
  label           (N,) int8       copied from the label file
  attrs: see FEATURE_ATTRS

Every file carries `schema_version` and `params_hash`; a stage treats an existing file as done
only when both match what it would write now (not merely because the file exists).
"""

from __future__ import annotations

import numpy as np

SCHEMA_VERSION = 1

LABEL_NORMAL = 0
LABEL_TUMOR = 1
LABEL_NOLABEL = -1
LABEL_NAMES = {LABEL_NORMAL: "normal", LABEL_TUMOR: "tumor", LABEL_NOLABEL: "nolabel"}
# Value of background and nolabel positions in label maps; torch's cross_entropy default.
IGNORE_INDEX = -100

# tile index
COORDS = "coords"
GRID = "grid"
TISSUE_FRACTION = "tissue_fraction"
LUMP_ID = "lump_id"
TILE_DTYPES = {COORDS: np.int64, GRID: np.int32, TISSUE_FRACTION: np.float32, LUMP_ID: np.int32}
TILE_ATTRS = (
    "schema_version",
    "params_hash",      # Params.section_hash("tile")
    "params_json",      # the tile params used, JSON
    "slide_id",
    "slide_path",       # absolute path of the slide read
    "slide_fingerprint",  # size + hash of first/last MiB: a slide replaced in place is re-tiled
    "slide_width_px_level0",
    "slide_height_px_level0",
    "mpp",              # level-0 um/px of the slide (NaN when unknown and no fallback)
    "mpp_source",       # "metadata" | "fallback_mpp" | "unknown"
    "tile_mpp",         # um/px of the tile pixels handed to the model (NaN when unknown)
    "level",            # pyramid level read
    "level_downsample", # downsample of that level relative to level 0
    "read_size_px",     # square size read at `level` (resampled to tile_size_px when different)
    "tile_size_px",     # output tile side in pixels
    "tile_size_px_level0",  # tile side in level-0 pixels (grid pitch), float
    "grid_rows",
    "grid_cols",
    "n_lumps",
)

PIXELS = "pixels"

# labels
TUMOR_FRACTION = "tumor_fraction"
NORMAL_FRACTION = "normal_fraction"
LABEL = "label"
LABEL_DTYPES = {TUMOR_FRACTION: np.float32, NORMAL_FRACTION: np.float32, LABEL: np.int8}
LABEL_ATTRS = (
    "schema_version",
    "params_hash",        # Params.section_hash("tile", "label")
    "annotation_path",    # "" for slides without annotations (all tissue normal)
    "annotation_sha256",  # content hash: an annotation edited in place makes the labels stale
    "tile_index_sha256",  # the tile index labelled: re-tiling makes the labels stale
    "annotation_format",  # "asap_xml" | "geojson" | "mask" | "none"
    "raster_um",          # size of one raster pixel in um (or level-0 px when mpp unknown)
    "tumor_min",
    "normal_min",
)

# features
FEATURES = "features"
TUMOR_PROB = "tumor_prob"
FEATURE_DTYPES = {
    FEATURES: np.float32, TUMOR_PROB: np.float32, COORDS: np.int64, GRID: np.int32,
    LUMP_ID: np.int32, LABEL: np.int8,
}
FEATURE_ATTRS = (
    "schema_version",
    "params_hash",
    "extractor_sha256",   # sha256 of the checkpoint file that produced the features
    "extractor_arch",
    "feature_dim",
    "tile_params_json",
    "slide_id",
)

# per-tile predictions of one method, data/predictions/<method>/<slide_id>.h5
#   tumor_prob (N,) float32 aligned with the tile index (every tile, nolabel included — paper:
#   "the tumor/normal prediction is also assigned to the nolabel patches"); tiles a method could
#   not see (off a centered canvas) get NaN and are counted in attr n_unpredicted.
METHODS = ("classifier", "separate", "e2e", "seg_only", "frozen")
PRED_ATTRS = (
    "schema_version",
    "params_hash",
    "method",
    "model_sha256",     # checkpoint(s) that produced the predictions
    "slide_id",
    "n_unpredicted",
)
