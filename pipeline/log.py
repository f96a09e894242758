"""Logging and progress for stages: one logger, tqdm progress bars that stay quiet in CI logs."""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

_CONFIGURED = False


def get_logger(name: str = "pipeline") -> logging.Logger:
    global _CONFIGURED
    if not _CONFIGURED:
        logging.basicConfig(
            level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            stream=sys.stderr,
        )
        _CONFIGURED = True
    return logging.getLogger(name)


def progress(iterable=None, **kwargs):
    """tqdm with sane defaults: to stderr, updates at most every 2 s when not a terminal."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 2.0)
    return tqdm(iterable, **kwargs)
