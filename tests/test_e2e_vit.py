"""The two-block End-to-End gradient is exact for a ViT extractor with stochastic depth.

A tiny timm ViT (vit_tiny_patch16_224 at 32 px, 4 blocks) wrapped the way PatchClassifier wraps
every backbone, in float64, with drop-path (timm's DropPath draws torch bernoulli masks per
sample), attention, projection and position dropout all active. LayerNorm is per sample, so
nothing is frozen; what makes the two passes compute the same function is the per-chunk RNG
replay in pipeline.e2e (`_chunk_rng`). The negative control replaces that replay by a no-op and
the gradient is no longer the one-graph gradient.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import timm
import torch

import pipeline.e2e as e2e
from pipeline.featuremap import build_layouts
from pipeline.models import PatchClassifier
from pipeline.schema import LABEL_NOLABEL, LABEL_NORMAL, LABEL_TUMOR
from pipeline.unet import UNet
from tests.test_e2e_exact import _augment, _grads, _max_rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_PATCHES, R = 48, 8
ARCH = "vit_tiny_patch16_224"


def tiny_vit(feature_dim: int = 16, drop_path_rate: float = 0.2, drop: float = 0.1,
             img_px: int = 32, depth: int = 4) -> PatchClassifier:
    """timm ViT-Tiny/16 (random init, `depth` blocks, `img_px` input) under the paper's
    heads: backbone -> Linear(192, feature_dim) -> Linear(feature_dim, 2)."""
    backbone = timm.create_model(
        ARCH, pretrained=False, num_classes=0, img_size=img_px, depth=depth,
        drop_path_rate=drop_path_rate, pos_drop_rate=drop, proj_drop_rate=drop,
        attn_drop_rate=drop)
    return PatchClassifier(backbone, backbone.num_features, feature_dim, f"timm:{ARCH}")


@pytest.fixture(scope="module")
def vit_setup():
    torch.manual_seed(0)
    extractor = tiny_vit().double()
    unet = UNet(in_channels=16, n_classes=2, depth=2, width=8).double()
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(N_PATCHES, 3, 32, 32, generator=gen, dtype=torch.float64)
    n_cols = 8
    rr, cc = np.divmod(np.arange(N_PATCHES), n_cols)
    labels = np.random.default_rng(1).choice(
        [LABEL_TUMOR, LABEL_NORMAL, LABEL_NOLABEL], size=N_PATCHES).astype(np.int8)
    layouts = build_layouts(np.stack([rr, cc], 1), np.where(cc < 2, 1, 2), size=8,
                            mode="full", per_lump=True, depth=2)
    return extractor, unet, e2e.tensor_chunk_source(pixels, R), layouts, labels


def test_drop_path_is_really_stochastic(vit_setup):
    extractor, *_ = vit_setup
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    extractor.train()
    a, b = extractor.features(x), extractor.features(x)
    assert not torch.allclose(a, b)
    drop_paths = [m for m in extractor.modules() if type(m).__name__ == "DropPath"]
    # two per block (attention and MLP branch) in blocks 1-3; block 0 has rate 0 (Identity)
    assert len(drop_paths) == 6 and all(m.drop_prob > 0 for m in drop_paths)


def test_fp64_vit_two_block_equals_one_graph(vit_setup):
    extractor, unet, chunks, layouts, labels = vit_setup
    common = dict(seed=11, augment=_augment)
    args = (extractor, unet, chunks, layouts, labels, R)
    info, g_two = _grads(e2e.e2e_slide_step, *args, **common)
    ref, g_one = _grads(e2e.one_graph_grads, *args, **common)
    assert info["n_patches"] == ref["n_patches"] == N_PATCHES
    assert info["n_reforwarded"] == N_PATCHES
    assert info["loss"] == pytest.approx(ref["loss"], rel=1e-12)
    assert _max_rel_err(g_two, g_one) <= 1e-6
    assert g_two["fe.head.weight"] is None
    for name in ("fe.backbone.patch_embed.proj.weight", "fe.backbone.blocks.3.mlp.fc2.weight",
                 "fe.backbone.cls_token", "fe.backbone.norm.weight", "fe.feature.weight"):
        assert float(g_two[name].abs().max()) > 0, name
    # another seed draws other masks: the stochastic layers were on
    _, g_other = _grads(e2e.e2e_slide_step, *args, seed=12, augment=_augment)
    assert _max_rel_err(g_other, g_two) > 1e-3


def test_without_rng_replay_the_vit_gradient_is_wrong(vit_setup, monkeypatch):
    """Negative control, drop-path the only stochastic layer: without per-chunk reseeding pass
    2 draws fresh drop-path masks, L' = sum <dL/dx, x> differentiates another function, and
    the gradient is off. (With the replay it is exact: the test above.)"""
    _, unet, chunks, layouts, labels = vit_setup
    torch.manual_seed(0)
    extractor = tiny_vit(drop_path_rate=0.2, drop=0.0).double()
    args = (extractor, unet, chunks, layouts, labels, R)
    _, g_replayed = _grads(e2e.e2e_slide_step, *args, seed=11)
    _, g_one = _grads(e2e.one_graph_grads, *args, seed=11)
    monkeypatch.setattr(e2e, "_chunk_rng", lambda seed, k, device: contextlib.nullcontext())
    torch.manual_seed(123)
    _, g_two = _grads(e2e.e2e_slide_step, *args, seed=11)
    assert _max_rel_err(g_replayed, g_one) <= 1e-6
    assert _max_rel_err(g_two, g_one) > 1e-2


def test_vit_without_dropout_matches_a_single_batch(vit_setup):
    """With every stochastic layer off, the chunked two-block gradient is the gradient of the
    whole slide forwarded as ONE batch: LayerNorm needs no freezing."""
    _, unet, chunks, layouts, labels = vit_setup
    torch.manual_seed(0)
    extractor = tiny_vit(drop_path_rate=0.0, drop=0.0).double()
    args = (extractor, unet, chunks, layouts, labels, R)
    _, g_two = _grads(e2e.e2e_slide_step, *args, seed=0)
    _, g_one = _grads(e2e.one_graph_grads, *args, seed=0, single_batch=True)
    assert _max_rel_err(g_two, g_one) <= 1e-6
