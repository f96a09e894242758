"""e2e-finetune resumes after SIGKILL: a CPU `python -m pipeline e2e-finetune` killed in the
middle of an epoch and rerun ends with exactly (bit for bit) the weights, curves and metrics of
an uninterrupted run; a rerun under other params starts from scratch and says why.

The tiny project (8 demo slides, 4 for training) is built once by the real demo-data, tile and
label stages; the starting extractor and U-Net are random checkpoints, their features written
by extract_all. Every run is the real CLI in a fresh process, with one torch thread.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.models import build_extractor, save_checkpoint
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.stages.extract_features import extract_all
from pipeline.trainstate import state_file
from pipeline.unet import UNet
from tests.conftest import sigkill_when, stage_env

REPO = Path(__file__).resolve().parents[1]
STAGE = "e2e-finetune"
TIMEOUT_S = 300
POLL_S = 0.005


def _params(root: Path) -> Params:
    raw = Params().model_dump(mode="json")
    raw["demo"].update(n_patients=4, slides_per_patient=2, slide_mm=1.5,
                       split_patients=[2, 1, 1])
    raw["data"]["manifest"] = str(root / "data" / "demo" / "manifest.csv")
    raw["tile"].update(size_px=64, workers=1)
    raw["extractor"].update(arch="small_cnn", feature_dim=4, crop_px=64, workers=0)
    raw["unet"].update(depth=2, width=8)
    # a visible learning rate (every weight moves), a state file after every slide
    raw["e2e"].update(epochs=2, chunk_size=64, lr_fe=1e-3, lr_seg=1e-3, state_every_slides=1)
    return Params.model_validate(raw)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from pipeline.stages import demo_data, label, tile

    root = tmp_path_factory.mktemp("e2e_resume")
    params = _params(root)
    paths = Paths(root)
    demo_data.run(params, paths)
    tile.run(params, paths, workers=1)
    label.run(params, paths, workers=1)
    torch.manual_seed(0)
    save_checkpoint(paths.models / "extractor.pt", build_extractor("small_cnn", 4),
                    {"params_json": params.section_json("seed", "extractor", "tile")})
    torch.manual_seed(1)  # a U-Net whose ReLUs pass a gradient to the features (width 4 did not)
    save_checkpoint(paths.models / "unet.pt", UNet(in_channels=4, depth=2, width=8))
    extract_all(params, paths, paths.models / "extractor.pt")
    (root / "params.yaml").write_text(json.dumps(params.model_dump(mode="json")))
    return root


def _copy(project: Path, dest: Path) -> Path:
    shutil.copytree(project, dest)
    return dest


CMD = [sys.executable, "-m", "pipeline", STAGE, "--params", "params.yaml"]


def _run(root: Path) -> str:
    r = subprocess.run(CMD, cwd=root, env=stage_env(), capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    assert r.returncode == 0, f"{STAGE} failed:\n{r.stderr[-4000:]}"
    return r.stderr


def _kill_mid_epoch(root: Path) -> dict:
    """Start the stage, SIGKILL it as soon as its first training state exists (written after
    the first slide); returns that state. Fails if the run ends first."""
    state = state_file(Paths(root), STAGE)
    proc = subprocess.Popen(CMD, cwd=root, env=stage_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        sigkill_when(proc, state.is_file, STAGE, TIMEOUT_S,
                     lambda: proc.stderr.read().decode(errors="replace"))
    finally:
        proc.stderr.close()
    return torch.load(state, map_location="cpu", weights_only=True)


def _weights(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("e2e_extractor.pt", "e2e_unet.pt"):
        ckpt = torch.load(root / "models" / name, map_location="cpu", weights_only=True)
        out.update({f"{name}:{k}": v for k, v in ckpt["state_dict"].items()})
    return out


def _results(root: Path) -> tuple[dict, str, dict]:
    reports = root / "reports"
    return (_weights(root), (reports / "e2e.csv").read_text(),
            json.loads((reports / "e2e.json").read_text()))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_is_bit_identical(project, tmp_path):
    ref = _copy(project, tmp_path / "reference")
    _run(ref)
    assert not state_file(Paths(ref), STAGE).exists()  # a finished stage leaves no state
    want_w, want_csv, want_metrics = _results(ref)
    assert want_metrics["fe_moved_fraction"] > 0.5 and want_metrics["seg_rel_l2"] > 0

    killed = _copy(project, tmp_path / "killed")
    state = _kill_mid_epoch(killed)
    # the kill landed inside an epoch, after a mid-epoch save (slide order and position)
    assert state["epoch"] < 2 and "order" in state["extra"], state["extra"].keys()
    assert 0 < state["extra"]["next_step"] < 4
    other = _copy(killed, tmp_path / "other_params")  # the killed state, for the last check
    log = _run(killed)
    assert f"resuming e2e epoch {state['epoch']} at step {state['extra']['next_step']} of 4" in log
    got_w, got_csv, got_metrics = _results(killed)
    assert got_w.keys() == want_w.keys()
    for k, v in want_w.items():
        assert torch.equal(got_w[k], v), k
    assert got_csv == want_csv and got_metrics == want_metrics

    # other params: the saved state is not used, and the log says why
    params = json.loads((other / "params.yaml").read_text())
    params["e2e"]["lr_fe"] = 2e-3
    (other / "params.yaml").write_text(json.dumps(params))
    log = _run(other)
    assert "different params or inputs" in log and "starting from epoch 0" in log
    assert "resuming" not in log
    assert not torch.equal(_weights(other)["e2e_extractor.pt:feature.weight"],
                           want_w["e2e_extractor.pt:feature.weight"])


def test_select_best_val_keeps_the_epoch_with_the_lowest_val_loss(project, tmp_path):
    """select=best_val: the val slide loss is computed after every epoch (csv), the written
    checkpoints are the selected epoch's (their val loss, recomputed here, is the minimum)."""
    from pipeline.e2e_train import val_slide_loss
    from pipeline.manifest import load_manifest
    from pipeline.models import load_extractor, load_unet
    from pipeline.params import load_params
    from pipeline.segment import load_slide_maps
    from pipeline.stages.e2e_finetune import loader_chunks, pixel_fn
    from pipeline.stages.e2e_finetune import run as e2e_run

    root = _copy(project, tmp_path / "best_val")
    raw = json.loads((root / "params.yaml").read_text())
    raw["e2e"].update(select="best_val", epochs=3, lr_fe=3e-3, lr_seg=3e-3)
    (root / "params.yaml").write_text(json.dumps(raw))
    params = load_params(root / "params.yaml")
    paths = Paths(root)
    metrics = e2e_run(params, paths)
    rows = [line.split(",") for line in (root / "reports/e2e.csv").read_text().splitlines()]
    assert rows[0][:3] == ["epoch", "train_loss", "val_loss"]
    val = [float(r[2]) for r in rows[1:]]
    assert len(val) == 3 and len(set(val)) == 3  # the weights changed between epochs
    assert metrics["selected_epoch"] == min(range(3), key=val.__getitem__)
    assert metrics["val_loss"] == pytest.approx(min(val), abs=1e-6)

    fe, _ = load_extractor(paths.models / "e2e_extractor.pt")
    unet, _ = load_unet(paths.models / "e2e_unet.pt")
    manifest = load_manifest(params.data.manifest)
    losses = []
    for sid in manifest.loc[manifest["split"] == "val", "slide_id"]:
        m = load_slide_maps(paths.feature_file(sid), sid, params)
        loss, n = val_slide_loss(fe, unet, loader_chunks(paths.tile_file(sid), 64, 0, None),
                                 m.layouts, m.labels, pixel_fn(params.extractor.crop_px, False))
        if n:
            losses.append(loss)
    assert sum(losses) / len(losses) == pytest.approx(min(val), rel=1e-5)
