"""Data-parallel runs under torchrun: one process per GPU (or per CPU slot), PyTorch DDP.

A stage launched by `torchrun --nproc_per_node=K -m pipeline <stage>` finds RANK, WORLD_SIZE
and LOCAL_RANK in its environment; `init_if_needed` then joins the process group (nccl when the
stage's device is CUDA, else gloo) and pins the process to cuda:LOCAL_RANK. Without those
variables (or with WORLD_SIZE=1) every helper here is a no-op and a stage runs exactly as a
plain single process: world = 1 is the special case, not a separate code path.

What the stages do with it (docs/distributed.md has the whole story):
- train-extractor: DDP; each rank takes a disjoint, equal-length slice of the same seeded epoch
  index list (`ShardedBalancedSampler`), extractor.batch_size is the GLOBAL batch (batch_size /
  world per rank), validation sums are all-reduced, rank 0 writes the outputs.
- extract-features: slide i -> rank i % world (`shard`), each rank writes its own HDF5s.
- e2e-finetune: one step = world slides, one per rank; both models' gradients are averaged over
  the ranks that had a labelled slide (`all_reduce_mean_grads`) before the optimizers step.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import math
import os
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from pipeline.data import epoch_indices
from pipeline.errors import PipelineError
from pipeline.log import get_logger
from pipeline.runtime import pick_device

log = get_logger("pipeline.distributed")

T = TypeVar("T")

# Collectives wait this long for the slowest rank (e.g. at the barrier after extract-features,
# where ranks finish their slides at different times); NCCL's own default is only 10 minutes.
TIMEOUT_ENV = "PIPELINE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 6 * 3600
# e.g. "torchrun --nproc_per_node=8": the distributed stages re-launch themselves under it, so
# dvc.yaml's `python -m pipeline <stage>` stays as it is (see `relaunch_if_requested`).
LAUNCHER_ENV = "PIPELINE_LAUNCHER"


class DistributedError(PipelineError):
    """The torchrun environment or a cross-rank check is inconsistent; one line says which."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment: {name}={value!r} is not an integer") from None


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) of this process: from the process group once joined,
    else from torchrun's RANK / WORLD_SIZE / LOCAL_RANK; (0, 1, 0) in a plain run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0)
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"environment: RANK={rank} WORLD_SIZE={world}: need "
                               "0 <= RANK < WORLD_SIZE")
    return rank, world, local


def is_distributed() -> bool:
    """True when this process is one of several ranks (WORLD_SIZE > 1)."""
    return dist_info()[1] > 1


def is_main() -> bool:
    """True on rank 0 (and in a plain run): the process that writes shared outputs and logs."""
    return dist_info()[0] == 0


def init_if_needed() -> tuple[int, int, int]:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1 (idempotent).

    Backend nccl when the device `pipeline.runtime.pick_device` chooses is CUDA (then the
    process is pinned to cuda:LOCAL_RANK), else gloo. Log lines get a "[rank r/W]" prefix.
    Returns dist_info()."""
    rank, world, local = dist_info()
    if world == 1 or dist.is_initialized():
        return rank, world, local
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    device = pick_device()
    timeout = datetime.timedelta(seconds=_env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    atexit.register(_shutdown)
    _prefix_log_lines(rank, world)
    log.info("joined process group: rank %d of %d (local rank %d), backend %s, device %s",
             rank, world, local, dist.get_backend(), device)
    return rank, world, local


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _prefix_log_lines(rank: int, world: int) -> None:
    fmt = f"%(asctime)s %(levelname)s [rank {rank}/{world}] %(name)s: %(message)s"
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))


def launcher_argv(env: Mapping[str, str], argv: Sequence[str]) -> list[str] | None:
    """The command that re-runs this CLI call (`argv` = sys.argv) under $PIPELINE_LAUNCHER, or
    None when no launcher is set or this process already is a launched rank (RANK set)."""
    launcher = env.get(LAUNCHER_ENV, "").strip()
    if not launcher or "RANK" in env or "WORLD_SIZE" in env:
        return None
    return [*shlex.split(launcher), "-m", "pipeline", *argv[1:]]


def relaunch_if_requested() -> None:
    """Replace this process by `$PIPELINE_LAUNCHER -m pipeline <same arguments>` when the
    variable is set and this is not already a launched rank; otherwise return. Called by the
    CLIs of the stages that support data parallelism (train-extractor, extract-features,
    e2e-finetune), so `PIPELINE_LAUNCHER="torchrun --nproc_per_node=8" dvc repro` runs those
    on 8 GPUs and every other stage as a single process."""
    cmd = launcher_argv(os.environ, sys.argv)
    if cmd is None:
        return
    log.info("%s is set: re-launching as %s", LAUNCHER_ENV, shlex.join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        raise DistributedError(f"{LAUNCHER_ENV}={os.environ[LAUNCHER_ENV]!r}: cannot run "
                               f"{cmd[0]!r}: {exc.strerror}") from None


def barrier() -> None:
    """Wait for every rank (no-op in a plain run)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_objects(obj: T, world: int) -> list[T]:
    """[obj of every rank], in rank order (pickled: small objects only); [obj] in a plain run
    (world 1). Every rank must call it, in step."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def shard(seq: Sequence[T], rank: int, world: int) -> list[T]:
    """Items rank, rank + world, ... of `seq` (slide i -> rank i % world); world=1: all."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard: need 0 <= rank < world, got rank {rank}, world {world}")
    return list(seq)[rank::world]


def padded_shard(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Like DistributedSampler: wrap `indices` around to a multiple of `world` (the first ones
    repeat), then take positions rank, rank + world, ... . Every rank gets ceil(n / world)
    entries, so all ranks run the same number of batches; world=1 returns `indices` as is."""
    indices = np.asarray(indices)
    per_rank = math.ceil(len(indices) / world) if len(indices) else 0
    return np.resize(indices, per_rank * world)[rank::world]


class ShardedBalancedSampler(Sampler[int]):
    """Rank `rank`'s part of `pipeline.data.epoch_indices` (the balanced, shuffled epoch of the
    single-process run, seeded by (seed, epoch) so it is the same list on every rank), via
    `padded_shard`. With per-rank batch B / world, batch b of all ranks together is exactly
    batch b of a single process at batch B (up to the wrap-around padding of the last one).
    Call `set_epoch(e)` before each epoch. world=1 is `BalancedSampler`."""

    def __init__(self, labels: np.ndarray, seed: int, balance: bool = True, rank: int = 0,
                 world: int = 1, epoch: int = 0):
        self.labels = np.asarray(labels)
        self.seed, self.balance = int(seed), balance
        self.rank, self.world, self.epoch = int(rank), int(world), int(epoch)
        self.epoch_len = int(epoch_indices(self.labels, self.seed, 0, balance).size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        idx = epoch_indices(self.labels, self.seed, self.epoch, self.balance)
        return iter(padded_shard(idx, self.rank, self.world).tolist())

    def __len__(self) -> int:
        return math.ceil(self.epoch_len / self.world) if self.epoch_len else 0


def rank_seed(seed: int, rank: int, world: int) -> int:
    """`seed` itself in a plain run (so it is unchanged); else a distinct, well-mixed seed per
    rank, so dropout masks and augmentation draws are not copies across ranks."""
    if world == 1:
        return int(seed)
    ss = np.random.SeedSequence([int(seed) % (1 << 63), 0x5EED, int(rank)])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def all_reduce_sum(values: Sequence[float], device: torch.device | None = None) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64); the values themselves in a plain
    run. `device` must be the CUDA device under nccl."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _trainable(models: Sequence[nn.Module]) -> list[nn.Parameter]:
    return [p for m in models for p in m.parameters() if p.requires_grad]


def all_reduce_mean_grads(*models: nn.Module, weight: float = 1.0) -> float:
    """Average the .grad of every trainable parameter of `models` over the ranks: sum of
    weight_r * grad_r over ranks / sum of weight_r. weight 1 everywhere is the plain mean over
    ranks; a rank with nothing to contribute (no slide this step) passes weight 0 and still
    takes part. A parameter without .grad counts as zeros when another rank has one, and keeps
    .grad None when no rank has one (so an optimizer skips it, as in a single process).

    Returns the total weight (0: no rank contributed; do not step). A plain run leaves .grad as
    it is and returns `weight`. Every rank must call this with the same models, in step."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(weight)
    params = _trainable(models)
    if not params:
        return float(all_reduce_sum([weight])[0])
    device = params[0].device
    # One small collective says which parameters have a gradient anywhere, and the total weight.
    flags = torch.tensor([p.grad is not None for p in params] + [float(weight)],
                         dtype=torch.float64, device=device)
    dist.all_reduce(flags)
    total = float(flags[-1])
    active = [p for p, f in zip(params, flags[:-1].tolist(), strict=True) if f > 0]
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in active:
        by_dtype.setdefault(p.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([
            (p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in group
        ])
        if weight != 1.0:
            flat.mul_(weight)
        dist.all_reduce(flat)
        if total > 0:
            flat.div_(total)
        offset = 0
        for p in group:
            n = p.numel()
            g = flat[offset:offset + n].view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            offset += n
    return total


def check_in_sync(*models: nn.Module, where: str = "") -> None:
    """Raise DistributedError unless every rank holds the same parameters: a float64 (sum,
    sum of squares) fingerprint per model is all-reduced with MIN and MAX and must agree
    exactly (ranks apply identical updates to identical weights, so the bits are equal).
    Costs two tiny collectives; a no-op in a plain run."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = _trainable(models)
    device = params[0].device if params else None
    fp = []
    with torch.no_grad():
        for m in models:
            ps = [p.detach().double() for p in m.parameters()]
            fp += [sum(float(p.sum()) for p in ps), sum(float((p * p).sum()) for p in ps)]
    lo = torch.tensor(fp, dtype=torch.float64, device=device)
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        diff = float((hi - lo).abs().max())
        raise DistributedError(f"{where}: model parameters differ between ranks "
                               f"(checksum spread {diff:.3g}); the ranks have diverged")


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) to every rank, so all ranks
    evaluate (and rank 0 saves) the same model. No-op in a plain run."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for b in model.buffers():
        dist.broadcast(b, src)


def summary_sum(summary: dict[str, Any], keys: Sequence[str],
                device: torch.device | None = None) -> dict[str, Any]:
    """`summary` with the numeric `keys` summed over ranks (ints stay ints)."""
    sums = all_reduce_sum([summary[k] for k in keys], device)
    out = dict(summary)
    for k, v in zip(keys, sums, strict=True):
        out[k] = int(round(v)) if isinstance(summary[k], int) else v
    return out
