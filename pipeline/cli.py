"""The command line: one Typer app, one command per stage (`python -m pipeline <stage>`).

Stage modules are imported only for the command being run (torch, torchvision and sklearn take
seconds to import, and every DVC stage starts a fresh process); `--help` imports them all.
"""

from __future__ import annotations

import importlib
import sys

import typer

from pipeline.errors import PipelineError
from pipeline.heap import fix_mmap_threshold

HELP = (
    "multistage-wsi: whole-slide tumor segmentation (Takahama et al., ICCV 2019). "
    "Each command is one DVC stage over on-disk artifacts; run them all with `dvc repro`."
)

# stage name -> module under pipeline/stages exposing `cli` (the thin Typer command) and `run`
# (or a full module path exposing `cli`).
STAGES = {
    "demo-data": "demo_data",
    "tile": "tile",
    "label": "label",
    "fetch-weights": "fetch_weights",
    "train-extractor": "train_extractor",
    "extract-features": "extract_features",
    "train-unet": "train_unet",
    "e2e-finetune": "e2e_finetune",
    "train-seg-only": "train_seg_only",
    "train-frozen": "train_frozen",
    "evaluate": "evaluate",
    "predict": "predict",
    # not a DVC stage: writes CAMELYON16-shaped synthetic slides (a full module path)
    "synth-camelyon": "pipeline.synth_camelyon",
}

# Inference stages return freed activations to the system (pipeline/heap.py): their peak then
# no longer depends on how many batches a slide has (1.26x -> 1.00x), for ~5-10 % more CPU time.
# Not the training stages: it cost them up to ~50 % CPU time, and their heap plateaus within 1.2x
# (docs/benchmarks.md, CAMELYON-sized slides).
FIXED_HEAP_STAGES = {"extract-features", "predict"}


def build_app(names: list[str] | None = None) -> typer.Typer:
    """A Typer app with the given stage commands (all by default)."""
    app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False,
                      pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        # A callback keeps Typer in sub-command mode even when only one command is registered.
        pass

    _root.__doc__ = HELP
    for name in names or list(STAGES):
        mod = STAGES[name]
        module = importlib.import_module(mod if "." in mod else f"pipeline.stages.{mod}")
        app.command(name)(module.cli)
    return app


_FULL_APP: typer.Typer | None = None


def __getattr__(attr: str) -> typer.Typer:
    # `from pipeline.cli import app` gives the full app (tests, docs) without paying for it here.
    global _FULL_APP
    if attr == "app":
        if _FULL_APP is None:
            _FULL_APP = build_app()
        return _FULL_APP
    raise AttributeError(attr)


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip()
    # torch re-raises a DataLoader worker's error with the worker's traceback in the message;
    # the user needs its last line (our PipelineError, which names the file and the cause).
    if "Original Traceback" in msg:
        last = msg.splitlines()[-1]
        msg = last.split(": ", 1)[-1] if ": " in last else last
    return msg.splitlines()[0] if msg else type(exc).__name__


def main() -> None:
    argv = sys.argv[1:]
    names = [argv[0]] if argv and argv[0] in STAGES else None
    if names and names[0] in FIXED_HEAP_STAGES:
        fix_mmap_threshold()
    try:
        build_app(names)()
    except PipelineError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as exc:
        if "Original Traceback" not in str(exc):
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(1)
