"""Run-time plumbing shared by the training stages: seeding, device, mixed precision, and the
checks that stop a run with a clear message instead of training on NaNs."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.errors import PipelineError


class TrainingError(PipelineError):
    """Training cannot go on (non-finite loss, empty split); the message says where."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch. On CPU, the same seed gives the same metrics run to run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    """CUDA when present (override with PIPELINE_DEVICE=cpu|cuda|cuda:1). Under torchrun with
    WORLD_SIZE > 1, a CUDA device without an index is cuda:LOCAL_RANK (one GPU per process)."""
    want = os.environ.get("PIPELINE_DEVICE")
    device = torch.device(want if want else "cuda" if torch.cuda.is_available() else "cpu")
    world = os.environ.get("WORLD_SIZE", "1")
    local = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and device.index is None and local and world not in ("", "1"):
        device = torch.device("cuda", int(local))
    return device


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool) -> Iterator[None]:
    """bf16 autocast on CUDA when enabled; a no-op on CPU (fp32 keeps CPU runs reproducible)."""
    if enabled and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA (cuDNN's fast layout for bf16 convolutions); contiguous on CPU,
    where the layout would change the float rounding of CPU runs kept reproducible."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def check_finite(loss: torch.Tensor, where: str, epoch: int, batch: int) -> None:
    """Stop with the epoch and batch named when the loss is NaN or inf."""
    if not torch.isfinite(loss.detach()).all():
        raise TrainingError(
            f"{where}: non-finite loss ({loss.item()}) at epoch {epoch}, batch {batch}; "
            "lower the learning rate or check the inputs"
        )
