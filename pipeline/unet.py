"""U-Net (Ronneberger et al. 2015) over whole-slide feature maps: each "pixel" is one tile's
feature vector (in_channels = the extractor's feature_dim), each output pixel that tile's
tumor/normal logits.

Differences from the original, on purpose: 3x3 convolutions are zero-padded ("same"), so the
output has the input's H x W and tile (r, c) keeps its position; optional BatchNorm after each
conv (default on) for stable training at the paper's learning rates. BatchNorm in the U-Net does
not break End-to-End exactness: the U-Net always sees the slide's whole map(s) at once, in the
two-block method and in the one-graph reference alike (see pipeline.e2e).

Input H and W must be divisible by 2**depth (the maps are built that way by pipeline.featuremap).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _double_conv(c_in: int, c_out: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers.append(nn.Conv2d(c, c_out, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """[conv3x3-BN-ReLU x2] per level, 2x2 max-pool down `depth` times, 2x2 transposed conv up
    with skip concatenation, 1x1 conv head to `n_classes` logits. Level i has width * 2**i
    channels."""

    CONFIG_KEYS = ("in_channels", "n_classes", "depth", "width", "batch_norm")

    def __init__(
        self,
        in_channels: int = 16,
        n_classes: int = 2,
        depth: int = 3,
        width: int = 32,
        batch_norm: bool = True,
    ):
        super().__init__()
        if depth < 1 or width < 1 or in_channels < 1 or n_classes < 1:
            raise ValueError(
                f"UNet: depth, width, in_channels, n_classes must be >= 1, got "
                f"{depth}, {width}, {in_channels}, {n_classes}"
            )
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.depth = depth
        self.width = width
        self.batch_norm = batch_norm
        ch = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList(
            [_double_conv(in_channels, ch[0], batch_norm)]
            + [_double_conv(ch[i - 1], ch[i], batch_norm) for i in range(1, depth + 1)]
        )
        self.pool = nn.MaxPool2d(2)
        self.upconv = nn.ModuleList(
            [nn.ConvTranspose2d(ch[i], ch[i - 1], 2, stride=2) for i in range(depth, 0, -1)]
        )
        self.up = nn.ModuleList(
            [_double_conv(2 * ch[i - 1], ch[i - 1], batch_norm) for i in range(depth, 0, -1)]
        )
        self.head = nn.Conv2d(ch[0], n_classes, 1)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (stored in checkpoints to rebuild the model)."""
        return {k: getattr(self, k) for k in self.CONFIG_KEYS}

    @property
    def multiple(self) -> int:
        """H and W of the input must be multiples of this (2**depth)."""
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, n_classes, H, W) logits."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        m = self.multiple
        if h % m or w % m:
            raise ValueError(
                f"UNet(depth={self.depth}) needs H and W divisible by 2**depth={m}, got {h}x{w}"
            )
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottom level's output is x itself
        for upconv, block in zip(self.upconv, self.up, strict=True):
            x = block(torch.cat([skips.pop(), upconv(x)], dim=1))
        return self.head(x)
