"""Patch level (paper Table 1): pooled tile metrics over the labelled (tumor/normal) tiles of the
evaluated slides — accuracy at the threshold, PR-AUC (trapezoid, the paper's), average
precision, ROC-AUC — and the PR / ROC curves. nolabel tiles are excluded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline import metrics as m
from pipeline.evaluation.inputs import EvaluateError, SlideTruth, filled
from pipeline.schema import LABEL_NOLABEL, LABEL_TUMOR


def patch_section(truths: Sequence[SlideTruth], probs: Mapping[str, np.ndarray],
                  threshold: float) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """Pooled patch metrics over the labelled (tumor/normal) tiles of `truths`, and the curves."""
    ys, ps, n_unpred = [], [], 0
    for t in truths:
        keep = t.label != LABEL_NOLABEL
        p = np.asarray(probs[t.slide_id])[keep]
        n_unpred += int(np.isnan(p).sum())
        ys.append((t.label[keep] == LABEL_TUMOR).astype(np.int8))
        ps.append(filled(p))
    y, p = np.concatenate(ys), np.concatenate(ps)
    if y.size == 0:
        raise EvaluateError("evaluate: no tumor/normal tiles in the evaluated split")
    out = m.patch_metrics(y, p, threshold)
    out["n_unpredicted"] = n_unpred
    return out, m.curves(y, p)
