"""The heatmap over the slide thumbnail with the predicted regions outlined (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.io import atomic_path
from pipeline.slide import Slide

THUMB_MAX_PX = 1600  # longest side of the overlay's slide thumbnail
HEATMAP_ALPHA = 0.45


def write_overlay(path: Path, slide_path: Path, heat: np.ndarray, pitch_px: float,
                   origin: np.ndarray, rings_px: Sequence[np.ndarray], title: str) -> None:
    """The heatmap over the slide thumbnail with region outlines and a colour bar, as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with Slide(slide_path) as slide:
        w, h = slide.dimensions
        rgb, _ = slide.low_res_image(max(1.0, max(w, h) / THUMB_MAX_PX))
    th, tw = rgb.shape[:2]
    fig = Figure(figsize=(tw / 100 + 1.6, th / 100 + 0.7), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(rgb, extent=(0, w, h, 0), interpolation="nearest")
    rows, cols = heat.shape
    im = ax.imshow(np.ma.masked_invalid(heat), cmap="jet", vmin=0.0, vmax=1.0,
                   alpha=HEATMAP_ALPHA, interpolation="nearest",
                   extent=(origin[0], origin[0] + cols * pitch_px,
                           origin[1] + rows * pitch_px, origin[1]))
    for ring in rings_px:
        closed = np.vstack([ring, ring[:1]])
        ax.plot(closed[:, 0], closed[:, 1], color="black", linewidth=1.2)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02, label="tumor probability")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
