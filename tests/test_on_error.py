"""`--on-error` means the same in every per-slide stage (tile, label, extract-features,
predict; pipeline/runner.py): with `skip` the failing slide is listed with its one-line error in
the stage's failures file, the others are done, and the stage fails only when no slide is done;
with `stop` the first failure propagates. Unexpected exceptions (not PipelineErrors) are
failures too, with their traceback in the log."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import GLASS_RGB, TISSUE_RGB

from pipeline.annotations import write_asap_xml
from pipeline.errors import PipelineError
from pipeline.models import build_extractor, save_checkpoint
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.runner import FAILURE_COLUMNS, AllSlidesFailed, on_error_mode, run_slides
from pipeline.stages import extract_features, label, predict, tile
from pipeline.tiff import write_pyramidal_tiff

TILE_PX = 64
IDS = ("good1", "good2", "bad")
ONLY_BAD = (2, 3)  # the shard holding just "bad" (manifest position 2)
CORRUPT = b"II*\x00" + bytes(range(256)) * 8  # a TIFF header and garbage


def _slide_rgb(seed: int) -> np.ndarray:
    img = np.empty((8 * TILE_PX, 8 * TILE_PX, 3), np.int16)
    img[:] = GLASS_RGB
    img[TILE_PX:7 * TILE_PX, TILE_PX:7 * TILE_PX] = TISSUE_RGB
    img += np.random.default_rng(seed).integers(-4, 5, size=img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _project(root: Path) -> tuple[Params, Paths]:
    """good1, good2: tissue slides with a tumor square; bad: not a readable slide."""
    lines = ["slide_id,slide_path,annotation_path,split"]
    for k, sid in enumerate(IDS):
        if sid == "bad":
            (root / "bad.tiff").write_bytes(CORRUPT)
        else:
            write_pyramidal_tiff(root / f"{sid}.tiff", _slide_rgb(k), mpp=1.0, n_levels=2)
        square = np.array([[128, 128], [256, 128], [256, 256], [128, 256]], float)
        write_asap_xml(root / f"{sid}.xml", [square])
        lines.append(f"{sid},{sid}.tiff,{sid}.xml,train")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    raw = Params().model_dump(mode="json")
    raw["data"]["manifest"] = str(root / "manifest.csv")
    raw["tile"].update(size_px=TILE_PX, mpp=1.0, mask_mpp=8.0, min_object_um2=1000.0,
                       max_hole_um2=0.0, workers=1)
    raw["extractor"].update(arch="small_cnn", crop_px=TILE_PX, workers=0, feature_dim=4)
    params = Params.model_validate(raw)
    paths = Paths(root)
    paths.models.mkdir(parents=True)
    save_checkpoint(paths.models / "extractor.pt", build_extractor("small_cnn", 4),
                    {"params_json": params.section_json("seed", "extractor", "tile")})
    return params, paths


def _listed(csv: Path, summary_failed: dict, expected: set[str]) -> pd.DataFrame:
    """The failures file lists exactly `expected`, one line each, like the summary."""
    df = pd.read_csv(csv)
    assert list(df.columns) == FAILURE_COLUMNS
    assert set(df["slide_id"]) == set(summary_failed) == expected
    for msg in df["error"]:
        assert isinstance(msg, str) and msg.strip() and "\n" not in msg
    return df


def test_skip_and_stop_mean_the_same_in_every_per_slide_stage(tmp_path):
    params, paths = _project(tmp_path)
    reports = paths.reports

    # tile: the unreadable slide is listed, the others tiled
    with pytest.raises(PipelineError):
        tile.run(params, paths, on_error="stop")
    s = tile.run(params, paths, on_error="skip")
    _listed(reports / "tile_failures.csv", s["failed"], {"bad"})
    assert paths.tile_file("good1").is_file() and paths.tile_file("good2").is_file()
    with pytest.raises(AllSlidesFailed, match="every slide failed"):
        tile.run(params, paths, on_error="skip", shard=ONLY_BAD)
    assert set(pd.read_csv(reports / "tile_failures.2of3.csv")["slide_id"]) == {"bad"}

    # label: "bad" has no tile index
    with pytest.raises(PipelineError, match="bad.h5: tile index missing"):
        label.run(params, paths, on_error="stop")
    s = label.run(params, paths, on_error="skip")
    _listed(reports / "label_failures.csv", s["failed"], {"bad"})
    assert s["n_current"] == 2  # good1 and good2 were labelled before "stop" reached "bad"
    with pytest.raises(AllSlidesFailed):
        label.run(params, paths, on_error="skip", shard=ONLY_BAD)

    # extract-features: "bad" has no inputs, and good1's pixels become unreadable, which
    # breaks the one-loader stream over good1 + good2 mid-way: only good1 may be listed
    (tmp_path / "good1.tiff").write_bytes(CORRUPT)
    with pytest.raises(PipelineError, match="bad.h5: tile index not found"):
        extract_features.run(params, paths, on_error="stop")
    s = extract_features.run(params, paths, on_error="skip")
    df = _listed(reports / "extract-features_failures.csv", s["failed"], {"bad", "good1"})
    assert "good1.tiff" in df.set_index("slide_id").loc["good1", "error"]
    assert s["n_extracted"] == 1 and paths.feature_file("good2").is_file()
    with h5py.File(paths.feature_file("good2"), "r") as f:
        assert f["features"].shape[0] > 0
    assert not paths.feature_file("good1").exists()
    with pytest.raises(AllSlidesFailed):
        extract_features.run(params, paths, on_error="skip", shard=ONLY_BAD)

    # predict (the classifier: only extractor.pt is there)
    out = tmp_path / "predicted"
    slides = [tmp_path / "good2.tiff", tmp_path / "bad.tiff"]
    with pytest.raises(PipelineError, match="bad.tiff"):
        predict.run(params, paths, slides, out, on_error="stop")
    s = predict.run(params, paths, slides, out, on_error="skip")
    _listed(out / "predict_failures.csv", s["failed"], {"bad"})
    assert s["n_predicted"] == 1 and (out / "good2" / "good2.summary.json").is_file()
    with pytest.raises(AllSlidesFailed):
        predict.run(params, paths, [tmp_path / "bad.tiff"], out, on_error="skip")

    # a stop run leaves no failures file of an older run behind
    tile.run(params, paths, on_error="skip")
    assert set(pd.read_csv(reports / "tile_failures.csv")["slide_id"]) == {"bad", "good1"}
    tile.run(params, paths, on_error="skip", shard=(1, 3))  # good2: current, nothing failed
    assert pd.read_csv(reports / "tile_failures.1of3.csv").empty
    tile.run(params, paths, on_error="stop", shard=(1, 3))
    assert not (reports / "tile_failures.1of3.csv").exists()


def _double(x: int) -> int:
    return 2 * x


def _broken(x: int) -> int:
    return {}[x]  # a bug: KeyError


@pytest.mark.parametrize("workers", [1, 2])
def test_unexpected_exceptions_are_failures_with_their_traceback_logged(workers, caplog):
    jobs = [("a", _double, (1,)), ("b", _broken, (7,)), ("c", _double, (3,))]
    with caplog.at_level(logging.ERROR, logger="pipeline.runner"):
        run = run_slides(jobs, "skip", workers)
    assert run.results == {"a": 2, "c": 6} and run.failed == {"b": "KeyError: 7"}
    assert "Traceback" in caplog.text and "_broken" in caplog.text
    with pytest.raises(KeyError):
        run_slides(jobs, "stop", workers)


def test_on_error_values():
    assert on_error_mode("stop") == "stop" and on_error_mode("skip") == "skip"
    assert on_error_mode("fail") == "stop"  # the older name
    with pytest.raises(PipelineError, match="--on-error must be one of stop, skip, got 'ignore'"):
        on_error_mode("ignore")
