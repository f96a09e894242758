"""Patch classifier (the paper's feature extractor) and model checkpoints.

A `PatchClassifier` is backbone -> Linear(backbone_dim, feature_dim) -> Linear(feature_dim, 2).
The middle Linear's output is the paper's f_{n-1} (the 16-d patch feature, `.features(x)`); the
last Linear is f_n (tumor/normal logits, `forward(x)`), used only when training the extractor on
its own; End-to-End learning drops it (§3.2.2).

Weights are never downloaded: `pretrained="imagenet"` reads torchvision's file from the local
torch hub cache and fails with the exact path and URL when it is not there.

Checkpoints are `{"state_dict": ..., "meta": {...}}` written atomically; `meta` holds what is
needed to rebuild the architecture (kind, arch, feature_dim / U-Net shape) plus whatever the
caller adds (params JSON, epoch, metrics). Loading refuses a state_dict that does not fit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.unet import UNet

ARCHS = ("googlenet", "resnet18", "small_cnn")
N_CLASSES = 2
# ImageNet channel statistics (torchvision's); the data module normalises patches with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KIND_EXTRACTOR = "extractor"
KIND_UNET = "unet"


class ModelError(PipelineError):
    """A model or checkpoint cannot be built/loaded; the message names the file and the cause."""


RGB = tuple[float, float, float]


def extractor_input_normalization() -> tuple[RGB, RGB]:
    """(mean, std) per RGB channel for pixels scaled to [0, 1], as every extractor expects."""
    return IMAGENET_MEAN, IMAGENET_STD


class PatchClassifier(nn.Module):
    """backbone -> feature Linear (f_{n-1}) -> head Linear (f_n, 2 logits)."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, feature_dim: int, arch: str):
        super().__init__()
        self.arch = arch
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.feature = nn.Linear(backbone_dim, feature_dim)
        self.head = nn.Linear(feature_dim, N_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, feature_dim) patch features (f_{n-1})."""
        return self.feature(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 2) tumor/normal logits (f_n applied to the features)."""
        return self.head(self.features(x))


def _small_cnn() -> tuple[nn.Module, int]:
    def block(c_in: int, c_out: int, kernel: int, stride: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2 if kernel % 2 else 0,
                      bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]

    # A 4x4/4 "patchify" stem, then stride 2: a 224 px patch is 14 px after three blocks, which
    # keeps forward+backward of a CPU batch of 64 well under a second (no 112 px activations).
    layers = [
        *block(3, 16, 4, 4),
        *block(16, 32, 3, 2),
        *block(32, 64, 3, 2),
        *block(64, 64, 3, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
    ]
    return nn.Sequential(*layers), 64


def _torchvision_backbone(arch: str) -> tuple[nn.Module, int]:
    import torchvision

    if arch == "googlenet":
        # transform_input=True: torchvision's ImageNet GoogLeNet weights (ported from TF) expect
        # it (torchvision turns it on whenever weights are given); it is a fixed per-channel
        # affine map, harmless for random init, and one setting keeps checkpoints
        # interchangeable whatever the init was.
        net = torchvision.models.googlenet(
            weights=None, aux_logits=False, init_weights=True, transform_input=True
        )
        dim = net.fc.in_features  # 1024; torchvision's dropout before fc is kept
    elif arch == "resnet18":
        net = torchvision.models.resnet18(weights=None)
        dim = net.fc.in_features  # 512
    else:
        raise ValueError(arch)
    net.fc = nn.Identity()
    return net, dim


def imagenet_weights_file(arch: str) -> tuple[Path, str]:
    """(expected local path in the torch hub cache, download URL) of torchvision's ImageNet
    weights for `arch`. The file name is taken from torchvision's weights enum."""
    import torchvision

    enums = {
        "googlenet": torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1,
        "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    }
    if arch not in enums:
        raise ModelError(f"extractor.pretrained=imagenet: no ImageNet weights for arch {arch!r}")
    url = enums[arch].url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def build_extractor(arch: str, feature_dim: int = 16, pretrained: str = "none") -> PatchClassifier:
    """Build the patch classifier.

    pretrained: "none" (random init), "imagenet" (torchvision's ImageNet backbone weights from
    the local torch hub cache; the two new Linear layers stay random), or a path to a checkpoint
    written by `save_checkpoint` or a plain state_dict (of the whole model, or of the
    torchvision backbone). Nothing is ever downloaded.
    """
    if arch not in ARCHS:
        raise ModelError(f"extractor.arch: unknown architecture {arch!r} (choose from {ARCHS})")
    if feature_dim < 1:
        raise ModelError(f"extractor.feature_dim must be >= 1, got {feature_dim}")
    backbone, dim = _small_cnn() if arch == "small_cnn" else _torchvision_backbone(arch)
    model = PatchClassifier(backbone, dim, feature_dim, arch)
    if pretrained == "none":
        return model
    if pretrained == "imagenet":
        path, url = imagenet_weights_file(arch)
        if not path.is_file():
            raise ModelError(
                f"{path}: ImageNet weights for {arch} not found; nothing is downloaded at run "
                f"time: fetch {url} yourself and put it at exactly that path (or set "
                f"extractor.pretrained=none)"
            )
        _load_backbone(model, _torch_load(path), path)
        return model
    path = Path(pretrained)
    if not path.is_file():
        raise ModelError(f"{path}: extractor.pretrained checkpoint not found")
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and "meta" in obj:
        meta = obj["meta"]
        if meta.get("arch") != arch or int(meta.get("feature_dim", -1)) != feature_dim:
            raise ModelError(
                f"{path}: checkpoint is arch={meta.get('arch')!r} feature_dim="
                f"{meta.get('feature_dim')}, params ask for arch={arch!r} feature_dim={feature_dim}"
            )
        _load_strict(model, obj["state_dict"], path)
        return model
    if not isinstance(obj, Mapping):
        raise ModelError(f"{path}: not a state_dict or checkpoint (got {type(obj).__name__})")
    if any(k.startswith(("backbone.", "feature.", "head.")) for k in obj):
        _load_strict(model, obj, path)
    else:
        _load_backbone(model, obj, path)
    return model


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        msg = f"{path}: cannot read as a torch checkpoint: {exc}".splitlines()[0]
        raise ModelError(msg) from exc


def _state_dict_mismatch(model: nn.Module, state: Mapping[str, Any]) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state
        and hasattr(state[k], "shape")
        and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
    return "; ".join(parts)


def _load_strict(model: nn.Module, state: Mapping[str, Any], path: Path) -> None:
    problem = _state_dict_mismatch(model, state)
    if problem:
        raise ModelError(f"{path}: state_dict does not fit the model: {problem}")
    model.load_state_dict(state, strict=True)


def _load_backbone(model: PatchClassifier, state: Mapping[str, Any], path: Path) -> None:
    """Load backbone weights in torchvision's layout; its fc (1000 classes) is ignored."""
    own = model.backbone.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    problem = _state_dict_mismatch(model.backbone, state)
    if problem:
        raise ModelError(f"{path}: backbone weights do not fit {model.arch}: {problem}")
    if not own:
        raise ModelError(f"{path}: {model.arch} backbone has no parameters to load")
    model.backbone.load_state_dict(state, strict=False)


def _model_meta(model: nn.Module) -> dict[str, Any]:
    if isinstance(model, PatchClassifier):
        return {"kind": KIND_EXTRACTOR, "arch": model.arch, "feature_dim": model.feature_dim}
    if isinstance(model, UNet):
        return {"kind": KIND_UNET, **model.config()}
    raise TypeError(f"save_checkpoint: unsupported model type {type(model).__name__}")


def save_checkpoint(
    path: str | Path, model: nn.Module, meta: Mapping[str, Any] | None = None
) -> None:
    """Write {"state_dict", "meta"} atomically. `meta` (JSON-like: str/int/float/bool/None,
    lists, dicts; e.g. params_json, epoch) is stored alongside the architecture keys, which
    take precedence, and the training settings (`with_settings`)."""
    full_meta = with_settings({**dict(meta or {}), **_model_meta(model)}, model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        # Saving to a file object keeps the temp file's name out of the archive, so the same
        # weights give byte-identical checkpoints (and DVC sees no change).
        torch.save({"state_dict": state, "meta": full_meta}, fh)


def _read_checkpoint(path: str | Path, kind: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    obj = _torch_load(path)
    if not (isinstance(obj, Mapping) and "state_dict" in obj and "meta" in obj):
        raise ModelError(
            f"{path}: not a checkpoint written by save_checkpoint (no state_dict/meta)"
        )
    meta = dict(obj["meta"])
    if meta.get("kind") != kind:
        raise ModelError(
            f"{path}: checkpoint holds a {meta.get('kind')!r} model, expected {kind!r}"
        )
    return obj["state_dict"], meta


# -- the settings a checkpoint carries --------------------------------------------------------
# Like torchvision weights carry their transforms, every checkpoint records the preprocessing
# it was trained with, meta["settings"]: flat dotted keys named like the params they come from
# (tile.mpp, tile.size_px, extractor.crop_px, featuremap.*), the input normalisation
# (normalization.mean/std) and, for a U-Net, its config (unet.*). `predict` runs a model with
# these; the training stages instead check their params against the checkpoint
# (`checkpoint_mismatches`). A checkpoint without them (older schema) is refused by predict.
SETTINGS_VERSION = 1
SETTINGS_FROM_PARAMS = ("tile.mpp", "tile.size_px", "extractor.crop_px", "featuremap.mode",
                        "featuremap.size", "featuremap.per_lump")


def training_settings(sections: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a model trained under `sections` (params sections as dicts, e.g.
    `params.model_dump(mode="json")` or a checkpoint's params_json): the SETTINGS_FROM_PARAMS
    keys those sections hold, and the input normalisation every extractor is fed."""
    out: dict[str, Any] = {"settings_version": SETTINGS_VERSION}
    for key in SETTINGS_FROM_PARAMS:
        section, name = key.split(".")
        if isinstance(sections.get(section), Mapping) and name in sections[section]:
            out[key] = sections[section][name]
    mean, std = extractor_input_normalization()
    out["normalization.mean"], out["normalization.std"] = list(mean), list(std)
    return out


def with_settings(meta: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """`meta` with "settings": as given (e2e keeps its source's), else from the params the
    trainer recorded (meta["params_json"]); a U-Net's config is added from the model."""
    settings = meta.get("settings")
    if not isinstance(settings, Mapping):
        try:
            sections = json.loads(meta.get("params_json") or "{}")
        except (TypeError, ValueError):
            sections = {}
        settings = training_settings(sections if isinstance(sections, Mapping) else {})
    settings = dict(settings)
    if isinstance(model, UNet):
        settings.update({f"unet.{k}": v for k, v in model.config().items()})
    return {**meta, "settings": settings}


def checkpoint_settings(meta: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """The settings `path` was trained with; ModelError (one line) for a checkpoint written
    before they were recorded, or by a newer version of the pipeline."""
    settings = meta.get("settings")
    if not isinstance(settings, Mapping) or "settings_version" not in settings:
        raise ModelError(f"{path}: checkpoint of an older schema: it does not record the "
                         "settings it was trained with (tile mpp/size, crop, feature map); "
                         "retrain it with this version of the pipeline")
    if int(settings["settings_version"]) > SETTINGS_VERSION:
        raise ModelError(f"{path}: checkpoint settings version {settings['settings_version']} "
                         f"is newer than this pipeline's ({SETTINGS_VERSION}); update it")
    return dict(settings)


# What an extractor checkpoint must agree on with the params it is used under: the architecture
# and the pixels it was trained on (tile size and scale, crop). Dotted keys are looked up in the
# params the checkpoint was trained with (meta["params_json"], written by train-extractor).
EXTRACTOR_MATCH_KEYS = ("arch", "feature_dim", "extractor.crop_px", "tile.size_px", "tile.mpp")


def extractor_expectations(params: Any) -> dict[str, Any]:
    """{key: value} of EXTRACTOR_MATCH_KEYS under `params` (a pipeline.params.Params), for
    `load_extractor(path, expected=...)`."""
    return {"arch": params.extractor.arch, "feature_dim": params.extractor.feature_dim,
            "extractor.crop_px": params.extractor.crop_px, "tile.size_px": params.tile.size_px,
            "tile.mpp": params.tile.mpp}


def checkpoint_mismatches(meta: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """One `key: checkpoint X, params ask for Y` per expected key whose value differs. A key is
    a meta key ("arch") or a dotted key into meta["params_json"] ("tile.mpp"); a key the
    checkpoint does not record counts as a mismatch (it cannot be checked)."""
    try:
        trained = json.loads(meta.get("params_json") or "{}")
    except (TypeError, ValueError):
        trained = {}
    missing = object()
    out = []
    for key, want in expected.items():
        if "." in key:
            got: Any = trained
            for part in key.split("."):
                got = got.get(part, missing) if isinstance(got, Mapping) else missing
        else:
            got = meta.get(key, missing)
        if got is missing:
            out.append(f"{key}: not recorded in the checkpoint, params ask for {want!r}")
        elif got != want:
            out.append(f"{key}: checkpoint {got!r}, params ask for {want!r}")
    return out


def load_extractor(
    path: str | Path, expected: Mapping[str, Any] | None = None
) -> tuple[PatchClassifier, dict[str, Any]]:
    """Rebuild the patch classifier from a checkpoint's meta and load its weights (CPU).
    `expected` (e.g. `extractor_expectations(params)`): refuse a checkpoint trained under other
    params or another architecture, naming every mismatch."""
    state, meta = _read_checkpoint(path, KIND_EXTRACTOR)
    if expected:
        problems = checkpoint_mismatches(meta, expected)
        if problems:
            raise ModelError(f"{path}: checkpoint does not match the params ("
                             f"{'; '.join(problems)}); retrain it or change the params")
    if meta.get("arch") not in ARCHS:
        raise ModelError(f"{path}: unknown arch {meta.get('arch')!r} in checkpoint meta")
    model = build_extractor(str(meta["arch"]), int(meta["feature_dim"]))
    _load_strict(model, state, Path(path))
    return model, meta


def load_unet(path: str | Path) -> tuple[UNet, dict[str, Any]]:
    """Rebuild the U-Net from a checkpoint's meta and load its weights (CPU) -> (model, meta)."""
    state, meta = _read_checkpoint(path, KIND_UNET)
    try:
        model = UNet(**{k: meta[k] for k in UNet.CONFIG_KEYS})
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: U-Net meta cannot rebuild the model: {exc}") from exc
    _load_strict(model, state, Path(path))
    return model, meta
