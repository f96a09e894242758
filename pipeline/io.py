"""Atomic file writes and "is this output complete and current?" checks.

A stage writes every output to a temporary sibling and renames it into place, so a killed stage
leaves either the old complete file or nothing at the final path — never a half file that a
rerun would mistake for done (the CLAM failure mode).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py

if TYPE_CHECKING:
    from pipeline.paths import Paths

from pipeline.schema import SCHEMA_VERSION


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success rename it to `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the output the permissions a plain open() would (umask),
        # so collaborators on a shared server can read the results.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# tempfile.mkstemp names: prefix + 8 characters from this alphabet + suffix
_TEMP_RANDOM = r"[a-z0-9_]{8}"


def temp_files_for(path: str | Path) -> list[Path]:
    """Temp files `atomic_path(path)` leaves behind when its process is killed (SIGKILL, power
    loss): `.<name>.XXXXXXXX.tmp` next to `path`. Exact match, so the temps of `a.h5` are never
    confused with those of `a.h5.b.h5`."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{_TEMP_RANDOM}\.tmp$")
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{path.name}.*.tmp") if pattern.match(p.name))


def remove_stale_temps(paths: Iterable[str | Path]) -> list[Path]:
    """Delete the temp files left by killed writers of `paths` (final output paths); returns
    what was removed. Call it only for outputs no other live process is writing (a stage: its
    own slides / shard, before starting work), since a live writer's temp looks the same."""
    removed = []
    for path in paths:
        for tmp in temp_files_for(path):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_h5(path: str | Path) -> Iterator[h5py.File]:
    """Open a new HDF5 file for writing that appears at `path` only once closed successfully."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            yield f


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_timings(paths: Paths, stage: str, **times: Any) -> None:
    """A stage's run log, reports/timings/<stage>.json: {"stage": stage, **times} (wall-clock
    seconds and counts of what this run did). Kept out of the metrics and of dvc.yaml: it
    changes every run."""
    write_json_atomic(paths.timings_file(stage), {"stage": stage, **times})


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def h5_is_current(path: str | Path, params_hash: str, **expected_attrs: Any) -> bool:
    """True when `path` is a readable HDF5 file of this schema version written with the same
    params hash (and the given attrs equal). Missing, truncated or stale files are not."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            if int(f.attrs.get("schema_version", -1)) != SCHEMA_VERSION:
                return False
            if str(f.attrs.get("params_hash", "")) != params_hash:
                return False
            for k, v in expected_attrs.items():
                if str(f.attrs.get(k, "")) != str(v):
                    return False
    except (OSError, KeyError):
        return False
    return True


def hash_file_into(h: Any, path: str | Path, chunk: int = 1 << 20) -> None:
    """Feed the bytes of `path` to the hashlib object `h`, a chunk at a time (any file size)."""
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    hash_file_into(h, path, chunk)
    return h.hexdigest()
