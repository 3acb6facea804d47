"""The shape of the code (issue 25's done-when): no import cycle, short modules, short functions.

- Imports: every ``import autoplan...``, ``from autoplan... import`` and relative import in
  autoplan/, lazy ones inside functions included, is an edge of the module graph, which must
  have no cycle. ``from autoplan.x import y`` where ``autoplan.x.y`` is a module is an edge to
  that module; importing ``autoplan.x.y`` also runs ``autoplan/x/__init__.py``, so it is an
  edge to ``autoplan.x`` too, except from inside ``autoplan.x`` (a package re-exporting its own
  submodules is not a cycle). Every module must also import on its own, in a fresh interpreter
  state (a forked child per module, after the third-party libraries are loaded once).
- Modules: at most MAX_MODULE_LINES lines each.
- Functions: at most MAX_FUNCTION_LINES lines each (``def`` to last line, docstring and nested
  functions included). A longer function must say why in its docstring with the words
  ``Long because`` followed by the reason, e.g. ``Long because the five cases share one
  loop state; split, they would pass it around``.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "autoplan"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
LONG_REASON = "long because"          # in the docstring of a longer function, case-insensitive


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    """{module name: path} of every module in autoplan/."""
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list:
    """(line, dotted name) of every autoplan name imported anywhere in the tree; for
    ``from X import a`` both ``X.a`` and ``X`` (which of them is a module is decided later)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            found.append((node.lineno, base))
    return [(line, name) for line, name in found if name == "autoplan" or name.startswith("autoplan.")]


def _import_graph() -> dict:
    """{module: {imported module: 'path:line'}}; edges to the module's own packages left out."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = graph.setdefault(module, {})
        own_packages = {".".join(module.split(".")[:k]) for k in range(1, module.count(".") + 1)}
        for line, name in _imported_names(tree, module, path.name == "__init__.py"):
            parts = name.split(".")
            # the module itself and every package above it run on import
            for k in range(2, len(parts) + 1):
                target = ".".join(parts[:k])
                if target in modules and target != module and target not in own_packages:
                    edges.setdefault(target, f"{path.relative_to(ROOT)}:{line}")
    return graph


def _cycles(graph: dict) -> list:
    """Every strongly connected component of more than one module (Tarjan), each as a
    list of modules in one cycle through it."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_one_cycle(graph, component) for component in components]


def _one_cycle(graph: dict, component: set) -> list:
    """A path start -> ... -> start inside one strongly connected component (breadth first)."""
    start = min(component)
    came_from, frontier = {start: None}, [start]
    while frontier:
        node = frontier.pop(0)
        for target in sorted(graph[node]):
            if target == start:
                path = [node]
                while came_from[path[-1]] is not None:
                    path.append(came_from[path[-1]])
                return path[::-1] + [start]
            if target in component and target not in came_from:
                came_from[target] = node
                frontier.append(target)
    return sorted(component)


def _describe_cycle(graph: dict, cycle: list) -> str:
    steps = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return "cycle: " + " -> ".join(cycle) + "\n    " + "\n    ".join(steps)


def test_the_import_graph_has_no_cycle_lazy_imports_included():
    graph = _import_graph()
    assert "autoplan.cli" in graph and graph["autoplan.cli"], "the scan found no imports: scanner broken"
    cycles = _cycles(graph)
    assert not cycles, f"{len(cycles)} import cycle(s) among autoplan modules:\n" + "\n".join(
        _describe_cycle(graph, cycle) for cycle in cycles)


def test_the_scanner_sees_lazy_relative_and_submodule_imports():
    source = ("import os\nfrom autoplan.errors import InputError\n"
              "def f():\n    from . import probe\n    from ..runs import RunSpec\n    import autoplan.nets.unet\n")
    names = {name for _, name in _imported_names(ast.parse(source), "autoplan.planning.schedule", False)}
    assert {"autoplan.errors", "autoplan.planning.probe", "autoplan.runs", "autoplan.nets.unet"} <= names
    assert "os" not in names
    graph = _import_graph()
    assert "autoplan.cli" not in graph["autoplan.demo"]           # the demo calls the pipeline


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:1"}, "c": {"a": "c.py:1", "d": "c.py:2"}, "d": {}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": "x"}, "b": {}}) == []


_IMPORT_EACH_ALONE = r"""
import importlib, os, sys, traceback
third_party, modules = sys.argv[1].split(","), sys.argv[2].split(",")
for name in third_party:                  # loaded once, shared by every child
    try:
        importlib.import_module(name)
    except Exception:
        pass
failed = []
for module in modules:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
        except BaseException:
            sys.stderr.write(f"--- import {module} alone failed:\n{traceback.format_exc()}")
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(module)
print("failed:", ", ".join(failed))
sys.exit(1 if failed else 0)
"""


def _third_party_modules() -> list:
    names = set()
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
    return sorted(name for name in names if name.split(".")[0] != "autoplan")


def test_every_module_imports_on_its_own():
    modules = sorted(name for name in _modules() if not name.endswith("__main__"))   # runs the CLI
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH_ALONE, ",".join(_third_party_modules()),
                             ",".join(modules)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, f"modules that fail to import alone ({result.stdout.strip()}):\n" \
        f"{result.stderr[-8000:]}"


def test_no_module_is_longer_than_the_limit():
    lengths = {path.relative_to(ROOT): len(path.read_text().splitlines()) for path in _modules().values()}
    long_modules = sorted((n, str(p)) for p, n in lengths.items() if n > MAX_MODULE_LINES)
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(
        f"  {path}: {n} lines" for n, path in reversed(long_modules))


def _long_functions() -> list:
    """(lines, 'path:line name') of functions over the limit whose docstring gives no reason."""
    found = []
    for path in _modules().values():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            reason = LONG_REASON in (ast.get_docstring(node) or "").lower()
            if lines > MAX_FUNCTION_LINES and not reason:
                found.append((lines, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def test_no_function_is_longer_than_the_limit_without_a_reason():
    offenders = _long_functions()
    assert not offenders, (
        f"functions over {MAX_FUNCTION_LINES} lines without 'Long because ...' in their docstring:\n"
        + "\n".join(f"  {where}: {lines} lines" for lines, where in offenders))
