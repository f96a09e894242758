"""dvc.yaml cannot drift from the code: every stage lists its command's import closure inside
pipeline/ in `deps:` and every params key its code reads in `params:` (pipeline/dvcdeps.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline import dvcdeps
from pipeline.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_lists_its_code_closure_and_params():
    reports = dvcdeps.check(ROOT)
    stages = dvcdeps.load_dvc_yaml(ROOT / "dvc.yaml")["stages"]
    # every dvc.yaml stage is a `python -m pipeline <stage>` command, so none escapes the check
    assert {r.stage for r in reports} == set(stages)
    bad = [r for r in reports if not r.ok]
    assert not bad, ("dvc.yaml misses what these stages' code reads; add to each stage:\n"
                     + dvcdeps.format_report(bad))


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))


FAKE = {
    "pipeline/__init__.py": "",
    "pipeline/cli.py": "STAGES = {}\n",
    "pipeline/stages/__init__.py": "",
    "pipeline/stages/tile.py": """
        from pipeline.a import helper
        from pipeline import c
        from . import sib

        def run(params):
            import pipeline.b  # an import inside a function counts too
            tp = params.tile          # the whole section, bound to a name
            params.section_hash("label")
            return helper(params), params.seed, c, sib, pipeline.b
        """,
    "pipeline/stages/sib.py": "",
    "pipeline/a.py": """
        from pipeline.d import thing

        def helper(params):
            return params.extractor.crop_px, thing

        def never_called(params):
            return params.unet.depth
        """,
    "pipeline/b.py": "",
    "pipeline/c.py": "",
    "pipeline/d.py": "thing = 1\n",
    "pipeline/unused.py": "",
}


def test_fake_stage_missing_deps_and_params_are_named(tmp_path):
    _write(tmp_path, FAKE)
    stage = {"cmd": "python -m pipeline tile",
             "deps": ["pipeline/stages/tile.py", "pipeline/a.py", "pipeline/unused.py"],
             "params": ["tile"]}
    r = dvcdeps.check_stage(tmp_path, "tile", stage)
    assert r.missing_deps == ["pipeline/__init__.py", "pipeline/b.py", "pipeline/c.py",
                              "pipeline/d.py", "pipeline/stages/__init__.py",
                              "pipeline/stages/sib.py"]
    assert r.unused_deps == ["pipeline/unused.py"]
    assert [m.split(" ")[0] for m in r.missing_params] == ["extractor.crop_px", "label", "seed"]
    assert "(pipeline/a.py:5)" in r.missing_params[0]  # where it is read
    # a folder dep covers its files; a declared section covers its keys
    stage = {"cmd": "python -m pipeline tile", "deps": ["pipeline/"],
             "params": ["tile", "extractor", "label", "seed"]}
    assert dvcdeps.check_stage(tmp_path, "tile", stage).ok
    # a key alone is not the whole section
    stage["params"] = ["tile.mpp", "extractor", "label", "seed"]
    assert dvcdeps.check_stage(tmp_path, "tile", stage).missing_params == [
        "tile (pipeline/stages/tile.py:8)"]


def test_an_import_added_to_the_real_tile_stage_without_a_dep_fails(tmp_path):
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    assert all(r.ok for r in dvcdeps.check(tmp_path))
    tile = tmp_path / "pipeline/stages/tile.py"
    tile.write_text(tile.read_text() + "\n\ndef _later():\n    from pipeline import vectorize\n"
                    "    return vectorize, params.e2e.chunk_size  # noqa: F821\n")
    reports = {r.stage: r for r in dvcdeps.check(tmp_path)}
    assert reports["tile"].missing_deps == ["pipeline/vectorize.py"]
    # the stage module counts as a whole (its code is the stage): the new read is charged
    assert [m.split(" ")[0] for m in reports["tile"].missing_params] == ["e2e.chunk_size"]
    assert not reports["tile"].ok
    assert all(r.ok for s, r in reports.items() if s not in {"tile", "evaluate"})
    r = subprocess.run([sys.executable, "-m", "pipeline.dvcdeps"], cwd=tmp_path,
                       capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1
    assert "tile (pipeline.stages.tile):" in r.stdout
    assert "add to deps:   pipeline/vectorize.py" in r.stdout
    assert "add to params: e2e.chunk_size (pipeline/stages/tile.py:" in r.stdout


def test_every_cli_stage_module_parses_and_resolves():
    for name, module in STAGES.items():
        assert dvcdeps.stage_module(f"python -m pipeline {name}") == f"pipeline.stages.{module}"
    assert dvcdeps.stage_module("python -m pipeline.table1 --out x") is None


def test_cached_outs_are_the_outputs_dvc_caches():
    outs = dvcdeps.cached_outs(ROOT)
    assert "data/tiles" in outs and "models/extractor.pt" in outs
    assert "reports/figures" in outs
    # cache: false outputs are git-tracked: never listed (make clean-outputs would delete them)
    assert "reports/tiles.csv" not in outs and "reports/metrics.json" not in outs
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert not [t for t in tracked for o in outs if t == o or t.startswith(o.rstrip("/") + "/")]
