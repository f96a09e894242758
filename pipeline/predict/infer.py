"""Per-tile tumor probability of one tiled slide: the extractor's own softmax (classifier) or
the U-Net on the slide's feature map(s)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.extraction import infer_slide
from pipeline.log import get_logger
from pipeline.params import Params
from pipeline.predict.models import PredictModels
from pipeline.segment import predict_tiles, slide_layouts
from pipeline.tileindex import TileIndex

log = get_logger("pipeline.predict")

@dataclass
class TileProbs:
    """Per-tile tumor probability of one slide and how it was obtained."""

    prob: np.ndarray  # (N,) float32, NaN for tiles no map covered (never with the mode switch)
    featuremap_mode: str | None  # None for the classifier
    warnings: list[str] = field(default_factory=list)


def predict_tile_probs(models: PredictModels, index: TileIndex, params: Params,
                       workers: int) -> TileProbs:
    """Tumor probability of every tile of a tiled slide. The U-Net's feature map follows the
    params' featuremap settings; a slide whose tiles would fall off the centered canvas is
    predicted with mode `full` instead (the U-Net is fully convolutional), with a warning."""
    feats, probs = infer_slide(models.extractor, index, params.extractor.crop_px,
                               models.device, workers, params.extractor.amp, None,
                               desc=index.slide_id)
    if models.unet is None:
        return TileProbs(probs, None)
    # The layout must fit the network actually loaded (canvas divisible by 2**its depth).
    p = params.model_copy(update={"unet": params.unet.model_copy(
        update={"depth": models.unet.depth})})
    layouts = slide_layouts(index.grid, index.lump_id, p)
    warnings = []
    n_out = sum(lay.n_outside for lay in layouts)
    if n_out:
        msg = (f"{n_out} of {index.n} tiles fall off the {p.featuremap.size}x{p.featuremap.size} "
               f"centered canvas; predicting with featuremap.mode=full instead")
        log.warning("slide %s: %s", index.slide_id, msg)
        warnings.append(msg)
        p = p.model_copy(update={"featuremap": p.featuremap.model_copy(update={"mode": "full"})})
        layouts = slide_layouts(index.grid, index.lump_id, p)
    prob = predict_tiles(models.unet, feats, layouts, models.device)
    return TileProbs(prob, p.featuremap.mode, warnings)
