"""The package layout guards itself: no import cycle inside leukedge/ (a package's eager imports of its own
children included), no import up the layers (:data:`LAYERS`) and none of another module's private names, one
reader per on-disk file (leukedge/formats/), library modules free of Click and Rich (the CLI layer,
leukedge/cli/, prints), short functions, and a light, explicit top-level API."""

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
    return _imports_of_tree(name, path.name == "__init__.py", ast.parse(path.read_text()), known)


def _resolve(name: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    package = name if is_pkg else name.rpartition(".")[0]
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports_of_tree(name: str, is_pkg: bool, tree: ast.AST, known: set[str]) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, is_pkg, node)
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


def _eager_children(name: str, path: Path, known: set[str]) -> set[str]:
    """The children a package's ``__init__`` imports when it runs (top-level statements, outside ``if
    TYPE_CHECKING``): ``leukedge.station`` importing ``station.core``, which imports ``leukedge.station`` back
    through ``from . import db``, is a cycle; the lazy face of ``leukedge`` imports none."""
    if path.name != "__init__.py":
        return set()
    tree = ast.parse(path.read_text())
    eager = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    mod = ast.Module(body=eager, type_ignores=[])
    tmp = {d for d in _imports_of_tree(name, True, mod, known)}
    return {d for d in tmp if d.startswith(name + ".")}


def _cycle(graph: dict[str, set[str]], eager: dict[str, set[str]] | None = None) -> list[str] | None:
    """One import cycle (as a path) if there is any. A package importing its own children counts only where its
    ``__init__`` does so when it runs (``eager``): otherwise Python runs the child after the parent."""
    eager = eager or {}

    def deps(m: str) -> set[str]:
        return {d for d in graph.get(m, ()) if not d.startswith(m + ".") or d in eager.get(m, ())}

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
    assert "leukedge.engines.factory" in graph and "leukedge.formats.sidecar" in graph["leukedge.model"]
    known = set(_modules())
    eager = {m: _eager_children(m, p, known) for m, p in _modules().items()}
    assert "leukedge.station.core" in eager["leukedge.station"] and eager["leukedge"] == {"leukedge._version"}
    cycle = _cycle(graph, eager)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"p": {"p.x"}, "p.x": {"p"}}) is None  # a package importing its own child lazily
    assert _cycle({"p": {"p.x"}, "p.x": {"p"}}, {"p": {"p.x"}}) == ["p", "p.x", "p"]  # ... and eagerly


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


# --------------------------------------------------------------------------------------------
# layers: an import may point down or sideways, never up
#: rank of each module (by the longest matching prefix; library modules not named here: LIBRARY_RANK). The
#: package face ``leukedge`` (lazy, imports nothing when it runs) is above everything: no module imports it.
LAYERS = {
    "leukedge._version": 0, "leukedge._native": 0, "leukedge._util": 0,
    "leukedge.config": 1,
    "leukedge.formats": 2, "leukedge.artifacts": 2, "leukedge.bundle_meta": 2,
    "leukedge.model": 3,
    # LIBRARY_RANK (4): the stages (data, preprocess, models, train, cv, evaluate, export, quantize, ood, ...)
    "leukedge.engines": 5,
    # the stages that run a model through a backend
    "leukedge.export": 6, "leukedge.quantize": 6, "leukedge.ood": 6, "leukedge.infer": 6, "leukedge.engines.build": 6,
    "leukedge.station": 7,
    # whole runs and their report
    "leukedge.report": 8, "leukedge.cv": 8,
    "leukedge.cli": 9, "leukedge.__main__": 9,
    "leukedge": 10,
}
LIBRARY_RANK = 4


def _rank(module: str) -> int:
    if module == "leukedge":
        return LAYERS["leukedge"]
    keys = [k for k in LAYERS if k != "leukedge" and (module == k or module.startswith(k + "."))]
    return LAYERS[max(keys, key=len)] if keys else LIBRARY_RANK


def _precise_imports(name: str, path: Path, known: set[str]) -> set[tuple[str, str]]:
    """``(module, statement)`` for every leukedge module ``path`` imports; ``from PKG import sub`` counts as
    ``PKG.sub`` only when ``sub`` is a module (the package itself is already initialised), as ``PKG`` otherwise."""
    is_pkg = path.name == "__init__.py"
    out: set[tuple[str, str]] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            pairs = [(a.name, f"import {a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, is_pkg, node)
            pairs = [(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod, f"from {mod} import {a.name}")
                     for a in node.names]
        else:
            continue
        for target, stmt in pairs:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not target.startswith(name + "."):
                out.add((target, stmt))
    return out


def _known() -> set[str]:
    return set(_modules()) | {"leukedge._native"}


def test_no_import_points_up_the_layers():
    known = _known()
    up = [f"{name} ({_rank(name)}): {stmt} ({_rank(target)})"
          for name, path in _modules().items() if name not in CLI_ENTRY_POINTS | {"leukedge.cli.__main__"}
          for target, stmt in _precise_imports(name, path, known) if _rank(target) > _rank(name)]
    assert not up, up


def test_the_layer_check_sees_an_upward_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from . import __version__\nfrom .infer import Predictor\n")
    found = _precise_imports("leukedge.model", f, _known())
    assert ("leukedge", "from leukedge import __version__") in found
    assert any(t == "leukedge.infer" and _rank(t) > _rank("leukedge.model") for t, _ in found)


# --------------------------------------------------------------------------------------------
# private names stay in their module
def _private_uses(name: str, path: Path, known: set[str]) -> list[str]:
    """``from leukedge.x import _name`` and ``x._name`` (``x`` an imported leukedge module) in module ``name``,
    where the private name belongs to another module (modules named with an underscore are not private names)."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = _resolve(name, is_pkg, node)
            if not (mod == "leukedge" or mod.startswith("leukedge.")):
                continue
            for a in node.names:
                full = f"{mod}.{a.name}"
                if full in known:
                    aliases[a.asname or a.name] = full
                elif a.name.startswith("_") and not a.name.startswith("__") and mod != name:
                    out.append(f"{name}: from {mod} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and f"{aliases[node.value.id]}.{node.attr}" not in known and aliases[node.value.id] != name):
            out.append(f"{name}: {node.value.id}.{node.attr} ({aliases[node.value.id]})")
    return out


def test_no_private_name_is_used_across_modules():
    known = _known()
    found = {u for name, path in _modules().items() for u in _private_uses(name, path, known)}
    assert not found, sorted(found)


def test_the_private_check_sees_both_forms(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from leukedge.config import _flatten\nfrom leukedge import config as c\nc._flatten({})\n"
                 "from leukedge import _util\n_util.as_int(1)\n")
    found = _private_uses("leukedge.model", f, _known())
    assert found == ["leukedge.model: from leukedge.config import _flatten", "leukedge.model: c._flatten (leukedge.config)"]


# --------------------------------------------------------------------------------------------
# each on-disk JSON file has one reader, in leukedge/formats/
#: the JSON files of leukedge/formats/ (and the constants that name them)
FORMAT_FILES = {"bundle.json", "export.json", "cache.json", "preprocess.json", "META_FILE", "MANIFEST_FILE",
                "CACHE_META_FILE", "PREPROCESS_FILE", "sidecar_path"}


def _json_parsers_of_format_files(name: str, path: Path) -> list[str]:
    """Functions of ``path`` that call ``json.load(s)`` and name one of :data:`FORMAT_FILES`."""
    out = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        parses = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("load", "loads")
                     and isinstance(n.func.value, ast.Name) and n.func.value.id == "json" for n in ast.walk(fn))
        names = {n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        names |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
        if parses and names & FORMAT_FILES:
            out.append(f"{name}.{fn.name}: {sorted(names & FORMAT_FILES)}")
    return out


def test_only_formats_parses_the_on_disk_json_files():
    found = {f for name, path in _modules().items() if not name.startswith("leukedge.formats")
             for f in _json_parsers_of_format_files(name, path)}
    assert not found, sorted(found)
    inside = [f for name, path in _modules().items() if name.startswith("leukedge.formats")
              for f in _json_parsers_of_format_files(name, path)]
    assert any(".bundle.read_bundle:" in f for f in inside), inside  # the check sees a real reader


def test_each_artifact_opens_through_formats(tmp_path):
    from leukedge.formats.bundle import default_model_path, read_bundle
    from leukedge.formats.export import read_export_manifest
    from leukedge.formats.sidecar import EngineMismatchError, read_sidecar
    from leukedge.model import open_model

    b = read_bundle(default_model_path())
    assert b.config.pixel_hash() == b.meta["preprocess_hash"] and b.class_names == ["hem", "all"]
    manifest = read_export_manifest(default_model_path() / "export")
    assert manifest["preprocess_hash"] == b.config.pixel_hash()
    spec = open_model()
    assert spec.kind == "bundle" and spec.config == b.config and spec.onnx_fp32 is not None
    with pytest.raises(EngineMismatchError, match="no sidecar"):
        read_sidecar(tmp_path / "model.plan")
