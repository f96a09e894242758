"""The params schema: the one place that says which keys params.yaml has and what they hold.

Loaded with ruamel.yaml in YAML 1.2 mode, like DVC itself, so the text `dvc exp run -S
e2e.lr_fe=1e-9` writes (`lr_fe: 1e-09`) is a float; PyYAML (YAML 1.1) would return the string
'1e-09'. Validation is pydantic with `extra="forbid"`, so an unknown or mistyped key stops the
stage with the dotted key named.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)
from ruamel.yaml import YAML

from pipeline.errors import PipelineError


class ParamsError(PipelineError):
    """params.yaml is malformed; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoParams(_Section):
    seed: int = 0
    n_patients: int = Field(6, ge=1)
    slides_per_patient: int = Field(5, ge=1)
    slide_mm: float = Field(5.0, gt=0)
    mpp: float = Field(1.0, gt=0)
    split_patients: tuple[int, int, int] = (3, 1, 2)
    jpeg_quality: int = Field(85, ge=10, le=100)


class DataParams(_Section):
    manifest: str = "data/demo/manifest.csv"
    track: str = "data/demo"


class TileParams(_Section):
    size_px: int = Field(256, ge=16)
    mpp: float = Field(1.0, gt=0)
    fallback_level: int = Field(0, ge=0)
    fallback_mpp: float | None = Field(None, gt=0)
    mpp_range_um: tuple[float, float] = (0.05, 20.0)
    min_tissue: float = Field(0.8, ge=0, le=1)
    mask_mpp: float = Field(8.0, gt=0)
    min_object_um2: float = Field(20000.0, ge=0)
    max_hole_um2: float = Field(5000.0, ge=0)
    workers: int = Field(2, ge=1)
    cache_pixels: bool = False

    @field_validator("mpp_range_um")
    @classmethod
    def _range_ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] < v[1]):
            raise ValueError("need 0 < low < high um/px")
        return v


class LabelParams(_Section):
    tumor_min: float = Field(0.2, ge=0, le=1)
    normal_min: float = Field(0.8, ge=0, le=1)
    raster_subsample: int = Field(8, ge=1)


# Which epoch's weights a training stage keeps: "best_val" the lowest validation loss, "last" the
# final epoch. The paper trains a fixed number of epochs (30 / 50 / 10) and keeps the last, so
# "last" reproduces it; the default stays "best_val", what every result of this project so far
# was made with (changing it would silently change them). See trainstate.select_weights.
Select = Literal["best_val", "last"]


class ExtractorParams(_Section):
    # googlenet | resnet18 | small_cnn | timm:<model_name> (checked against timm when built)
    arch: Literal["googlenet", "resnet18", "small_cnn"] | Annotated[
        str, StringConstraints(pattern=r"^timm:\S+$")] = "small_cnn"
    timm_kwargs: dict[str, Any] = {}
    pretrained: str = "none"
    feature_dim: Annotated[int, Field(ge=1)] | Literal["native"] = 16
    trainable_blocks: Literal["all"] | Annotated[int, Field(ge=0)] = "all"
    crop_px: int = Field(224, ge=8)
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0)
    balance: bool = True
    workers: int = Field(2, ge=0)
    amp: bool = True
    select: Select = "best_val"
    decode: Literal["cpu", "device"] = "cpu"
    compile: bool = False


class FeatureMapParams(_Section):
    size: int = Field(32, ge=4)
    mode: Literal["centered", "full"] = "centered"
    per_lump: bool = False
    crop: int = Field(32, ge=4)


class UNetParams(_Section):
    depth: int = Field(3, ge=1, le=8)
    width: int = Field(32, ge=1)
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    augment: bool = True
    select: Select = "best_val"


class E2EParams(_Section):
    lr_fe: float = Field(1e-9, ge=0)
    lr_seg: float = Field(1e-7, ge=0)
    epochs: int = Field(2, ge=0)
    chunk_size: int = Field(32, ge=1)
    backprop_fraction: float = Field(1.0, gt=0, le=1)
    augment: bool = False
    master_dtype: Literal["float32", "float64"] = "float64"
    select: Select = "last"
    state_every_slides: int = Field(4, ge=0)


class SegOnlyParams(_Section):
    downsample: int = Field(8, ge=1)
    depth: int = Field(5, ge=1, le=8)
    width: int = Field(8, ge=1)
    crop_tiles: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1)
    epochs: int = Field(60, ge=1)
    lr: float = Field(1e-4, gt=0)
    augment: bool = True
    select: Select = "best_val"


class FrozenParams(_Section):
    standardize: bool = True


class RandomForestParams(_Section):
    thresholds: tuple[float, ...] = Field((0.5, 0.9), min_length=1)
    n_estimators: int = Field(100, ge=1)
    folds: int = Field(5, ge=2)


class EvaluateParams(_Section):
    threshold: float = Field(0.5, ge=0, le=1)
    split: Literal["train", "val", "test"] = "test"
    rf: RandomForestParams = RandomForestParams()


class Params(_Section):
    seed: int = 0
    demo: DemoParams = DemoParams()
    data: DataParams = DataParams()
    tile: TileParams = TileParams()
    label: LabelParams = LabelParams()
    extractor: ExtractorParams = ExtractorParams()
    featuremap: FeatureMapParams = FeatureMapParams()
    unet: UNetParams = UNetParams()
    e2e: E2EParams = E2EParams()
    seg_only: SegOnlyParams = SegOnlyParams()
    frozen: FrozenParams = FrozenParams()
    evaluate: EvaluateParams = EvaluateParams()


    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections (e.g. 'tile'), stored in HDF5 attrs so a rerun can
        tell a complete output made with the same params from a stale one. Keys that change
        how a stage runs but not what it writes (RUNTIME_KEYS) are left out, so raising
        tile.workers does not re-tile a whole collection."""
        blob = json.dumps({s: _without_runtime(s, _dump(getattr(self, s))) for s in sections},
                          sort_keys=True)
        return short_hash(blob)

    def section_json(self, *sections: str) -> str:
        return json.dumps({s: _dump(getattr(self, s)) for s in sections}, sort_keys=True)


# Per section: keys that do not change any output (parallelism, an optional read cache).
RUNTIME_KEYS = {"tile": {"workers", "cache_pixels"}, "extractor": {"workers"},
                "e2e": {"state_every_slides"}}


def short_hash(blob: str) -> str:
    """The 16-hex-digit sha256 prefix of a text: the params/settings stamp on outputs."""
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _without_runtime(section: str, dumped: Any) -> Any:
    if isinstance(dumped, dict) and section in RUNTIME_KEYS:
        return {k: v for k, v in dumped.items() if k not in RUNTIME_KEYS[section]}
    return dumped


def _dump(v: Any) -> Any:
    return v.model_dump(mode="json") if isinstance(v, BaseModel) else v


def _yaml() -> YAML:
    y = YAML(typ="safe", pure=True)
    y.version = (1, 2)
    return y


def parse_params(text: str, source: str = "params.yaml") -> Params:
    """Parse params YAML text (YAML 1.2) and validate it against the schema."""
    try:
        raw = _yaml().load(text)
    except Exception as exc:  # ruamel raises several parser error types
        raise ParamsError(f"{source}: not valid YAML: {exc}".splitlines()[0]) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            kind = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            msgs.append(f"{key}: {kind} (got {err.get('input')!r})")
        raise ParamsError(f"{source}: " + "; ".join(msgs)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    return parse_params(path.read_text(), source=str(path))
