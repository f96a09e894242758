"""Patch transforms: the paper's training augmentation, the evaluation crop, normalisation.

Every transform takes one CHW uint8 tensor (the dataset's output) and returns a float32 CHW
tensor prepared the way the model's encoder expects (`Preprocess`: mean/std and, for encoders
with a fixed input size such as timm ViTs, a resize of the crop to that size). The default is
torchvision's ImageNet preprocessing (the mean/std of GoogLeNet/ResNet's ImageNet weights; used
for `pretrained: none` too so that switching the init changes nothing else). Each extractor
carries its own (`PatchClassifier.preprocess`, recorded in its checkpoint).

Randomness comes only from torch's global RNG (never python `random` or numpy), so
`torch.manual_seed(s)` before a call reproduces it exactly: e2e applies the train transform per
patch under a seeded RNG and needs the same pixels in its two passes. In DataLoader workers
torch seeds each worker from the loader's generator, so loaders are reproducible too.

Training (paper, Sec. 4 "Pre-Processing"): random crop_px crop of the tile, rotation by k*90
degrees (k uniform in 0..3), random left-right flip, and saturation, contrast, brightness and
sharpness factors each uniform in [0.75, 1.25].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Paper: colour factors "in the range [0.75, 1.25]".
COLOR_RANGE = (0.75, 1.25)

Transform = Callable[[torch.Tensor], torch.Tensor]
RGB = tuple[float, float, float]
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR,
                  "bicubic": v2.InterpolationMode.BICUBIC,
                  "nearest": v2.InterpolationMode.NEAREST}


@dataclass(frozen=True)
class Preprocess:
    """What an encoder expects of its input: per-channel mean/std for pixels in [0, 1] and,
    when `input_px` is set, the side the (crop_px) crop is resized to with `interpolation`
    (antialiased; a crop already of that size is left untouched). `source` says where the
    values come from (torchvision weights' transforms(), timm's pretrained config)."""

    mean: RGB = IMAGENET_MEAN
    std: RGB = IMAGENET_STD
    input_px: int | None = None
    interpolation: str = "bilinear"
    source: str = "torchvision ImageNet"

    def to_meta(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any] | None) -> Preprocess:
        """From `to_meta()`'s dict; None (a checkpoint from before preprocessing was recorded):
        the ImageNet default every such checkpoint was trained with."""
        if not meta:
            return cls()
        return cls(mean=tuple(float(v) for v in meta["mean"]),
                   std=tuple(float(v) for v in meta["std"]),
                   input_px=None if meta.get("input_px") is None else int(meta["input_px"]),
                   interpolation=str(meta.get("interpolation", "bilinear")),
                   source=str(meta.get("source", "")))


IMAGENET_PREPROCESS = Preprocess()


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """torchvision's mode for a timm interpolation name (bilinear for names it lacks)."""
    return INTERPOLATIONS.get(name, v2.InterpolationMode.BILINEAR)


class RandomRot90(v2.Transform):
    """Rotate by k*90 degrees, k uniform in {0, 1, 2, 3} (exact: no interpolation)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = torch.rot90(inpt, params["k"], dims=(-2, -1))
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


class RandomSharpness(v2.Transform):
    """Adjust sharpness by a factor uniform in [lo, hi] (1 = unchanged). torchvision's
    RandomAdjustSharpness only applies one fixed factor with a probability."""

    def __init__(self, factor_range: tuple[float, float] = COLOR_RANGE):
        super().__init__()
        self.lo, self.hi = float(factor_range[0]), float(factor_range[1])

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        u = float(torch.rand(()).item())
        return {"factor": self.lo + (self.hi - self.lo) * u}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if (isinstance(inpt, torch.Tensor) and inpt.dtype == torch.uint8 and inpt.ndim >= 3
                and inpt.shape[-3] == 3 and min(inpt.shape[-2:]) > 2):
            out = adjust_sharpness_uint8(inpt, params["factor"])
            return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out
        return F.adjust_sharpness(inpt, params["factor"])


def adjust_sharpness_uint8(img: torch.Tensor, factor: float) -> torch.Tensor:
    """Bit-identical to torchvision's `adjust_sharpness` on uint8 (..., C, H, W), ~7x faster on
    CPU: torchvision blurs with a depthwise 3x3 conv2d (~4 ms per 224 px tile on one core, more
    than reading the tile from the slide); here the same kernel (1s around a 5, /13) is a
    separable 3x3 box sum of shifted slices plus 4x the centre. The sums are exact integers in
    float32 and k/13 is never within rounding error of .5, so round() agrees with the conv's."""
    out = img.to(torch.float32)
    rows = out[..., :-2, :] + out[..., 1:-1, :] + out[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    view = out[..., 1:-1, 1:-1]  # border pixels stay as they are, as in torchvision / PIL
    blurred = box.add_(view, alpha=4.0).div_(13.0).round_()
    view.add_(blurred.sub_(view), alpha=1.0 - float(factor))  # same op order as torchvision
    return out.clamp_(0, 255).to(torch.uint8)


def geometric_transform(crop_px: int) -> v2.Compose:
    """Random crop_px crop, random k*90 rotation, random left-right flip; uint8 in, uint8 out.
    Only moves pixels, so the values of the crop are preserved as a multiset."""
    return v2.Compose([v2.RandomCrop(crop_px), RandomRot90(), v2.RandomHorizontalFlip(p=0.5)])


def color_transform(factor_range: tuple[float, float] = COLOR_RANGE) -> v2.Compose:
    """Saturation, contrast and brightness (ColorJitter, random order) then sharpness, each with
    a factor uniform in `factor_range`; uint8 in, uint8 out. Brightness scales RGB, i.e. V of
    HSV; saturation scales S: the paper's "HSV space" colour augmentation."""
    return v2.Compose([
        v2.ColorJitter(brightness=factor_range, contrast=factor_range, saturation=factor_range),
        RandomSharpness(factor_range),
    ])


def normalize_only(prep: Preprocess = IMAGENET_PREPROCESS) -> v2.Compose:
    """uint8 CHW (or a BCHW batch) -> float32 in [0, 1] -> resized to prep.input_px (when
    set) -> normalised with prep's mean/std. For patches already cropped."""
    steps: list[Any] = [v2.ToDtype(torch.float32, scale=True)]
    if prep.input_px is not None:
        steps.append(v2.Resize([prep.input_px, prep.input_px],
                               interpolation=interpolation_mode(prep.interpolation),
                               antialias=True))
    steps.append(v2.Normalize(mean=list(prep.mean), std=list(prep.std)))
    return v2.Compose(steps)


def train_transform(crop_px: int, prep: Preprocess = IMAGENET_PREPROCESS) -> v2.Compose:
    """The paper's training augmentation (crop, rot90, flip, colour, sharpness) + the encoder's
    preprocessing. Geometry first so the colour ops run on the smaller crop."""
    return v2.Compose([geometric_transform(crop_px), color_transform(), normalize_only(prep)])


def eval_transform(crop_px: int, prep: Preprocess = IMAGENET_PREPROCESS) -> v2.Compose:
    """Deterministic centre crop to crop_px + normalise, for validation, feature extraction and
    prediction. Why crop instead of feeding the full tile: the model is trained on crop_px
    inputs; GoogLeNet's global-pooled head accepts any size, but its BatchNorm statistics and the
    zero-padding border effects of its receptive fields are matched best at the trained size.
    The centre crop keeps the tile's centre where it lies on the tile grid."""
    return v2.Compose([v2.CenterCrop(crop_px), normalize_only(prep)])
