"""The import structure (docs/design.md, "Layers"): a base that imports no stage, stages
(compress, export, runtimes) that import the base and never each other, the app on top,
and no import cycle anywhere, counting imports inside functions too. Read from the source
with ast, so it holds for every code path, not only the ones a test happens to run."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = {"edgellm": "edgellm", "edgellm.archs": "edgellm/archs", "edgellm.compress": "compress",
            "edgellm.export": "export", "edgellm.export.formats": "export/formats",
            "edgellm.runtimes": "runtimes"}
STAGES = ("edgellm.compress", "edgellm.export", "edgellm.runtimes")
APP = {"edgellm.pipeline", "edgellm.auto", "edgellm.recipe", "edgellm.report",
       "edgellm.report_html", "edgellm.report_markdown", "edgellm.report_file", "edgellm.gate",
       "edgellm.compare",
       "edgellm.cli", "edgellm.standalone", "edgellm.resources", "edgellm.bandwidth",
       "edgellm.run_checks"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in (REPO / folder).glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """edgellm modules `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgellm"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("edgellm")}
    return {name for name in found if name in known}


def layer(module: str) -> int:
    if module.startswith(STAGES):
        return 1
    return 2 if module in APP else 0


def stage(module: str) -> str | None:
    return next((s for s in STAGES if module.startswith(s)), None)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_no_module_imports_a_layer_above_it_or_another_stage():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            if layer(target) > layer(module):
                wrong.append(f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})")
            elif layer(module) == layer(target) == 1 and stage(module) != stage(target):
                wrong.append(f"stage {module} imports another stage's {target}")
    assert wrong == []


def test_there_is_no_import_cycle():
    edges, seen, cycles = graph(), set(), []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(edges[module]):
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in seen:
                visit(target, path + [target])
        seen.add(module)

    for module in sorted(edges):
        if module not in seen:
            visit(module, [module])
    assert cycles == []


def test_the_checks_fail_on_a_planted_upward_import_and_cycle(tmp_path, monkeypatch):
    """errors.py (base) importing the pipeline inside a function: an upward import, and a
    cycle (the pipeline imports errors). Both checks above must fail on it."""
    import pytest
    import test_layers

    planted = tmp_path / "edgellm"
    planted.mkdir()
    for path in (REPO / "edgellm").glob("*.py"):
        (planted / path.name).write_text(path.read_text())
    (planted / "errors.py").write_text((planted / "errors.py").read_text()
                                       + "\n\ndef _late():\n    from edgellm import pipeline\n")
    folders = {package: str(REPO / folder) for package, folder in PACKAGES.items()}
    monkeypatch.setattr(test_layers, "PACKAGES", {**folders, "edgellm": str(planted)})
    with pytest.raises(AssertionError, match="edgellm.errors .layer 0. imports edgellm.pipeline"):
        test_no_module_imports_a_layer_above_it_or_another_stage()
    with pytest.raises(AssertionError, match="edgellm.errors"):
        test_there_is_no_import_cycle()
