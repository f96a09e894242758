"""Stage `tile`: tissue mask + non-overlapping tile grid per manifest slide ->
data/tiles/<slide_id>.h5 and reports/tiles/<slide_id>.png (the core: pipeline/tiling.py).

Also writes reports/tiles.csv (one row per manifest slide whose output is current), with
`--on-error skip` reports/tile_failures.csv (pipeline/runner.py), and (unsharded)
reports/timings/tile.json.

Resuming: every output is written to a temp sibling and renamed, so a killed run leaves complete
outputs or none; a rerun skips slides whose outputs are current and removes the temp files a
killed run left for the slides it is about to do (tests/test_resume.py kills it with SIGKILL).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd
import typer

from pipeline.io import atomic_path, h5_is_current, remove_stale_temps, write_timings
from pipeline.log import get_logger
from pipeline.manifest import load_manifest
from pipeline.params import Params, load_params
from pipeline.paths import Paths
from pipeline.runner import failures_file, finish, on_error_mode, run_slides, selected
from pipeline.sharding import parse_shard
from pipeline.tileindex import read_tile_index
from pipeline.tiling import (
    csv_row,
    fingerprint_or_unreadable,
    index_current,
    thumb_file,
    tile_or_cache,
)

log = get_logger("pipeline.tile")

# Only what the outputs are: the CSV is git-tracked (dvc.yaml cache: false), so a rerun with the
# same slides and params must leave it byte-identical. What a run did (seconds, tiled vs
# current) goes to the log and reports/timings/tile.json.
CSV_COLUMNS = ["slide_id", "n_tiles", "grid_rows", "grid_cols", "mpp", "mpp_source", "level",
               "tile_mpp"]
STAGE = "tile"


def _remove_stale(paths: Paths, slide_ids: list[str], shard: tuple[int, int] | None) -> None:
    """A killed run (SIGKILL, OOM, node loss) can leave `.<output>.XXXXXXXX.tmp` files; they are
    never read as outputs, but would pile up. Only this run's slides' temps are removed (a
    concurrent shard's live temps are not ours); the shared CSVs' only on an unsharded run."""
    own = [f(sid) for sid in slide_ids
           for f in (paths.tile_file, paths.pixel_cache_file, lambda s: thumb_file(paths, s))]
    if shard is None:
        own += [paths.reports / "tiles.csv", failures_file(paths.reports, STAGE),
                paths.timings_file(STAGE)]
    stale = remove_stale_temps(own)
    if stale:
        log.warning("removed %d temp file(s) left by a killed run (e.g. %s)", len(stale), stale[0])


def _todo(params: Params, paths: Paths, slide_ids: list[str],
          slide_paths: dict[str, str]) -> list[tuple[str, bool]]:
    """(slide_id, only the pixel cache is due) for every slide whose outputs are not current."""
    tp, phash = params.tile, params.section_hash("tile")
    jobs = []
    for sid in slide_ids:
        current = index_current(paths, sid, slide_paths[sid], phash)
        thumb_ok = thumb_file(paths, sid).is_file()
        cache_ok = not tp.cache_pixels or h5_is_current(
            paths.pixel_cache_file(sid), phash,
            slide_fingerprint=fingerprint_or_unreadable(slide_paths[sid]))
        if not (current and thumb_ok and cache_ok):
            jobs.append((sid, current and thumb_ok))
    return jobs


def _table(params: Params, paths: Paths, ids: list[str], slide_paths: dict[str, str],
           rows: dict[str, dict], failed: dict[str, str]) -> list[dict]:
    """reports/tiles.csv describes every manifest slide whose output is current, so that any run
    (a shard too) leaves a complete table of what is on disk; `seconds` only for this run's
    work."""
    phash = params.section_hash("tile")
    table = []
    for sid in ids:
        if sid in rows:
            table.append(rows[sid])
        elif sid not in failed and index_current(paths, sid, slide_paths[sid], phash):
            idx = read_tile_index(paths.tile_file(sid))
            table.append(csv_row(idx.attrs, idx.n_tiles, math.nan, "current"))
    return table


def run(
    params: Params,
    paths: Paths,
    on_error: str = "stop",
    shard: tuple[int, int] | None = None,
    workers: int | None = None,
) -> dict:
    """Tile every manifest slide (or shard i of n: slides whose manifest index % n == i) whose
    output is missing or stale; returns a summary dict. `on_error`: see pipeline/runner.py."""
    t_start = time.perf_counter()
    on_error = on_error_mode(on_error)
    manifest_path = paths.root / params.data.manifest
    manifest = load_manifest(manifest_path)
    log.info("read manifest %s (%d slides)", manifest_path, len(manifest))
    ids = manifest["slide_id"].tolist()
    slide_paths = dict(zip(ids, manifest["slide_path"], strict=True))
    mine = selected(ids, shard)
    if shard is not None:
        log.info("shard %d/%d: %d slides", shard[0], shard[1], len(mine))
    _remove_stale(paths, mine, shard)
    jobs = _todo(params, paths, mine, slide_paths)
    n_current = len(mine) - len(jobs)
    log.info("%d slides current, %d to tile", n_current, len(jobs))
    done = run_slides([(sid, tile_or_cache, (sid, slide_paths[sid], params, paths, only_cache))
                       for sid, only_cache in jobs], on_error,
                      workers or params.tile.workers, "tile", log)
    rows, failed = done.results, done.failed
    table = _table(params, paths, ids, slide_paths, rows, failed)
    csv_path = paths.reports / "tiles.csv"
    with atomic_path(csv_path) as tmp:
        pd.DataFrame(table, columns=CSV_COLUMNS).to_csv(tmp, index=False)
    fail_path = failures_file(paths.reports, STAGE, shard)
    n_tiled = sum(r["status"] == "tiled" for r in rows.values())
    seconds = round(time.perf_counter() - t_start, 3)
    if shard is None:  # array-job shards would overwrite each other's times
        write_timings(paths, STAGE, seconds=seconds, n_tiled=n_tiled, n_current=n_current,
                      slide_seconds={sid: round(float(r["seconds"]), 3)
                                     for sid, r in rows.items()})
    log.info("wrote %s (%d slides) in %.1f s (%d tiled, %d current, %d failed)", csv_path,
             len(table), seconds, n_tiled, n_current, len(failed))
    finish(done, fail_path, slide_paths, n_current)
    return {
        "n_slides": len(mine),
        "n_tiled": n_tiled,
        "n_current": n_current,
        "n_failed": len(failed),
        "failed": failed,
        "tiled": [s for s in mine if s in rows],
        "n_tiles": int(sum(r["n_tiles"] for r in table if r["slide_id"] in set(mine))),
        "csv": str(csv_path),
        "failures_csv": str(fail_path),
    }


def cli(
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
    on_error: str = typer.Option(
        "stop", "--on-error",
        help="stop: stop at the first bad slide; skip: log it, list it in "
        "reports/tile_failures.csv and tile the others (fails if every slide fails)",
    ),
    shard: str | None = typer.Option(
        None, "--shard", help="i/n: only slides whose manifest index % n == i (array jobs)"
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="slide worker processes (default: tile.workers)", min=1
    ),
) -> None:
    """Tile the slides: tissue mask (Otsu on saturation) and a grid of whole tiles at tile.mpp.

    Reads the manifest (data.manifest), the slides it lists and params tile.*. Writes
    data/tiles/<slide_id>.h5 (tile coords, grid, tissue fraction, lump id), reports/tiles/
    <slide_id>.png, reports/tiles.csv (and reports/tile_failures.csv). Slides whose output is
    current (same tile params) are skipped; stale or damaged ones are rewritten.
    """
    params = load_params(params_file)
    summary = run(params, Paths(), on_error=on_error, shard=parse_shard(shard), workers=workers)
    typer.echo(f"tile: {summary['n_tiled']} slides tiled, {summary['n_current']} current, "
               f"{summary['n_failed']} failed; {summary['n_tiles']} tiles -> {summary['csv']}")
