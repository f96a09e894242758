"""Feature-map placement, label maps, masked CE and the U-Net (pipeline.featuremap / unet)."""

import math

import numpy as np
import pytest
import torch

from pipeline.featuremap import (
    FeatureMapError,
    build_layouts,
    gather,
    label_map,
    masked_cross_entropy,
    place,
    random_crop,
)
from pipeline.schema import IGNORE_INDEX, LABEL_NOLABEL, LABEL_NORMAL, LABEL_TUMOR
from pipeline.unet import UNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _block_grid(r0: int, c0: int, rows: int, cols: int) -> np.ndarray:
    rr, cc = np.meshgrid(np.arange(rows) + r0, np.arange(cols) + c0, indexing="ij")
    return np.stack([rr.ravel(), cc.ravel()], axis=1)


def test_centered_tile_lands_at_grid_plus_offset_and_gather_returns_it():
    grid = _block_grid(10, 20, 4, 6)  # extent 4 x 6
    perm = np.random.default_rng(0).permutation(len(grid))
    grid = grid[perm]  # tile order must not matter
    (lay,) = build_layouts(grid, np.ones(len(grid)), size=8, mode="centered", per_lump=False,
                           depth=2)
    # offset = (size - extent) // 2 - min, by hand: rows (8-4)//2-10 = -8, cols (8-6)//2-20 = -19
    assert lay.offset_rc == (-8, -19)
    assert lay.shape == (8, 8) and lay.n_outside == 0
    assert np.array_equal(lay.tile_index, np.arange(len(grid)))
    feats = torch.randn(len(grid), 5)
    m = place(feats, lay)
    assert m.shape == (5, 8, 8)
    i = int(np.flatnonzero((grid[:, 0] == 11) & (grid[:, 1] == 22))[0])
    assert torch.equal(m[:, 11 - 8, 22 - 19], feats[i])
    for j in range(len(grid)):
        assert torch.equal(m[:, grid[j, 0] - 8, grid[j, 1] - 19], feats[j])
    assert torch.equal(gather(m, lay), feats)
    # nothing else on the canvas: 24 occupied cells, the rest exactly zero
    assert int((m.abs().sum(0) > 0).sum()) == len(grid)
    assert torch.isclose(m.sum(), feats.sum(), atol=1e-5)


def test_off_canvas_tiles_are_dropped_and_counted():
    grid = _block_grid(0, 0, 1, 12)  # a 1 x 12 strip on an 8 x 8 canvas
    (lay,) = build_layouts(grid, np.ones(12), size=8, mode="centered", per_lump=False, depth=3)
    # col offset (8 - 12) // 2 - 0 = -2: cols 2..9 land on 0..7, cols 0, 1, 10, 11 fall off
    assert lay.n_outside == 4
    assert lay.tile_index.tolist() == list(range(2, 10))
    assert lay.canvas_rc[:, 1].tolist() == list(range(8))
    assert set(lay.canvas_rc[:, 0].tolist()) == {(8 - 1) // 2}


def test_full_mode_keeps_every_tile_and_pads_to_multiples():
    grid = _block_grid(3, 7, 5, 11)
    (lay,) = build_layouts(grid, np.ones(len(grid)), size=8, mode="full", per_lump=False, depth=2)
    assert lay.n_outside == 0 and lay.n_tiles == len(grid)
    # rows: 5 -> 8 (multiple of 4, and at least 2 * 4); cols: 11 -> 12
    assert lay.shape == (8, 12)
    assert lay.offset_rc == ((8 - 5) // 2 - 3, (12 - 11) // 2 - 7)
    assert lay.canvas_rc.min() >= 0
    assert (lay.canvas_rc < np.array(lay.shape)).all()
    small = build_layouts(np.array([[5, 5]]), np.ones(1), 8, "full", False, depth=3)[0]
    assert small.shape == (16, 16)
    assert small.shape[0] % 8 == 0


def test_per_lump_gives_one_centered_map_per_lump():
    g1 = _block_grid(0, 0, 2, 2)
    g2 = _block_grid(30, 40, 3, 1)
    grid = np.concatenate([g1, g2])
    lump = np.array([1] * 4 + [2] * 3)
    lays = build_layouts(grid, lump, size=8, mode="centered", per_lump=True, depth=2)
    assert [lay.group for lay in lays] == [1, 2]
    assert lays[0].tile_index.tolist() == [0, 1, 2, 3]
    assert lays[1].tile_index.tolist() == [4, 5, 6]
    assert lays[0].offset_rc == (3, 3)
    assert lays[1].offset_rc == ((8 - 3) // 2 - 30, (8 - 1) // 2 - 40)
    (whole,) = build_layouts(grid, lump, size=8, mode="centered", per_lump=False, depth=2)
    assert whole.n_outside > 0  # the two lumps are 40 columns apart: no 8 x 8 canvas holds both
    assert build_layouts(np.zeros((0, 2)), np.zeros(0), 8, "centered", True, 2) == []


def test_bad_layout_inputs_raise():
    with pytest.raises(FeatureMapError, match="multiple of 2"):
        build_layouts(_block_grid(0, 0, 2, 2), np.ones(4), size=12, mode="centered",
                      per_lump=False, depth=3)
    with pytest.raises(FeatureMapError, match="share one grid position"):
        build_layouts(np.array([[1, 1], [1, 1]]), np.ones(2), 8, "centered", False, 2)


def test_place_is_differentiable_and_its_gradient_is_gather():
    grid = _block_grid(0, 0, 3, 3)
    (lay,) = build_layouts(grid, np.ones(9), 8, "centered", False, 2)
    feats = torch.randn(9, 4, requires_grad=True)
    weight = torch.randn(4, 8, 8)
    (place(feats, lay) * weight).sum().backward()
    assert torch.equal(feats.grad, gather(weight, lay))


def test_label_map_codes():
    grid = _block_grid(0, 0, 1, 3)
    (lay,) = build_layouts(grid, np.ones(3), 4, "centered", False, 2)
    labels = np.array([LABEL_TUMOR, LABEL_NORMAL, LABEL_NOLABEL], dtype=np.int8)
    t = label_map(labels, lay)
    assert t.dtype == torch.long and t.shape == (4, 4)
    rc = lay.canvas_rc
    assert t[rc[0, 0], rc[0, 1]] == 1
    assert t[rc[1, 0], rc[1, 1]] == 0
    assert t[rc[2, 0], rc[2, 1]] == IGNORE_INDEX
    assert int((t == IGNORE_INDEX).sum()) == 16 - 2


def test_masked_ce_is_mean_over_labelled_positions_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 3, 3, requires_grad=True)
    target = torch.full((2, 3, 3), IGNORE_INDEX)
    labelled = [(0, 0, 0, 1), (0, 1, 2, 0), (1, 2, 2, 1), (1, 0, 1, 0), (1, 1, 1, 1)]
    for b, r, c, y in labelled:
        target[b, r, c] = y
    by_hand = 0.0
    for b, r, c, y in labelled:
        z = logits[b, :, r, c].tolist()
        by_hand += -(z[y] - math.log(math.exp(z[0]) + math.exp(z[1])))
    by_hand /= len(labelled)
    loss = masked_cross_entropy(logits, target)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # other values at unlabelled positions (raw nolabel code, junk) change nothing
    for junk in (-1, 7, -5):
        t2 = torch.where(target == IGNORE_INDEX, torch.full_like(target, junk), target)
        assert masked_cross_entropy(logits, t2).item() == pytest.approx(by_hand, rel=1e-6)
    # nor do the logits there
    with torch.no_grad():
        l2 = logits.clone()
        l2[target.unsqueeze(1).expand_as(l2) == IGNORE_INDEX] = 1e4
    assert masked_cross_entropy(l2, target).item() == pytest.approx(by_hand, rel=1e-6)


def test_masked_ce_without_labels_is_zero_with_grad():
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    loss = masked_cross_entropy(logits, torch.full((1, 4, 4), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_random_crop_pads_and_keeps_alignment():
    fm = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    target = torch.arange(24).reshape(4, 6)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        f, t = random_crop(fm, target, 3, g)
        assert f.shape == (3, 3, 3) and t.shape == (3, 3)
        # the crop is a window of the original: feature channel 0 value v sits at target v
        assert torch.equal(f[0].long(), t)
    f, t = random_crop(fm, target, 8, g)
    assert f.shape == (3, 8, 8) and t.shape == (8, 8)
    assert int((t != IGNORE_INDEX).sum()) == 24 and f[0].sum() == fm[0].sum()


def test_unet_shapes_and_divisibility():
    net = UNet(in_channels=4, n_classes=2, depth=3, width=4)
    assert net(torch.randn(2, 4, 16, 24)).shape == (2, 2, 16, 24)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth=8"):
        net(torch.randn(1, 4, 12, 16))


def _context_task(n_maps: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """label(r, c) = cell (r, c + 2) is marked; the cell's own feature says nothing."""
    rng = np.random.default_rng(seed)
    marked = rng.random((n_maps, size, size)) < 0.5
    label = np.zeros_like(marked)
    label[:, :, :-2] = marked[:, :, 2:]
    return torch.from_numpy(marked).float()[:, None], torch.from_numpy(label).long()


def test_unet_learns_a_context_only_pattern():
    x, y = _context_task(4, 16, seed=0)
    # a 1x1 model sees only the cell's own mark: its best accuracy is near chance
    own = x[:, 0].long()
    best_1x1 = sum(
        max(int(((own == v) & (y == k)).sum()) for k in (0, 1)) for v in (0, 1)
    ) / y.numel()
    assert best_1x1 < 0.65
    torch.manual_seed(0)
    net = UNet(in_channels=1, n_classes=2, depth=2, width=8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        loss = masked_cross_entropy(net(x), y)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc > 0.95
