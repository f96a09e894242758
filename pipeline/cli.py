"""The command line: one Typer app, one command per stage (`python -m pipeline <stage>`)."""

from __future__ import annotations

import importlib
import sys

import typer

from pipeline.errors import PipelineError

app = typer.Typer(
    help="multistage-wsi: whole-slide tumor segmentation (Takahama et al., ICCV 2019). "
    "Each command is one DVC stage over on-disk artifacts; run them all with `dvc repro`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# stage name -> module under pipeline/stages exposing `cli` (the thin Typer command) and `run`.
STAGES = {
    "demo-data": "demo_data",
    "tile": "tile",
    "label": "label",
    "train-extractor": "train_extractor",
    "extract-features": "extract_features",
    "train-unet": "train_unet",
    "e2e-finetune": "e2e_finetune",
    "train-seg-only": "train_seg_only",
    "train-frozen": "train_frozen",
    "evaluate": "evaluate",
    "predict": "predict",
}

for _name, _module in STAGES.items():
    try:
        _mod = importlib.import_module(f"pipeline.stages.{_module}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"pipeline.stages.{_module}":
            raise
        continue  # stage not implemented in this checkout
    app.command(_name)(_mod.cli)


def main() -> None:
    try:
        app()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
