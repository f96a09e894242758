"""No module of the package imports a stage module (pipeline/stages/*.py), stages included:
shared code lives in library modules, a stage is a thin shell around them. The one exception
is pipeline/cli.py, which registers the stages' commands. Checked on the source (ast), so a
lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
ALLOWED = {PACKAGE / "cli.py"}


def stage_imports(source: str, module: str) -> list[str]:
    """The `pipeline.stages...` names `source` (the text of module `module`, dotted) imports,
    relative imports resolved."""
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        found += [n for n in names if n == "pipeline.stages" or n.startswith("pipeline.stages.")]
    return sorted(set(found))


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p not in ALLOWED)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_module_imports_a_stage(path):
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    assert stage_imports(path.read_text(), module) == [], (
        f"{path} imports a stage module: move the shared code into a library module")


@pytest.mark.parametrize("source", [
    "from pipeline.stages.tile import tile_slide",
    "from pipeline.stages import extract_features",
    "import pipeline.stages.train_unet as t",
    "def f():\n    from pipeline.stages.tile import run\n",
    "from .tile import run",  # relative, inside pipeline/stages/
    "from . import tile",
])
def test_the_check_sees_every_form_of_stage_import(source):
    assert stage_imports(source, "pipeline.stages.predict")


def test_the_check_lets_library_imports_through():
    src = "from pipeline.tiling import tile_slide\nimport pipeline.extraction\nfrom . import io\n"
    assert stage_imports(src, "pipeline.segment") == []
