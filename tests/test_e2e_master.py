"""e2e optimizer master weights and the movement report (pipeline.e2e_train).

At the paper's lr_fe = 1e-9 an Adam step (~ lr) is smaller than half the float32 ulp of every
weight with |w| > 2^-5, so plain float32 Adam never moves those weights; float64 master copies
accumulate the steps until the rounded float32 weight moves.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipeline.e2e import e2e_slide_step, tensor_chunk_source
from pipeline.e2e_train import MasterAdam, make_optimizer, movement, snapshot, trained_parameters
from pipeline.featuremap import build_layouts
from pipeline.models import build_extractor
from pipeline.schema import LABEL_NOLABEL, LABEL_NORMAL, LABEL_TUMOR
from pipeline.unet import UNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, R, STEPS = 48, 16, 10
BIG = 2.0**-5  # a float32 weight above this has half an ulp > 1e-9 (2^-5 * 2^-24 ~ 1.9e-9)


def _slide():
    grid = np.stack(np.divmod(np.arange(N), 8), axis=1)
    labels = np.random.default_rng(0).choice(
        [LABEL_TUMOR, LABEL_NORMAL, LABEL_NOLABEL], size=N).astype(np.int8)
    return build_layouts(grid, np.ones(N), 8, "centered", False, 2), labels


def _finetune(extractor, unet, master_dtype: str, lr_fe: float):
    """STEPS e2e steps (two-block gradient, then Adam) on one slide; returns the extractor."""
    extractor, unet = copy.deepcopy(extractor), copy.deepcopy(unet)
    opt_fe = make_optimizer(extractor, lr_fe, master_dtype)
    opt_seg = make_optimizer(unet, 1e-7, master_dtype)
    layouts, labels = _slide()
    pixels = torch.randn(N, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for step in range(STEPS):
        opt_fe.zero_grad()
        opt_seg.zero_grad()
        e2e_slide_step(extractor, unet, tensor_chunk_source(pixels, R), layouts, labels, R,
                       seed=step)
        opt_fe.step()
        opt_seg.step()
    return extractor, opt_fe


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return build_extractor("small_cnn", feature_dim=16), UNet(16, 2, depth=2, width=8)


def test_lr_1e9_moves_large_weights_only_with_float64_master(models):
    extractor, unet = models
    start = snapshot(extractor)
    w0 = torch.cat([w.flatten() for w in start.values()])
    big = w0.abs() > BIG
    band = big & (w0.abs() < 2.0**-4)  # half ulp 1.9e-9: two steps of 1e-9 move them
    assert int(band.sum()) > 100  # the test looks at real weights

    def changed(fe):
        w = torch.cat([fe.state_dict()[k].flatten() for k in start])
        return w != w0

    fe32, opt32 = _finetune(extractor, unet, "float32", 1e-9)
    assert isinstance(opt32, torch.optim.Adam)  # float32: plain Adam, no copy
    c32 = changed(fe32)
    assert int(c32[big].sum()) == 0  # rounding eats every step
    assert int(c32[~big].sum()) > 0  # small weights do move: the steps were taken

    fe64, opt64 = _finetune(extractor, unet, "float64", 1e-9)
    assert isinstance(opt64, MasterAdam)
    c64 = changed(fe64)
    assert float(c64[band].float().mean()) > 0.8
    assert int(c64[big].sum()) > int(band.sum()) // 2
    # the masters hold the un-rounded sum of the steps: ~ STEPS * 1e-9 from the start
    moved = torch.cat([(m.detach() - w.double()).abs().flatten()
                       for m, w in zip(opt64.master, start.values(), strict=True)])
    assert 0.5 * STEPS * 1e-9 < float(moved.max()) < 2 * STEPS * 1e-9
    assert movement(fe64, start)["moved_fraction"] > movement(fe32, start)["moved_fraction"]


def test_master_adam_matches_float32_adam_at_a_normal_lr(models):
    # At lr 1e-3 the float64 masters give the same trajectory up to float32 rounding.
    extractor, unet = models
    fe32, _ = _finetune(extractor, unet, "float32", 1e-3)
    fe64, _ = _finetune(extractor, unet, "float64", 1e-3)
    for k, v in fe32.state_dict().items():
        torch.testing.assert_close(fe64.state_dict()[k], v, rtol=1e-4, atol=1e-6)
    assert movement(fe64, snapshot(extractor))["rel_l2"] > 1e-3


def test_master_adam_state_roundtrip_restores_model_and_masters(models):
    extractor, unet = models
    fe, opt = _finetune(extractor, unet, "float64", 1e-9)
    saved = copy.deepcopy(opt.state_dict())
    fe2 = copy.deepcopy(extractor)  # the start weights
    opt2 = make_optimizer(fe2, 1e-9, "float64")
    opt2.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(opt2.master, opt.master, strict=True))
    for k, v in fe.state_dict().items():
        assert torch.equal(fe2.state_dict()[k], v), k


def test_head_is_not_trained_and_movement_counts_elements():
    torch.manual_seed(0)
    fe = build_extractor("small_cnn", feature_dim=4)
    ids = {id(p) for p in trained_parameters(fe)}
    assert all(id(p) not in ids for p in fe.head.parameters())
    unet = UNet(4, 2, depth=1, width=4)
    assert len(trained_parameters(unet)) == len(list(unet.parameters()))  # its head trains
    start = snapshot(fe)
    n = sum(v.numel() for v in start.values())
    with torch.no_grad():
        fe.feature.bias[0] += 1.0
        fe.head.weight.zero_()  # not a trained parameter: not counted
    m = movement(fe, start)
    assert m["moved_fraction"] == pytest.approx(1 / n)
    ref = sum(float((v.double() ** 2).sum()) for v in start.values()) ** 0.5
    assert m["rel_l2"] == pytest.approx(1.0 / ref, rel=1e-6)
    with pytest.raises(ValueError, match="master_dtype"):
        make_optimizer(fe, 1e-3, "float16")
