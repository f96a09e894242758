"""`--shard i/n` for cluster array jobs: job i of n processes manifest slides i, i+n, i+2n, ..."""

from __future__ import annotations

from pipeline.errors import PipelineError


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/n' -> (i, n) with 0 <= i < n; None or '' stays None."""
    if not text:
        return None
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise PipelineError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise PipelineError(f"--shard {text!r}: need 0 <= i < n")
    return i, n
