"""`dvc repro` of the real dvc.yaml on a tiny demo set, in a throwaway git+DVC project.

Proves the stage commands, deps/outs/params declarations and the `dvc exp run -S` float path
work together: the chain runs, a second repro does nothing, and an experiment that changes
e2e.lr_fe re-runs only the stages that read it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.params import load_params

ROOT = Path(__file__).resolve().parents[1]

# A tiny set: 3 patients x 2 slides of 2 mm, one epoch of everything.
TINY = {
    "demo": {"n_patients": 3, "slides_per_patient": 2, "slide_mm": 2.5,
             "split_patients": [1, 1, 1]},
    "tile": {"workers": 1},
    "extractor": {"epochs": 1, "batch_size": 16, "workers": 0, "crop_px": 192},
    "featuremap": {"size": 16},
    "unet": {"depth": 2, "width": 8, "epochs": 3, "batch_size": 4},
    "e2e": {"epochs": 1, "chunk_size": 16},
    "seg_only": {"epochs": 2, "depth": 3},
}


def _tiny_params_text() -> str:
    """The repo's params.yaml with the TINY values substituted in place (keeps the comments and
    layout, like a user editing the file)."""
    lines = (ROOT / "params.yaml").read_text().splitlines()
    section = None
    out = []
    replaced_list = False
    for line in lines:
        if replaced_list and line.startswith("  - "):
            continue  # items of a block-style list we replaced by a flow-style one
        replaced_list = False
        m_sec = re.match(r"^([a-z_0-9]+):\s*(#.*)?$", line)
        if m_sec:
            section = m_sec.group(1)
        m_key = re.match(r"^  ([a-z_0-9]+):(\s*)([^#]*?)(\s*#.*)?$", line)
        if m_key and section in TINY and m_key.group(1) in TINY[section]:
            val = TINY[section][m_key.group(1)]
            line = f"  {m_key.group(1)}: {json.dumps(val)}{m_key.group(4) or ''}"
            replaced_list = m_key.group(3) == ""
        out.append(line)
    return "\n".join(out) + "\n"


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    proj = tmp_path_factory.mktemp("proj")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, proj / name)
    shutil.copytree(ROOT / "pipeline", proj / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (proj / "params.yaml").write_text(_tiny_params_text())
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", DVC_NO_ANALYTICS="1", PIPELINE_DEVICE="cpu")
    _run(["git", "init", "-q"], proj, env)
    _run(["dvc", "init", "-q"], proj, env)
    _run(["dvc", "config", "core.autostage", "true"], proj, env)
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "commit", "-qm", "tiny"], proj, env)
    return proj, env


def _stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.mark.slow
def test_dvc_repro_chain_then_noop(project):
    proj, env = project
    p = load_params(proj / "params.yaml")
    assert p.demo.n_patients == 3 and p.unet.depth == 2  # the tiny params were applied
    out = _run(["dvc", "repro"], proj, env)
    ran = _stages_run(out)
    for stage in ("demo-data", "tile", "label", "train-extractor", "extract-features",
                  "train-unet", "e2e-finetune", "train-seg-only", "train-frozen", "evaluate"):
        assert stage in ran, out
    for sub in ("data/tiles", "data/labels", "data/features", "data/features_e2e",
                "data/predictions/separate", "data/predictions/e2e",
                "data/predictions/seg_only", "data/predictions/frozen"):
        assert len(list((proj / sub).glob("*.h5"))) == 6, sub
    assert (proj / "models" / "unet.pt").is_file()
    metrics = json.loads((proj / "reports" / "train_unet.json").read_text())
    assert metrics["tiles_off_canvas"] == 0
    report = json.loads((proj / "reports" / "metrics.json").read_text())
    for method in ("classifier", "separate", "e2e", "seg_only", "frozen"):
        assert 0 <= report["patch"][method]["accuracy"] <= 1, method
    assert (proj / "reports" / "index.html").is_file()
    # nothing changed -> nothing re-runs
    again = _run(["dvc", "repro"], proj, env)
    assert _stages_run(again) == [], again


@pytest.mark.slow
def test_changing_one_param_reruns_only_its_stages(project):
    proj, env = project
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "commit", "-qm", "after repro", "--allow-empty"], proj, env)
    text = (proj / "params.yaml").read_text()
    (proj / "params.yaml").write_text(text.replace("lr: 1.0e-4                 # Adam learning "
                                                   "rate (paper: 1e-4)\n  augment",
                                                   "lr: 2.0e-4                 # changed\n  "
                                                   "augment"))
    out = _run(["dvc", "status"], proj, env)
    changed = set(re.findall(r"^([a-z0-9-]+):\s*$", out, flags=re.M))
    assert "train-unet" in changed, out
    assert not changed & {"demo-data", "tile", "label", "train-extractor", "extract-features"}
    (proj / "params.yaml").write_text(text)


@pytest.mark.slow
def test_dvc_exp_run_set_float_reruns_only_e2e_and_downstream(project):
    proj, env = project
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "commit", "-qm", "baseline", "--allow-empty"], proj, env)
    out = _run(["dvc", "exp", "run", "-S", "e2e.lr_fe=1e-8", "-n", "lr-fe-1e-8"], proj, env)
    ran = set(_stages_run(out))
    assert "e2e-finetune" in ran, out
    assert ran <= {"e2e-finetune", "evaluate"}, out
    text = (proj / "params.yaml").read_text()
    assert "lr_fe: 1e-08" in text  # the literal YAML 1.2 text DVC writes
    assert load_params(proj / "params.yaml").e2e.lr_fe == 1e-8
    assert json.loads((proj / "reports" / "e2e.json").read_text())["lr_fe"] == 1e-8
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], proj, env))
    assert "lr-fe-1e-8" in json.dumps(shown)
    # the experiment carries its metrics (git-tracked, cache: false) so exp show can compare them
    exps = [r for row in shown for e in (row.get("experiments") or []) for r in e["revs"]
            if r.get("name") == "lr-fe-1e-8"]
    assert exps, shown
    metrics = exps[0]["data"]["metrics"]
    assert metrics["reports/e2e.json"]["data"]["lr_fe"] == 1e-8, metrics["reports/e2e.json"]
    assert "patch" in metrics["reports/metrics.json"]["data"]
