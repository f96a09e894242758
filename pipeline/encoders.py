"""Patch encoders (the extractor's backbone): architectures, pretrained weights, preprocessing.

`extractor.arch`:
- small_cnn: a small CNN for the CPU demo and tests;
- googlenet (the paper), resnet18: torchvision architectures;
- timm:<model_name>: any timm model, `timm.create_model(model_name, num_classes=0,
  **extractor.timm_kwargs)` (the kwargs a foundation model needs: init_values, reg_tokens,
  act_layer, mlp_layer, img_size, dynamic_img_size, drop_path_rate, pretrained_cfg_overlay...).

`extractor.pretrained` (where the encoder's weights come from):
- none: random init (seeded by the caller);
- imagenet: torchvision's ImageNet weights of a torchvision arch (its weights enum, e.g.
  GoogLeNet_Weights.IMAGENET1K_V1), loaded in torchvision's own key layout: GoogLeNet's file
  holds the auxiliary classifiers, so it is loaded strictly into the aux_logits=True net and
  the aux heads are dropped afterwards, exactly as torchvision does;
- hf-hub:<owner>/<repo>: the weights file of a timm model on the Hugging Face hub (often gated:
  accept the licence on the model page and `huggingface-cli login` first);
- a file: .safetensors, or .pth/.pt/.bin written by torch.save (a state dict of the encoder,
  e.g. UNI's pytorch_model.bin, or a checkpoint written by this project).

Where a weights file is read from. In the DVC pipeline (`weights_dir` given: models/pretrained)
only from the copy the `fetch-weights` stage put there, so the weights are a tracked input of
every stage that uses them and dvc.lock records their hash: one commit gives one Table 1 on
every machine. Outside it (`weights_dir=None`: tests, notebooks) where torchvision and the
Hugging Face hub look themselves: the torch hub cache (downloaded there when online, as
torchvision does) or the Hugging Face cache. Offline without the file: a one-line error naming
the file, its URL and where to put it.

Preprocessing (`augment.Preprocess`) comes with the encoder: torchvision weights' own
`transforms()` mean/std; a timm model's pretrained config (`timm.data.resolve_model_data_config`:
mean, std, input size, interpolation).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.augment import IMAGENET_PREPROCESS, Preprocess
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, sha256_file, write_json_atomic

ARCHS = ("googlenet", "resnet18", "small_cnn")
TIMM_PREFIX = "timm:"
HF_PREFIX = "hf-hub:"
# Folder (under models/) that `fetch-weights` fills, and its index file.
PRETRAINED_DIR = "pretrained"
WEIGHTS_JSON = "weights.json"
# Files tried, in order, in a Hugging Face model repo.
HF_FILES = ("model.safetensors", "pytorch_model.bin")
# timm_kwargs set by the pipeline itself.
RESERVED_TIMM_KWARGS = ("pretrained", "num_classes", "checkpoint_path", "pretrained_cfg")


class ModelError(PipelineError):
    """A model or checkpoint cannot be built/loaded; the message names the file and the cause."""


@dataclass
class Encoder:
    module: nn.Module
    dim: int
    preprocess: Preprocess


def is_timm(arch: str) -> bool:
    return arch.startswith(TIMM_PREFIX)


def check_arch(arch: str) -> None:
    if arch in ARCHS:
        return
    if is_timm(arch):
        import timm

        name = arch[len(TIMM_PREFIX):]
        if timm.is_model(name):
            return
        raise ModelError(f"extractor.arch={arch}: timm {timm.__version__} has no model "
                         f"{name!r} (timm.list_models() lists them)")
    raise ModelError(f"extractor.arch: unknown architecture {arch!r} (choose from {ARCHS} or "
                     "timm:<model_name>)")


def build_encoder(arch: str, timm_kwargs: Mapping[str, Any] | None = None) -> Encoder:
    """The randomly initialised encoder of `arch`, its output width and its preprocessing."""
    check_arch(arch)
    if is_timm(arch):
        return _timm_encoder(arch, timm_kwargs or {})
    if timm_kwargs:
        raise ModelError(f"extractor.timm_kwargs is only for timm:<model> archs, not {arch!r}")
    if arch == "small_cnn":
        net, dim = _small_cnn()
        return Encoder(net, dim, IMAGENET_PREPROCESS)
    net, dim = _torchvision_backbone(arch)
    return Encoder(net, dim, torchvision_preprocess(arch))


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


def _torchvision_net(arch: str, with_heads: bool = False) -> nn.Module:
    """torchvision's net; with_heads: in its ImageNet weights' layout (GoogLeNet with its
    auxiliary classifiers, every net with its 1000-class fc), as torchvision loads them."""
    import torchvision

    if arch == "googlenet":
        # transform_input=True: torchvision's ImageNet GoogLeNet weights (ported from TF) expect
        # it (torchvision turns it on whenever weights are given); it is a fixed per-channel
        # affine map, harmless for random init, and one setting keeps checkpoints
        # interchangeable whatever the init was.
        return torchvision.models.googlenet(weights=None, aux_logits=with_heads,
                                            init_weights=True, transform_input=True)
    if arch == "resnet18":
        return torchvision.models.resnet18(weights=None)
    raise ValueError(arch)


def _torchvision_backbone(arch: str) -> tuple[nn.Module, int]:
    net = _torchvision_net(arch)
    dim = net.fc.in_features  # googlenet 1024 (its dropout before fc is kept), resnet18 512
    net.fc = nn.Identity()
    return net, dim


def torchvision_weights(arch: str) -> Any:
    """torchvision's ImageNet weights enum member for `arch` (file, URL, transforms)."""
    import torchvision.models as tvm

    enums = {"googlenet": tvm.GoogLeNet_Weights.IMAGENET1K_V1,
             "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1}
    if arch not in enums:
        hint = (" (timm models: extractor.pretrained=hf-hub:timm/<model>.<tag> or a file)"
                if is_timm(arch) else "")
        raise ModelError(f"extractor.pretrained=imagenet: no torchvision ImageNet weights for "
                         f"arch {arch!r}{hint}")
    return enums[arch]


def torchvision_preprocess(arch: str) -> Preprocess:
    """The mean/std of the ImageNet weights' own `transforms()`. Their resize 256 / crop 224
    are for ImageNet photos; tiles are resampled to tile.mpp and cropped to crop_px instead, and
    these convnets take any input size, so no resize (input_px None)."""
    w = torchvision_weights(arch)
    t = w.transforms()
    return Preprocess(mean=tuple(float(v) for v in t.mean), std=tuple(float(v) for v in t.std),
                      input_px=None, interpolation=str(t.interpolation.value),
                      source=f"torchvision {type(w).__name__}.{w.name}.transforms()")


def _timm_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """params -> create_model kwargs. YAML holds no classes, so a string for a `*_layer` key
    becomes the layer: act_layer through timm's get_act_layer ("silu", "gelu"), others the
    class of that name in timm.layers or torch.nn (mlp_layer: SwiGLUPacked)."""
    import timm.layers

    bad = [k for k in RESERVED_TIMM_KWARGS if k in kwargs]
    if bad:
        raise ModelError(f"extractor.timm_kwargs.{bad[0]}: set by the pipeline (weights come "
                         "from extractor.pretrained); remove it")
    out = dict(kwargs)
    for k, v in kwargs.items():
        if not (k.endswith("_layer") and isinstance(v, str)):
            continue
        layer = timm.layers.get_act_layer(v) if k == "act_layer" else None
        layer = layer or getattr(timm.layers, v, None) or getattr(nn, v, None)
        if not isinstance(layer, type) and not callable(layer):
            raise ModelError(f"extractor.timm_kwargs.{k}: {v!r} names no timm / torch layer")
        out[k] = layer
    return out


def _timm_encoder(arch: str, kwargs: Mapping[str, Any]) -> Encoder:
    import timm
    from timm.data import resolve_model_data_config

    name = arch[len(TIMM_PREFIX):]
    try:
        net = timm.create_model(name, pretrained=False, num_classes=0, **_timm_kwargs(kwargs))
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError) as exc:
        msg = f"extractor.timm_kwargs: {arch} cannot be built with {dict(kwargs)}: {exc}"
        raise ModelError(msg.splitlines()[0]) from exc
    cfg = resolve_model_data_config(net)
    img = kwargs.get("img_size")  # the model's fixed input size when the params set one
    input_px = int(img if isinstance(img, int) else img[0]) if img else int(cfg["input_size"][-1])
    prep = Preprocess(mean=tuple(float(v) for v in cfg["mean"]),
                      std=tuple(float(v) for v in cfg["std"]), input_px=input_px,
                      interpolation=str(cfg.get("interpolation", "bicubic")),
                      source=f"timm {name} pretrained_cfg (resolve_model_data_config)")
    dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
    return Encoder(net, dim, prep)


# --- reading weights -------------------------------------------------------------------------

def torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        msg = f"{path}: cannot read as a torch checkpoint: {exc}".splitlines()[0]
        raise ModelError(msg) from exc


def read_weights(path: Path) -> Any:
    """The object in a weights file: .safetensors (a flat state dict) or torch.save output."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"{path}: cannot read as safetensors: {exc}".splitlines()[0]) from exc
    return torch_load(path)


def state_dict_mismatch(model: nn.Module, state: Mapping[str, Any]) -> str:
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


def load_torchvision_imagenet(backbone: nn.Module, arch: str, state: Mapping[str, Any],
                              path: Path) -> None:
    """Load torchvision's ImageNet file the way torchvision does: strictly, into the net in the
    file's layout (GoogLeNet with aux_logits=True, the 1000-class fc), then keep what the
    backbone has (the aux classifiers and fc are dropped)."""
    full = _torchvision_net(arch, with_heads=True)
    problem = state_dict_mismatch(full, state)
    if problem:
        raise ModelError(f"{path}: not torchvision's ImageNet weights for {arch}: {problem}")
    full.load_state_dict(state, strict=True)
    keep = {k: v for k, v in full.state_dict().items()
            if not k.startswith(("aux1.", "aux2.", "fc."))}
    backbone.load_state_dict(keep, strict=True)


def load_encoder_state(backbone: nn.Module, arch: str, state: Mapping[str, Any],
                       path: Path) -> None:
    """Load a plain state dict of the encoder. torchvision / small_cnn: the backbone's keys (a
    1000-class fc and GoogLeNet's aux classifiers are ignored). timm: the model's own
    checkpoint filter (e.g. ViT position-embedding resize) after dropping its classifier, then
    strict."""
    state = _unwrap(state)
    if is_timm(arch):
        state = _timm_filter(backbone, dict(state), path)
    else:
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "aux1.", "aux2."))}
    problem = state_dict_mismatch(backbone, state)
    if problem:
        raise ModelError(f"{path}: encoder weights do not fit {arch}: {problem}")
    backbone.load_state_dict(state, strict=True)


def _unwrap(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A state dict saved inside a training checkpoint ({"model": ...}, {"state_dict": ...})."""
    for key in ("model", "state_dict", "teacher"):
        inner = state.get(key) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and all(isinstance(k, str) for k in inner):
            return inner
    return state


def _timm_filter(net: nn.Module, state: dict[str, Any], path: Path) -> dict[str, Any]:
    cls = getattr(net, "pretrained_cfg", {}).get("classifier")
    for name in ((cls,) if isinstance(cls, str) else tuple(cls or ())):
        if f"{name}.weight" not in net.state_dict():  # num_classes=0: no classifier here
            state.pop(f"{name}.weight", None)
            state.pop(f"{name}.bias", None)
    filt = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    if filt is None:
        return state
    try:
        return dict(filt(state, net))
    except Exception as exc:  # a filter may fail in many ways on a foreign file
        msg = f"{path}: timm's checkpoint filter for {type(net).__name__} failed: {exc}"
        raise ModelError(msg.splitlines()[0]) from exc


# --- where weights files are ------------------------------------------------------------------

def source_file(arch: str, pretrained: str, progress: bool = True) -> Path:
    """The local weights file for (arch, pretrained), as torchvision / the HF hub keep it,
    downloaded there when the machine is online. Offline: a one-line ModelError naming the
    file, its URL and where to put it."""
    if pretrained == "imagenet":
        return _torchvision_file(arch, progress)
    if pretrained.startswith(HF_PREFIX):
        return _hf_file(arch, pretrained[len(HF_PREFIX):])
    path = Path(pretrained)
    if not path.is_file():
        where = (f"; put the weights of {arch} there (e.g. pytorch_model.bin or "
                 "model.safetensors from the model's Hugging Face repo)" if is_timm(arch) else "")
        raise ModelError(f"{path}: extractor.pretrained weights file not found{where}")
    return path


def _torchvision_file(arch: str, progress: bool) -> Path:
    from urllib.error import URLError

    w = torchvision_weights(arch)
    dst = Path(torch.hub.get_dir()) / "checkpoints" / w.url.rsplit("/", 1)[-1]
    if not dst.is_file():
        try:  # torchvision's own loader: downloads into the hub cache, checks the hash prefix
            w.get_state_dict(progress=progress, check_hash=True)
        except (URLError, OSError, RuntimeError) as exc:
            raise ModelError(
                f"{dst}: {arch} ImageNet weights ({type(w).__name__}.{w.name}) are not in the "
                f"torch hub cache and cannot be downloaded ({str(exc).splitlines()[0]}): fetch "
                f"{w.url} and put it at exactly that path (TORCH_HOME moves it), or set "
                "extractor.pretrained=none") from exc
    if not dst.is_file():
        raise ModelError(f"{dst}: torchvision reported the {arch} weights loaded but the file "
                         "is not there")
    return dst


def _hf_file(arch: str, repo: str) -> Path:
    import huggingface_hub

    last: Exception | None = None
    for offline in (True, False):  # the local HF cache first: no network when it is there
        for name in HF_FILES:
            try:
                return Path(huggingface_hub.hf_hub_download(repo, name,
                                                            local_files_only=offline))
            except Exception as exc:  # missing file, offline, gated, unknown repo, ...
                last = exc
    reason = str(last).splitlines()[0] if last else "unknown"
    raise ModelError(
        f"hf-hub:{repo}: weights for {arch} not available (offline, gated or not found: "
        f"{reason}): download {' or '.join(HF_FILES)} from https://huggingface.co/{repo} and set "
        "extractor.pretrained to its local path")


def stored_name(pretrained: str, src: Path) -> str:
    """The file's name under models/pretrained/: torchvision's file name for imagenet (it
    carries the hash prefix), <owner>--<repo>--<file> for hf-hub, the file's name otherwise."""
    if pretrained.startswith(HF_PREFIX):
        return pretrained[len(HF_PREFIX):].replace("/", "--") + "--" + src.name
    return src.name


def fetch_weights(arch: str, pretrained: str, out_dir: Path, progress: bool = True) -> dict:
    """Put the weights (arch, pretrained) name into out_dir (models/pretrained) and index them
    in out_dir/weights.json; any other file there is removed, so the folder (a DVC output) holds
    exactly the weights the params name. pretrained=none: the index only. Returns the index."""
    check_arch(arch)
    info: dict[str, Any] = {"arch": arch, "pretrained": pretrained, "file": None}
    keep = {WEIGHTS_JSON}
    if pretrained != "none":
        src = source_file(arch, pretrained, progress)
        if out_dir.resolve() in src.resolve().parents:
            raise ModelError(f"{src}: extractor.pretrained points into {out_dir}, which "
                             "fetch-weights rewrites; keep the file elsewhere")
        name = stored_name(pretrained, src)
        dst = out_dir / name
        sha = sha256_file(src)
        if not (dst.is_file() and sha256_file(dst) == sha):
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
        keep.add(name)
        info.update(file=name, sha256=sha, bytes=dst.stat().st_size)
        if pretrained == "imagenet":
            info["url"] = torchvision_weights(arch).url
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in out_dir.iterdir():
        if f.is_file() and f.name not in keep:
            f.unlink()
    write_json_atomic(out_dir / WEIGHTS_JSON, info)
    return info


def tracked_file(weights_dir: Path, arch: str, pretrained: str) -> Path:
    """The weights file `fetch-weights` put in weights_dir for (arch, pretrained)."""
    import json

    index = weights_dir / WEIGHTS_JSON
    hint = "run `dvc repro fetch-weights` (or `python -m pipeline fetch-weights`)"
    if not index.is_file():
        raise ModelError(f"{index}: no fetched weights for extractor.pretrained={pretrained}; "
                         f"{hint}")
    info = json.loads(index.read_text())
    if (info.get("arch"), info.get("pretrained")) != (arch, pretrained) or not info.get("file"):
        raise ModelError(f"{index}: holds weights for arch={info.get('arch')} pretrained="
                         f"{info.get('pretrained')}, params ask for arch={arch} pretrained="
                         f"{pretrained}; {hint}")
    path = weights_dir / str(info["file"])
    if not path.is_file():
        raise ModelError(f"{path}: listed in {index} but missing; {hint}")
    return path


# --- training modes -------------------------------------------------------------------------

def encoder_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The encoder's blocks in forward order: a ViT's `blocks`, a staged net's (ConvNeXt...)
    stage blocks, a ResNet's layer1..4 blocks, else its top-level children with parameters."""
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return list(blocks)
    stages = getattr(backbone, "stages", None)
    if isinstance(stages, (nn.Sequential, nn.ModuleList)):
        return [b for s in stages for b in (list(s.blocks) if hasattr(s, "blocks") else [s])]
    layers = [getattr(backbone, f"layer{i}") for i in range(1, 5) if hasattr(backbone, f"layer{i}")]
    if layers:
        return [b for layer in layers for b in layer]
    return [m for m in backbone.children() if next(m.parameters(), None) is not None]


def frozen_prefix(backbone: nn.Module, trainable_blocks: int) -> list[nn.Module]:
    """Modules of the encoder whose OWN parameters (recurse=False) stay frozen and which stay
    in eval mode (non-recursively: a container listed here may hold trainable blocks) when only
    its last `trainable_blocks` blocks and what follows them (final norms) train: the encoder
    itself (a ViT's cls/pos tokens) and every module registered before the first trainable
    block; 0: every module of the encoder."""
    blocks = encoder_blocks(backbone)
    if trainable_blocks > len(blocks):
        raise ModelError(f"extractor.trainable_blocks={trainable_blocks}: the encoder has only "
                         f"{len(blocks)} blocks")
    modules = list(backbone.modules())
    if trainable_blocks == 0:
        return modules
    first = blocks[len(blocks) - trainable_blocks]
    cut = next(i for i, m in enumerate(modules) if m is first)
    return modules[:cut]
