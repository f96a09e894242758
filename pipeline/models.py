"""Patch classifier (the paper's feature extractor) and model checkpoints.

A `PatchClassifier` is encoder -> Linear(encoder_dim, feature_dim) -> Linear(feature_dim, 2).
The middle Linear's output is the paper's f_{n-1} (the 16-d patch feature, `.features(x)`); the
last Linear is f_n (tumor/normal logits, `forward(x)`), used only when training the extractor on
its own; End-to-End learning drops it (§3.2.2). `feature_dim="native"`: no middle Linear, the
encoder's own D-dim output is the feature (a fixed per-channel affine map stands in its place,
identity unless the frozen baseline folds a standardisation into it).

The encoders (small_cnn, torchvision googlenet/resnet18, timm:<model>), their pretrained
weights and preprocessing live in pipeline/encoders.py. Every extractor carries its
`preprocess` (mean/std, input size) and the checkpoint records it under meta["encoder"].

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

from pipeline.augment import IMAGENET_MEAN, IMAGENET_PREPROCESS, IMAGENET_STD, Preprocess
from pipeline.encoders import (
    ARCHS,
    ModelError,
    build_encoder,
    check_arch,
    frozen_prefix,
    is_timm,
    load_encoder_state,
    load_torchvision_imagenet,
    read_weights,
    source_file,
    torchvision_weights,
    tracked_file,
)
from pipeline.encoders import state_dict_mismatch as _state_dict_mismatch
from pipeline.encoders import torch_load as _torch_load
from pipeline.io import atomic_path
from pipeline.unet import UNet

__all__ = ["ARCHS", "IMAGENET_MEAN", "IMAGENET_STD", "ModelError", "NATIVE", "PatchClassifier",
           "build_extractor", "load_extractor", "load_unet", "save_checkpoint"]

N_CLASSES = 2
NATIVE = "native"  # extractor.feature_dim: the encoder's own output width, no feature Linear
KIND_EXTRACTOR = "extractor"
KIND_UNET = "unet"

RGB = tuple[float, float, float]


def extractor_input_normalization() -> tuple[RGB, RGB]:
    """(mean, std) per RGB channel for pixels in [0, 1] of the ImageNet default preprocessing
    (small_cnn, torchvision archs; timm encoders carry their own: `PatchClassifier.preprocess`)."""
    return IMAGENET_MEAN, IMAGENET_STD


class ChannelAffine(nn.Module):
    """x * scale + shift per channel with fixed buffers (never trained): the identity, unless
    the frozen baseline folds its feature standardisation into it."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("shift", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class PatchClassifier(nn.Module):
    """backbone (encoder) -> feature Linear (f_{n-1}) -> head Linear (f_n, 2 logits)."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, feature_dim: int | None,
                 arch: str, preprocess: Preprocess = IMAGENET_PREPROCESS,
                 timm_kwargs: Mapping[str, Any] | None = None):
        super().__init__()
        self.arch = arch
        self.native = feature_dim is None
        self.feature_dim = backbone_dim if feature_dim is None else int(feature_dim)
        self.backbone_dim = backbone_dim
        self.backbone = backbone
        self.feature = (ChannelAffine(backbone_dim) if feature_dim is None
                        else nn.Linear(backbone_dim, self.feature_dim))
        self.head = nn.Linear(self.feature_dim, N_CLASSES)
        self.preprocess = preprocess
        self.timm_kwargs = dict(timm_kwargs or {})
        self.trainable_blocks: int | None = None  # None: the whole encoder trains
        self._frozen: list[nn.Module] = []  # a plain list: not registered as submodules

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, feature_dim) patch features (f_{n-1})."""
        return self.feature(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 2) tumor/normal logits (f_n applied to the features)."""
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> PatchClassifier:
        super().train(mode)
        for m in self._frozen:  # frozen encoder parts: fixed BN statistics, no dropout
            m.training = False
        return self

    def set_trainable_blocks(self, k: int | str | None) -> None:
        """Which encoder parameters train: None / "all" every one (full finetune), 0 none
        (frozen encoder: only the feature/head Linears train), k the last k blocks (and the
        final norms after them). Frozen parts get requires_grad=False and stay in eval mode."""
        for q in self.backbone.parameters():
            q.requires_grad_(True)
        self._frozen = []
        self.trainable_blocks = None if k in (None, "all") else int(k)
        if self.trainable_blocks is not None:
            self._frozen = frozen_prefix(self.backbone, self.trainable_blocks)
            for m in self._frozen:
                for q in m.parameters(recurse=False):
                    q.requires_grad_(False)
        self.train(self.training)

    def encoder_meta(self) -> dict[str, Any]:
        """What a checkpoint records about the encoder (meta["encoder"])."""
        return {"feature_head": NATIVE if self.native else "linear",
                "backbone_dim": self.backbone_dim, "timm_kwargs": self.timm_kwargs,
                "trainable_blocks": self.trainable_blocks,
                "preprocess": self.preprocess.to_meta()}


def imagenet_weights_file(arch: str) -> tuple[Path, str]:
    """(path in the torch hub cache, download URL) of torchvision's ImageNet weights for
    `arch`; the file name is taken from torchvision's weights enum."""
    url = torchvision_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def build_extractor(
    arch: str, feature_dim: int | str = 16, pretrained: str = "none", *,
    timm_kwargs: Mapping[str, Any] | None = None, weights_dir: Path | None = None,
) -> PatchClassifier:
    """Build the patch classifier.

    arch: small_cnn | googlenet | resnet18 | timm:<model_name> (built with `timm_kwargs`).
    feature_dim: width of the feature Linear, or "native" (the encoder's own output).
    pretrained: "none" (random init), "imagenet" (torchvision's ImageNet weights), "hf-hub:<repo>"
    (a timm model's weights on the HF hub), or a file: a checkpoint written by
    `save_checkpoint`, a state_dict of the whole model, or of the encoder (.safetensors or
    torch.save). The new Linear layers stay random unless the file holds them.
    weights_dir: read the weights only from what `fetch-weights` put there (the DVC stages pass
    models/pretrained); None: from torchvision's / the HF hub's caches (downloading when online)
    or the file itself (encoders.source_file).
    """
    check_arch(arch)
    native = feature_dim == NATIVE
    if not native and (isinstance(feature_dim, str) or int(feature_dim) < 1):
        raise ModelError(f"extractor.feature_dim must be >= 1 or {NATIVE!r}, got {feature_dim!r}")
    enc = build_encoder(arch, timm_kwargs)
    model = PatchClassifier(enc.module, enc.dim, None if native else int(feature_dim), arch,
                            enc.preprocess, timm_kwargs)
    if pretrained == "none":
        return model
    if pretrained == "imagenet":
        torchvision_weights(arch)  # names the arch when it has no ImageNet weights
    path = (tracked_file(weights_dir, arch, pretrained) if weights_dir is not None
            else source_file(arch, pretrained))
    obj = read_weights(path)
    if pretrained == "imagenet":
        load_torchvision_imagenet(model.backbone, arch, obj, path)
        return model
    if isinstance(obj, Mapping) and "state_dict" in obj and "meta" in obj:
        meta = obj["meta"]
        head = (meta.get("encoder") or {}).get("feature_head", "linear")
        if meta.get("arch") != arch or (head == NATIVE) != native or (
                not native and int(meta.get("feature_dim", -1)) != int(feature_dim)):
            raise ModelError(
                f"{path}: checkpoint is arch={meta.get('arch')!r} feature_dim="
                f"{NATIVE if head == NATIVE else meta.get('feature_dim')}, params ask for "
                f"arch={arch!r} feature_dim={feature_dim}")
        _load_strict(model, obj["state_dict"], path)
        return model
    if not isinstance(obj, Mapping):
        raise ModelError(f"{path}: not a state_dict or checkpoint (got {type(obj).__name__})")
    if any(k.startswith("backbone.") for k in obj):  # a whole PatchClassifier's state dict
        _load_strict(model, obj, path)
    else:
        load_encoder_state(model.backbone, arch, obj, path)
    return model


def _load_strict(model: nn.Module, state: Mapping[str, Any], path: Path) -> None:
    problem = _state_dict_mismatch(model, state)
    if problem:
        raise ModelError(f"{path}: state_dict does not fit the model: {problem}")
    model.load_state_dict(state, strict=True)


def _model_meta(model: nn.Module) -> dict[str, Any]:
    if isinstance(model, PatchClassifier):
        return {"kind": KIND_EXTRACTOR, "arch": model.arch, "feature_dim": model.feature_dim,
                "encoder": model.encoder_meta()}
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
    if isinstance(model, PatchClassifier):  # the encoder's own mean/std (timm, torchvision)
        settings["normalization.mean"] = list(model.preprocess.mean)
        settings["normalization.std"] = list(model.preprocess.std)
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
    `load_extractor(path, expected=...)`. feature_dim "native" is checked as the trained
    params' value (the width is the encoder's); a timm encoder's kwargs must match too."""
    arch, feature_dim = params.extractor.arch, params.extractor.feature_dim
    out = {"arch": arch, "feature_dim": feature_dim,
           "extractor.crop_px": params.extractor.crop_px,
           "tile.size_px": params.tile.size_px, "tile.mpp": params.tile.mpp}
    if feature_dim == NATIVE:
        out["extractor.feature_dim"] = out.pop("feature_dim")
    if is_timm(arch):
        out["extractor.timm_kwargs"] = dict(params.extractor.timm_kwargs)
    return out


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
    arch = str(meta.get("arch"))
    if not (arch in ARCHS or is_timm(arch)):
        raise ModelError(f"{path}: unknown arch {meta.get('arch')!r} in checkpoint meta")
    # meta["encoder"]: absent in checkpoints from before timm encoders (ImageNet preprocessing,
    # a feature Linear, the whole encoder trained)
    enc = meta.get("encoder") or {}
    native = enc.get("feature_head") == NATIVE
    model = build_extractor(arch, NATIVE if native else int(meta["feature_dim"]),
                            timm_kwargs=enc.get("timm_kwargs") or None)
    model.preprocess = Preprocess.from_meta(enc.get("preprocess"))
    _load_strict(model, state, Path(path))
    model.set_trainable_blocks(enc.get("trainable_blocks"))
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
