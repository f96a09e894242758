"""The models predict runs: which checkpoints (the method), loading them once, and the settings
they were trained with.

The rule for settings (tile.mpp, tile.size_px, extractor.crop_px, featuremap.mode/size/per_lump):
the checkpoints' recorded settings are used, whatever params.yaml says; a params.yaml value that
merely differs is ignored with an info line (params.yaml describes the training pipeline, not
the model at hand); a command-line flag that contradicts them is an error naming both values.
A checkpoint from before settings were recorded is refused with a one-line error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.io import sha256_file
from pipeline.log import get_logger
from pipeline.models import (
    PatchClassifier,
    checkpoint_settings,
    extractor_input_normalization,
    load_extractor,
    load_unet,
)
from pipeline.params import Params
from pipeline.runtime import pick_device
from pipeline.unet import UNet

log = get_logger("pipeline.predict")

METHODS = ("auto", "e2e", "separate", "classifier")
# method -> (extractor checkpoint, U-Net checkpoint or None) under the models folder
CHECKPOINTS: dict[str, tuple[str, str | None]] = {
    "e2e": ("e2e_extractor.pt", "e2e_unet.pt"),
    "separate": ("extractor.pt", "unet.pt"),
    "classifier": ("extractor.pt", None),
}
# settings the run takes from the checkpoints: from the extractor's, and also from the U-Net's
EXTRACTOR_SETTINGS = ("tile.mpp", "tile.size_px", "extractor.crop_px")
UNET_SETTINGS = ("featuremap.mode", "featuremap.size", "featuremap.per_lump")
# command-line flag -> the setting it names (flags only assert: they never override a model)
FLAGS = {"--tile-mpp": "tile.mpp", "--tile-size-px": "tile.size_px",
         "--crop-px": "extractor.crop_px", "--featuremap-mode": "featuremap.mode",
         "--featuremap-size": "featuremap.size"}


class PredictError(PipelineError):
    """predict cannot go on (bad arguments, missing models); one line naming the cause."""


@dataclass
class PredictModels:
    """The models of one method, on `device`, with the checkpoints' sha256 and settings."""

    method: str
    extractor: PatchClassifier
    unet: UNet | None
    checkpoints: dict[str, Path]  # "extractor" / "unet" -> file
    sha256: dict[str, str]  # "extractor" / "unet" -> sha256 of the file
    metas: dict[str, dict]
    device: torch.device
    settings: dict[str, Any] = field(default_factory=dict)  # the run's, from the checkpoints


def resolve_method(models_dir: Path, method: str) -> str:
    """The concrete method for `method` ("auto": the best whose checkpoints all exist)."""
    if method not in METHODS:
        raise PredictError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "auto":
        return method
    for m in ("e2e", "separate", "classifier"):
        if all((models_dir / f).is_file() for f in CHECKPOINTS[m] if f is not None):
            return m
    raise PredictError(
        f"{models_dir}: no models found (need e2e_extractor.pt + e2e_unet.pt, extractor.pt + "
        "unet.pt, or extractor.pt; train them or pass --models)"
    )


def load_models(models_dir: str | Path, method: str = "auto",
                device: torch.device | None = None) -> PredictModels:
    """Load the checkpoints of `method` (resolved from "auto") once, in eval mode on `device`,
    with the settings they were trained with (`model_settings`)."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise PredictError(f"{models_dir}: models folder not found (pass --models)")
    concrete = resolve_method(models_dir, method)
    device = device or pick_device()
    ext_name, unet_name = CHECKPOINTS[concrete]
    files = {"extractor": models_dir / ext_name}
    if unet_name is not None:
        files["unet"] = models_dir / unet_name
    extractor, ext_meta = load_extractor(files["extractor"])  # ModelError names a missing file
    metas = {"extractor": ext_meta}
    unet = None
    if "unet" in files:
        unet, metas["unet"] = load_unet(files["unet"])
        if unet.in_channels != extractor.feature_dim:
            raise PredictError(
                f"{files['unet']}: U-Net takes {unet.in_channels} channels but "
                f"{files['extractor']} gives {extractor.feature_dim}-d features"
            )
        unet.to(device).eval()
    extractor.to(device).eval()
    settings = model_settings(files, metas)
    sha = {k: sha256_file(p) for k, p in files.items()}
    how = "chosen by --method" if method != "auto" else "auto: best method with all checkpoints"
    log.info("predict: method %s (%s): read %s on %s", concrete, how,
             ", ".join(str(p) for p in files.values()), device)
    return PredictModels(concrete, extractor, unet, files, sha, metas, device, settings)


def model_settings(files: Mapping[str, Path], metas: Mapping[str, dict]) -> dict[str, Any]:
    """The run's settings: tile and crop from the extractor checkpoint, the feature map from
    the U-Net's. The two must have been trained at the same tile scale and crop, and the
    extractor on the normalisation this pipeline feeds it."""
    ext = checkpoint_settings(metas["extractor"], files["extractor"])
    out = {k: ext[k] for k in EXTRACTOR_SETTINGS if k in ext}
    missing = [k for k in EXTRACTOR_SETTINGS if k not in ext]
    if missing:
        raise PredictError(f"{files['extractor']}: checkpoint settings lack {', '.join(missing)}")
    mean, std = extractor_input_normalization()
    if ext.get("normalization.mean") != list(mean) or ext.get("normalization.std") != list(std):
        raise PredictError(f"{files['extractor']}: trained on inputs normalised with mean "
                           f"{ext.get('normalization.mean')} std {ext.get('normalization.std')}, "
                           f"this pipeline feeds mean {list(mean)} std {list(std)}")
    if "unet" in files:
        seg = checkpoint_settings(metas["unet"], files["unet"])
        for key in EXTRACTOR_SETTINGS:
            if key in seg and seg[key] != out[key]:
                raise PredictError(f"{files['unet']} was trained on features of {key} "
                                   f"{seg[key]!r}, {files['extractor']} on {out[key]!r}")
        out.update({k: seg[k] for k in UNET_SETTINGS if k in seg})
    return out


def run_params(params: Params, settings: Mapping[str, Any],
               flags: Mapping[str, Any] | None = None) -> Params:
    """`params` with the models' settings in place of params.yaml's. `flags` (flag -> value,
    None = not given) must agree with the settings: else a PredictError naming both values."""
    wrong = []
    for flag, value in (flags or {}).items():
        key = FLAGS[flag]
        if value is not None and key in settings and value != settings[key]:
            wrong.append(f"{flag} {value!r} but the models were trained with {key} "
                         f"{settings[key]!r}")
    if wrong:
        raise PredictError("; ".join(wrong))
    update: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        section, name = key.split(".")
        have = getattr(getattr(params, section), name)
        if have != value:
            log.info("predict: %s is %r in the params but the models were trained with %r; "
                     "using the models' value", key, have, value)
        update.setdefault(section, {})[name] = value
    return params.model_copy(update={s: getattr(params, s).model_copy(update=u)
                                     for s, u in update.items()})
