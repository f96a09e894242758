"""`make clean` removes only regenerable working files; `make clean-outputs` removes the
workspace copies of DVC-cached outputs, which `dvc checkout` restores."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make not installed")


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return [p for p in out.splitlines() if (ROOT / p).is_file()]


def _rm_targets(recipe: str) -> list[str]:
    targets = []
    for line in recipe.splitlines():
        words = line.split()
        if words[:1] == ["rm"]:
            targets += [w for w in words[1:] if not w.startswith("-")]
    return targets


def test_make_n_clean_names_no_tracked_file_and_no_dvc_cache():
    recipe = subprocess.run([MAKE, "-n", "clean"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    tracked = _tracked()
    targets = _rm_targets(recipe)
    assert targets, recipe
    for t in targets:
        assert not (t.startswith(".dvc") or t in {"data", "models", "reports", "."}), t
        for hit in glob.glob(str(ROOT / t)) + [str(ROOT / t)]:
            rel = os.path.relpath(hit, ROOT)
            assert not any(p == rel or p.startswith(rel.rstrip("/") + "/") for p in tracked), \
                f"`make clean` would delete git-tracked {rel}"
    # the only other command: find ... -name __pycache__ ... -exec rm
    for line in recipe.splitlines():
        if "find" in line.split()[:1]:
            assert "__pycache__" in recipe and "-prune" in line


def test_make_clean_keeps_results_and_removes_caches(tmp_path):
    tracked = _tracked()
    for rel in tracked:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp_path / rel)
    keep = [".dvc/cache/files/md5/ab/cdef0123", "data/tiles/s1.h5", "models/extractor.pt",
            "data/camelyon16/slide.tif", "reports/figures/map.png", ".venv/lib/x/__pycache__/a.pyc"]
    gone = ["pipeline/__pycache__/slide.cpython-311.pyc", "tests/__pycache__/t.pyc",
            ".pytest_cache/v/cache/lastfailed", ".ruff_cache/0.1/x", "reports/timings/tile.json",
            "reports/exp_show.json"]
    for rel in keep + gone:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    subprocess.run([MAKE, "clean"], cwd=tmp_path, check=True, capture_output=True)
    for rel in tracked + keep:
        assert (tmp_path / rel).is_file(), f"make clean deleted {rel}"
    for rel in gone:
        assert not (tmp_path / rel).exists(), f"make clean left {rel}"
    assert not (tmp_path / "pipeline/__pycache__").exists()


def _dvc(cwd: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_clean_outputs_then_dvc_checkout_restores_every_output(tmp_path):
    pytest.importorskip("dvc")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  make:\n"
        "    cmd: python -c \"import os; os.makedirs('data/out', exist_ok=True); "
        "os.makedirs('models', exist_ok=True); os.makedirs('reports', exist_ok=True); "
        "open('data/out/a.txt','w').write('tiles'); open('models/m.pt','w').write('w'); "
        "open('reports/m.json','w').write('{}')\"\n"
        "    outs:\n"
        "      - data/out:\n"
        "          persist: true\n"
        "      - models/m.pt\n"
        "    metrics:\n"
        "      - reports/m.json:\n"
        "          cache: false\n")
    (tmp_path / "data/slides").mkdir(parents=True)
    (tmp_path / "data/slides/own.tif").write_text("a user's slide")
    _dvc(tmp_path, "init", "--no-scm", "-q")
    _dvc(tmp_path, "repro", "-q")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([MAKE, "-f", str(ROOT / "Makefile"), f"PY={sys.executable}",
                        "clean-outputs"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       check=True)
    assert "data/out models/m.pt" in r.stdout and "dvc checkout" in r.stdout
    assert not (tmp_path / "data/out").exists() and not (tmp_path / "models/m.pt").exists()
    assert (tmp_path / "data/slides/own.tif").is_file()  # not an output: kept
    assert (tmp_path / "reports/m.json").is_file()  # cache: false (git carries it): kept
    assert any((tmp_path / ".dvc/cache").rglob("*"))
    _dvc(tmp_path, "checkout", "-q")
    assert (tmp_path / "data/out/a.txt").read_text() == "tiles"
    assert (tmp_path / "models/m.pt").read_text() == "w"
    assert "up to date" in _dvc(tmp_path, "status").lower()
