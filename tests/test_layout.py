"""The package layout guards itself: no import cycle inside leukedge/, library modules free of Click and
Rich (the CLI layer, leukedge/cli/, prints), short functions, and a light, explicit top-level API."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "leukedge"
#: Modules of the CLI layer outside leukedge/cli/: ``python -m leukedge`` (what torchrun starts) runs the CLI.
CLI_ENTRY_POINTS = {"leukedge.__main__"}
MAX_BODY_LINES = 60  # a longer function says why in its docstring ("Long on purpose: ...")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """leukedge modules imported anywhere in ``path`` (top level and inside functions)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph(include_cli: bool = True) -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items() if include_cli or not m.startswith("leukedge.cli")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path) if there is any; a package's own __init__ importing its children
    does not count (Python runs the child after the parent)."""
    def deps(m: str) -> set[str]:
        return {d for d in graph.get(m, ()) if not d.startswith(m + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(deps(m)):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_inside_the_package():
    graph = _graph()
    assert "leukedge.engines.factory" in graph and "leukedge.artifacts" in graph["leukedge.engines.resolve"]
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"p": {"p.x"}, "p.x": {"p"}}) is None  # a package importing its own child


def test_library_modules_import_neither_click_nor_rich():
    offenders = []
    for name, path in _modules().items():
        if name.startswith("leukedge.cli") or name in CLI_ENTRY_POINTS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{name}: {m}" for m in mods if m.split(".")[0] in ("click", "rich")]
        # and no library module reaches the CLI layer
        offenders += [f"{name}: {d}" for d in _imports(name, path, set(_modules())) if d.startswith("leukedge.cli")]
    assert not offenders, offenders


def test_long_functions_say_why():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node) or ""
            body = node.body[1:] if doc else node.body
            if body and body[-1].end_lineno - body[0].lineno + 1 > MAX_BODY_LINES and "Long on purpose" not in doc:
                long.append(f"{name}.{node.name} ({body[-1].end_lineno - body[0].lineno + 1} lines)")
    assert not long, long


def test_top_level_api_is_explicit_lazy_and_light():
    import leukedge

    assert set(leukedge._LAZY) | {"__version__"} == set(leukedge.__all__)
    code = ("import sys, leukedge; heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'click', 'rich', "
            "'leukedge.models', 'leukedge.infer') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"`import leukedge` loads {out}"
    for name in leukedge.__all__:
        assert getattr(leukedge, name) is not None
    assert callable(leukedge.train) and callable(leukedge.evaluate) and callable(leukedge.Predictor)


def test_stage_modules_that_share_a_name_with_their_function_stay_callable():
    import leukedge
    import leukedge.evaluate
    import leukedge.training

    assert leukedge.training.TrainConfig is leukedge.TrainConfig
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        leukedge.train("no-cache", "no-run", leukedge.TrainConfig(epochs=0))
