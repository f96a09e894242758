"""The CLI fixes glibc's mmap threshold before any stage runs (pipeline/heap.py)."""

from __future__ import annotations

import platform
import sys

import pytest

from pipeline import cli, heap


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt(M_MMAP_THRESHOLD) is glibc's")
def test_threshold_is_set_on_glibc() -> None:
    heap.fix_mmap_threshold.cache_clear()
    assert heap.fix_mmap_threshold() is True


def test_every_stage_command_fixes_the_threshold_first(monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(cli, "fix_mmap_threshold", lambda: calls.append("heap"))
    monkeypatch.setattr(cli, "build_app", lambda names: lambda: calls.append(f"run {names}"))
    monkeypatch.setattr(sys, "argv", ["pipeline", "tile"])
    cli.main()
    assert calls == ["heap", "run ['tile']"]
