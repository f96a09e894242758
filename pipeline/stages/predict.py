"""Command `predict`: tumor heatmaps, regions and summaries for new slides (the core:
pipeline/predict/).

For slides that are not in the manifest and need no annotation: tile -> features -> U-Net with
the trained models, loaded once for the whole batch, each run with the settings its checkpoint
was trained with (pipeline/predict/models.py states the rule). Per slide, DIR/<slide_stem>/
gets a heatmap (HDF5 + PNG), the regions as QuPath GeoJSON and ASAP XML, and a summary JSON
written last (pipeline/predict/summary.py lists the files).

Methods: auto = E2E (models/e2e_extractor.pt + e2e_unet.pt) when both exist, else Separate
(extractor.pt + unet.pt), else the patch classifier alone (extractor.pt, its own tumor_prob).
A rerun skips slides whose summary is current (same slide path, method, model sha256s and
params); others are redone. `--on-error` as every per-slide stage (pipeline/runner.py); the
failures file is DIR/predict_failures.csv.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import typer

from pipeline.errors import PipelineError
from pipeline.log import get_logger
from pipeline.params import Params, load_params
from pipeline.paths import Paths
from pipeline.predict.models import (  # noqa: F401 (load_models, resolve_method re-exported)
    FLAGS,
    METHODS,
    PredictError,
    load_models,
    resolve_method,
    run_params,
)
from pipeline.predict.slide import predict_slide
from pipeline.predict.summary import CSV_KEYS
from pipeline.runner import SlideRun, failures_file, finish, on_error_mode, one_line, run_slides
from pipeline.slide import Slide

log = get_logger("pipeline.predict")


def _one_line(exc: BaseException, slide_path: Path) -> str:
    """The error in one line, naming the slide."""
    msg = one_line(exc)
    return msg if str(slide_path) in msg else f"{slide_path}: {msg}"


def _named(fn: Any, slide_path: Path, *args: Any) -> Any:
    """fn(slide_path, *args); an expected error comes back as one PredictError line naming
    the slide (a bug keeps its type and traceback)."""
    try:
        return fn(slide_path, *args)
    except PipelineError as exc:
        raise PredictError(_one_line(exc, slide_path)) from exc


def _check_slide(path: Path, fallback_mpp: float | None, mpp_range_um: Sequence[float]) -> None:
    """Open the slide once (cheap: header only) so that a bad path or implausible mpp metadata
    fails before any work or output."""
    with Slide(path) as slide:
        slide.level0_mpp(fallback_mpp, tuple(mpp_range_um))


def _slide_paths(slides: Sequence[str | Path], out_dir: Path) -> list[Path]:
    """The slides, resolved and deduplicated; two different files with one name are refused."""
    if not slides:
        raise PredictError("predict: no slides given")
    slide_paths = [Path(s).resolve() for s in slides]
    seen: dict[str, Path] = {}
    for p in slide_paths:
        if p.stem in seen and seen[p.stem] != p:
            raise PredictError(f"{p}: same name as {seen[p.stem]}; their outputs would share "
                               f"{out_dir / p.stem} (predict them into different --out folders)")
        seen[p.stem] = p
    return list(dict.fromkeys(slide_paths))


def _check_args(method: str, mpp: float | None, out_dir: Path) -> None:
    if method not in METHODS:
        raise PredictError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise PredictError(f"--mpp must be a positive number of um per level-0 pixel, got {mpp}")
    if out_dir.exists() and not out_dir.is_dir():
        raise PredictError(f"{out_dir}: --out exists and is not a folder")


def run(
    params: Params,
    paths: Paths,
    slides: Sequence[str | Path],
    out_dir: str | Path,
    models_dir: str | Path | None = None,
    method: str = "auto",
    mpp: float | None = None,
    on_error: str = "stop",
    workers: int | None = None,
    flags: Mapping[str, Any] | None = None,
) -> dict:
    """Predict every slide into out_dir/<stem>/ with the models in `models_dir` (default
    paths.models), loaded once and run with their training settings (`flags`: FLAGS -> value
    that must agree with them). `on_error`: pipeline/runner.py. Returns a summary dict."""
    t0 = time.perf_counter()
    mode = on_error_mode(on_error)
    out_dir = Path(out_dir)
    _check_args(method, mpp, out_dir)
    slide_paths = _slide_paths(slides, out_dir)
    checked = SlideRun(mode, log)  # bad paths fail before the models load
    for p in slide_paths:
        checked.call(p.stem, _named, _check_slide, p,
                     mpp if mpp is not None else params.tile.fallback_mpp,
                     params.tile.mpp_range_um)
    models = load_models(models_dir if models_dir is not None else paths.models, method)
    params = run_params(params, models.settings, flags)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [p for p in slide_paths if p.stem in checked.results]
    done = run_slides([(p.stem, _named, (predict_slide, p, out_dir, models, params, mpp,
                                         workers)) for p in todo], mode, 1,
                      f"predict/{models.method}", log)
    done.failed = {**checked.failed, **done.failed}
    rows = [{k: s.get(k) for k in CSV_KEYS} for s in done.results.values()]
    failures_csv = failures_file(out_dir, "predict")
    log.info("predict: wrote %d slide folder(s) under %s", len(rows), out_dir)
    finish(done, failures_csv, {p.stem: p for p in slide_paths})
    return {
        "method": models.method,
        "model_sha256": models.sha256,
        "settings": models.settings,
        "out_dir": str(out_dir),
        "n_slides": len(slide_paths),
        "n_predicted": sum(r["status"] == "predicted" for r in rows),
        "n_current": sum(r["status"] == "current" for r in rows),
        "n_failed": len(done.failed),
        "failed": done.failed,
        "failures_csv": str(failures_csv) if mode == "skip" else None,
        "slides": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def cli(
    slides: list[Path] = typer.Argument(..., help="slide files (any format OpenSlide reads)"),
    out: Path = typer.Option(..., "--out", help="output folder; one subfolder per slide"),
    models: Path = typer.Option(Path("models"), "--models", help="folder with the checkpoints"),
    mpp: float | None = typer.Option(
        None, "--mpp", help="um per level-0 pixel for slides without mpp metadata "
        "(otherwise tile.fallback_mpp / tile.fallback_level apply, with a warning)"),
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
    on_error: str = typer.Option(
        "stop", "--on-error", help="stop: stop at the first bad slide; skip: list it in "
        "OUT/predict_failures.csv and predict the others"),
    method: str = typer.Option(
        "auto", "--method", help="auto (e2e, else separate, else classifier) | e2e | separate | "
        "classifier"),
    tile_mpp: float | None = typer.Option(
        None, "--tile-mpp", help="expected tile um/px: an error if the models were trained "
        "at another (they always run at their own)"),
    tile_size_px: int | None = typer.Option(
        None, "--tile-size-px", help="expected tile size (px): an error if the models differ"),
    crop_px: int | None = typer.Option(
        None, "--crop-px", help="expected extractor crop (px): an error if the models differ"),
    featuremap_mode: str | None = typer.Option(
        None, "--featuremap-mode", help="expected feature-map mode: an error if the U-Net "
        "was trained with another"),
    featuremap_size: int | None = typer.Option(
        None, "--featuremap-size", help="expected canvas size: an error if the U-Net differs"),
) -> None:
    """Predict tumor on new slides (no manifest, no annotation): heatmap (PNG + HDF5), tumor
    regions as QuPath GeoJSON and ASAP XML, and a JSON summary per slide.

    The models run with the tile mpp/size, crop and feature map they were trained with (their
    checkpoints record them); params.yaml values that differ are ignored (logged), a flag
    above that contradicts them is an error. Also reads params tile.* (tissue detection),
    extractor.workers/amp, evaluate.threshold. Writes OUT/<slide_stem>/<stem>.{heatmap.h5,
    heatmap.png, tumor.geojson, tumor.xml, summary.json} (summary last: a folder is complete
    when it exists; a rerun skips current ones) and, with --on-error skip,
    OUT/predict_failures.csv.
    """
    params = load_params(params_file)
    flags = dict(zip(FLAGS, (tile_mpp, tile_size_px, crop_px, featuremap_mode, featuremap_size),
                     strict=True))
    s = run(params, Paths(), slides, out, models, method, mpp, on_error, flags=flags)
    typer.echo(f"predict ({s['method']}): {s['n_predicted']} predicted, {s['n_current']} current, "
               f"{s['n_failed']} failed -> {s['out_dir']}"
               + (f" (see {s['failures_csv']})" if s["n_failed"] else ""))
