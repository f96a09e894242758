"""What each dvc.yaml stage's code reads, from the code itself, so its `deps:` and `params:`
cannot drift from it.

For a stage whose command is `python -m pipeline <name>`, the stage module is
pipeline/stages/<module>.py (pipeline/cli.py STAGES). Its code closure is every module inside
`pipeline/` reachable by `import` / `from ... import` statements (ast: imports inside
functions and under TYPE_CHECKING included, so the closure may be larger than what one run
executes, never smaller), plus the `__init__.py` of every package on the way, which Python runs
on import. The CLI dispatcher (pipeline/__main__.py, pipeline/cli.py) is left out on purpose: it
maps a command name to a stage module and computes nothing a stage writes, and listing it would
re-run every stage whenever a command is added.

The params a stage reads are the attribute chains on a params object in the code of its closure
that the stage can reach (see `used_units`):
`params.<section>.<key>` (also `p.`, `tparams.`, `self.params.`), a bare `params.<section>`
(the whole section: e.g. bound to a name and passed on), `params.seed`, and the sections named
in `section_hash(...)` / `section_json(...)` calls. A read is covered by the key or its section
in the stage's `params:`.

`python -m pipeline.dvcdeps` prints, per stage, what to add to dvc.yaml (exit 1 if anything);
`--cached-outs` prints the stage outputs DVC caches (`make clean-outputs` deletes those).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from ruamel.yaml import YAML

PACKAGE = "pipeline"
# modules left out of every closure (see the module docstring)
DISPATCH = {"pipeline.__main__", "pipeline.cli"}
# names a Params object goes by in this code base
PARAMS_ROOTS = {"params", "p", "tparams"}
SECTION_CALLS = {"section_hash", "section_json"}


@dataclass
class StageReport:
    stage: str
    module: str
    missing_deps: list[str] = field(default_factory=list)
    unused_deps: list[str] = field(default_factory=list)
    missing_params: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing_deps or self.missing_params)


# -- code closure --------------------------------------------------------------------------------


def module_file(root: Path, module: str) -> Path | None:
    """pipeline/a/b.py or pipeline/a/b/__init__.py for 'pipeline.a.b' (relative to root)."""
    base = Path(*module.split("."))
    for rel in (base.with_suffix(".py"), base / "__init__.py"):
        if (root / rel).is_file():
            return rel
    return None


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Modules named by the imports in `tree` (absolute names; `from x import y` gives x and,
    when it is a module, x.y)."""
    pkg = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def closure(root: Path, start: str) -> dict[str, Path]:
    """module -> file (relative to root) of every `pipeline` module reachable from `start`."""
    seen: dict[str, Path] = {}
    todo = [start]
    while todo:
        name = todo.pop()
        for mod in _with_parents(name):
            if mod in seen or mod in DISPATCH or mod.split(".")[0] != PACKAGE:
                continue
            rel = module_file(root, mod)
            if rel is None:  # `from pipeline.x import function`: not a module
                continue
            seen[mod] = rel
            tree = ast.parse((root / rel).read_text(), filename=str(rel))
            todo.extend(_imported(tree, mod, rel.name == "__init__.py"))
    return seen


def _aliases(tree: ast.AST, module: str, is_package: bool) -> dict[str, tuple[str, str | None]]:
    """Local name -> (module, attribute or None) for every import in a module (functions'
    imports included): `from pipeline.x import f` -> f: (pipeline.x, f); `import pipeline.x as
    y` -> y: (pipeline.x, None); `from pipeline import x` -> x: (pipeline.x, None) when x is a
    module (both entries are kept; the unused one matches nothing)."""
    pkg = module if is_package else module.rpartition(".")[0]
    out: dict[str, tuple[str, str | None]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = (a.name if a.asname else
                                                         a.name.split(".")[0], None)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                out[a.asname or a.name] = (base, a.name)
    return out


def _references(node: ast.AST, module: str, aliases: dict) -> set[tuple[str, str]]:
    """(module, name) pairs a piece of code refers to: its own module's names, imported names,
    and `alias.name` on an imported module."""
    out: set[tuple[str, str]] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            mod, attr = aliases.get(n.id, (module, n.id))
            out.add((mod, attr) if attr else (mod, n.id))
        elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
            mod, attr = aliases.get(n.value.id, (None, None))
            if mod is not None:  # x.f where x is `import pipeline.m as x` or `from p import m`
                out.add((f"{mod}.{attr}" if attr else mod, n.attr))
    return out


def used_units(root: Path, mods: dict[str, Path], start: str) -> list[tuple[Path, ast.stmt]]:
    """The top-level statements of the closure a stage can run: all of the stage module, the
    module-level code of the others, and every top-level function / class that used code refers
    to (transitively, resolved through imports). Params read in a library function no stage
    code calls are not charged to the stage; a name the resolution cannot follow (a function
    passed around under another name) is still found, as its module-level reference counts."""
    units: list[tuple[Path, ast.stmt, tuple[str, str] | None, str]] = []
    aliases: dict[str, dict] = {}
    for mod, rel in mods.items():
        tree = ast.parse((root / rel).read_text())
        aliases[mod] = _aliases(tree, mod, rel.name == "__init__.py")
        for stmt in tree.body:
            named = isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            units.append((rel, stmt, (mod, stmt.name) if named and mod != start else None, mod))
    used = [u for u in units if u[2] is None]
    rest = [u for u in units if u[2] is not None]
    refs: set[tuple[str, str]] = set()
    new = used
    while new:
        for _, stmt, _, mod in new:
            refs |= _references(stmt, mod, aliases[mod])
        new = [u for u in rest if u[2] in refs]
        rest = [u for u in rest if u[2] not in refs]
        used += new
    return [(u[0], u[1]) for u in used]


# -- params reads --------------------------------------------------------------------------------


@cache
def _schema() -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    """(top-level scalar keys, section -> its keys) from the typed schema."""
    from pydantic import BaseModel

    from pipeline.params import Params

    scalars, sections = set(), {}
    for name, f in Params.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            sections[name] = frozenset(ann.model_fields)
        else:
            scalars.add(name)
    return frozenset(scalars), sections


def _is_params_root(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in PARAMS_ROOTS
    return isinstance(node, ast.Attribute) and node.attr == "params"


def params_read(tree: ast.AST) -> dict[str, int]:
    """Dotted params keys ('tile.mpp', 'seed') and whole sections ('tile') read in `tree`,
    each with the first line reading it."""
    scalars, sections = _schema()
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_params_root(node.value):
            if node.attr in scalars:
                found.append((node.attr, node.lineno))
            elif node.attr in sections:
                up = parents.get(node)
                if isinstance(up, ast.Attribute) and up.attr in sections[node.attr]:
                    found.append((f"{node.attr}.{up.attr}", node.lineno))
                else:  # the section as a whole (bound to a name, passed on, copied)
                    found.append((node.attr, node.lineno))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in SECTION_CALLS):
            found += [(a.value, node.lineno) for a in node.args
                      if isinstance(a, ast.Constant) and a.value in sections]
    out: dict[str, int] = {}
    for key, line in sorted(found, key=lambda kv: kv[1]):
        out.setdefault(key, line)
    return out


def covered(read: str, declared: set[str]) -> bool:
    """Is a read key covered by the declared params (the key itself or its section)?"""
    return read in declared or read.split(".")[0] in declared


# -- dvc.yaml ------------------------------------------------------------------------------------


def load_dvc_yaml(path: Path) -> dict:
    y = YAML(typ="safe", pure=True)
    return y.load(path.read_text()) or {}


def stage_module(cmd: str) -> str | None:
    """'python -m pipeline tile ...' -> 'pipeline.stages.tile' (None for other commands)."""
    from pipeline.cli import STAGES

    words = cmd.split()
    if len(words) >= 4 and words[1:3] == ["-m", PACKAGE] and words[3] in STAGES:
        return f"{PACKAGE}.stages.{STAGES[words[3]]}"
    return None


def _entries(items: list) -> list[str]:
    """dvc.yaml deps / params / outs lists: strings or one-key mappings."""
    out = []
    for it in items or []:
        if isinstance(it, dict):
            out.extend(str(k) for k in it)
        else:
            out.append(str(it))
    return out


def _is_covered_path(rel: str, deps: list[str]) -> bool:
    for d in deps:
        d = d.rstrip("/")
        if rel == d or rel.startswith(d + "/"):
            return True
    return False


def check_stage(root: Path, name: str, stage: dict) -> StageReport | None:
    module = stage_module(str(stage.get("cmd", "")))
    if module is None:
        return None
    mods = closure(root, module)
    files = sorted(str(p) for p in mods.values())
    deps = _entries(stage.get("deps", []))
    report = StageReport(name, module)
    report.missing_deps = [f for f in files if not _is_covered_path(f, deps)]
    code_deps = [d for d in deps if d.startswith(f"{PACKAGE}/") and d.endswith(".py")]
    report.unused_deps = [d for d in code_deps if d not in files]
    declared = set(_entries(stage.get("params", [])))
    where: dict[str, str] = {}  # key -> first file:line reading it
    for rel, unit in sorted(used_units(root, mods, module), key=lambda u: (str(u[0]),
                                                                          u[1].lineno)):
        for key, line in params_read(unit).items():
            where.setdefault(key, f"{rel}:{line}")
    report.missing_params = [f"{k} ({where[k]})" for k in sorted(where)
                             if not covered(k, declared)]
    return report


def check(root: Path = Path(".")) -> list[StageReport]:
    stages = load_dvc_yaml(root / "dvc.yaml").get("stages", {})
    reports = [check_stage(root, n, s) for n, s in stages.items()]
    return [r for r in reports if r is not None]


def format_report(reports: list[StageReport]) -> str:
    lines = []
    for r in reports:
        if r.ok and not r.unused_deps:
            continue
        lines.append(f"{r.stage} ({r.module}):")
        if r.missing_deps:
            lines.append("  add to deps:   " + ", ".join(r.missing_deps))
        if r.missing_params:
            lines.append("  add to params: " + ", ".join(r.missing_params))
        if r.unused_deps:
            lines.append("  not imported (may drop from deps): " + ", ".join(r.unused_deps))
    return "\n".join(lines)


def cached_outs(root: Path = Path(".")) -> list[str]:
    """Every stage output DVC keeps in its cache (not `cache: false`, which git carries)."""
    out = []
    for stage in load_dvc_yaml(root / "dvc.yaml").get("stages", {}).values():
        for section in ("outs", "metrics", "plots"):
            for it in stage.get(section, []) or []:
                path, opts = (next(iter(it.items())) if isinstance(it, dict) else (it, None))
                if not (isinstance(opts, dict) and opts.get("cache") is False):
                    out.append(str(path))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--cached-outs"]:
        print("\n".join(cached_outs()))
        return 0
    if argv:
        print("usage: python -m pipeline.dvcdeps [--cached-outs]", file=sys.stderr)
        return 2
    reports = check()
    text = format_report(reports)
    print(text or "dvc.yaml: every stage lists its code closure and the params it reads")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
