"""Resumable training (pipeline/trainstate.py) and checkpoint selection (`*.select`).

The bar: a training stage killed with SIGKILL in the middle of training and rerun with the same
params ends with a checkpoint whose tensors are bit-identical to an uninterrupted run's (CPU).
Checked with the real CLI (`python -m pipeline train-extractor` / `train-unet` in a tiny
project, test_baselines.make_project) for the two Separate Learning stages, and in-process for
the loop train-seg-only and train-frozen share (`segment.fit_segmenter`, interrupted by an
exception after a few epochs). The extractor run uses DataLoader workers, whose per-epoch base
seed is drawn from the loader's generator: that generator is part of the state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import segment
from pipeline.models import build_extractor, save_checkpoint
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.stages import extract_features
from pipeline.stages import train_extractor as train_extractor_stage
from pipeline.trainstate import (
    EVERY_S_ENV,
    Progress,
    TrainState,
    fingerprint,
    select_weights,
    state_file,
)
from pipeline.unet import UNet
from tests.conftest import sigkill_when, stage_env
from tests.test_baselines import make_project

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300.0
POLL_S = 0.005


@pytest.fixture(autouse=True)
def state_every_epoch(monkeypatch):
    """Write the training state after every epoch (the default waits 60 s between writes), so
    a kill lands between two known epochs; the CLI runs inherit it through the environment."""
    monkeypatch.setenv(EVERY_S_ENV, "0")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread, as in the CLI runs (OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the state file on its own ---------------------------------------------------------------------


def test_fingerprint_is_type_tagged_and_reads_file_contents(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"same")
    b.write_bytes(b"same")
    assert fingerprint(a) == fingerprint(b)  # a file is its bytes, not its name
    b.write_bytes(b"other")
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint("1") != fingerprint(1) != fingerprint(1.0)
    assert fingerprint(np.arange(3, dtype=np.int64)) != fingerprint(np.arange(3, dtype=np.int32))
    assert fingerprint(torch.ones(2)) == fingerprint(np.ones(2, np.float32))
    assert fingerprint([1, 2], {"k": (3, None)}) == fingerprint([1, 2], {"k": [3, None]})
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])


def _draws(g: torch.Generator) -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(())), float(
        torch.rand((), generator=g))


def test_state_restores_weights_optimizer_and_every_rng(tmp_path):
    torch.manual_seed(0)
    model, g = torch.nn.Linear(3, 2), torch.Generator().manual_seed(5)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    path = tmp_path / "state" / "x" / "state.pt"
    ts = TrainState(path, "fp", {"m": model}, {"o": opt}, generators={"g": g})
    prog = ts.resume()
    assert (prog.epoch, prog.resumed) == (0, False)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    prog.rows.append((0, 1.5, 2.5))
    prog.consider(2.5, 0, ts.models)
    prog.epoch, prog.step, prog.extra = 1, 1, {"perm": torch.arange(4)}
    ts.save(prog)
    expected = _draws(g)

    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    model2, g2 = torch.nn.Linear(3, 2), torch.Generator()
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.1)
    ts2 = TrainState(path, "fp", {"m": model2}, {"o": opt2}, generators={"g": g2})
    prog2 = ts2.resume()
    assert _draws(g2) == expected
    assert (prog2.epoch, prog2.step, prog2.rows, prog2.best_epoch) == (1, 1, [(0, 1.5, 2.5)], 0)
    assert prog2.resumed and torch.equal(prog2.extra["perm"], torch.arange(4))
    assert torch.equal(model2.weight, model.weight) and torch.equal(model2.bias, model.bias)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k][n], s2[k][n]) for k in s1 for n in ("exp_avg", "exp_avg_sq"))
    ts2.discard()
    assert not path.exists() and not path.parent.exists()


def test_save_waits_every_s_between_writes_except_first_and_forced(tmp_path):
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "state.pt"
    ts = TrainState(path, "fp", {"m": model}, {"o": torch.optim.SGD(model.parameters(), 0.1)},
                    every_s=3600)
    assert ts.save(Progress(epoch=1))  # the first one
    assert not ts.save(Progress(epoch=2))  # within the hour
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert ts.save(Progress(epoch=3), force=True)  # the last epoch
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert TrainState(None, "fp", {}, {}).save(Progress(), force=True) is False


def test_other_fingerprint_or_foreign_file_starts_fresh_and_says_why(tmp_path, caplog):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "state.pt"
    TrainState(path, "old", {"m": model}, {"o": opt}).save(Progress(epoch=3))
    with caplog.at_level(logging.INFO, logger="pipeline.trainstate"):
        prog = TrainState(path, "new", {"m": model}, {"o": opt}).resume()
    assert prog.epoch == 0 and not prog.resumed
    assert "different params or inputs" in caplog.text and "starting from epoch 0" in caplog.text
    path.write_bytes(b"not a torch file")
    (tmp_path / ".state.pt.abcd1234.tmp").write_bytes(b"killed writer")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.trainstate"):
        prog = TrainState(path, "new", {"m": model}, {"o": opt}).resume()
    assert prog.epoch == 0 and "unreadable training state" in caplog.text
    assert not (tmp_path / ".state.pt.abcd1234.tmp").exists()


def test_select_weights_last_keeps_final_and_best_val_loads_best():
    model = torch.nn.Linear(2, 1)
    prog = Progress()
    for epoch, val in enumerate([0.9, 0.4, float("nan"), 0.6]):
        with torch.no_grad():
            model.weight.fill_(epoch)
        prog.consider(val, epoch, {"m": model})
        prog.epoch = epoch + 1
    assert prog.best_epoch == 1
    assert select_weights(prog, "last", {"m": model}) == 3
    assert torch.all(model.weight == 3)
    assert select_weights(prog, "best_val", {"m": model}) == 1
    assert torch.all(model.weight == 1)
    nan_only = Progress(epoch=2)
    nan_only.consider(float("nan"), 0, {"m": model})
    assert select_weights(nan_only, "best_val", {"m": model}) == 1  # no finite val: the last


# -- the segmenter loop (train-unet, train-frozen, train-seg-only) ---------------------------------


def _pairs(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(3, 16, 16, generator=g)
        y = (x[0] > 0).long()
        y[:2] = -100  # some ignored positions
        out.append((x, y))
    return out


def _fit(state_path, select="best_val", stop_after: int | None = None, monkeypatch=None,
         params_hash="h", epochs=6):
    """fit_segmenter on fixed random pairs; with stop_after, the loop dies (like a kill) when
    epoch `stop_after` starts, after the state of the epochs before was written."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    unet = UNet(in_channels=3, depth=2, width=4)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-2)
    if stop_after is not None:
        real = segment._segmenter_epoch

        def dying(*args, **kw):
            if args[4] == stop_after:
                raise KeyboardInterrupt("killed")
            return real(*args, **kw)
        monkeypatch.setattr(segment, "_segmenter_epoch", dying)
    try:
        fit = segment.fit_segmenter(
            unet, opt, _pairs(3, 1), _pairs(2, 2), epochs=epochs, batch_size=2, crop=8,
            augment=True, generator=g, device=torch.device("cpu"), desc="t", select=select,
            state_path=state_path, params_hash=params_hash)
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()
    return unet, fit


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("select", ["best_val", "last"])
def test_segmenter_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, select):
    ref, ref_fit = _fit(None, select)
    path = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit(path, select, stop_after=3, monkeypatch=monkeypatch)
    assert torch.load(path, weights_only=True)["epoch"] == 3
    torch.manual_seed(123)  # a rerun starts in another RNG state: the file must restore it
    got, fit = _fit(path, select)
    assert fit.rows == ref_fit.rows
    assert (fit.best_epoch, fit.selected_epoch) == (ref_fit.best_epoch, ref_fit.selected_epoch)
    assert _same_tensors(got.state_dict(), ref.state_dict())
    assert path.exists()  # the stage discards it once its outputs are written
    fit.state.discard()
    assert not path.exists()


def test_segmenter_select_last_and_best_val_weights(tmp_path):
    """last: the weights of the final epoch (the state file's model); best_val: those of the
    epoch with the lowest val loss (the state file's best weights), both from one training."""
    path = tmp_path / "state.pt"
    unet_best, fit_best = _fit(path, "best_val", epochs=8)
    saved = torch.load(path, weights_only=True)
    vals = [r[2] for r in fit_best.rows]
    assert fit_best.best_epoch == fit_best.selected_epoch == int(np.argmin(vals))
    assert _same_tensors(unet_best.state_dict(), saved["best_weights"]["unet"])
    unet_last, fit_last = _fit(tmp_path / "last.pt", "last", epochs=8)
    assert fit_last.selected_epoch == 7 and fit_last.rows == fit_best.rows
    assert _same_tensors(unet_last.state_dict(), saved["models"]["unet"])
    if fit_best.best_epoch != 7:  # this data: the val loss is not lowest at the end
        assert not _same_tensors(unet_last.state_dict(), unet_best.state_dict())


def test_segmenter_killed_after_the_last_epoch_only_writes_outputs(tmp_path, monkeypatch):
    """A kill between the last epoch's state and the stage's outputs: the rerun trains nothing
    and keeps the same weights."""
    path = tmp_path / "state.pt"
    ref, ref_fit = _fit(path)  # leaves the state (the stage would discard it after its outputs)
    monkeypatch.setattr(segment, "_segmenter_epoch", None)  # any training would fail
    got, fit = _fit(path)
    assert fit.rows == ref_fit.rows and fit.selected_epoch == ref_fit.selected_epoch
    assert _same_tensors(got.state_dict(), ref.state_dict())


def test_segmenter_other_params_start_fresh(tmp_path, monkeypatch, caplog):
    path = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit(path, stop_after=2, monkeypatch=monkeypatch)
    ref, ref_fit = _fit(None, params_hash="other")
    with caplog.at_level(logging.INFO, logger="pipeline.trainstate"):
        got, fit = _fit(path, params_hash="other")
    assert "different params or inputs" in caplog.text
    assert fit.rows == ref_fit.rows and _same_tensors(got.state_dict(), ref.state_dict())


# -- SIGKILL of the real stages -------------------------------------------------------------------


def _write_params(root: Path, params: Params, **sections) -> None:
    raw = params.model_dump(mode="json")
    raw["data"]["manifest"] = "manifest.csv"  # this copy's own (the CLI runs in `root`)
    for name, kv in sections.items():
        raw[name].update(kv)
    (root / "params.yaml").write_text(json.dumps(raw, indent=1))  # JSON is YAML 1.2


def _cli(root: Path, stage: str) -> str:
    res = subprocess.run([sys.executable, "-m", "pipeline", stage], cwd=root, env=stage_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def _kill_after_first_state(root: Path, stage: str) -> int:
    """Run the stage's CLI, SIGKILL it as soon as its first training state is on disk (the
    next epoch is then under way); returns the epochs the state holds."""
    state = state_file(Paths(root), stage)
    log = open(root / f"{stage}.killed.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", stage], cwd=root, env=stage_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        sigkill_when(proc, state.exists, stage, START_TIMEOUT_S,
                     lambda: (root / f"{stage}.killed.log").read_text(), POLL_S)
    finally:
        log.close()
    return int(torch.load(state, weights_only=True)["epoch"])


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _check_kill_resume(base: Path, tmp_path: Path, stage: str, ckpt: str, epochs: int,
                       reports: list[str]) -> None:
    ref, killed = tmp_path / "reference", tmp_path / "killed"
    shutil.copytree(base, ref)
    shutil.copytree(base, killed)
    _cli(ref, stage)
    done = _kill_after_first_state(killed, stage)
    assert 1 <= done < epochs, f"killed after {done} of {epochs} epochs"
    assert not (killed / "models" / ckpt).exists()
    out = _cli(killed, stage)
    assert f"resuming after epoch {done - 1}" in out
    a, b = _tensors(ref / "models" / ckpt), _tensors(killed / "models" / ckpt)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ after resume: {different}"
    for name in reports:  # per-epoch curves and metrics: the rows come back from the state
        assert (ref / "reports" / name).read_bytes() == (killed / "reports" / name).read_bytes()
    assert not state_file(Paths(killed), stage).exists()  # discarded once outputs are written
    assert not list(killed.rglob("*.tmp"))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, Params]:
    root = tmp_path_factory.mktemp("train_resume")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    params, _ = make_project(root)
    torch.set_num_threads(threads)
    return root, params


def test_train_extractor_sigkill_resume_is_bit_identical(project, tmp_path):
    root, params = project
    base = tmp_path / "base"
    shutil.copytree(root, base)
    epochs = 4
    # batch 2 and 2 DataLoader workers: several batches per epoch, worker seeds in play
    _write_params(base, params, extractor={"epochs": epochs, "batch_size": 2, "workers": 2})
    _check_kill_resume(base, tmp_path, "train-extractor", "extractor.pt", epochs,
                       ["train_extractor.json", "train_extractor.csv"])


def test_train_unet_sigkill_resume_is_bit_identical(project, tmp_path):
    root, params = project
    base = tmp_path / "base"
    shutil.copytree(root, base)
    paths = Paths(base)
    torch.manual_seed(0)
    model = build_extractor("small_cnn", params.extractor.feature_dim, "none")
    save_checkpoint(paths.models / "extractor.pt", model,
                    {"params_json": params.section_json("seed", "extractor", "tile")})
    extract_features.run(params, paths)
    epochs = 300  # tiny maps: milliseconds per epoch, so the kill lands within training
    _write_params(base, params, unet={"epochs": epochs})
    _check_kill_resume(base, tmp_path, "train-unet", "unet.pt", epochs,
                       ["train_unet.json", "train_unet.csv"])


# -- extractor checkpoint selection -------------------------------------------------------------


@pytest.mark.parametrize("select", ["best_val", "last"])
def test_extractor_select(project, tmp_path, monkeypatch, select):
    """The saved weights are the final epoch's (last) or the lowest-val-loss epoch's
    (best_val): compared with the training state the run leaves when not discarded."""
    root, params = project
    shutil.copytree(root, tmp_path / "p")
    paths = Paths(tmp_path / "p")
    raw = params.model_dump(mode="json")
    raw["extractor"].update(epochs=3, batch_size=8, workers=0, select=select)
    params = Params.model_validate(raw)
    monkeypatch.setattr(TrainState, "discard", lambda self: None)
    summary = train_extractor_stage.run(params, paths)
    saved = torch.load(state_file(paths, "train-extractor"), weights_only=True)
    vals = [r[3] for r in saved["rows"]]
    best = int(np.nanargmin(vals))
    assert summary["best_epoch"] == best and summary["select"] == select
    ckpt = _tensors(paths.models / "extractor.pt")
    if select == "last":
        assert summary["selected_epoch"] == 2
        assert _same_tensors(ckpt, saved["models"]["model"])
    else:
        assert summary["selected_epoch"] == best
        assert _same_tensors(ckpt, saved["best_weights"]["model"])
    assert math.isclose(summary["val_loss"], vals[summary["selected_epoch"]])
    metrics = json.loads((paths.reports / "train_extractor.json").read_text())
    assert metrics["selected_epoch"] == summary["selected_epoch"]


# -- DDP: rank 0 writes one file with every rank's RNG state, each rank resumes its own -----------


def _ddp_worker(rank: int, world: int, path: str, port: int, phase: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), PIPELINE_DEVICE="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)  # same weights on every rank, as DDP keeps them
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    g = torch.Generator().manual_seed(50 + rank)
    ts = TrainState(Path(path), "fp", {"m": model}, {"o": opt}, generators={"g": g})
    if phase == "save":
        random.seed(10 + rank)
        np.random.seed(20 + rank)
        torch.manual_seed(30 + rank)  # per-rank streams (dropout, augmentation)
        ts.save(Progress(epoch=2, step=7))
        expected = _draws(g)
        torch.save(expected, Path(path).with_name(f"expected{rank}.pt"))
    else:
        prog = ts.resume()
        got = _draws(g)
        torch.save((prog.epoch, prog.step, got), Path(path).with_name(f"got{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_state_holds_every_ranks_rngs(tmp_path, caplog):
    import torch.multiprocessing as mp

    from tests.test_distributed import _free_port

    path = tmp_path / "state.pt"
    mp.spawn(_ddp_worker, args=(2, str(path), _free_port(), "save"), nprocs=2, join=True)
    mp.spawn(_ddp_worker, args=(2, str(path), _free_port(), "resume"), nprocs=2, join=True)
    expected = [torch.load(tmp_path / f"expected{r}.pt") for r in range(2)]
    got = [torch.load(tmp_path / f"got{r}.pt") for r in range(2)]
    assert expected[0] != expected[1]  # the ranks' streams differ...
    assert got == [(2, 7, expected[0]), (2, 7, expected[1])]  # ...and each gets its own back
    model = torch.nn.Linear(3, 2)
    with caplog.at_level(logging.INFO, logger="pipeline.trainstate"):
        prog = TrainState(path, "fp", {"m": model}, {"o": torch.optim.Adam(
            model.parameters())}).resume()
    assert prog.epoch == 0 and "made by 2 processes, this run has 1" in caplog.text


# -- under DVC: `dvc repro` after a kill resumes (the state is no out DVC would delete) -----------


def _dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=stage_env(),
                         capture_output=True, text=True)
    if check:
        assert res.returncode == 0, f"dvc {args}: {res.stdout[-3000:]}{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
def test_dvc_repro_after_sigkill_resumes_the_real_stage(project, tmp_path):
    """The repo's own train-extractor stage (dvc.yaml) in a git + DVC project: `dvc repro` is
    SIGKILLed (its whole process group) during training; a second `dvc repro` resumes and
    ends with the tensors of an uninterrupted `dvc repro`."""
    from ruamel.yaml import YAML

    root, params = project
    yaml = YAML()
    all_stages = yaml.load((REPO / "dvc.yaml").read_text())["stages"]
    # train-extractor and what makes its models/pretrained input (fetch-weights, offline here)
    stages = {k: all_stages[k] for k in ("fetch-weights", "train-extractor")}
    runs = {}
    for name in ("reference", "killed"):
        p = tmp_path / name
        shutil.copytree(root, p)
        shutil.copytree(REPO / "pipeline", p / "pipeline",
                        ignore=shutil.ignore_patterns("__pycache__"))
        _write_params(p, params, extractor={"epochs": 4, "batch_size": 2, "workers": 0})
        with open(p / "dvc.yaml", "w") as f:
            yaml.dump({"stages": stages}, f)
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "i"]):
            subprocess.run(cmd, cwd=p, check=True, capture_output=True)
        _dvc(p, "init", "-q")
        shutil.copy(REPO / ".dvcignore", p / ".dvcignore")
        runs[name] = p
    _dvc(runs["reference"], "repro")
    killed = runs["killed"]
    state = state_file(Paths(killed), "train-extractor")
    with open(killed / "dvc1.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=killed, env=stage_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not state.exists():
            assert proc.poll() is None, (killed / "dvc1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no training state"
            time.sleep(POLL_S)
        os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage it runs
        proc.wait(timeout=30)
    assert not (killed / "models" / "extractor.pt").exists()
    out = _dvc(killed, "repro")
    assert "resuming after epoch" in out.stdout + out.stderr
    a = _tensors(runs["reference"] / "models" / "extractor.pt")
    b = _tensors(killed / "models" / "extractor.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not state.exists()
    assert _dvc(killed, "status").stdout.strip().endswith("up to date.")


# -- the stages that share fit_segmenter: interrupted (in-process) and rerun ---------------------


def _run_seg_only(params: Params, paths: Paths) -> None:
    from pipeline.stages import train_seg_only
    from tests.test_baselines import TINY

    train_seg_only.run(params, paths, config=TINY.model_copy(update={"epochs": 4}))


def _run_frozen(params: Params, paths: Paths) -> None:
    from pipeline.stages import train_frozen

    train_frozen.run(params, paths)


@pytest.mark.parametrize("stage,run,ckpt,report", [
    ("train-seg-only", _run_seg_only, "seg_only.pt", "train_seg_only.csv"),
    ("train-frozen", _run_frozen, "frozen_unet.pt", "train_frozen.csv"),
])
def test_stage_interrupted_mid_training_resumes_bit_identical(project, tmp_path, monkeypatch,
                                                              stage, run, ckpt, report):
    root, params = project
    params = Params.model_validate({**params.model_dump(mode="json"),
                                    "unet": {**params.unet.model_dump(), "epochs": 4}})
    ref, killed = Paths(tmp_path / "ref"), Paths(tmp_path / "killed")
    shutil.copytree(root, ref.root)
    shutil.copytree(root, killed.root)
    run(params, ref)
    real = segment._segmenter_epoch

    def dying(*args, **kw):
        if args[4] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)
    monkeypatch.setattr(segment, "_segmenter_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        run(params, killed)
    monkeypatch.undo()
    state = state_file(killed, stage)
    assert torch.load(state, weights_only=True)["epoch"] == 2
    torch.manual_seed(99)
    run(params, killed)
    a, b = _tensors(ref.models / ckpt), _tensors(killed.models / ckpt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (ref.reports / report).read_bytes() == (killed.reports / report).read_bytes()
    assert not state.exists()
