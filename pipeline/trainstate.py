"""Resumable training: one atomic training-state file per training stage, written after epochs.

A killed training stage (SIGKILL, OOM, preemption) rerun with the same params and inputs goes
on from the last saved epoch and ends with the tensors an uninterrupted run ends with
(bit-identical on CPU): the file holds everything the next epoch's arithmetic depends on —
model and optimizer (and LR scheduler) state, the epoch/step counters, the per-epoch rows and
the best-so-far value, epoch and weights, extra loop state (a sampler position or permutation),
and the random number generators: python `random`, numpy's legacy global RNG, torch's CPU RNG,
every CUDA device's RNG when CUDA is initialised, and any named `torch.Generator` the loop
draws from (a DataLoader's `generator`, from which each epoch's worker base seed is drawn; a
shuffling generator). Rerunning with different params or inputs starts from epoch 0 with one
log line saying why. Model: torchvision's references/classification/train.py `--resume`.

Where: `state_file(paths, stage)` = models/state/<stage>/state.pt. It is not a DVC output (and
.dvcignore lists models/state/): DVC neither deletes it before rerunning a stage nor caches it,
so `dvc repro` after a kill resumes; the stage deletes it (`discard`) once its outputs are
written, so a finished stage leaves nothing behind and a forced rerun trains from scratch.

API (for a training loop):

    ts = TrainState(state_file(paths, STAGE), fingerprint(params_hash, inputs...),
                    models={"model": model}, optimizers={"opt": opt},
                    schedulers={"sched": sched},            # optional
                    generators={"loader": loader.generator}) # optional
    prog = ts.resume()         # Progress(); fresh unless the file matches. Restores in place:
                               # weights, optimizer/scheduler state, every RNG and generator.
    for epoch in range(prog.epoch, epochs):
        ...train, evaluate...
        prog.rows.append(row)
        prog.consider(val_loss, epoch, ts.models)  # best-so-far value, epoch and weights
        prog.epoch, prog.step = epoch + 1, steps   # epochs completed; optimizer steps
        ts.save(prog, force=epoch == epochs - 1)  # atomic; at most every `every_s` seconds
                               # (the last epoch always); under DDP all ranks call, rank 0 writes
    selected = select_weights(prog, select, ts.models)  # "best_val" | "last"
    ...write outputs...
    ts.discard()

- `fingerprint(*parts)`: sha256 (16 hex) of str / bytes / numbers / None / numpy arrays / torch
  tensors / Path (the file's bytes) / lists / tuples / dicts, type-tagged. Pass the params that
  change the training (`Params.section_hash(...)`) and what identifies its inputs (the train /
  val arrays or files). The world size is added by TrainState itself.
- `Progress`: epoch (epochs completed = next epoch to run), step, rows (per-epoch tuples),
  best_value / best_epoch / best_weights ({model name: CPU state_dict}), extra (a dict of
  torch-saveable values: sampler permutation and position, slides done within an epoch, ...).
  Resume at a finer grain than an epoch (e2e: every K slides) is the caller's: save with
  `prog.epoch` = the epoch in progress and its position in `extra`.
- `TrainState(path, fingerprint, models, optimizers, schedulers=None, generators=None,
  keep_best=True, every_s=None)`; `.models` etc. hold what was passed. path None disables it
  (resume() returns a fresh Progress, save/discard do nothing). keep_best=False drops
  best_weights from the file (select=last needs none). every_s: least seconds between writes
  (None: $PIPELINE_STATE_EVERY_S, default 60); `save(prog, force)` writes on its first call,
  when every_s has passed, and when forced, and returns whether it wrote. A kill loses at most
  every_s seconds plus one epoch of work. Models may be DDP-wrapped (the inner module's state is
  saved). `resume()` restores the RNG states last, so call it after building the models,
  optimizers and loaders (model init draws from the RNG) and right before the first epoch.
- `select_weights(prog, select, models) -> int`: "last" keeps the current (final epoch's)
  weights and returns the last epoch; "best_val" loads best_weights (when there are none, e.g.
  every val loss NaN, it keeps the last and says so) and returns best_epoch.
- DDP: every rank calls save() (the RNG states of all ranks are gathered to rank 0, which writes
  one file) and resume() (every rank reads the file — one node or a shared filesystem — and
  takes its own RNG state; the ranks check that they agree on the epoch). A different world
  size starts fresh.
- rng_state() / set_rng_state(): the global RNG capture used above, on their own.

Format: torch.save of a dict {format, fingerprint, world, progress fields, models, optimizers,
schedulers, generators, rng: [per rank]}; read with weights_only=True (tensors, numbers,
strings and containers only: the numpy RNG state is stored as a tensor).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import PipelineError
from pipeline.io import atomic_path, hash_file_into, remove_stale_temps
from pipeline.log import get_logger

if TYPE_CHECKING:
    from pipeline.paths import Paths

log = get_logger("pipeline.trainstate")

FORMAT = 1
STATE_DIR = "state"  # under models/
# Seconds between two state writes (besides the first and the forced last). A write took
# 0.13 s for the demo U-Net's 31 MB (weights + Adam + best weights; loaded 2-core machine): after
# each of its 60 epochs, ~8 s on top of a ~14 s stage. Resuming is exact from any saved epoch,
# so this trades only the work a kill loses. Environment variable, as it changes no result.
EVERY_S_ENV = "PIPELINE_STATE_EVERY_S"
DEFAULT_EVERY_S = 60.0
STATE_NAME = "state.pt"
SELECT_CHOICES = ("best_val", "last")


class TrainStateError(PipelineError):
    """A training-state file cannot be used as asked (message names the file)."""


def state_file(paths: Paths, stage: str) -> Path:
    """models/state/<stage>/state.pt under the project root."""
    return paths.models / STATE_DIR / stage / STATE_NAME


# -- fingerprint ----------------------------------------------------------------------------------
def fingerprint(*parts: Any) -> str:
    """sha256 (first 16 hex digits) of `parts`, type-tagged so ("1",) and (1,) differ."""
    h = hashlib.sha256()
    for p in parts:
        _feed(h, p)
    return h.hexdigest()[:16]


def _feed(h: Any, p: Any) -> None:
    if p is None or isinstance(p, (bool, int, float, str)):
        h.update(f"{type(p).__name__}:{p!r};".encode())
    elif isinstance(p, bytes):
        h.update(b"bytes:%d;" % len(p))
        h.update(p)
    elif isinstance(p, torch.Tensor):
        _feed(h, p.detach().cpu().contiguous().numpy())
    elif isinstance(p, np.ndarray):
        a = np.ascontiguousarray(p)
        h.update(f"ndarray:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
    elif isinstance(p, Path):
        h.update(b"file:")
        hash_file_into(h, p)
        h.update(b";")
    elif isinstance(p, Mapping):
        h.update(b"map{")
        for k in sorted(p, key=str):
            _feed(h, str(k))
            _feed(h, p[k])
        h.update(b"}")
    elif isinstance(p, (list, tuple)):
        h.update(b"seq[")
        for v in p:
            _feed(h, v)
        h.update(b"]")
    else:
        raise TypeError(f"fingerprint: cannot hash a {type(p).__name__}")


# -- RNG states -----------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """python / numpy (legacy global) / torch CPU RNG states, and every CUDA device's when CUDA
    is initialised, as torch-saveable values."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, np.int64)), int(pos), int(has_gauss),
                  float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what rng_state() captured (CUDA only when both sides have the same devices)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("training state has CUDA RNG states of %d devices, this machine has %d: "
                        "CUDA random draws will differ from an uninterrupted run", len(cuda),
                        torch.cuda.device_count())


# -- progress and selection -----------------------------------------------------------------------
@dataclass
class Progress:
    """What a training loop carries from epoch to epoch besides weights, optimizers and RNGs."""

    epoch: int = 0  # epochs completed = the next epoch to run
    step: int = 0  # optimizer steps taken
    rows: list = field(default_factory=list)  # per-epoch tuples (epoch, losses, ...)
    best_value: float = math.inf
    best_epoch: int = -1
    best_weights: dict[str, dict[str, torch.Tensor]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False  # True when restored from a file (not saved)

    def consider(self, value: float, epoch: int, models: Mapping[str, nn.Module]) -> bool:
        """Record `epoch` as the best so far when `value` is lower than every earlier one (a NaN
        never is); the weights are copied to CPU. Returns whether it was."""
        if not value < self.best_value:
            return False
        self.best_value, self.best_epoch = float(value), int(epoch)
        self.best_weights = {name: _cpu_state(m) for name, m in models.items()}
        return True


def select_weights(prog: Progress, select: str, models: Mapping[str, nn.Module]) -> int:
    """Leave `models` with the weights `select` asks for and return that epoch: "last" the final
    epoch's (the paper's fixed-epoch training), "best_val" the epoch with the lowest
    validation loss (the last when no epoch had a finite one)."""
    if select not in SELECT_CHOICES:
        raise TrainStateError(f"select={select!r}: expected one of {', '.join(SELECT_CHOICES)}")
    last = prog.epoch - 1
    if select == "last":
        return last
    if prog.best_weights is None:
        log.warning("select=best_val: no epoch had a finite validation loss; keeping the last "
                    "epoch's weights (epoch %d)", last)
        return last
    for name, m in models.items():
        _unwrap(m).load_state_dict(prog.best_weights[name])
    return prog.best_epoch


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


def _cpu_state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in _unwrap(m).state_dict().items()}


# -- the state file -------------------------------------------------------------------------------
def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TrainState:
    """The training-state file of one run: see the module docstring for the protocol."""

    def __init__(
        self,
        path: Path | None,
        fingerprint: str,
        models: Mapping[str, nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        schedulers: Mapping[str, Any] | None = None,
        generators: Mapping[str, torch.Generator] | None = None,
        keep_best: bool = True,
        every_s: float | None = None,
    ):
        self.path = None if path is None else Path(path)
        self.fingerprint = fingerprint
        self.models = dict(models)
        self.optimizers = dict(optimizers)
        self.schedulers = dict(schedulers or {})
        self.generators = dict(generators or {})
        self.keep_best = keep_best
        self.every_s = (float(os.environ.get(EVERY_S_ENV, DEFAULT_EVERY_S)) if every_s is None
                        else float(every_s))
        self._last_save = -math.inf

    # writing ------------------------------------------------------------------------------
    def save(self, prog: Progress, force: bool = False) -> bool:
        """Write the state after a completed step of work (normally an epoch): the first call,
        then when `every_s` seconds have passed since the last write, and always with `force`
        (pass it for the last epoch). Returns whether it wrote. Every rank calls it under DDP
        (rank 0's clock decides for all; a collective gathers the RNG states); rank 0 writes."""
        if self.path is None:
            return False
        rank, world = _dist()
        due = [force or time.monotonic() - self._last_save >= self.every_s]
        if world > 1:
            dist.broadcast_object_list(due, src=0)
        if not due[0]:
            return False
        self._last_save = time.monotonic()
        rng = {**rng_state(), "generators": {k: g.get_state()
                                             for k, g in self.generators.items()}}
        rngs = [rng]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng)
        if rank != 0:
            return True
        obj = {
            "format": FORMAT, "fingerprint": self.fingerprint, "world": world,
            "epoch": int(prog.epoch), "step": int(prog.step), "rows": list(prog.rows),
            "best_value": float(prog.best_value), "best_epoch": int(prog.best_epoch),
            "best_weights": prog.best_weights if self.keep_best else None,
            "extra": dict(prog.extra),
            "models": {k: _cpu_state(m) for k, m in self.models.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "rng": rngs,
        }
        with atomic_path(self.path) as tmp, open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not overtake the data (power loss)
        return True

    def discard(self) -> None:
        """Delete the file (the stage's outputs are written); rank 0 only under DDP."""
        if self.path is None or _dist()[0] != 0:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        for d in (self.path.parent, self.path.parent.parent):
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty

    # reading ------------------------------------------------------------------------------
    def resume(self, device: torch.device | None = None) -> Progress:
        """A fresh Progress, or the saved one with the models, optimizers, schedulers, named
        generators and global RNGs restored in place. `device`: the CUDA device of this rank
        under NCCL (for the cross-rank agreement check)."""
        rank, world = _dist()
        if self.path is not None and rank == 0:
            remove_stale_temps([self.path])  # a writer killed mid-save leaves its temp file
        obj = self._read()
        prog = Progress() if obj is None else self._restore(obj)
        if world > 1:
            t = torch.tensor([prog.epoch, -prog.epoch], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if t[0] != prog.epoch or -t[1] != prog.epoch:
                raise TrainStateError(f"{self.path}: the ranks disagree on the epoch to resume "
                                      "from; is models/state on a filesystem every rank sees?")
        return prog

    def _read(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated by a foreign writer, other torch format, ...
            log.warning("%s: unreadable training state (%s); starting from epoch 0", self.path,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None
        _, world = _dist()
        why = None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            why = "another format version"
        elif obj["fingerprint"] != self.fingerprint:
            why = (f"made with different params or inputs (fingerprint {obj['fingerprint']}, "
                   f"now {self.fingerprint})")
        elif obj["world"] != world:
            why = f"made by {obj['world']} processes, this run has {world}"
        elif set(obj["models"]) != set(self.models) or set(obj["optimizers"]) != set(
                self.optimizers):
            why = "holds other models or optimizers"
        if why is not None:
            log.info("%s: %s; starting from epoch 0", self.path, why)
            return None
        return obj

    def _restore(self, obj: dict) -> Progress:
        rank, _ = _dist()
        for k, m in self.models.items():
            _unwrap(m).load_state_dict(obj["models"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(obj["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(obj["schedulers"][k])
        rng = obj["rng"][rank]
        for k, g in self.generators.items():
            g.set_state(rng["generators"][k])
        set_rng_state(rng)  # last: nothing may draw between here and the next epoch
        prog = Progress(epoch=obj["epoch"], step=obj["step"], rows=list(obj["rows"]),
                        best_value=obj["best_value"], best_epoch=obj["best_epoch"],
                        best_weights=obj["best_weights"], extra=dict(obj["extra"]),
                        resumed=True)
        log.info("%s: resuming after epoch %d (step %d, best epoch %d)", self.path,
                 prog.epoch - 1, prog.step, prog.best_epoch)
        return prog
