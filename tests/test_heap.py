"""The CLI fixes glibc's mmap threshold before the inference stages run (pipeline/heap.py)."""

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


@pytest.mark.parametrize(("stage", "fixed"), [("extract-features", True), ("predict", True),
                                              ("train-extractor", False), ("tile", False)])
def test_inference_stages_fix_the_threshold_first(monkeypatch, stage: str, fixed: bool) -> None:
    calls: list[str] = []
    monkeypatch.setattr(cli, "fix_mmap_threshold", lambda: calls.append("heap"))
    monkeypatch.setattr(cli, "build_app", lambda names: lambda: calls.append(f"run {names}"))
    monkeypatch.setattr(sys, "argv", ["pipeline", stage])
    cli.main()
    assert calls == ["heap"] * fixed + [f"run {[stage]}"]
