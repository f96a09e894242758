"""The evaluate stage, the report and Table 1 over seeds.

A hand-made set (schema names, no other stage involved): tile pitch 100 level-0 px at 1 um/px
(100 um tiles), 4 x 5 grids with tiles on rows 0-1. Test slides A (patient P1, annotated tumor)
and B (patient P2, normal); train slide C (patient P3, normal).

  A labels        A tumor_fraction       B: 10 normal tiles, C: 10 normal tiles
  T T N N N       1 1 0 0 0
  T X N N N       1 .1 0 0 0             (X = nolabel)

Labelled tiles of the split: 3 tumor, 16 normal (19). Every expected number below is worked
out by hand in the comments, not by the code under test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline import schema
from pipeline.annotations import write_asap_xml
from pipeline.camelyon import pn_kappa, read_camelyon17_submission
from pipeline.evaluation.inputs import EvaluateError
from pipeline.evaluation.outputs import json_clean
from pipeline.params import DataParams, EvaluateParams, Params
from pipeline.paths import Paths
from pipeline.slide_classify import feature_names
from pipeline.stages import evaluate
from pipeline.table1 import (
    exp_show_records,
    format_table1,
    main,
    parse_exp_show,
    read_metrics_files,
    select_runs,
)

T, N, X = schema.LABEL_TUMOR, schema.LABEL_NORMAL, schema.LABEL_NOLABEL
PITCH = 100.0
RC = [(r, c) for r in range(2) for c in range(5)]  # row-major, tile i = RC[i]
NaN = math.nan

LABELS = {
    "A": [T, T, N, N, N, T, X, N, N, N],
    "B": [N] * 10,
    "C": [N] * 10,
}
TUMOR_FRACTION = {"A": [1, 1, 0, 0, 0, 1, 0.1, 0, 0, 0], "B": [0] * 10, "C": [0] * 10}
PROBS = {
    # method -> slide -> 10 tile probabilities (row 0 then row 1)
    "classifier": {
        "A": [0.9, 0.8, 0.1, 0.1, 0.7, 0.6, 0.9, 0.1, 0.1, 0.1],
        "B": [0.1] * 7 + [0.55, 0.1, 0.1],
        "C": [0.1] * 10,
    },
    "separate": {
        "A": [0.95, 0.9, 0.2, 0.2, 0.2, 0.8, 0.6, 0.2, 0.2, 0.2],
        "B": [0.05] * 10,
        "C": [0.05] * 10,
    },
    "e2e": {  # tile (0, 1) not predicted (NaN): a tumor tile scored as normal
        "A": [0.9, NaN, 0.3, 0.3, 0.3, 0.7, 0.4, 0.3, 0.6, 0.3],
        "B": [0.2] * 10,
        "C": [0.2] * 10,
    },
    # frozen: A's nolabel tile (1,1) (10 % tumor) and B's (0,0) at 0.6; no file for train C
    "frozen": {"A": [0.4] * 6 + [0.6] + [0.4] * 3, "B": [0.6] + [0.4] * 9},
}
SLIDES = {"A": ("test", "P1", "micro"), "B": ("test", "P2", "negative"),
          "C": ("train", "P3", "negative")}


def write_tile_index(path, slide_id: str) -> None:
    grid = np.asarray(RC, np.int32)
    coords = np.stack([grid[:, 1] * PITCH, grid[:, 0] * PITCH], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f[schema.COORDS] = coords.astype(np.int64)
        f[schema.GRID] = grid
        f[schema.TISSUE_FRACTION] = np.ones(len(grid), np.float32)
        f[schema.LUMP_ID] = np.ones(len(grid), np.int32)
        attrs = {
            "schema_version": schema.SCHEMA_VERSION, "params_hash": "x", "params_json": "{}",
            "slide_id": slide_id, "slide_path": "/nowhere.tiff", "slide_fingerprint": "0-x",
            "slide_width_px_level0": 500, "slide_height_px_level0": 400, "mpp": 1.0,
            "mpp_source": "metadata", "tile_mpp": 1.0, "level": 0, "level_downsample": 1.0,
            "read_size_px": 100, "tile_size_px": 100, "tile_size_px_level0": PITCH,
            "grid_rows": 4, "grid_cols": 5, "n_lumps": 1,
        }
        assert set(attrs) == set(schema.TILE_ATTRS)
        f.attrs.update(attrs)


def write_probs(path, prob, **attrs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f[schema.TUMOR_PROB] = np.asarray(prob, np.float32)
        f.attrs["schema_version"] = schema.SCHEMA_VERSION
        f.attrs.update(attrs)


def make_dataset(root) -> tuple[Params, Paths]:
    paths = Paths(root=root)
    # A's tumor: tiles (0,0), (0,1), (1,0) whole and a 10 x 100 px sliver of (1,1) (10 %).
    ann = root / "ann" / "A.xml"
    ann.parent.mkdir(parents=True)
    write_asap_xml(ann, [np.array([[0, 0], [200, 0], [200, 100], [110, 100], [110, 200],
                                   [0, 200]], float)])
    lines = ["slide_id,slide_path,annotation_path,split,patient_id,slide_label"]
    for sid, (split, patient, cls) in SLIDES.items():
        lines.append(f"{sid},slides/{sid}.tiff,{'ann/A.xml' if sid == 'A' else ''},{split},"
                     f"{patient},{cls}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    for sid in SLIDES:
        write_tile_index(paths.tile_file(sid), sid)
        paths.labels.mkdir(parents=True, exist_ok=True)
        with h5py.File(paths.label_file(sid), "w") as f:
            f[schema.LABEL] = np.asarray(LABELS[sid], np.int8)
            f[schema.TUMOR_FRACTION] = np.asarray(TUMOR_FRACTION[sid], np.float32)
            f[schema.NORMAL_FRACTION] = 1 - np.asarray(TUMOR_FRACTION[sid], np.float32)
        write_probs(paths.feature_file(sid), PROBS["classifier"][sid])
        for meth in ("separate", "e2e", "frozen"):
            if sid in PROBS[meth]:
                write_probs(paths.prediction_file(meth, sid), PROBS[meth][sid], method=meth,
                            **({"frozen_extractor": "imagenet"} if meth == "frozen" else {}))
    (paths.reports).mkdir(parents=True, exist_ok=True)
    (paths.reports / "train_unet.json").write_text(json.dumps({"val_loss": 0.25,
                                                               "best_epoch": 7}))
    return Params(data=DataParams(manifest=str(manifest))), paths


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    params, paths = make_dataset(root)
    summary = evaluate.run(params, paths)
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    return summary, metrics, paths


# -- patch level ---------------------------------------------------------------------------------
def test_patch_metrics_match_hand_computation(evaluated):
    _, mt, _ = evaluated
    p = mt["patch"]
    # classifier: tumor 0.9, 0.8, 0.6; normal 0.7, 0.55, 14 x 0.1. At 0.5: TP 3, FP 2, TN 14.
    c = p["classifier"]
    assert (c["tp"], c["fp"], c["tn"], c["fn"], c["n"]) == (3, 2, 14, 0, 19)
    assert c["accuracy"] == pytest.approx(17 / 19)
    # PR points (R, P): (0,1) (1/3,1) (2/3,1) (2/3,2/3) (1,3/4) (1,3/5) (1,3/19); trapezoid:
    # 1/3 + 1/3 + 1/3 * (2/3 + 3/4) / 2 = 65/72. AP = 1/3 + 1/3 + 1/3 * 3/4 = 11/12.
    assert c["pr_auc"] == pytest.approx(65 / 72)
    assert c["average_precision"] == pytest.approx(11 / 12)
    # ROC: tumor > normal pairs: 16 + 16 + 15 of 48.
    assert c["roc_auc"] == pytest.approx(47 / 48)
    # separate: every tumor above every normal and the threshold.
    s = p["separate"]
    assert s["accuracy"] == 1.0 and s["pr_auc"] == pytest.approx(1.0)
    # e2e: the NaN tumor tile counts as 0 -> tumor 0.9, 0.7, 0; normal 0.6, 5 x 0.3, 10 x 0.2.
    # At 0.5: TP 2, FN 1, FP 1, TN 15. PR: (0,1) (1/3,1) (2/3,1) ... (2/3,1/9) (1,3/19):
    # 2/3 + 1/3 * (1/9 + 3/19) / 2 = 365/513.
    e = p["e2e"]
    assert (e["tp"], e["fn"], e["fp"], e["tn"]) == (2, 1, 1, 15)
    assert e["accuracy"] == pytest.approx(17 / 19)
    assert e["pr_auc"] == pytest.approx(365 / 513)
    assert e["n_unpredicted"] == 1
    # frozen: tumor 3 x 0.4; normal 0.6 (B) and 15 x 0.4 -> TN 15, FP 1, FN 3. PR points
    # (0,1) (0,0) [t=0.6] (1,3/19) [t=0.4]: (0 + 3/19) / 2 = 3/38.
    f = p["frozen"]
    assert f["accuracy"] == pytest.approx(15 / 19)
    assert f["pr_auc"] == pytest.approx(3 / 38)
    assert f["frozen_extractor"] == "imagenet"
    assert mt["evaluation"]["frozen_extractor"] == "imagenet"


def test_missing_method_is_not_run(evaluated):
    summary, mt, _ = evaluated
    for sec in ("patch", "tumor_points", "camelyon16", "camelyon17"):
        assert mt[sec]["seg_only"] == {"status": "not run"}
    assert summary["not_run"] == ["seg_only"]
    assert summary["methods_run"] == ["classifier", "separate", "e2e", "frozen"]


def test_tumor_points(evaluated):
    _, mt, _ = evaluated
    tp = mt["tumor_points"]
    # classifier: A: the block at (0,0)-(1,1) touches tumor, (0,4) is isolated -> 1;
    # B: (1,2) -> 1. e2e: A: (1,3) isolated -> 1 (the (0,0)-(1,0) group touches tumor); B: 0.
    # frozen: A's (1,1) is nolabel but holds annotated tumor -> not a point; B's (0,0) -> 1.
    assert (tp["classifier"]["total"], tp["classifier"]["mean_per_slide"]) == (2, 1.0)
    assert (tp["e2e"]["total"], tp["e2e"]["mean_per_slide"]) == (1, 0.5)
    assert (tp["frozen"]["total"], tp["frozen"]["mean_per_slide"]) == (1, 0.5)
    assert tp["separate"]["total"] == 0
    rows = pd.read_csv(evaluated[2].reports / "evaluate_slides.csv")
    got = rows.set_index(["slide_id", "method"])["tumor_points"]
    assert (got[("A", "classifier")], got[("B", "classifier")], got[("A", "e2e")]) == (1, 1, 1)


def test_camelyon16(evaluated):
    _, mt, _ = evaluated
    c16 = mt["camelyon16"]
    # Max probability: classifier A 0.9 > B 0.55 -> AUC 1; frozen 0.6 = 0.6 -> 0.5.
    assert c16["classifier"]["slide_auc_max_prob"] == 1.0
    assert c16["frozen"]["slide_auc_max_prob"] == 0.5
    # One non-ITC lesion (A). Classifier: the hit at (0,0) is a TP (0.9), (0,4) on A and (1,2)
    # on B are FPs (0.7, 0.55): sensitivity 1 from 0 FP on -> FROC 1. Frozen: its hit on A at
    # the centre of (1,1), (150, 150), lies 40 um from the tumor sliver (x <= 110), outside the
    # 37.5 um dilation -> FP, as is B's -> FROC 0.
    assert c16["classifier"]["n_lesions"] == 1
    assert c16["classifier"]["n_fp"] == 2
    assert c16["classifier"]["froc"] == 1.0
    assert c16["frozen"]["froc"] == 0.0
    assert c16["frozen"]["n_fp"] == 2


def test_camelyon17(evaluated):
    _, mt, paths = evaluated
    c17 = mt["camelyon17"]
    # classifier: A's largest group spans centres sqrt(2) apart -> (sqrt2 + 1) * 100 um = 241 um
    # -> micro -> P1 pN1mi (true pN1mi); B's single tile -> itc -> P2 pN0(i+) (true pN0).
    # Quadratic kappa (ranks 2,0 vs 2,1; weights /16): 1 - (1/16) / (3/16) = 2/3.
    assert c17["classifier"]["evaluated_split"]["kappa"] == pytest.approx(2 / 3)
    assert c17["classifier"]["evaluated_split"]["stage_accuracy"] == 0.5
    assert c17["separate"]["evaluated_split"]["kappa"] == pytest.approx(1.0)
    assert c17["classifier"]["all_splits"]["n_patients"] == 3
    assert c17["frozen"]["all_splits"]["status"].startswith("incomplete")
    assert mt["evaluation"]["camelyon17_truth"] == "manifest slide_label"
    sub = read_camelyon17_submission(paths.reports / "camelyon17" / "classifier_submission.csv")
    assert sub == {"P1": "pn1mi", "P2": "pn0(i+)"}
    ref = read_camelyon17_submission(paths.reports / "camelyon17" / "reference.csv")
    assert ref == {"P1": "pn1mi", "P2": "pn0"}


def test_camelyon17_random_forest(evaluated):
    _, mt, paths = evaluated
    rf = mt["camelyon17"]["classifier"]["random_forest"]
    # Test split: patients P1 (A, micro) and P2 (B, negative) -> 2 folds of one patient each.
    # Each forest is trained on one slide of one class, so it predicts that class: A -> negative
    # (P1 pN0, true pN1mi), B -> micro (P2 pN1mi, true pN0). A fold of one wrongly staged
    # patient has kappa 0 (observed = chance disagreement).
    sp = rf["evaluated_split"]
    assert sp["kappa"] == pytest.approx(pn_kappa(["pN1mi", "pN0"], ["pN0", "pN1mi"]))
    assert (sp["n_folds"], sp["n_folds_scored"]) == (2, 2)
    assert (sp["kappa_fold_mean"], sp["kappa_fold_std"]) == (0.0, 0.0)
    assert "number of patients (2 < 5)" in sp["folds"]
    assert (sp["stage_accuracy"], sp["slide_class_accuracy"]) == (0.0, 0.0)
    # All splits: 3 patients -> 3 folds; frozen lacks train slide C -> incomplete.
    al = rf["all_splits"]
    assert (al["n_folds"], al["n_patients"], al["n_slides"]) == (3, 3, 3)
    assert mt["camelyon17"]["frozen"]["random_forest"]["all_splits"]["status"].startswith(
        "incomplete")
    assert "kappa" in mt["camelyon17"]["frozen"]["random_forest"]["evaluated_split"]
    sub = read_camelyon17_submission(paths.reports / "camelyon17" / "classifier_rf_submission.csv")
    assert sub == {"P1": "pn0", "P2": "pn1mi"}
    # The features table: every slide (all have classifier predictions), hand-checked features
    # of A: tiles >= 0.5 are the 2x2 block at (0,0) and (0,4) -> 2 regions; none is >= 0.9:
    # the two 0.9 tiles are stored as float32 0.89999998 -> 0 regions.
    ft = pd.read_csv(paths.reports / "camelyon17" / "slide_features_classifier.csv",
                     keep_default_na=False).set_index("slide_id")
    assert list(ft.index) == ["A", "B", "C"]
    assert list(ft.columns[:8]) == ["patient_id", "split", "true_class", "rule_class",
                                    "rf_class_split", "rf_fold_split", "rf_class_all",
                                    "rf_fold_all"]
    assert list(ft.columns[8:]) == feature_names((0.5, 0.9))
    assert (ft.loc["A", "n_regions_t50"], ft.loc["A", "n_regions_t90"]) == (2, 0)
    assert ft.loc["A", "largest_area_um2_t50"] == 4 * 100.0**2
    assert ft.loc["A", "prob_max"] == pytest.approx(0.9)
    assert (ft.loc["A", "rule_class"], ft.loc["A", "rf_class_split"]) == ("micro", "negative")
    assert ft.loc["C", "rf_class_split"] == ""  # train slide: not in the test-split CV
    page = (paths.reports / "index.html").read_text()
    assert "Random-forest slide classifier" in page and "number of patients (2 &lt; 5)" in page
    assert summary_kappas(evaluated[0]) == (pytest.approx(2 / 3), pytest.approx(sp["kappa"]))


def test_random_forest_on_a_one_patient_split_reports_why(tmp_path):
    params, paths = make_dataset(tmp_path)
    params = params.model_copy(update={"evaluate": EvaluateParams(split="train")})  # only C
    evaluate.run(params, paths)
    c17 = json.loads((paths.reports / "metrics.json").read_text())["camelyon17"]["classifier"]
    assert c17["evaluated_split"]["n_patients"] == 1  # the rule still scores
    assert "at least 2 patients" in c17["random_forest"]["evaluated_split"]["status"]
    assert c17["random_forest"]["all_splits"]["n_patients"] == 3
    assert not (paths.reports / "camelyon17" / "classifier_rf_submission.csv").exists()


def summary_kappas(summary: dict) -> tuple:
    return summary["classifier"]["kappa_rule"], summary["classifier"]["kappa_rf"]


def test_curve_csvs(evaluated):
    _, _, paths = evaluated
    pr = pd.read_csv(paths.reports / "curves" / "pr.csv")
    roc = pd.read_csv(paths.reports / "curves" / "roc.csv")
    assert list(pr.columns) == ["method", "recall", "precision"]
    assert list(roc.columns) == ["method", "fpr", "tpr"]
    assert set(pr["method"]) == set(roc["method"]) == {"classifier", "separate", "e2e", "frozen"}
    c = pr[pr["method"] == "classifier"]
    got = np.array(sorted(zip(c["recall"], c["precision"], strict=True)))
    want = np.array(sorted([(0, 1), (1 / 3, 1), (2 / 3, 1), (2 / 3, 2 / 3), (1, 3 / 4),
                            (1, 3 / 5), (1, 3 / 19)]))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_figures_and_index(evaluated):
    _, _, paths = evaluated
    rep = paths.reports
    page = (rep / "index.html").read_text()
    for sid in ("A", "B"):
        for name in (f"figures/{sid}.png", f"figures/{sid}_heatmap.png"):
            assert (rep / name).stat().st_size > 1000
            assert f'src="{name}"' in page
    assert not (rep / "figures" / "C.png").exists()  # train slide: no figure
    for name in ("figures/pr_curves.png", "figures/roc_curves.png"):
        assert (rep / name).is_file() and f'src="{name}"' in page
    assert "Frozen features (imagenet)" in page
    assert "not run" in page and "Segmentation only" in page
    assert "train_unet" in page and "best_epoch" in page  # training metrics shown
    assert "<script" not in page and "http" not in page  # offline, no JS / CDN
    # Table 1 row of the classifier: accuracy 17/19, PR-AUC 65/72, in %.
    assert "<td>Classifier only</td><td>89.47</td><td>90.28</td>" in page


def test_metrics_json_is_strict_json():
    assert json_clean({"a": math.nan, "b": [np.float32(1.5), math.inf], "c": {"d": None}}) == \
        {"a": None, "b": [1.5, None], "c": {"d": None}}


def test_partial_predictions_stop_the_stage(tmp_path):
    params, paths = make_dataset(tmp_path)
    paths.prediction_file("e2e", "B").unlink()
    with pytest.raises(EvaluateError, match=r"e2e/B\.h5: missing while 1 other test"):
        evaluate.run(params, paths)


def test_stale_predictions_stop_the_stage(tmp_path):
    params, paths = make_dataset(tmp_path)
    write_probs(paths.prediction_file("separate", "A"), [0.5] * 9)
    with pytest.raises(EvaluateError, match="9 tile predictions but the tile index has 10"):
        evaluate.run(params, paths)


# -- Table 1 over seeds --------------------------------------------------------------------------
def _metrics(seed, acc_sep, pr_sep, acc_e2e=0.95, pr_e2e=0.97, frozen="imagenet"):
    return {
        "evaluation": {"seed": seed, "split": "test", "threshold": 0.5,
                       "frozen_extractor": frozen},
        "patch": {
            "classifier": {"status": "ok", "accuracy": 0.80, "pr_auc": 0.70},
            "separate": {"status": "ok", "accuracy": acc_sep, "pr_auc": pr_sep},
            "e2e": {"status": "ok", "accuracy": acc_e2e, "pr_auc": pr_e2e},
            "seg_only": {"status": "not run"},
            "frozen": {"status": "ok", "accuracy": 0.5, "pr_auc": None,
                       "frozen_extractor": frozen},
        },
        "tumor_points": {"classifier": {"mean_per_slide": 2.0}},
    }


def test_table1_from_metrics_files(tmp_path):
    files = []
    for seed, acc, pr, pr_e2e in ((0, 0.90, 0.80, 0.97), (1, 0.92, 0.85, None),
                                  (2, 0.94, 0.90, 0.99)):
        p = tmp_path / f"m{seed}.json"
        p.write_text(json.dumps(_metrics(seed, acc, pr, pr_e2e=pr_e2e)))
        files.append(str(p))
    out = tmp_path / "table1.md"
    assert main(["--metrics", *files, "--out", str(out)]) == 0
    text = out.read_text()
    # separate: mean 92, sample std 2 (ddof 1); PR-AUC 85 ± 5. e2e accuracy 95 ± 0 is the best
    # accuracy (bold); e2e PR-AUC over the 2 runs that define it: 98 ± 1.41421 (n=2), best.
    assert "| Separate Learning | 92.00 ± 2.00 | 85.00 ± 5.00 |" in text
    assert "| End-to-End Learning | **95.00 ± 0.00** | **98.00 ± 1.41 (n=2)** |" in text
    assert "| Segmentation only | not run | not run |" in text
    assert "| Frozen features (imagenet) | 50.00 ± 0.00 | n/a |" in text
    assert "seeds 0, 1, 2" in text


def test_table1_rejects_runs_on_other_splits(tmp_path):
    a, b = _metrics(0, 0.9, 0.8), _metrics(1, 0.9, 0.8)
    b["evaluation"]["split"] = "val"
    for name, m in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(m))
    runs = read_metrics_files([tmp_path / "a.json", tmp_path / "b.json"])
    with pytest.raises(Exception, match="different split"):
        select_runs(runs, kinds=("file",))


def _exp_state(rev, name, seed, metrics, timestamp, lr=1e-9):
    """One ExpState record as DVC 3.x `dvc exp show --json` writes it."""
    return {
        "rev": rev, "name": name,
        "data": {
            "rev": rev, "timestamp": timestamp,
            "params": {"params.yaml": {"data": {"seed": seed, "e2e": {"lr_fe": lr}}}},
            "metrics": {"reports/metrics.json": {"data": metrics}} if metrics else {},
            "deps": {}, "outs": {}, "meta": {},
        },
        "error": None, "experiments": None,
    }


def _range(state, executor=None):
    return {"revs": [state], "executor": executor, "name": state["name"]}


def exp_show_json():
    ws = _exp_state("workspace", None, 0, _metrics(0, 0.5, 0.5), None)
    base = _exp_state("a" * 40, "main", 0, _metrics(0, 0.5, 0.5), "2024-05-01T10:00:00")
    exps = [
        _exp_state("b" * 40, "exp-old0", 0, _metrics(0, 0.10, 0.10), "2024-05-02T10:00:00"),
        _exp_state("c" * 40, "exp-s1", 1, _metrics(1, 0.92, 0.85), "2024-05-02T11:00:00"),
        _exp_state("d" * 40, "exp-s2", 2, _metrics(2, 0.94, 0.90), "2024-05-02T12:00:00"),
        _exp_state("e" * 40, "exp-s0", 0, _metrics(0, 0.90, 0.80), "2024-05-02T13:00:00"),
        # another sweep on the same commit: lr differs from the workspace -> left out
        _exp_state("f" * 40, "exp-lr", 3, _metrics(3, 0.0, 0.0), "2024-05-02T14:00:00", lr=1e-8),
    ]
    base["experiments"] = [_range(s) for s in exps]
    queued = {"rev": "1" * 40, "name": "exp-queued", "data": None, "error": None,
              "experiments": None}
    failed = {"rev": "2" * 40, "name": "exp-failed", "error": {"msg": "failed", "type": ""},
              "experiments": None}
    base["experiments"] += [_range(queued, {"state": "queued", "name": "dvc-task",
                                            "local": None}), _range(failed)]
    return [ws, base]


def test_exp_show_parsing(tmp_path):
    runs, skipped = parse_exp_show(exp_show_json())
    kinds = {r.name: (r.kind, r.seed) for r in runs}
    assert kinds["workspace"] == ("workspace", 0) and kinds["main"] == ("baseline", 0)
    assert kinds["exp-s1"] == ("experiment", 1) and kinds["exp-lr"] == ("experiment", 3)
    assert runs[0].params["e2e.lr_fe"] == 1e-9
    assert any("exp-queued" in s for s in skipped) and any("exp-failed" in s for s in skipped)
    chosen = select_runs(runs, reference=runs[0].params)
    # newest of the two seed-0 experiments; exp-lr dropped; workspace/baseline not used
    assert [r.name for r in chosen] == ["exp-s0", "exp-s1", "exp-s2"]
    with pytest.raises(Exception, match="differ in params other than seed: e2e.lr_fe"):
        select_runs(runs)  # no reference: the lr sweep is mixed in
    src = tmp_path / "exp.json"
    src.write_text(json.dumps(exp_show_json()))
    out = tmp_path / "t.md"
    assert main(["--from-exp-show", str(src), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| Separate Learning | 92.00 ± 2.00 | 85.00 ± 5.00 |" in text
    assert "exp-s0 (seed 0), exp-s1 (seed 1), exp-s2 (seed 2)" in text
    assert main(["--from-exp-show", str(src), "--out", str(out), "--exp", "nope"]) == 1


_METRICS_SCRIPT = """import json, yaml
from pathlib import Path
seed = yaml.safe_load(open("params.yaml"))["seed"]
acc = {0: 0.90, 1: 0.92, 2: 0.94}[seed]
text = Path("template.json").read_text().replace('"SEED"', str(seed))
Path("reports").mkdir(exist_ok=True)
Path("reports/metrics.json").write_text(text.replace('"ACC"', str(acc)))
"""


def test_table1_from_repo_equals_the_exp_show_json(tmp_path):
    """`--from-repo` (DVC's Python API) gives the table `dvc exp show --json` gives, on a real
    DVC project with four experiments (seed 0 twice: the newer one counts)."""
    repo = tmp_path / "proj"
    repo.mkdir()
    (repo / "template.json").write_text(json.dumps(_metrics("SEED", "ACC", 0.80)))
    (repo / "metrics.py").write_text(_METRICS_SCRIPT)
    (repo / "params.yaml").write_text("seed: 0\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n  ev:\n    cmd: python metrics.py\n    deps: [metrics.py, template.json]\n"
        "    params: [seed]\n    metrics:\n    - reports/metrics.json:\n        cache: false\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"], [*dvc, "repro", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"],
                *([*dvc, "exp", "run", "-q", "-S", f"seed={s}"] for s in (0, 1, 2, 0))):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    shown = subprocess.run([*dvc, "exp", "show", "--json"], cwd=repo, env=env, check=True,
                           capture_output=True, text=True).stdout
    (tmp_path / "exp.json").write_text(shown)
    assert exp_show_records(repo) == json.loads(shown)
    a, b = tmp_path / "a.md", tmp_path / "b.md"
    assert main(["--from-repo", str(repo), "--out", str(a)]) == 0
    assert main(["--from-exp-show", str(tmp_path / "exp.json"), "--out", str(b)]) == 0
    assert a.read_text() == b.read_text()
    assert "| Separate Learning | 92.00 ± 2.00 | 80.00 ± 0.00 |" in a.read_text()
    assert main(["--from-repo", str(tmp_path), "--out", str(a)]) == 1  # not a DVC project

def test_exp_show_dvc2_layout():
    m = _metrics(4, 0.9, 0.8)
    obj = {"workspace": {"baseline": {"data": {"timestamp": None, "params": {}, "metrics": {}}}},
           "abc": {"baseline": {"data": {"name": "main", "metrics": {}}},
                   "def1234567": {"data": {"name": "exp-x", "timestamp": "t",
                                           "params": {"params.yaml": {"data": {"seed": 4}}},
                                           "metrics": {"reports/metrics.json": {"data": m}}}}}}
    runs, _ = parse_exp_show(obj)
    assert [(r.name, r.kind, r.seed) for r in runs] == [("exp-x", "experiment", 4)]
    assert "Separate Learning | 90.00 |" in format_table1(runs)
