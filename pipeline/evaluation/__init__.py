"""The evaluation protocols of the `evaluate` stage, one module per job; the stage
(pipeline/stages/evaluate.py) only wires them.

  inputs        the tile grid + ground truth of each slide (SlideTruth) and each method's
                per-tile tumor probabilities (MethodPredictions)
  annotation    the CAMELYON ground truth from the annotation: evaluation raster, official
                evaluation mask, true slide class
  patch         pooled tile metrics (accuracy, PR-AUC, ...) and curves — paper Table 1
  tumor_points  isolated predicted tumor spots per slide (paper §4.2.1)
  camelyon16    slide ROC-AUCs and the lesion FROC (official protocol)
  camelyon17    patient pN-stage kappa: rule-based slide classes and the random forest on
                heat-map features with patient-level cross-validation (pipeline.slide_classify)
  outputs       metrics.json cleaning, CSV tables, per-slide rows, figures and index.html
"""
