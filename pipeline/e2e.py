"""End-to-End learning by the paper's two-block method (§3.2.2), with exact gradients.

For one slide with N patches on its map(s), `e2e_slide_step` computes the gradient of the slide
loss L (U-Net masked softmax CE) w.r.t. BOTH models' parameters while holding at most one chunk
of r patches' activations:

  step 1   stream the patches in chunks of r; extractor.features under no_grad; keep x (N, D)
  step 2   place x on the map(s) (pipeline.featuremap.place), x a leaf that requires grad
  step 3   U-Net forward + backward of L  -> U-Net .grad, and dL/dx (N, D)
  step 4-5 re-stream the same chunks, forward WITH a graph, backward L' = sum_i <dL/dx_i, x_i>
           chunk by chunk -> extractor .grad = dL'/dw = dL/dw (the chain rule, eq. 2-4).

The head f_n is not used (L' replaces it), so its parameters get no gradient. Gradients are
accumulated into .grad (call zero_grad before, step the optimizers after).

Exactness. dL'/dw equals dL/dw only if pass 2 recomputes exactly the function of pass 1, and
that function is the one a single autograd graph over all N patches would differentiate
(`one_graph_grads`, the reference the tests compare against):
- BatchNorm: every BatchNorm module of the extractor is put in eval mode (frozen running
  statistics) for both passes. In train mode, BN would normalise with per-chunk batch statistics:
  the result would depend on how the slide is cut into chunks, and running statistics would be
  updated twice per step. Frozen statistics are the natural choice when finetuning at the
  paper's lr of 1e-9 from separately trained weights; running stats are never updated here.
- Dropout (and any other stochastic layer) stays active, and the optional `augment` callable
  (applied to each chunk's pixels on the device, using torch's RNG only) runs with a per-chunk
  RNG state: each chunk's augmentation + forward runs inside torch.random.fork_rng after
  torch.manual_seed(seed_for(seed, chunk_no)), so pass 2 draws exactly the pixels and dropout
  masks of pass 1. This requires pass 2 to see the same chunks as pass 1: the chunk source must
  split a request into consecutive runs of `chunk_size` indices (the last may be shorter) — see
  `chunk_indices` — and pass 2 re-forwards whole chunks; this is checked, not assumed. The
  global RNG state is left as it was. Use a different `seed` per step (e.g. per epoch and slide)
  so masks differ between steps. This covers every layer that draws from torch's generator of
  the device: nn.Dropout, timm's DropPath (stochastic depth: a per-sample bernoulli_ mask),
  attention dropout inside scaled_dot_product_attention (CPU and the CUDA kernels' philox seed).
  LayerNorm (ViTs) normalises each sample on its own and needs no freezing; tested on a tiny
  timm ViT with drop-path in tests/test_e2e_vit.py.
- Skipping: rows of dL/dx that are exactly zero contribute nothing to L', so a chunk whose rows
  are all zero is not re-forwarded (exact). Tiles that fell off the canvas are not on any map
  and are not forwarded at all (L does not depend on them).
- backprop_fraction < 1 is APPROXIMATE: a seeded random subset of k = ceil(fraction * m) of the
  m non-zero rows is kept (whole chunks containing a kept row are re-forwarded, other rows
  masked to zero) and scaled by m / k, the inverse inclusion probability, so the extractor
  gradient is an unbiased estimate of the exact one. The U-Net gradient stays exact.

Loss: L = sum of per-position CE over the labelled positions of all the slide's maps / their
count (one mean over the slide's labelled tiles, as a batch of its maps). Maps of equal shape are
batched through the U-Net together (so U-Net BatchNorm sees the whole slide, identically in both
methods); maps of different shapes (mode full, per lump) go one by one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.featuremap import MapLayout, label_map, masked_ce_sum_count, place

# chunks(indices) -> successive (idx, pixels) with idx a run of `indices` of at most r entries
# and pixels the (len(idx), 3, H, W) float tensor the extractor takes (already normalised).
ChunkSource = Callable[[np.ndarray], Iterable[tuple[np.ndarray, torch.Tensor]]]
Augment = Callable[[torch.Tensor], torch.Tensor]

_STREAM_CHUNK = 0
_STREAM_SUBSET = 1


def seed_for(seed: int, chunk_no: int, stream: int = _STREAM_CHUNK) -> int:
    """Deterministic, well-mixed 63-bit seed for chunk `chunk_no` of a step seeded `seed`."""
    ss = np.random.SeedSequence([seed % (1 << 64), stream, chunk_no])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def chunk_indices(indices: np.ndarray, chunk_size: int) -> list[np.ndarray]:
    """Split `indices` into consecutive runs of `chunk_size` (the last may be shorter): the
    chunking every chunk source must follow (e.g. as a DataLoader batch_sampler)."""
    indices = np.asarray(indices, dtype=np.int64)
    return [indices[a : a + chunk_size] for a in range(0, len(indices), chunk_size)]


def tensor_chunk_source(pixels: torch.Tensor, chunk_size: int) -> ChunkSource:
    """A chunk source over an in-memory (N_slide, 3, H, W) tensor (tests, benchmarks)."""

    def chunks(indices: np.ndarray) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for part in chunk_indices(indices, chunk_size):
            yield part, pixels[torch.from_numpy(part)]

    return chunks


def map_indices(layouts: Sequence[MapLayout]) -> np.ndarray:
    """Sorted unique tile indices that are on any of the maps (the patches L depends on)."""
    if not layouts:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate([lay.tile_index for lay in layouts])).astype(np.int64)


@contextlib.contextmanager
def e2e_modes(extractor: nn.Module, freeze_bn: bool = True) -> Iterator[None]:
    """Extractor in train mode (dropout active) with BatchNorm in eval mode (frozen stats);
    every module's previous mode is restored on exit. freeze_bn=False exists only to show
    (in tests) that the two-block gradient is not exact without it."""
    saved = [(m, m.training) for m in extractor.modules()]
    extractor.train()
    if freeze_bn:
        for m in extractor.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


@contextlib.contextmanager
def _chunk_rng(seed: int, chunk_no: int, device: torch.device) -> Iterator[None]:
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed_for(seed, chunk_no))
        yield


def _prepare(
    px: torch.Tensor, device: torch.device, dtype: torch.dtype, augment: Augment | None
) -> torch.Tensor:
    px = px.to(device=device, dtype=dtype, non_blocking=True)
    return augment(px) if augment is not None else px


def _checked_chunks(
    source: Iterable[tuple[np.ndarray, torch.Tensor]], request: np.ndarray, chunk_size: int
) -> Iterator[tuple[int, np.ndarray, torch.Tensor]]:
    """Enumerate a chunk source's output, checking it delivers `request` in order in runs of at
    most chunk_size. Drops its own references before asking for the next chunk, so at most one
    chunk is alive here."""
    pos = 0
    k = 0
    for idx, px in source:
        idx = np.asarray(idx, dtype=np.int64)
        n = len(idx)
        if not 1 <= n <= chunk_size or px.shape[0] != n:
            raise RuntimeError(
                f"chunk source yielded {n} indices / {px.shape[0]} patches; "
                f"expected 1..{chunk_size}"
            )
        if not np.array_equal(idx, request[pos : pos + n]):
            raise RuntimeError(f"chunk source yielded indices out of order at position {pos}")
        pos += n
        yield k, idx, px
        k += 1
        del idx, px
    if pos != len(request):
        raise RuntimeError(f"chunk source yielded {pos} of {len(request)} requested patches")


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def slide_loss(
    unet: nn.Module,
    x: torch.Tensor,
    indices: np.ndarray,
    layouts: Sequence[MapLayout],
    labels: np.ndarray,
) -> tuple[torch.Tensor, int]:
    """L for one slide: x (len(indices), D) are the features of tiles `indices` (sorted);
    labels (N_slide,) int8 schema labels of all the slide's tiles. Returns (L, n_labelled)."""
    total = x.new_zeros(())
    count = 0
    by_shape: dict[tuple[int, int], list[MapLayout]] = {}
    for lay in layouts:
        by_shape.setdefault(lay.shape, []).append(lay)
    for group in by_shape.values():
        maps = []
        targets = []
        for lay in group:
            rows = torch.from_numpy(np.searchsorted(indices, lay.tile_index)).to(x.device)
            maps.append(place(x[rows], lay))
            targets.append(label_map(labels[lay.tile_index], lay))
        logits = unet(torch.stack(maps))
        s, c = masked_ce_sum_count(logits, torch.stack(targets).to(x.device))
        total = total + s
        count += int(c)
    return total / max(count, 1), count


def e2e_slide_step(
    extractor: nn.Module,
    unet: nn.Module,
    chunks: ChunkSource,
    layouts: Sequence[MapLayout],
    labels: np.ndarray,
    chunk_size: int,
    *,
    seed: int,
    augment: Augment | None = None,
    backprop_fraction: float = 1.0,
    freeze_bn: bool = True,
) -> dict[str, Any]:
    """Accumulate dL/dw into both models' .grad for one slide by the two-block method (see the
    module docstring); does not step. One function on purpose: steps 1-5 read in the paper's
    order, and passes 1 and 2 must share the chunk bounds, seeds and modes set up here.
    `extractor` must have `.features(x) -> (B, D)`.

    Returns loss, n_patches (forwarded in pass 1), n_reforwarded (pass 2), n_selected (rows of
    dL/dx used), n_labelled, n_chunks, n_chunks_reforwarded.
    """
    if not 0 < backprop_fraction <= 1:
        raise ValueError(f"backprop_fraction must be in (0, 1], got {backprop_fraction}")
    labels = np.asarray(labels)
    indices = map_indices(layouts)
    n = len(indices)
    out: dict[str, Any] = {
        "loss": 0.0, "n_patches": n, "n_reforwarded": 0, "n_selected": 0, "n_labelled": 0,
        "n_chunks": 0, "n_chunks_reforwarded": 0,
    }
    if n == 0:
        return out
    device, dtype = _device_dtype(extractor)
    with e2e_modes(extractor, freeze_bn):
        # step 1: features only; each chunk's activations are freed before the next.
        feats: torch.Tensor | None = None
        bounds: list[tuple[int, int]] = []
        with torch.no_grad():
            for k, idx, px in _checked_chunks(chunks(indices), indices, chunk_size):
                with _chunk_rng(seed, k, device):
                    f = extractor.features(_prepare(px, device, dtype, augment))
                del px
                if feats is None:
                    feats = f.new_empty((n, f.shape[1]))
                a = bounds[-1][1] if bounds else 0
                feats[a : a + len(idx)] = f
                bounds.append((a, a + len(idx)))
                del f
        assert feats is not None
        # steps 2-3: U-Net on the whole map(s); dL/dx retained between the two blocks.
        x = feats.requires_grad_(True)
        loss, n_labelled = slide_loss(unet, x, indices, layouts, labels)
        loss.backward()
        grad_x = x.grad.detach()
        del x, feats
        out.update(loss=float(loss.detach()), n_labelled=n_labelled, n_chunks=len(bounds))
        del loss

        # step 4: which rows of dL/dx enter L'.
        selected = (grad_x != 0).any(dim=1).cpu().numpy()
        if backprop_fraction < 1 and selected.any():
            candidates = np.flatnonzero(selected)
            k_keep = max(1, math.ceil(backprop_fraction * len(candidates)))
            rng = np.random.default_rng(seed_for(seed, 0, _STREAM_SUBSET))
            keep = rng.choice(candidates, size=k_keep, replace=False)
            selected = np.zeros_like(selected)
            selected[keep] = True
            grad_x = grad_x * (len(candidates) / k_keep)
        sel_t = torch.from_numpy(selected).to(grad_x.device)
        grad_x = torch.where(sel_t[:, None], grad_x, torch.zeros_like(grad_x))
        needed = [j for j, (a, b) in enumerate(bounds) if selected[a:b].any()]
        out.update(n_selected=int(selected.sum()), n_chunks_reforwarded=len(needed))
        if not needed:
            return out

        # step 5: re-forward the same chunks (same seeds) with a graph; backprop L' per chunk.
        request = np.concatenate([indices[bounds[j][0] : bounds[j][1]] for j in needed])
        n_ref = 0
        for pos, idx, px in _checked_chunks(chunks(request), request, chunk_size):
            j = needed[pos]
            a, b = bounds[j]
            if len(idx) != b - a:
                raise RuntimeError(
                    "chunk source split the pass-2 request differently from pass 1; it must "
                    "yield consecutive runs of chunk_size (see pipeline.e2e.chunk_indices)"
                )
            with _chunk_rng(seed, j, device):
                f = extractor.features(_prepare(px, device, dtype, augment))
            del px
            (f * grad_x[a:b]).sum().backward()
            del f
            n_ref += len(idx)
        out["n_reforwarded"] = n_ref
    return out


def one_graph_grads(
    extractor: nn.Module,
    unet: nn.Module,
    chunks: ChunkSource,
    layouts: Sequence[MapLayout],
    labels: np.ndarray,
    chunk_size: int,
    *,
    seed: int,
    augment: Augment | None = None,
    freeze_bn: bool = True,
    single_batch: bool = False,
) -> dict[str, Any]:
    """Reference: the same L in ONE autograd graph over all the slide's patches (memory grows
    with N), backward once; accumulates into .grad like `e2e_slide_step`.

    Chunks are forwarded with the same per-chunk RNG seeding, so dropout masks and augmentation
    match the two-block method. single_batch=True instead forwards all patches as one batch (the
    pixels still augmented per chunk): that is the function a whole-slide batch defines, which
    the chunked methods reproduce only when the extractor has no batch coupling (frozen BN) and
    no RNG in its forward (no active dropout)."""
    labels = np.asarray(labels)
    indices = map_indices(layouts)
    if len(indices) == 0:
        return {"loss": 0.0, "n_patches": 0, "n_labelled": 0}
    device, dtype = _device_dtype(extractor)
    with e2e_modes(extractor, freeze_bn):
        parts = []
        for k, _idx, px in _checked_chunks(chunks(indices), indices, chunk_size):
            with _chunk_rng(seed, k, device):
                px = _prepare(px, device, dtype, augment)
                parts.append(px if single_batch else extractor.features(px))
            del px
        if single_batch:
            with _chunk_rng(seed, 0, device):
                x = extractor.features(torch.cat(parts))
        else:
            x = torch.cat(parts)
        del parts
        loss, n_labelled = slide_loss(unet, x, indices, layouts, labels)
        loss.backward()
    return {"loss": float(loss.detach()), "n_patches": len(indices), "n_labelled": n_labelled}
