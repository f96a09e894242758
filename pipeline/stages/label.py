"""Stage `label`: per-tile tumor / normal fractions and tumor / normal / nolabel labels from the
pathologists' annotations for every manifest slide (the core: pipeline/labeling.py).

Reads  the manifest (`data.manifest`), data/tiles/<slide_id>.h5 and each slide's annotation;
       params `tile.*` (via the tile index) and `label.*`.
Writes data/labels/<slide_id>.h5, reports/labels.csv (slide_id, split, n_tiles, n_tumor,
       n_normal, n_nolabel) and, with `--on-error skip`, reports/label_failures.csv
       (pipeline/runner.py). A killed run's temp files of this run's slides are removed before
       work starts.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from pipeline.io import atomic_path, h5_is_current, remove_stale_temps
from pipeline.labeling import (
    CSV_COLUMNS,
    annotation_sha,
    counts_from_file,
    label_slide,
    tile_sha,
    warn_unreferenced_annotations,
)
from pipeline.log import get_logger
from pipeline.manifest import load_manifest
from pipeline.params import Params, load_params
from pipeline.paths import Paths
from pipeline.runner import failures_file, finish, on_error_mode, run_slides, selected
from pipeline.sharding import parse_shard

log = get_logger("pipeline.label")
STAGE = "label"


def _csv_rows(paths: Paths, rows: list, params_hash: str, results: dict[str, dict]) -> list[dict]:
    """reports/labels.csv: every manifest slide with a current label file."""
    csv_rows = []
    for r in rows:
        out = paths.label_file(r.slide_id)
        counts = results.get(r.slide_id)
        if counts is None:
            if not h5_is_current(out, params_hash,
                                 annotation_path=paths.recorded(r.annotation_path, out.parent)):
                continue
            counts = counts_from_file(r.slide_id, out)
        csv_rows.append({**counts, "split": r.split})
    return csv_rows


def run(
    params: Params,
    paths: Paths,
    on_error: str = "stop",
    shard: tuple[int, int] | None = None,
    workers: int | None = None,
) -> dict:
    """Label every manifest slide (of this shard) whose label file is not current; then write
    reports/labels.csv over all manifest slides with a current label file. Returns a summary.
    `on_error`: see pipeline/runner.py (`failed`: slide_id -> message). Tile / label totals in
    the summary are over this shard's slides; labels.csv lists every manifest slide."""
    on_error = on_error_mode(on_error)
    manifest_path = paths.root / params.data.manifest
    manifest = load_manifest(manifest_path)
    params_hash = params.section_hash("tile", "label")
    tile_hash = params.section_hash("tile")
    rows = list(manifest.itertuples(index=False))
    by_id = {r.slide_id: r for r in rows}
    mine = [by_id[s] for s in selected(by_id, shard)]
    # temps of a killed run: only this run's slides (a concurrent shard's live temps look the
    # same), the shared CSV's only on an unsharded run
    own = [paths.label_file(r.slide_id) for r in mine]
    stale = remove_stale_temps(own + ([paths.reports / "labels.csv"] if shard is None else []))
    if stale:
        log.warning("label: removed %d temp file(s) left by a killed run (e.g. %s)", len(stale),
                    stale[0])
    if shard is None:
        warn_unreferenced_annotations(manifest_path, rows)
    # An annotation edited in place (same path) must relabel: compare its content hash too.
    # Hashed once: label_slide records these.
    shas = {r.slide_id: (annotation_sha(r.annotation_path), tile_sha(paths.tile_file(r.slide_id)))
            for r in mine}
    todo = [r for r in mine if not h5_is_current(paths.label_file(r.slide_id), params_hash,
                                                 annotation_path=paths.recorded(
                                                     r.annotation_path, paths.labels),
                                                 annotation_sha256=shas[r.slide_id][0],
                                                 tile_index_sha256=shas[r.slide_id][1])]
    log.info("label: %d slide(s) in %s%s, %d current, %d to label", len(mine), manifest_path,
             f" (shard {shard[0]}/{shard[1]})" if shard else "", len(mine) - len(todo), len(todo))

    def job_args(r) -> tuple:
        out = paths.label_file(r.slide_id)
        return (r.slide_id, paths.tile_file(r.slide_id), r.annotation_path, out, params.label,
                params_hash, tile_hash, paths.recorded(r.annotation_path, out.parent),
                shas[r.slide_id])

    done = run_slides([(r.slide_id, label_slide, job_args(r)) for r in todo], on_error,
                      workers if workers is not None else params.tile.workers, "label", log)
    csv_rows = _csv_rows(paths, rows, params_hash, done.results)
    csv_path = paths.reports / "labels.csv"
    df = pd.DataFrame(csv_rows, columns=list(CSV_COLUMNS))
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False)
    missing = len(rows) - len(csv_rows)
    if missing:
        log.warning("label: %d manifest slide(s) have no current label file (failed, other "
                    "shards, or not run yet) and are not in %s", missing, csv_path)
    log.info("label: wrote %s (%d slides)", csv_path, len(csv_rows))
    finish(done, failures_file(paths.reports, STAGE, shard),
           {r.slide_id: r.slide_path for r in rows}, len(mine) - len(todo))
    ours = df[df["slide_id"].isin({r.slide_id for r in mine})]  # totals over this shard
    return {
        "n_slides": len(mine),
        "n_labelled": len(done.results),
        "n_current": len(mine) - len(todo),
        "n_failed": len(done.failed),
        "failed": done.failed,  # slide_id -> error message
        "n_tiles": int(ours["n_tiles"].sum()),
        "n_tumor": int(ours["n_tumor"].sum()),
        "n_normal": int(ours["n_normal"].sum()),
        "n_nolabel": int(ours["n_nolabel"].sum()),
        "csv": str(csv_path),
    }


def cli(
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params YAML file"),
    on_error: str = typer.Option(
        "stop", "--on-error",
        help="stop: stop at the first slide that cannot be labelled; skip: list it in "
        "reports/label_failures.csv and label the rest",
    ),
    shard: str | None = typer.Option(
        None, "--shard", help="I/N: only manifest slides whose index % N == I (array jobs)"
    ),
    workers: int | None = typer.Option(None, "--workers", help="processes (default: tile.workers)"),
) -> None:
    """Label tiles tumor / normal / nolabel from the annotations.

    Reads the manifest (data.manifest), data/tiles/<slide_id>.h5 and each slide's annotation
    (ASAP XML, QuPath GeoJSON or mask image); params tile.* and label.*. Writes
    data/labels/<slide_id>.h5 and reports/labels.csv."""
    params = load_params(params_file)
    summary = run(params, Paths(), on_error=on_error, shard=parse_shard(shard), workers=workers)
    typer.echo(
        f"label: {summary['n_labelled']} labelled, {summary['n_current']} current, "
        f"{summary['n_failed']} failed; {summary['n_tiles']} tiles: {summary['n_tumor']} "
        f"tumor, {summary['n_normal']} normal, {summary['n_nolabel']} nolabel"
    )
