"""Kill-and-resume of the per-slide runner (pipeline/runner.py, which tile, label,
extract-features and predict share): a stage killed with SIGKILL mid-run and rerun leaves the
slides it finished untouched (same bytes, same mtime), completes the others, and ends with
exactly the outputs of an uninterrupted run; temp files a killed writer leaves are never read
as outputs and are removed by the rerun.

Resuming rests on what the runner's stages share: every output written by pipeline/io.py's
atomic helpers and stamped with a params hash, and the stage's "is current" check before the
runner is handed the slides to do. It is exercised through tile (several outputs per slide,
slide fingerprints) and label (a content hash of its inputs).

The killed run is the real CLI (`python -m pipeline <stage>` in a temp project, tile.workers: 1
so slides finish one at a time); the rerun goes through the stage's run() in-process (the same
code, without a second ~5 s interpreter start). HDF5 files here are byte-reproducible (h5py does
not store creation times unless asked: track_times is off), so finished-set equality is checked
on bytes and, for a readable failure message, on datasets and attrs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.annotations import write_asap_xml
from pipeline.params import load_params
from pipeline.paths import Paths
from pipeline.stages import label as label_stage
from pipeline.stages import tile as tile_stage
from pipeline.tiff import write_pyramidal_tiff
from tests.conftest import sigkill_when

REPO = Path(__file__).resolve().parents[1]
N_SLIDES = 5
SIDE_PX = 1024  # 0.5 um/px slides: an 8 x 8 grid of 128 px tiles
TISSUE_RGB = (215, 120, 185)
GLASS_RGB = (242, 242, 240)
# mask_mpp = the slide's mpp: the tissue mask is computed on the full-resolution image, which
# makes each slide take a noticeable fraction of a second, so the kill lands between slides.
PARAMS_YAML = """\
data:
  manifest: manifest.csv
tile:
  size_px: 128
  mpp: 0.5
  mask_mpp: 0.5
  min_tissue: 0.5
  min_object_um2: 2000.0
  max_hole_um2: 1000.0
  workers: 1
label:
  raster_subsample: 1
"""
KILL_AFTER = 2  # SIGKILL once this many slides are finished
POLL_S = 0.01
START_TIMEOUT_S = 120.0


def _slide_rgb(k: int) -> np.ndarray:
    """Slide k: 2-3 tissue rectangles at seeded positions (every slide different)."""
    rng = np.random.default_rng(100 + k)
    img = np.empty((SIDE_PX, SIDE_PX, 3), np.int16)
    img[:] = GLASS_RGB
    for _ in range(2 + k % 2):
        x0, y0 = rng.integers(0, SIDE_PX - 400, size=2)
        w, h = rng.integers(200, 400, size=2)
        img[y0:y0 + h, x0:x0 + w] = TISSUE_RGB
    img += rng.integers(-4, 5, size=img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _annotation(k: int) -> list[np.ndarray]:
    """A many-vertex tumor polygon (rasterising it is what makes labelling take a moment)."""
    t = np.linspace(0, 2 * np.pi, 300, endpoint=False)
    r = 200 + 40 * np.sin(7 * t + k)
    c = 340 + 60 * k
    return [np.stack([c + r * np.cos(t), c + r * np.sin(t)], axis=1)]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """Slides, annotations and manifest shared by every project of this module."""
    base = tmp_path_factory.mktemp("resume_inputs")
    (base / "slides").mkdir()
    (base / "annotations").mkdir()
    lines = ["slide_id,slide_path,annotation_path,split"]
    for k in range(N_SLIDES):
        slide = base / "slides" / f"s{k}.tiff"
        write_pyramidal_tiff(slide, _slide_rgb(k), mpp=0.5, n_levels=3)
        ann = base / "annotations" / f"s{k}.xml"
        write_asap_xml(ann, _annotation(k))
        lines.append(f"s{k},{slide},{ann},train")
    (base / "manifest.csv").write_text("\n".join(lines) + "\n")
    return base


def _project(root: Path, slides: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.csv").write_text((slides / "manifest.csv").read_text())
    (root / "params.yaml").write_text(PARAMS_YAML)
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slides) -> Path:
    """An uninterrupted tile + label run (in-process) over the same slides."""
    root = _project(tmp_path_factory.mktemp("resume_reference"), slides)
    params = load_params(root / "params.yaml")
    paths = Paths(root=root)
    assert tile_stage.run(params, paths)["n_tiled"] == N_SLIDES
    assert label_stage.run(params, paths)["n_labelled"] == N_SLIDES
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _h5_content(path: Path) -> dict:
    """Every dataset and attr of an HDF5 file, as plain Python values."""
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: _plain(v) for k, v in f.attrs.items()}
        for name, ds in f.items():
            out[name] = (str(ds.dtype), ds[...].tolist())
    return out


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and np.isnan(v):
        return "nan"
    return v


def _kill_when_finished(cmd: list[str], cwd: Path, finished) -> list[str]:
    """Start `cmd`, SIGKILL it as soon as `finished()` lists >= KILL_AFTER slides; returns
    them. Fails if the process ends on its own before (nothing would be tested)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        sigkill_when(proc, lambda: len(finished()) >= KILL_AFTER, " ".join(cmd),
                     START_TIMEOUT_S, lambda: proc.stdout.read().decode(errors="replace"),
                     POLL_S)
    finally:
        proc.stdout.close()
    return finished()


def _temps(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.tmp"))


def _check_resume(project: Path, reference: Path, outputs, stage, cmd: list[str]) -> None:
    """Kill `cmd` after KILL_AFTER slides, rerun `stage.run` in-process, compare with the
    reference. `outputs(paths, sid)` lists the final output files of one slide."""
    paths, ref_paths = Paths(root=project), Paths(root=reference)
    ids = [f"s{k}" for k in range(N_SLIDES)]

    def finished() -> list[str]:  # a slide is finished when all of its outputs exist
        return [s for s in ids if all(p.is_file() for p in outputs(paths, s))]

    done = _kill_when_finished(cmd, project, finished)
    assert KILL_AFTER <= len(done) < N_SLIDES, f"kill landed too late: {done} finished"
    before = {p: (_sha(p), p.stat().st_mtime_ns) for s in done for p in outputs(paths, s)}
    # whatever was on disk at the kill: every final-named output is complete and readable
    for p in paths.root.rglob("*.h5"):
        _h5_content(p)

    # a temp file as a killed writer leaves it (half an HDF5 file), for a slide not yet done
    todo = [s for s in ids if s not in done]
    planted = outputs(paths, todo[-1])[0]
    stale = planted.parent / f".{planted.name}.abcd1234.tmp"
    stale.write_bytes(outputs(ref_paths, todo[-1])[0].read_bytes()[:1000])
    unrelated = planted.parent / ".notes.txt.tmp"  # not an atomic-writer temp: left alone
    unrelated.write_text("keep")

    summary = stage.run(load_params(project / "params.yaml"), paths)
    assert summary["n_current"] == len(done) and summary["n_failed"] == 0
    after = {p: (_sha(p), p.stat().st_mtime_ns) for p in before}
    assert after == before  # finished-before-kill outputs: untouched, byte for byte
    assert _temps(project) == [unrelated]
    for s in ids:  # the full set equals the uninterrupted run's
        for mine, ref in zip(outputs(paths, s), outputs(ref_paths, s), strict=True):
            if mine.suffix == ".h5":
                assert _h5_content(mine) == _h5_content(ref), mine
            assert _sha(mine) == _sha(ref), mine


def _tile_outputs(paths: Paths, sid: str) -> list[Path]:
    return [paths.tile_file(sid), paths.reports / "tiles" / f"{sid}.png"]


def _label_outputs(paths: Paths, sid: str) -> list[Path]:
    return [paths.label_file(sid)]


def test_tile_killed_with_sigkill_resumes_to_identical_outputs(tmp_path, slides, reference):
    project = _project(tmp_path / "proj", slides)
    _check_resume(project, reference, _tile_outputs, tile_stage,
                  [sys.executable, "-m", "pipeline", "tile", "--params", "params.yaml"])


def test_label_killed_with_sigkill_resumes_to_identical_outputs(tmp_path, slides, reference):
    project = _project(tmp_path / "proj", slides)
    (project / "data").mkdir()
    # the tile stage's outputs, as an uninterrupted run left them
    src = Paths(root=reference).tiles
    (project / "data" / "tiles").mkdir()
    for f in src.glob("*.h5"):
        (project / "data" / "tiles" / f.name).write_bytes(f.read_bytes())
    _check_resume(project, reference, _label_outputs, label_stage,
                  [sys.executable, "-m", "pipeline", "label", "--params", "params.yaml"])


def test_atomic_outputs_get_umask_permissions_not_0600(tmp_path):
    import os

    from pipeline.io import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "x.txt", "hi")
    finally:
        os.umask(old)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o644
