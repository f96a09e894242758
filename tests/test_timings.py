"""Wall-clock time stays out of the DVC metrics files.

`dvc metrics diff` / `dvc exp show` must move only when results move: the metrics JSONs hold no
`*seconds` key at any depth and are byte-identical over two seeded runs, while each stage's wall
time goes to reports/timings/<stage>.json (a git-ignored run log that dvc.yaml does not
declare). Checked on evaluate (the
hand-made set of test_evaluate) and on extract-features + train-unet (the tiny tiled project of
test_baselines with an untrained small CNN), and on dvc.yaml's declarations for every stage.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from ruamel.yaml import YAML

from pipeline.cli import STAGES
from pipeline.models import build_extractor, save_checkpoint
from pipeline.paths import Paths
from pipeline.stages import evaluate, extract_features, train_unet
from tests.test_baselines import SLIDES, make_project
from tests.test_evaluate import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def _keys(obj) -> list[str]:
    """Every dict key at any nesting depth (lists descended too)."""
    if isinstance(obj, dict):
        return [k for k, v in obj.items() for k in (k, *_keys(v))]
    if isinstance(obj, list):
        return [k for v in obj for k in _keys(v)]
    return []


def _assert_no_seconds(path: Path) -> dict:
    data = json.loads(path.read_text())
    timed = [k for k in _keys(data) if str(k).endswith("seconds")]
    assert timed == [], f"{path.name} holds wall-clock keys {timed}"
    return data


def _assert_timings(paths: Paths, stage: str, summary: dict) -> dict:
    t = json.loads(paths.timings_file(stage).read_text())
    assert t["stage"] == stage
    assert t["seconds"] > 0
    assert t["seconds"] == summary["seconds"]  # the returned summary keeps the same wall time
    return t


def test_keys_walks_every_depth():
    # the helper the checks rely on must see nested keys (else the tests could not fail)
    assert sorted(_keys({"a": {"b": [{"c_seconds": 1}]}, "d": 2})) == ["a", "b", "c_seconds", "d"]


def test_timings_file_path():
    assert Paths(Path("/p")).timings_file("train-unet") == Path(
        "/p/reports/timings/train-unet.json")


# -- evaluate ----------------------------------------------------------------------------------


def test_evaluate_metrics_hold_no_time_and_rerun_is_identical(tmp_path):
    params, paths = make_dataset(tmp_path)
    summary = evaluate.run(params, paths)
    first = (paths.reports / "metrics.json").read_bytes()
    metrics = _assert_no_seconds(paths.reports / "metrics.json")
    assert metrics["patch"]["separate"]["accuracy"] is not None  # a real metrics file was read
    t1 = _assert_timings(paths, "evaluate", summary)

    summary2 = evaluate.run(params, paths)
    assert (paths.reports / "metrics.json").read_bytes() == first
    _assert_timings(paths, "evaluate", summary2)
    assert t1.keys() == {"stage", "seconds"}


# -- extract-features + train-unet -------------------------------------------------------------


@pytest.fixture(scope="module")
def featured(tmp_path_factory):
    """test_baselines' three-slide project, tiled, labelled, with features of an untrained
    small CNN (extract-features stage run once)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add waits on a shared machine
    params, paths = make_project(tmp_path_factory.mktemp("timings"))
    torch.manual_seed(0)
    model = build_extractor("small_cnn", params.extractor.feature_dim, "none")
    save_checkpoint(paths.models / "extractor.pt", model,
                    {"params_json": params.section_json("seed", "extractor", "tile")})
    summary = extract_features.run(params, paths)
    yield params, paths, summary
    torch.set_num_threads(threads)


def test_extract_features_records_its_time(featured):
    _, paths, summary = featured
    assert summary["n_extracted"] == len(SLIDES)
    _assert_timings(paths, "extract-features", summary)


def test_extract_features_shard_writes_no_timings(featured, tmp_path):
    params, paths, _ = featured
    before = paths.timings_file("extract-features").read_bytes()
    paths.timings_file("extract-features").write_text("{}")
    extract_features.run(params, paths, shard=(0, 2))  # all current: nothing re-extracted
    assert paths.timings_file("extract-features").read_text() == "{}"
    paths.timings_file("extract-features").write_bytes(before)


def test_train_unet_metrics_hold_no_time_and_rerun_is_identical(featured):
    params, paths, _ = featured
    summary = train_unet.run(params, paths)
    report = paths.reports / "train_unet.json"
    first = report.read_bytes()
    metrics = _assert_no_seconds(report)
    assert metrics["best_epoch"] == summary["best_epoch"]
    assert metrics["n_train_slides"] == 1 and metrics["n_val_slides"] == 1
    # the summary is the metrics plus the wall time, nothing else
    assert {k: v for k, v in summary.items() if k != "seconds"} == metrics
    _assert_timings(paths, "train-unet", summary)

    summary2 = train_unet.run(params, paths)  # seeded on CPU: same results, other wall time
    assert report.read_bytes() == first
    _assert_timings(paths, "train-unet", summary2)


# -- dvc.yaml ------------------------------------------------------------------------------------


def _out_names(entries) -> dict[str, dict]:
    out = {}
    for e in entries or []:
        if isinstance(e, str):
            out[e] = {}
        else:
            (name, opts), = e.items()
            out[name] = opts or {}
    return out


def test_dvc_yaml_never_declares_timings():
    """Run logs, not results: declared as outs they would change dvc.lock on every rerun."""
    stages = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
    timed = {"tile", "train-extractor", "extract-features", "train-unet", "e2e-finetune",
             "train-seg-only", "train-frozen", "evaluate"}
    for name, st in stages.items():
        for kind in ("outs", "metrics", "plots"):
            assert not [p for p in _out_names(st.get(kind)) if "timings" in p], (name, kind)
        if name in timed:  # the stage module names its log file after its dvc.yaml stage
            module = importlib.import_module(f"pipeline.stages.{STAGES[name]}")
            assert module.STAGE == name


def test_gitignore_keeps_timings_out_of_git():
    lines = (ROOT / ".gitignore").read_text().splitlines()
    # the re-includes of reports/*.json come first; the timings rule must follow them
    assert "/reports/timings/" in lines
    assert lines.index("/reports/timings/") > lines.index("!/reports/*.json")
