"""Table 1 over seeds: mean ± std of the evaluate stage's metrics over several runs, in the
paper's Table 1 form (Method | Accuracy (%) | PR-AUC (%)), plus a table of further metrics.

Inputs, either
  --from-repo [DIR]      the experiments of the DVC project DIR (default: this one), read with
                         DVC's Python API in this process: the same records as
  --from-exp-show FILE   the output of `dvc exp show --json` (DVC 3.x: a list of ExpState
                         records, each baseline commit with its `experiments` ranges; the DVC 2.x
                         dict layout is read too). The experiments' reports/metrics.json data are
                         used — not the workspace or baseline-commit rows unless asked — only
                         those whose params equal the workspace's apart from the seed (unless
                         --exp names them or --allow-mixed), and when several share a seed only
                         the newest one counts.
  --metrics A.json B.json ...   plain reports/metrics.json files, one per run.

Runs must differ only in the seed: runs whose params.yaml differ in any other key, or whose
metrics were computed on another split/threshold, stop the script with the keys named
(`--allow-mixed` overrides the params check).

    python -m pipeline.table1 --from-repo --out reports/table1.md
    python -m pipeline.table1 --from-exp-show exp.json --out reports/table1.md
    python -m pipeline.table1 --metrics s0/metrics.json s1/metrics.json --out table1.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.io import write_text_atomic
from pipeline.log import get_logger
from pipeline.report import METHOD_LABELS, TABLE_ORDER

log = get_logger("pipeline.table1")

DEFAULT_METRICS_FILE = "reports/metrics.json"
DEFAULT_PARAMS_FILE = "params.yaml"
NOT_RUN = "not run"

# (column title, metrics.json path below the method, scale, higher is better)
MAIN_COLUMNS: tuple[tuple[str, tuple[str, ...], float, bool], ...] = (
    ("Accuracy (%)", ("patch", "accuracy"), 100.0, True),
    ("PR-AUC (%)", ("patch", "pr_auc"), 100.0, True),
)
EXTRA_COLUMNS: tuple[tuple[str, tuple[str, ...], float, bool], ...] = (
    ("Average precision (%)", ("patch", "average_precision"), 100.0, True),
    ("ROC-AUC (%)", ("patch", "roc_auc"), 100.0, True),
    ("Tumor points / slide", ("tumor_points", "mean_per_slide"), 1.0, False),
    ("C16 slide AUC (%)", ("camelyon16", "slide_auc_max_prob"), 100.0, True),
    ("C16 FROC", ("camelyon16", "froc"), 1.0, True),
    ("C17 kappa, split", ("camelyon17", "evaluated_split", "kappa"), 1.0, True),
    ("C17 kappa, all splits (incl. training data)", ("camelyon17", "all_splits", "kappa"), 1.0,
     True),
    # the paper's protocol: random forest on heat-map features, patient-level CV (out of fold)
    ("C17 kappa RF, split", ("camelyon17", "random_forest", "evaluated_split", "kappa"), 1.0,
     True),
    ("C17 kappa RF, all splits", ("camelyon17", "random_forest", "all_splits", "kappa"), 1.0,
     True),
)


class TableError(PipelineError):
    """The runs given to table1 cannot be tabulated together (one line)."""


@dataclass
class RunMetrics:
    """One run: its name, seed, params (flat, dotted keys) and metrics.json content."""

    name: str
    seed: int | None
    metrics: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    timestamp: str | None = None
    kind: str = "experiment"  # experiment | workspace | baseline | file


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (lists kept as values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _norm(path: str) -> str:
    p = path.replace("\\", "/")
    return p[2:] if p.startswith("./") else p


def _file_data(section: Mapping[str, Any] | None, wanted: str) -> dict[str, Any] | None:
    """DVC's {path: {"data": {...}} | {"error": ...}} -> the data of `wanted`, else None. DVC 2.x
    nested it the same way; very old versions gave the data directly."""
    if not section:
        return None
    for path, res in section.items():
        if _norm(path) != _norm(wanted):
            continue
        if isinstance(res, Mapping) and "data" in res:
            return dict(res["data"]) if isinstance(res["data"], Mapping) else None
        if isinstance(res, Mapping) and "error" in res:
            return None
        return dict(res) if isinstance(res, Mapping) else None
    return None


def _seed_of(params: Mapping[str, Any], metrics: Mapping[str, Any], seed_key: str) -> int | None:
    v = params.get(seed_key)
    if v is None:
        v = metrics.get("evaluation", {}).get("seed") if isinstance(
            metrics.get("evaluation"), Mapping) else None
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _record(name: str, data: Mapping[str, Any] | None, kind: str, metrics_file: str,
            params_file: str, seed_key: str, skipped: list[str]) -> RunMetrics | None:
    if not data:
        skipped.append(f"{name} (no data: queued, running or failed)")
        return None
    metrics = _file_data(data.get("metrics"), metrics_file)
    if metrics is None:
        skipped.append(f"{name} (no {metrics_file})")
        return None
    params = flatten(_file_data(data.get("params"), params_file) or {})
    return RunMetrics(name=name, seed=_seed_of(params, metrics, seed_key), metrics=metrics,
                      params=params, timestamp=data.get("timestamp"), kind=kind)


def parse_exp_show(
    obj: Any, metrics_file: str = DEFAULT_METRICS_FILE, params_file: str = DEFAULT_PARAMS_FILE,
    seed_key: str = "seed",
) -> tuple[list[RunMetrics], list[str]]:
    """Every row of `dvc exp show --json` output that has `metrics_file`.

    DVC 3.x layout: ``[{"rev": "workspace" | sha, "name": branch | None, "data": {"timestamp",
    "params": {"params.yaml": {"data": {...}}}, "metrics": {"reports/metrics.json": {"data":
    {...}}}, ...}, "error": ..., "experiments": [{"name": exp, "executor": {...}, "revs":
    [ExpState, ...]}] | None}, ...]``; the first rev of a range is the experiment's result.
    Returns (runs with kind workspace / baseline / experiment, list of skipped rows + reason).
    """
    runs: list[RunMetrics] = []
    skipped: list[str] = []
    args = (metrics_file, params_file, seed_key, skipped)
    if isinstance(obj, Mapping):  # DVC 2.x: {baseline_rev: {"baseline": {...}, exp_rev: {...}}}
        for base_rev, entries in obj.items():
            for rev, entry in entries.items():
                data = entry.get("data", entry) if isinstance(entry, Mapping) else None
                kind = ("workspace" if base_rev == "workspace" else "baseline") \
                    if rev == "baseline" else "experiment"
                name = (data or {}).get("name") or (base_rev if rev == "baseline" else rev[:7])
                r = _record(str(name), data, kind, *args)
                if r is not None:
                    runs.append(r)
        return runs, skipped
    if not isinstance(obj, list):
        raise TableError("exp show JSON: expected a list (DVC 3) or an object (DVC 2) at the top")
    for state in obj:
        if not isinstance(state, Mapping):
            continue
        rev = str(state.get("rev", ""))
        kind = "workspace" if rev == "workspace" else "baseline"
        name = state.get("name") or (rev if kind == "workspace" else rev[:7])
        r = _record(str(name), state.get("data"), kind, *args)
        if r is not None:
            runs.append(r)
        for rng in state.get("experiments") or []:
            revs = rng.get("revs") or []
            if not revs:
                continue
            exp = revs[0]
            name = str(rng.get("name") or exp.get("name") or str(exp.get("rev", ""))[:7])
            if exp.get("error"):
                skipped.append(f"{name} (error: {exp['error'].get('msg', exp['error'])})")
                continue
            r = _record(name, exp.get("data"), "experiment", *args)
            if r is not None:
                runs.append(r)
    return runs, skipped


def _exp_json_default(o: Any) -> Any:
    """How `dvc exp show --json` writes what JSON has no type for."""
    if isinstance(o, (datetime.date, datetime.datetime)):
        return o.isoformat()
    if isinstance(o, Exception):
        return {"type": type(o).__name__, "msg": str(o)}
    raise TypeError(f"exp show: cannot write a {type(o).__name__} as JSON")


def exp_show_records(repo: str | Path = ".") -> list[dict[str, Any]]:
    """The records `dvc exp show --json` prints for the DVC project `repo` (experiments of HEAD),
    from DVC's Python API, for `parse_exp_show`. Not `dvc.api.exp_show`: that returns the CLI
    table's rows (timestamps to the minute, which cannot tell the newest of two runs; integers as
    floats; metrics columns not told apart from params), `Repo.experiments.show` under it keeps
    the full records."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo.open(str(repo)) as dvc_repo:
            states = dvc_repo.experiments.show()
            return json.loads(json.dumps([s.dumpd() for s in states], default=_exp_json_default))
    except DvcException as exc:
        raise TableError(f"{repo}: cannot list the DVC experiments ({exc})") from None


def read_metrics_files(paths: Sequence[str | Path], seed_key: str = "seed") -> list[RunMetrics]:
    """Plain metrics.json files, one run each (seed from the file's evaluation.seed)."""
    runs = []
    for p in paths:
        p = Path(p)
        try:
            metrics = json.loads(p.read_text())
        except FileNotFoundError:
            raise TableError(f"{p}: metrics file not found") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise TableError(f"{p}: not readable JSON ({exc})") from None
        if not isinstance(metrics, dict) or "patch" not in metrics:
            raise TableError(f"{p}: not an evaluate metrics.json (no 'patch' section)")
        runs.append(RunMetrics(name=str(p), seed=_seed_of({}, metrics, seed_key),
                               metrics=metrics, kind="file"))
    return runs


def _without(params: Mapping[str, Any], key: str) -> str:
    return json.dumps({k: v for k, v in params.items() if k != key}, sort_keys=True)


def select_runs(runs: Sequence[RunMetrics], seed_key: str = "seed",
                kinds: Sequence[str] = ("experiment",), names: Sequence[str] = (),
                allow_mixed: bool = False,
                reference: Mapping[str, Any] | None = None) -> list[RunMetrics]:
    """The runs to tabulate: of the given kinds (or named), one per seed (newest timestamp wins
    among experiments sharing a seed), all with the same params apart from the seed and the same
    evaluated split and threshold. Files (kind 'file') are always kept as given.

    `reference`: flat params (e.g. the workspace's); experiments whose params differ from it in
    anything but the seed are dropped first (older sweeps on the same commit), with a log line.
    """
    chosen = [r for r in runs if (r.name in names if names else r.kind in (*kinds, "file"))]
    if names:
        missing = sorted(set(names) - {r.name for r in chosen})
        if missing:
            raise TableError(f"exp show JSON: no run with metrics named {', '.join(missing)}")
    if reference is not None and not names:
        ref = _without(reference, seed_key)
        dropped = [r.name for r in chosen if r.kind != "file" and _without(r.params, seed_key)
                   != ref]
        if dropped:
            log.info("left out %d run(s) whose params differ from the workspace's in more than "
                     "%s: %s", len(dropped), seed_key, ", ".join(dropped))
        chosen = [r for r in chosen if r.name not in dropped]
    if not chosen:
        raise TableError("no runs with metrics to tabulate (did the experiments finish?)")
    by_seed: dict[Any, RunMetrics] = {}
    out: list[RunMetrics] = []
    for r in chosen:
        if r.kind == "file" or r.seed is None:
            out.append(r)
            continue
        old = by_seed.get(r.seed)
        if old is None or (r.timestamp or "") > (old.timestamp or ""):
            if old is not None:
                log.warning("seed %s: using %s, newer than %s", r.seed, r.name, old.name)
            by_seed[r.seed] = r
        else:
            log.warning("seed %s: using %s, newer than %s", r.seed, old.name, r.name)
    out += sorted(by_seed.values(), key=lambda r: r.seed)
    if not allow_mixed:
        keys = set().union(*(r.params for r in out)) - {seed_key}
        differ = sorted(k for k in keys if len({json.dumps(r.params.get(k), sort_keys=True)
                                                  for r in out}) > 1)
        if differ:
            raise TableError(f"runs differ in params other than {seed_key}: "
                             f"{', '.join(differ[:8])}; pick runs with --exp or pass "
                             "--allow-mixed")
    for key in ("split", "threshold"):
        vals = {str(r.metrics.get("evaluation", {}).get(key)) for r in out}
        if len(vals) > 1:
            raise TableError(f"runs were evaluated with different {key}: {sorted(vals)}")
    return out


def _get(d: Mapping[str, Any], path: Sequence[str]) -> Any:
    for k in path:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def summarise(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std (ddof=1; NaN for one value), n) of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def _method_status(runs: Sequence[RunMetrics], method: str) -> str:
    st = {str(_get(r.metrics, ("patch", method, "status")) or NOT_RUN) for r in runs}
    return "ok" if st == {"ok"} else NOT_RUN if st == {NOT_RUN} else "partial"


def _cell(runs: Sequence[RunMetrics], method: str, col: tuple, n_runs: int) -> tuple[str, float]:
    _, path, scale, _ = col
    vals = [_get(r.metrics, (path[0], method, *path[1:])) for r in runs]
    vals = [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
            for v in vals]
    mean, std, n = summarise(vals)
    if n == 0:
        return "n/a", math.nan
    digits = 2 if scale == 100.0 else 3
    text = f"{scale * mean:.{digits}f}"
    if n > 1:
        text += f" ± {scale * std:.{digits}f}"
    if n < n_runs:
        text += f" (n={n})"
    return text, mean


def _rows(runs: Sequence[RunMetrics], columns: Sequence[tuple], labels: Mapping[str, str]
          ) -> list[list[str]]:
    n_runs = len(runs)
    cells: dict[str, list[tuple[str, float]]] = {}
    for meth in TABLE_ORDER:
        status = _method_status(runs, meth)
        if status == NOT_RUN:
            cells[meth] = [(NOT_RUN, math.nan)] * len(columns)
        else:
            cells[meth] = [_cell(runs, meth, c, n_runs) for c in columns]
    # bold the best mean of each column (paper style)
    for j, col in enumerate(columns):
        means = {m: cells[m][j][1] for m in cells if math.isfinite(cells[m][j][1])}
        if len(means) > 1:
            best = (max if col[3] else min)(means.values())
            for meth, v in means.items():
                if v == best:
                    cells[meth][j] = (f"**{cells[meth][j][0]}**", v)
    return [[labels[m]] + [c[0] for c in cells[m]] for m in TABLE_ORDER]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header)
                                                                              - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def format_table1(runs: Sequence[RunMetrics]) -> str:
    """The Markdown text of reports/table1.md."""
    if not runs:
        raise TableError("no runs to tabulate")
    ev = runs[0].metrics.get("evaluation", {})
    fx = next((str(_get(r.metrics, ("patch", "frozen", "frozen_extractor"))) for r in runs
               if _get(r.metrics, ("patch", "frozen", "frozen_extractor"))), "")
    labels = dict(METHOD_LABELS)
    if fx:
        labels["frozen"] = f"{labels['frozen']} ({fx})"
    seeds = [r.seed for r in runs]
    seed_txt = ", ".join("?" if s is None else str(s) for s in seeds)
    names = ", ".join(f"{r.name} (seed {'?' if r.seed is None else r.seed})" for r in runs)
    std_note = "mean ± sample standard deviation (ddof = 1)" if len(runs) > 1 else \
        "a single run, no standard deviation"
    out = [
        "# Table 1 — patch classification over seeds",
        "",
        f"Split `{ev.get('split', '?')}`, threshold {ev.get('threshold', '?')}; {len(runs)} "
        f"run(s), seeds {seed_txt}; {std_note}, in %. Nolabel tiles excluded. Best mean in "
        "bold; (n=k): the metric was defined in only k runs.",
        "",
        _md_table(["Method"] + [c[0] for c in MAIN_COLUMNS], _rows(runs, MAIN_COLUMNS, labels)),
        "## Further metrics",
        "",
        "PR-AUC above is the trapezoidal area (the paper's); average precision is step-wise. "
        "Tumor points: isolated predicted-tumor groups touching no annotated tumor, per slide "
        "(lower is better). C16: CAMELYON16 slide AUC (max probability) and lesion FROC; C17: "
        "CAMELYON17 quadratic-weighted kappa of patient pN-stages ('all splits' includes "
        "training data): slide classes by the largest-lesion rule, and by the paper's random "
        "forest on heat-map features (RF; out-of-fold, patient-level GroupKFold).",
        "",
        _md_table(["Method"] + [c[0] for c in EXTRA_COLUMNS], _rows(runs, EXTRA_COLUMNS,
                                                                     labels)),
        f"Runs: {names}.",
        "",
    ]
    return "\n".join(out)


def _read_exp_show(source: str) -> Any:
    """A saved `dvc exp show --json` output ('-': stdin)."""
    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TableError(f"{source}: not JSON ({exc})") from None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: python -m pipeline.table1 (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.table1",
                                 description="Table 1 (mean ± std over seeds) from DVC "
                                 "experiments or metrics.json files.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-repo", nargs="?", const=".", metavar="DIR",
                     help="the experiments of this DVC project (default: the current one)")
    src.add_argument("--from-exp-show", metavar="JSON",
                     help="output of `dvc exp show --json` ('-' = stdin)")
    src.add_argument("--metrics", nargs="+", metavar="JSON", help="metrics.json files")
    ap.add_argument("--out", default="reports/table1.md", help="Markdown file to write")
    ap.add_argument("--metrics-file", default=DEFAULT_METRICS_FILE,
                    help="metrics path inside each experiment (default %(default)s)")
    ap.add_argument("--seed-key", default="seed", help="params key of the seed")
    ap.add_argument("--exp", action="append", default=[], metavar="NAME",
                    help="only these experiments (repeatable); default: all experiments")
    ap.add_argument("--include-workspace", action="store_true",
                    help="also use the workspace row of exp show")
    ap.add_argument("--include-baseline", action="store_true",
                    help="also use the baseline commit row(s) of exp show")
    ap.add_argument("--allow-mixed", action="store_true",
                    help="tabulate runs even if they differ in params other than the seed")
    a = ap.parse_args(argv)
    try:
        if a.from_repo is not None or a.from_exp_show is not None:
            obj = exp_show_records(a.from_repo) if a.from_repo is not None else \
                _read_exp_show(a.from_exp_show)
            runs, skipped = parse_exp_show(obj, a.metrics_file, seed_key=a.seed_key)
            for s in skipped:
                log.info("exp show: skipped %s", s)
            kinds = ["experiment"] + (["workspace"] if a.include_workspace else []) + \
                (["baseline"] if a.include_baseline else [])
        else:
            runs, kinds = read_metrics_files(a.metrics, a.seed_key), ["file"]
        # Default: the experiments run with the workspace's params apart from the seed (what
        # `make table1` just ran), not older experiments of other sweeps on the same commit.
        ws = next((r for r in runs if r.kind == "workspace"), None)
        ref = ws.params if ws is not None and ws.params and not a.allow_mixed else None
        chosen = select_runs(runs, a.seed_key, kinds, a.exp, a.allow_mixed, ref)
        text = format_table1(chosen)
        write_text_atomic(a.out, text)
    except (PipelineError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log.info("wrote %s from %d runs (%s)", a.out, len(chosen),
             ", ".join(r.name for r in chosen))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
