"""Stage `extract-features`: every tile's 16-d feature and tumor probability, per slide, with
models/extractor.pt (the core: pipeline/extraction.py).

Writes data/features/<slide_id>.h5, with `--on-error skip` reports/extract-features_failures.csv
(pipeline/runner.py), and the stage's wall time to reports/timings/extract-features.json
(unsharded runs; rank 0).
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.distributed import is_main, relaunch_if_requested
from pipeline.extraction import extract_all
from pipeline.io import write_timings
from pipeline.manifest import load_manifest
from pipeline.params import Params, load_params
from pipeline.paths import Paths
from pipeline.runner import SlideRun, failures_file, finish, on_error_mode
from pipeline.sharding import parse_shard

STAGE = "extract-features"


def run(params: Params, paths: Paths, shard: tuple[int, int] | None = None,
        on_error: str = "stop") -> dict:
    mode = on_error_mode(on_error)
    manifest = load_manifest(params.data.manifest)
    summary = extract_all(params, paths, paths.models / "extractor.pt", "", shard, mode,
                          manifest)
    if is_main():
        slide_paths = dict(zip(manifest["slide_id"], manifest["slide_path"], strict=True))
        done = SlideRun(mode, failed=summary["failed"])
        n_done = summary["n_extracted"] + summary["n_current"]
        finish(done, failures_file(paths.reports, STAGE, shard), slide_paths, n_done)
    # An array job's shards would overwrite each other's time: only a whole run records it.
    if shard is None and is_main():
        write_timings(paths, STAGE, seconds=summary["seconds"])
    return summary


def cli(
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
    shard: str = typer.Option(None, "--shard", help="i/n: only slides i, i+n, ... (array jobs)"),
    on_error: str = typer.Option(
        "stop", "--on-error", help="stop: stop at the first bad slide; skip: list it in "
        "reports/extract-features_failures.csv and extract the others"),
) -> None:
    """Compute every tile's 16-d feature and tumor probability with the trained extractor.

    Reads: models/extractor.pt, the manifest, data/tiles/*.h5, data/labels/*.h5, the slides (or
    pixel caches); params tile.*, label.*, extractor.crop_px/workers/amp.
    Writes: data/features/<slide_id>.h5 (features, tumor_prob, coords, grid, label, lump_id),
    reports/timings/extract-features.json (not with --shard).
    Under torchrun, slides are split over the ranks (docs/distributed.md).
    """
    relaunch_if_requested()
    run(load_params(params_file), Paths(), parse_shard(shard), on_error)
