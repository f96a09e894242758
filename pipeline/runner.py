"""One per-slide runner for the stages that work slide by slide (tile, label, extract-features,
predict): a process pool or the calling process, a progress bar, and one meaning of
`--on-error` everywhere.

- `stop` (default; `fail` is accepted as its older name): the first failing slide's exception
  propagates unchanged and the stage exits non-zero. Slides finished before it keep their
  outputs (each written atomically and stamped with a params hash), so a rerun resumes.
- `skip`: a failing slide is logged (with its traceback when the exception is not a
  PipelineError, i.e. a bug or an unexpected library error) and listed with its one-line
  error in the stage's failures file, `reports/<stage>_failures.csv` (predict, whose outputs
  are not the project's: OUT/predict_failures.csv); the other slides go on. The stage
  succeeds only if at least one of its slides is done (processed now or already current);
  when every slide failed it raises `AllSlidesFailed` after writing the failures file.

Failures files are run logs, like reports/timings/: git-ignored and not declared in dvc.yaml.
The DVC commands run with `stop`, so a declared failures file would always be an empty,
tracked file; a `skip` run is a manual triage step whose list belongs to that run only. A
`stop` run removes an older run's failures file so that it never describes another run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.log import get_logger, progress

log = get_logger("pipeline.runner")

ON_ERROR = ("stop", "skip")
_ALIASES = {"fail": "stop"}  # the tile/label/predict option's older name
FAILURE_COLUMNS = ["slide_id", "slide_path", "error"]


class AllSlidesFailed(PipelineError):
    """--on-error skip, and no slide of the stage is done: nothing to go on with."""


def on_error_mode(value: str) -> str:
    """'stop' or 'skip' (from 'stop', 'skip' or the alias 'fail'); else a PipelineError."""
    mode = _ALIASES.get(value, value)
    if mode not in ON_ERROR:
        raise PipelineError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {value!r}")
    return mode


def one_line(exc: BaseException) -> str:
    """The error in one line. Errors re-raised from DataLoader workers carry a traceback in
    their text: keep its last line (the original message) without the repeated type name.
    Exceptions that are not PipelineErrors keep their type name (a KeyError's text alone says
    little)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    msg = lines[-1] if lines else type(exc).__name__
    name = type(exc).__name__
    for prefix in (f"{type(exc).__module__}.{name}: ", f"{name}: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg if isinstance(exc, PipelineError) else f"{name}: {msg}"


@dataclass
class SlideRun:
    """What one stage run did per slide: results of the slides done, errors of the failed."""

    mode: str  # "stop" | "skip"
    logger: logging.Logger = log
    results: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def ok(self, slide_id: str, result: Any) -> None:
        self.results[slide_id] = result

    def fail(self, slide_id: str, exc: BaseException) -> None:
        """stop: re-raise `exc`; skip: log it and list the slide."""
        if self.mode == "stop":
            raise exc
        expected = isinstance(exc, PipelineError)
        self.logger.error("slide %s failed: %s", slide_id, one_line(exc),
                          exc_info=None if expected else exc)
        self.failed[slide_id] = one_line(exc)

    def call(self, slide_id: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) for one slide in this process; its result, or None when it failed."""
        try:
            result = fn(*args)
        except Exception as exc:
            self.fail(slide_id, exc)
            return None
        self.ok(slide_id, result)
        return result


Job = tuple[str, Callable[..., Any], tuple]  # (slide_id, function, its arguments)


def run_slides(jobs: Sequence[Job], on_error: str, workers: int = 1, desc: str = "",
               logger: logging.Logger = log) -> SlideRun:
    """Run fn(*args) for every job, in `workers` processes (1: in this process, in order),
    with a progress bar. Returns the SlideRun (results by slide, failures when skipping)."""
    run = SlideRun(on_error_mode(on_error), logger)
    n_workers = max(1, min(workers, len(jobs)))
    bar = progress(total=len(jobs), desc=desc, unit="slide")
    try:
        if n_workers == 1:
            for slide_id, fn, args in jobs:
                run.call(slide_id, fn, *args)
                bar.update(1)
        else:
            _pool(jobs, n_workers, run, bar)
    finally:
        bar.close()
    return run


def _pool(jobs: Sequence[Job], n_workers: int, run: SlideRun, bar: Any) -> None:
    with ProcessPoolExecutor(max_workers=n_workers) as ex:
        pending = {ex.submit(fn, *args): sid for sid, fn, args in jobs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    sid = pending.pop(fut)
                    try:
                        run.ok(sid, fut.result())
                    except Exception as exc:
                        run.fail(sid, exc)
                    bar.update(1)
        except BaseException:  # stop (or Ctrl-C): let running slides finish, start no more
            ex.shutdown(wait=True, cancel_futures=True)
            raise


def failures_file(reports: Path, stage: str, shard: tuple[int, int] | None = None) -> Path:
    """reports/<stage>_failures.csv (reports/<stage>_failures.<i>of<n>.csv for a shard)."""
    suffix = "" if shard is None else f".{shard[0]}of{shard[1]}"
    return reports / f"{stage}_failures{suffix}.csv"


def finish(run: SlideRun, path: Path, slide_paths: Mapping[str, Any],
           n_done_before: int = 0) -> None:
    """Write (skip) or remove (stop) the failures file `path`; raise AllSlidesFailed when
    slides failed and none is done (`n_done_before`: slides already current, not rerun)."""
    if run.mode == "stop":
        path.unlink(missing_ok=True)
        return
    rows = [{"slide_id": s, "slide_path": str(slide_paths.get(s, "")), "error": m}
            for s, m in run.failed.items()]
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=FAILURE_COLUMNS).to_csv(tmp, index=False)
    if run.failed:
        run.logger.warning("%d slide(s) failed, listed in %s", len(run.failed), path)
        if not run.results and n_done_before == 0:
            raise AllSlidesFailed(f"every slide failed ({len(run.failed)}; see {path}), e.g. "
                                  f"{next(iter(run.failed))}: {next(iter(run.failed.values()))}")


def selected(ids: Iterable[str], shard: tuple[int, int] | None) -> list[str]:
    """The slides of shard (i, n): those at manifest positions k with k % n == i."""
    ids = list(ids)
    if shard is None:
        return ids
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise PipelineError(f"shard {i}/{n}: need 0 <= i < n")
    return [s for k, s in enumerate(ids) if k % n == i]
