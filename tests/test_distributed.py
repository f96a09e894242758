"""Data-parallel runs (pipeline/distributed.py): sharding, the sharded balanced sampler, and the
distributed steps of train-extractor and e2e-finetune against their single-process meaning.

- Pure checks of the sharding arithmetic (no processes).
- One 2-process gloo group (torch.multiprocessing.spawn) runs the stages' own step functions:
  `all_reduce_mean_grads` on known gradients; `train_extractor.train_step` under DDP with a
  half batch per rank vs one process on the whole batch (eval-mode model, so BatchNorm and
  dropout are deterministic; SGD, whose step is proportional to the gradient); and
  `e2e_finetune.e2e_step` with one slide per rank vs one process accumulating both slides'
  gradients and halving them, plus an empty step (rank 1 without a slide) vs a one-slide step.
- One real `torchrun --nproc_per_node=2 -m pipeline <stage>` run of train-extractor,
  extract-features and e2e-finetune on a tiny demo project built with the real stages.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pipeline import schema
from pipeline.augment import eval_transform
from pipeline.data import PatchDataset, collect_labelled, epoch_indices
from pipeline.distributed import ShardedBalancedSampler, padded_shard, shard
from pipeline.e2e import e2e_slide_step, tensor_chunk_source
from pipeline.featuremap import build_layouts
from pipeline.manifest import load_manifest
from pipeline.models import build_extractor, load_extractor, load_unet, save_checkpoint
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.unet import UNet

REPO = Path(__file__).resolve().parents[1]


# -- sharding arithmetic -----------------------------------------------------------------------
def test_shard_is_round_robin_and_covers_everything():
    ids = [f"s{i}" for i in range(7)]
    parts = [shard(ids, r, 3) for r in range(3)]
    assert parts == [["s0", "s3", "s6"], ["s1", "s4"], ["s2", "s5"]]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert shard(ids, 0, 1) == ids
    with pytest.raises(ValueError):
        shard(ids, 3, 3)


def test_padded_shard_wraps_to_equal_lengths():
    idx = np.array([10, 11, 12, 13, 14])
    parts = [padded_shard(idx, r, 3) for r in range(3)]
    # 5 -> padded to 6 with the first index repeated, then strided like DistributedSampler
    assert [p.tolist() for p in parts] == [[10, 13], [11, 14], [12, 10]]
    assert padded_shard(idx, 0, 1).tolist() == idx.tolist()
    # fewer items than ranks: wrap around more than once, every rank still gets one
    assert [padded_shard(np.array([7, 8]), r, 5).tolist() for r in range(5)] == [
        [7], [8], [7], [8], [7]]


def test_sharded_sampler_batches_union_to_the_single_process_batches():
    rng = np.random.default_rng(3)
    labels = rng.choice([0, 1, 1, -1], size=203).astype(np.int8)
    seed, epoch, world, batch = 5, 2, 4, 16  # global batch 16 = 4 per rank
    single = epoch_indices(labels, seed, epoch, balance=True)
    samplers = [ShardedBalancedSampler(labels, seed, True, r, world) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in samplers]
    n = len(single)
    assert all(len(p) == len(samplers[0]) == -(-n // world) for p in per_rank)
    b = batch // world
    n_full = n // batch  # the last global batch may hold wrap-around padding
    for k in range(n_full):
        union = sorted(sum((p[k * b:(k + 1) * b] for p in per_rank), []))
        assert union == sorted(single[k * batch:(k + 1) * batch].tolist())
    # every epoch index appears, and only the padding (the first few) repeats
    flat = sum(per_rank, [])
    assert sorted(set(flat)) == sorted(single.tolist())
    assert len(flat) - n == (-n) % world
    # world=1 is the single-process sampler
    one = ShardedBalancedSampler(labels, seed, True, 0, 1, epoch=epoch)
    assert list(one) == single.tolist()


def test_step_plan_gives_rank_r_positions_r_plus_k_world():
    from pipeline.stages.e2e_finetune import step_plan

    order = [4, 0, 3, 1, 2]
    plan = step_plan(order, 2)
    assert plan == [[4, 0], [3, 1], [2]]
    for r in range(2):
        assert [s[r] for s in plan if r < len(s)] == order[r::2]
    assert step_plan(order, 1) == [[k] for k in order]


def test_launcher_argv_relaunches_only_an_unlaunched_cli_call():
    from pipeline.distributed import launcher_argv

    argv = ["/x/pipeline/__main__.py", "extract-features", "--params", "p y.yaml"]
    env = {"PIPELINE_LAUNCHER": "torchrun --nproc_per_node=8 --rdzv_id='job 1'"}
    assert launcher_argv(env, argv) == [
        "torchrun", "--nproc_per_node=8", "--rdzv_id=job 1", "-m", "pipeline",
        "extract-features", "--params", "p y.yaml"]
    assert launcher_argv({}, argv) is None
    assert launcher_argv({"PIPELINE_LAUNCHER": "  "}, argv) is None
    # a rank started by the launcher must not launch again
    assert launcher_argv({**env, "RANK": "0", "WORLD_SIZE": "8"}, argv) is None


# -- the stages' step functions in a real 2-process gloo group --------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_slides(n_slides: int = 2):
    """Two tiny in-memory slides: 4 x 5 tile grids of 32 px patches, labels with nolabel."""
    g = torch.Generator().manual_seed(11)
    rows, cols = np.meshgrid(np.arange(4), np.arange(5), indexing="ij")
    grid = np.stack([rows.ravel(), cols.ravel()], 1)
    out = []
    for i in range(n_slides):
        pixels = torch.randn(len(grid), 3, 32, 32, generator=g)
        labels = np.random.default_rng(i).choice([0, 1, -1], size=len(grid)).astype(np.int8)
        layouts = build_layouts(grid, np.ones(len(grid)), 8, "centered", False, 2)
        out.append((pixels, labels, layouts))
    return out


def _e2e_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)
    return build_extractor("small_cnn", 4), UNet(in_channels=4, depth=2, width=4)


def _sgd(model: nn.Module, lr: float = 0.5) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)


def _jobs(slides, chunk_size: int):
    from pipeline.stages.e2e_finetune import SlideJob

    return [SlideJob(tensor_chunk_source(px, chunk_size), lay, lab, seed=100 + i)
            for i, (px, lab, lay) in enumerate(slides)]


def _rank_worker(rank: int, world: int, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), PIPELINE_DEVICE="cpu")
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.distributed import all_reduce_mean_grads, gather_objects, init_if_needed
    from pipeline.stages.e2e_finetune import e2e_step
    from pipeline.stages.train_extractor import train_step

    assert init_if_needed() == (rank, world, rank)
    res: dict = {}
    # 1. all_reduce_mean_grads on known gradients: a.grad = rank + 1 on every rank; b.grad only
    #    on rank 0; c never; then rank 1 contributes with weight 0.
    m = nn.ModuleDict({"a": nn.Linear(2, 1, bias=False), "b": nn.Linear(3, 1, bias=False),
                       "c": nn.Linear(1, 1, bias=False)})
    m["a"].weight.grad = torch.full((1, 2), float(rank + 1))
    if rank == 0:
        m["b"].weight.grad = torch.full((1, 3), 4.0)
    res["total"] = all_reduce_mean_grads(m)
    res["a"], res["b"] = m["a"].weight.grad.clone(), m["b"].weight.grad.clone()
    res["c_is_none"] = m["c"].weight.grad is None
    m["a"].weight.grad = torch.full((1, 2), float(rank + 1))
    res["total_w"] = all_reduce_mean_grads(m, weight=1.0 if rank == 0 else 0.0)
    res["a_w"] = m["a"].weight.grad.clone()
    res["gathered"] = gather_objects({f"slide{rank}": f"error {rank}"}, world)

    # 2. train-extractor step under DDP, half the global batch per rank (strided, as the
    #    sharded sampler gives it).
    torch.manual_seed(0)
    model = build_extractor("small_cnn", 4).eval()  # frozen BN stats, no dropout
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    net = DistributedDataParallel(model)
    s, c, n = train_step(net, _sgd(model), x[rank::world], y[rank::world], torch.device("cpu"),
                         amp=False)
    res["train_sums"] = (s, c, n)
    res["train_state"] = {k: v.clone() for k, v in model.state_dict().items()}

    # 3. e2e: step 1 = one slide per rank; step 2 = rank 1 has no slide (empty step).
    ext, unet = _e2e_models()
    unet.eval()
    opt_fe, opt_seg = _sgd(ext), _sgd(unet)
    jobs = _jobs(_tiny_slides(), chunk_size=8)
    out, n1 = e2e_step(ext, unet, opt_fe, opt_seg, jobs[rank], 8)
    res["e2e_loss"], res["e2e_n1"] = out["loss"], n1
    res["e2e_state1"] = {**{f"e.{k}": v.clone() for k, v in ext.state_dict().items()},
                         **{f"u.{k}": v.clone() for k, v in unet.state_dict().items()}}
    _, n2 = e2e_step(ext, unet, opt_fe, opt_seg, jobs[0] if rank == 0 else None, 8)
    res["e2e_n2"] = n2
    res["e2e_state2"] = {**{f"e.{k}": v.clone() for k, v in ext.state_dict().items()},
                         **{f"u.{k}": v.clone() for k, v in unet.state_dict().items()}}
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank_worker, args=(2, str(out), _free_port()), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_all_reduce_mean_grads_averages_known_gradients(two_ranks):
    for res in two_ranks:
        assert res["total"] == 2.0
        assert torch.equal(res["a"], torch.full((1, 2), 1.5))  # (1 + 2) / 2
        assert torch.equal(res["b"], torch.full((1, 3), 2.0))  # (4 + 0) / 2: absent = zeros
        assert res["c_is_none"]  # no rank had a gradient: stays None
        assert res["total_w"] == 1.0
        assert torch.equal(res["a_w"], torch.full((1, 2), 1.0))  # only rank 0's counts


def test_gather_objects_lists_every_rank_in_rank_order(two_ranks):
    from pipeline.distributed import gather_objects

    for res in two_ranks:
        assert res["gathered"] == [{"slide0": "error 0"}, {"slide1": "error 1"}]
    obj = {"slide0": "error"}
    assert gather_objects(obj, 1)[0] is obj  # a plain run: no collective, the object itself


def test_ddp_train_step_equals_single_process_step_on_the_whole_batch(two_ranks):
    torch.manual_seed(0)
    model = build_extractor("small_cnn", 4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    from pipeline.stages.train_extractor import train_step

    s, c, n = train_step(model, _sgd(model), x, y, torch.device("cpu"), amp=False)
    ref = model.state_dict()
    # the loss sums of the two halves add up to the whole batch's
    assert sum(r["train_sums"][0] for r in two_ranks) == pytest.approx(s, rel=1e-6)
    assert sum(r["train_sums"][1] for r in two_ranks) == c
    assert sum(r["train_sums"][2] for r in two_ranks) == n == 8
    for r in two_ranks:
        assert _max_diff(r["train_state"], ref) < 1e-6
    assert _max_diff(before, ref) > 1e-3  # the step moved the weights: the check can fail
    # negative control: a step on rank 0's half alone is a different step
    torch.manual_seed(0)
    half = build_extractor("small_cnn", 4).eval()
    train_step(half, _sgd(half), x[0::2], y[0::2], torch.device("cpu"), amp=False)
    assert _max_diff(half.state_dict(), ref) > 1e-4


def _state(ext: nn.Module, unet: nn.Module) -> dict:
    return {**{f"e.{k}": v.clone() for k, v in ext.state_dict().items()},
            **{f"u.{k}": v.clone() for k, v in unet.state_dict().items()}}


def test_e2e_step_with_one_slide_per_rank_equals_averaged_accumulation(two_ranks):
    slides = _tiny_slides()
    jobs = _jobs(slides, 8)
    ext, unet = _e2e_models()
    unet.eval()
    start = _state(ext, unet)
    # reference: one process, both slides' gradients accumulated, then halved; one SGD step
    losses = []
    for job in jobs:
        out = e2e_slide_step(ext, unet, job.chunks, job.layouts, job.labels, 8, seed=job.seed)
        losses.append(out["loss"])
        assert out["n_labelled"] > 0
    for p in list(ext.parameters()) + list(unet.parameters()):
        if p.grad is not None:
            p.grad /= 2
    _sgd(ext).step()
    _sgd(unet).step()
    ref1 = _state(ext, unet)
    assert [r["e2e_loss"] for r in two_ranks] == pytest.approx(losses, rel=1e-6)
    for r in two_ranks:
        assert r["e2e_n1"] == 2.0
        assert _max_diff(r["e2e_state1"], ref1) < 1e-6
    assert _max_diff(start, ref1) > 1e-3
    # the extractor head gets no gradient in e2e: unchanged on every rank
    assert torch.equal(two_ranks[1]["e2e_state1"]["e.head.weight"], start["e.head.weight"])
    # step 2: rank 1 had no slide -> the step is slide 0's gradient alone (mean over 1)
    for p in list(ext.parameters()) + list(unet.parameters()):
        p.grad = None
    e2e_slide_step(ext, unet, jobs[0].chunks, jobs[0].layouts, jobs[0].labels, 8,
                   seed=jobs[0].seed)
    _sgd(ext).step()
    _sgd(unet).step()
    ref2 = _state(ext, unet)
    for r in two_ranks:
        assert r["e2e_n2"] == 1.0
        assert _max_diff(r["e2e_state2"], ref2) < 1e-6
    assert _max_diff(ref1, ref2) > 1e-4


# -- real torchrun runs of the stages ----------------------------------------------------------
def _params(root: Path) -> Params:
    raw = Params().model_dump(mode="json")
    raw["demo"].update(n_patients=3, slides_per_patient=2, slide_mm=1.5,
                       split_patients=[1, 1, 1])
    raw["data"]["manifest"] = str(root / "data" / "demo" / "manifest.csv")
    raw["tile"].update(size_px=64, workers=1)
    raw["extractor"].update(arch="small_cnn", feature_dim=4, crop_px=64, epochs=1,
                            batch_size=32, workers=0, lr=1e-3)
    raw["featuremap"].update(size=32)
    raw["unet"].update(depth=2, width=4)
    raw["e2e"].update(epochs=1, chunk_size=64, lr_fe=1e-3, lr_seg=1e-3)
    return Params.model_validate(raw)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, Params]:
    """A tiny demo project (6 slides: 2 train, 2 val, 2 test) tiled and labelled by the real
    stages; params.yaml written as JSON (valid YAML 1.2)."""
    from pipeline.stages import demo_data, label, tile

    root = tmp_path_factory.mktemp("dist_project")
    params = _params(root)
    paths = Paths(root)
    demo_data.run(params, paths)
    tile.run(params, paths, workers=1)
    label.run(params, paths, workers=1)
    (root / "params.yaml").write_text(json.dumps(params.model_dump(mode="json")))
    return root, params


def _torchrun(root: Path, stage: str, via_env: bool = False) -> str:
    """Run `torchrun --nproc_per_node=2 -m pipeline <stage>` in `root` (CPU, gloo); via_env:
    run plain `python -m pipeline <stage>` with PIPELINE_LAUNCHER set instead (the DVC way)."""
    env = {**os.environ, "PIPELINE_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PIPELINE_LAUNCHER"):
        env.pop(k, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                "--nproc_per_node=2", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{_free_port()}"]
    args = ["-m", "pipeline", stage, "--params", "params.yaml"]
    if via_env:
        env["PIPELINE_LAUNCHER"] = " ".join(launcher)
        cmd = [sys.executable, *args]
    else:
        cmd = launcher + args
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"{stage} failed:\n{r.stderr[-4000:]}"
    assert "[rank 1/2]" in r.stderr  # both ranks ran (log lines carry the rank)
    return r.stderr


def _read(path: Path, *names: str) -> list[np.ndarray]:
    with h5py.File(path, "r") as f:
        return [np.asarray(f[n][...]) for n in names]


@torch.no_grad()
def _val_loss(model: nn.Module, params: Params, paths: Paths) -> tuple[float, int]:
    """Mean CE of `model` over every labelled val patch, in one process, in plain batches."""
    items = collect_labelled(load_manifest(params.data.manifest), paths, "val")
    ds = PatchDataset(items, transform=eval_transform(params.extractor.crop_px))
    model.eval()
    total, n = 0.0, 0
    for a in range(0, len(ds), 64):
        xs, ys, _ = zip(*(ds[j] for j in range(a, min(a + 64, len(ds)))), strict=True)
        logits = model(torch.stack(xs))
        total += float(nn.functional.cross_entropy(logits, torch.tensor(ys), reduction="sum"))
        n += len(ys)
    return total / n, n


@pytest.mark.slow
def test_torchrun_two_processes_run_the_stages(project):
    from pipeline.e2e import e2e_slide_step as slide_step
    from pipeline.extraction import extract_all
    from pipeline.stages.e2e_finetune import loader_chunks, pixel_fn, step_seed

    root, params = project
    paths = Paths(root)
    sids = list(load_manifest(params.data.manifest)["slide_id"])

    # train-extractor: rank 0 writes once; the all-reduced val loss is the val loss of the
    # saved model computed here in one process, over every val patch exactly once.
    _torchrun(root, "train-extractor")
    metrics = json.loads((paths.reports / "train_extractor.json").read_text())
    assert metrics["world_size"] == 2 and metrics["best_epoch"] == 0
    assert len((paths.reports / "train_extractor.csv").read_text().splitlines()) == 2
    model, meta = load_extractor(paths.models / "extractor.pt")
    val_loss, n_val = _val_loss(model, params, paths)
    assert n_val == metrics["n_val_patches"] > 0
    assert metrics["val_loss"] == pytest.approx(val_loss, rel=1e-5)

    # extract-features, launched the DVC way (PIPELINE_LAUNCHER): each rank writes its slides;
    # same features as one process.
    log = _torchrun(root, "extract-features", via_env=True)
    assert "re-launching as" in log
    extract_all(params, paths, paths.models / "extractor.pt", variant="ref")
    for sid in sids:
        f2, p2, c2, l2 = _read(paths.feature_file(sid), schema.FEATURES, schema.TUMOR_PROB,
                               schema.COORDS, schema.LABEL)
        f1, p1, c1, l1 = _read(paths.feature_file(sid, "ref"), schema.FEATURES,
                               schema.TUMOR_PROB, schema.COORDS, schema.LABEL)
        assert len(f1) > 50
        np.testing.assert_allclose(f2, f1, rtol=0, atol=1e-6)
        np.testing.assert_allclose(p2, p1, rtol=0, atol=1e-6)
        assert np.array_equal(c2, c1) and np.array_equal(l2, l1)

    # e2e-finetune: 2 train slides = one step of two slides; compare with one process that
    # accumulates both slides' gradients, halves them and takes one Adam step.
    torch.manual_seed(0)
    save_checkpoint(paths.models / "unet.pt", UNet(in_channels=4, depth=2, width=4))
    _torchrun(root, "e2e-finetune")
    e2e_metrics = json.loads((paths.reports / "e2e.json").read_text())
    assert e2e_metrics["world_size"] == 2 and e2e_metrics["n_train_slides"] == 2
    for sid in sids:  # post-training extraction and predictions cover every slide
        assert paths.feature_file(sid, "e2e").is_file()
        assert paths.prediction_file("e2e", sid).is_file()
    ext, _ = load_extractor(paths.models / "extractor.pt")
    unet, _ = load_unet(paths.models / "unet.pt")
    unet.eval()
    start = _state(ext, unet)
    manifest = load_manifest(params.data.manifest)
    train_ids = list(manifest.loc[manifest["split"] == "train", "slide_id"])
    from pipeline.segment import load_slide_maps

    p = params.e2e
    for k, sid in enumerate(train_ids):
        m = load_slide_maps(paths.feature_file(sid), sid, params)
        chunks = loader_chunks(paths.tile_file(sid), p.chunk_size, 0, None)
        slide_step(ext, unet, chunks, m.layouts, m.labels, p.chunk_size,
                   seed=step_seed(params.seed, 0, k),
                   augment=pixel_fn(params.extractor.crop_px, p.augment))
    for q in list(ext.parameters()) + list(unet.parameters()):
        if q.grad is not None:
            q.grad /= len(train_ids)
    torch.optim.Adam(ext.parameters(), lr=p.lr_fe).step()
    torch.optim.Adam(unet.parameters(), lr=p.lr_seg).step()
    ref = _state(ext, unet)
    got = _state(load_extractor(paths.models / "e2e_extractor.pt")[0],
                 load_unet(paths.models / "e2e_unet.pt")[0])
    assert _max_diff(got, ref) < 1e-6
    assert _max_diff(start, ref) > 1e-4
