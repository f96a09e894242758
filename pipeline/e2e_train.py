"""End-to-End training around the two-block gradient (pipeline.e2e): the optimizer with optional
higher-precision master weights, how far each model moved from its starting weights, and the
validation slide loss (for e2e.select: best_val).

Why master weights. An Adam step moves a weight by about lr. A float32 weight w only changes
when the step exceeds half its ulp (|w| * 2^-24): at the paper's lr_fe = 1e-9 every weight with
|w| > 2^-5 ~ 0.031 (BatchNorm gammas ~ 1, most biases, many conv weights) stays exactly where it
was, however many steps run. `MasterAdam` keeps float64 copies of the parameters the optimizer
updates: the gradient is copied in (cast up), Adam steps the master copies, and the master is
copied back (rounded to the compute dtype) into the model, whose forward/backward runs as
before. Steps smaller than an ulp then accumulate in the master until the rounded weight moves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline.e2e import ChunkSource, map_indices, slide_loss
from pipeline.featuremap import MapLayout
from pipeline.models import PatchClassifier

MASTER_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class StepOptimizer(Protocol):
    """What e2e-finetune needs of an optimizer (torch.optim.Adam and MasterAdam have it)."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class MasterAdam:
    """Adam on `master_dtype` copies of `params`; after each step the model's parameters are
    set to the master values rounded to their own dtype. A parameter without .grad is skipped
    (as torch.optim.Adam skips it) and keeps its value."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, master_dtype: torch.dtype):
        self.params = list(params)
        self.master = [p.detach().to(master_dtype).clone().requires_grad_(True)
                       for p in self.params]
        self.adam = torch.optim.Adam(self.master, lr=lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.adam.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.master, strict=True):
            m.grad = None if p.grad is None else p.grad.detach().to(m.dtype)
        self.adam.step()
        for p, m in zip(self.params, self.master, strict=True):
            if m.grad is not None:
                p.copy_(m)  # rounds to the compute dtype (round to nearest)
                m.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"adam": self.adam.state_dict(), "master": [m.detach().clone() for m in self.master]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the Adam moments and the master weights, and set the model's parameters to
        the masters rounded (so the model is exactly what it was when the state was taken)."""
        if len(state["master"]) != len(self.master):
            raise ValueError(f"MasterAdam state has {len(state['master'])} master tensors, "
                             f"the model {len(self.master)}")
        with torch.no_grad():
            for p, m, saved in zip(self.params, self.master, state["master"], strict=True):
                m.copy_(saved)
                p.copy_(m)
        self.adam.load_state_dict(state["adam"])


def trained_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters e2e updates: all but the extractor's head f_n, which e2e does not use
    (pipeline.e2e: L' replaces it, so it never gets a gradient)."""
    if isinstance(model, PatchClassifier):
        skip = {id(p) for p in model.head.parameters()}
        return [p for p in model.parameters() if id(p) not in skip]
    return list(model.parameters())


def make_optimizer(model: nn.Module, lr: float, master_dtype: str) -> StepOptimizer:
    """Adam over `trained_parameters(model)`; with master copies when `master_dtype` is wider
    than the model's parameters (float64 masters of a float32 model), plain Adam otherwise."""
    if master_dtype not in MASTER_DTYPES:
        raise ValueError(f"e2e.master_dtype: {master_dtype!r} is not one of "
                         f"{sorted(MASTER_DTYPES)}")
    params = trained_parameters(model)
    want = MASTER_DTYPES[master_dtype]
    if all(p.dtype == want or torch.finfo(p.dtype).bits >= torch.finfo(want).bits
           for p in params):
        return torch.optim.Adam(params, lr=lr)
    return MasterAdam(params, lr, want)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of `trained_parameters(model)` by name: the start `movement` compares with."""
    keep = {id(p) for p in trained_parameters(model)}
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if id(p) in keep}


@torch.no_grad()
def movement(model: nn.Module, start: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """How far the parameters in `start` moved: moved_fraction = elements whose value differs
    from the start (bit-level inequality of the model's own dtype), rel_l2 = ||w - w0|| /
    ||w0|| over all of them (float64)."""
    now = dict(model.named_parameters())
    changed = total = 0
    diff_sq = ref_sq = 0.0
    for name, w0 in start.items():
        w = now[name].detach().cpu()
        changed += int((w != w0).sum())
        total += w0.numel()
        d = w.double() - w0.double()
        diff_sq += float((d * d).sum())
        ref_sq += float((w0.double() ** 2).sum())
    return {"moved_fraction": changed / max(total, 1),
            "rel_l2": (diff_sq ** 0.5) / ref_sq ** 0.5 if ref_sq > 0 else float(diff_sq > 0)}


@torch.no_grad()
def val_slide_loss(
    extractor: nn.Module, unet: nn.Module, chunks: ChunkSource, layouts: Sequence[MapLayout],
    labels: np.ndarray, prepare: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[float, int]:
    """The slide loss L of pipeline.e2e at inference (extractor and U-Net in eval mode: no
    dropout, frozen BatchNorm), features streamed chunk by chunk without a graph. Returns
    (L, n_labelled); (0.0, 0) for a slide without labelled tiles on its maps."""
    indices = map_indices(layouts)
    if len(indices) == 0:
        return 0.0, 0
    device, dtype = next(extractor.parameters()).device, next(extractor.parameters()).dtype
    saved = [(m, m.training) for m in (*extractor.modules(), *unet.modules())]
    extractor.eval()
    unet.eval()
    try:
        feats = torch.cat([extractor.features(prepare(px.to(device=device, dtype=dtype)))
                           for _, px in chunks(indices)])
        loss, n = slide_loss(unet, feats, indices, layouts, np.asarray(labels))
    finally:
        for m, training in saved:
            m.training = training
    return float(loss), int(n)
