"""Imports point down the layers: a module imports its own layer or a lower one, never a higher one.

Every ``import`` counts, at module level or inside a function, relative or absolute, and so does a
``"soarflow.module:name"`` string (what `importlib` turns into an import: the task registry, the command table),
so no lazy import can hide a cycle. Layers, low to high (docs/architecture.md):

    core math        flow, objective, sampling, conditioning, methods/
    data, world      data/, shapes/, scorers/, utils/
    models           models/
    tasks            tasks/
    training         train/
    study            study/
    commands         commands/, cli.py, __main__.py
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "soarflow"

LAYERS: list[tuple[str, set[str]]] = [
    ("core math", {"", "flow", "objective", "sampling", "conditioning", "methods"}),  # "": the package itself
    ("data, world", {"data", "shapes", "scorers", "utils"}),
    ("models", {"models"}),
    ("tasks", {"tasks"}),
    ("training", {"train"}),
    ("study", {"study"}),
    ("commands", {"commands", "cli", "__main__"}),
]

# (importing module, imported module) -> why the upward edge is tolerated for now. Keep it empty.
ALLOWED: dict[tuple[str, str], str] = {}

_MODULE_STRING = re.compile(r"soarflow(\.\w+)+(:[\w.]+)?")


def layer_of(module: str) -> int:
    """Index in LAYERS of a dotted soarflow module (its first component after ``soarflow`` decides)."""
    parts = module.split(".")
    if parts[0] != "soarflow":
        raise ValueError(f"{module} is not a soarflow module")
    top = parts[1] if len(parts) > 1 else ""
    for i, (_, names) in enumerate(LAYERS):
        if top in names:
            return i
    raise ValueError(
        f"soarflow.{top} has no layer: add it to LAYERS in tests/test_layers.py (and docs/architecture.md)"
    )


def _is_module(dotted: str) -> bool:
    path = SRC.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(imported soarflow module, line) for every import in `source`, the code of dotted `module`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "soarflow"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "soarflow":
                continue
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
            found += [
                (f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target, node.lineno) for a in node.names
            ]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.fullmatch(node.value):
            found.append((node.value.split(":")[0], node.lineno))
    return sorted(found, key=lambda item: item[1])


def upward_imports(source: str, module: str, path: str, is_package: bool = False) -> list[str]:
    """One line per import in `source` that points to a higher layer than `module`'s."""
    own = layer_of(module)
    out = []
    for target, line in imported_modules(source, module, is_package):
        layer = layer_of(target)
        if layer > own and (module, target) not in ALLOWED:
            out.append(
                f"{path}:{line}: {module} (layer '{LAYERS[own][0]}') imports {target} "
                f"(layer '{LAYERS[layer][0]}', higher)"
            )
    return out


def _modules() -> list[tuple[str, Path, bool]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out.append((".".join(parts), path, is_package))
    return out


def test_no_import_points_up_a_layer():
    problems = []
    for module, path, is_package in _modules():
        problems += upward_imports(path.read_text(), module, str(path.relative_to(SRC.parent)), is_package)
    assert not problems, "imports that point up a layer:\n" + "\n".join(problems)


def test_every_module_has_a_layer():
    for module, _, _ in _modules():
        layer_of(module)


def test_allowlist_names_real_edges():
    """An allowed edge that no longer exists is removed from ALLOWED, so the list only shrinks."""
    edges = {(m, t) for m, p, pkg in _modules() for t, _ in imported_modules(p.read_text(), m, pkg)}
    assert set(ALLOWED) <= edges, sorted(set(ALLOWED) - edges)


def test_checker_catches_upward_imports_of_every_kind():
    source = (
        "import torch\n"
        "from ..flow import interpolate\n"  # down: fine
        "from .lora import add_lora\n"  # same layer: fine
        "def build():\n"
        "    from ..train.trainer import train\n"  # function level, relative
        "    import soarflow.commands.demo\n"  # absolute
        "    from soarflow import tasks\n"  # a subpackage by name
        "TASK = 'soarflow.tasks.shapes:ShapesTask'\n"  # what importlib would import
    )
    problems = upward_imports(source, "soarflow.models.unet", "soarflow/models/unet.py")
    assert len(problems) == 4, problems
    assert problems[0] == (
        "soarflow/models/unet.py:5: soarflow.models.unet (layer 'models') imports "
        "soarflow.train.trainer (layer 'training', higher)"
    )
    assert [p.split(" imports ")[1].split()[0] for p in problems] == [
        "soarflow.train.trainer",
        "soarflow.commands.demo",
        "soarflow.tasks",
        "soarflow.tasks.shapes",
    ]
    assert upward_imports("from .. import __version__\n", "soarflow.cli", "soarflow/cli.py") == []
    assert upward_imports("from . import flow\n", "soarflow", "soarflow/__init__.py", is_package=True) == []
