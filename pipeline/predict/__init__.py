"""Predicting new slides (the `predict` command's core), one module per job:

- `models`:  which checkpoints (method), loading them once, and the settings they were trained
             with, which the run uses (`run_params`);
- `infer`:   per-tile tumor probability of a tiled slide (classifier or U-Net on feature maps);
- `export`:  regions as QuPath GeoJSON / ASAP XML, the heatmap HDF5 file;
- `overlay`: the heatmap over the slide thumbnail (PNG);
- `summary`: a slide's output files, the per-slide summary and when it is current;
- `slide`:   one slide from tiling to its summary, wiring the above.
"""
