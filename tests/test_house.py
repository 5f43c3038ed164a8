"""The layout holds: imports only point down the floors, nothing imports in a circle, rooms stay small.

The floors, lowest first (docs/design.md, "Layout", explains them):

1. ``common`` (schedules, results I/O, training utilities) and ``kernels`` (``token_stats``): import no other room;
2. ``dllm`` and ``uem``, the two engines: never each other;
3. ``samplers``, the diffusers swap-ins that plug each engine into diffusers;
4. ``app``: the command line, batch generation, the benchmarks, the demo.

Inside each engine the toy setup (``dllm/charlm``, ``uem/digits``) may use the method; the method never uses it.
Every import counts, also one inside a function and one made by ``importlib`` from a module path in a string.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {"common": 1, "kernels": 1, "dllm": 2, "uem": 2, "samplers": 3, "app": 4}
TOYS = {"dllm": "diffexit.dllm.charlm", "uem": "diffexit.uem.digits"}
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["diffexit", *parts])


def _library_files() -> dict[str, Path]:
    files = {}
    for folder in FLOORS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            files[_module_name(path)] = path
    return files


FILES = _library_files()


def _resolve(module: str, level: int, importer: str, is_package: bool) -> str:
    if level == 0:
        return module
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _target(name: str) -> str | None:
    """The library module that importing ``name`` loads (itself, or its nearest package)."""
    while name and name not in FILES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str) -> set[str]:
    """Every library module that module ``name`` imports, wherever in the file."""
    path = FILES[name]
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("diffexit")}
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", node.level, name, is_package)
            if base.startswith("diffexit"):
                found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in FILES else base for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            # Modules loaded by importlib: absolute paths (the command table), and the lazy tables of the
            # packages (".heads" relative to the package).
            if text.startswith("diffexit.") and " " not in text:
                found.add(text)
            elif is_package and text.startswith(".") and text[1:].isidentifier():
                found.add(name + text)
    return {t for t in map(_target, found) if t and t != name}


GRAPH = {name: imports_of(name) for name in FILES}


def _floor_of(name: str) -> str:
    return name.split(".")[1]


def test_every_import_points_down_a_floor():
    bad = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
           if _floor_of(a) != _floor_of(b) and not FLOORS[_floor_of(b)] < FLOORS[_floor_of(a)]]
    assert not bad, "imports that run sideways or up a floor:\n" + "\n".join(bad)


def test_methods_never_import_their_toy_setup():
    bad = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
           if _floor_of(a) in TOYS and not a.startswith(TOYS[_floor_of(a)])
           and b.startswith(TOYS[_floor_of(a)])]
    assert not bad, "method modules that import their engine's toy setup:\n" + "\n".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph``, as a path that starts and ends at the same node, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_file_imports_itself_through_a_circle():
    # A package's __init__ re-exports its own modules; those edges point down into the package, not round.
    cycle = _cycle(GRAPH)
    assert cycle is None, "files that import each other in a circle: " + " -> ".join(cycle)


def test_no_folder_imports_itself_through_a_circle():
    def folder(name):
        path = FILES[name]
        parent = path.parent if path.name != "__init__.py" else path.parent
        return ".".join(["diffexit", *parent.relative_to(ROOT).parts])

    folders: dict[str, set[str]] = {}
    for a, targets in GRAPH.items():
        for b in targets:
            fa, fb = folder(a), folder(b)
            # A package reaching into its own subfolder (its __init__ or a re-export) is not a circle.
            if fa != fb and not fb.startswith(fa + "."):
                folders.setdefault(fa, set()).add(fb)
    cycle = _cycle(folders)
    assert cycle is None, "folders that import each other in a circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(FILES))
def test_no_room_is_over_400_lines(name):
    lines = FILES[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{FILES[name].relative_to(ROOT)} has {lines} lines; split it by idea"


def test_the_checker_sees_what_it_must():
    # Guards against a checker that passes because it reads nothing: known edges of each kind are found.
    assert "diffexit.common.schedules" in GRAPH["diffexit.dllm.halting"]  # a relative import
    assert "diffexit.app.bench.text" in GRAPH["diffexit.app.cli"]  # a module path for importlib
    assert "diffexit.uem.heads" in GRAPH["diffexit.uem"]  # a package's lazy table
    assert "diffexit.dllm.halting" in GRAPH["diffexit.samplers.sched_scheduler"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_started_from_the_repository_root_our_folders_do_not_shadow_top_level_packages():
    # `python -m diffexit.app.cli` (and `accelerate launch -m`) run in a checkout put the root on sys.path; then
    # `import kernels`, which transformers does when it loads a model, found our kernels/ instead of Hugging Face's.
    import subprocess
    import sys

    code = "import diffexit, kernels, sys; print(kernels.__file__); print(any(p in ('', '.') for p in sys.path))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    kernels_file, root_on_path = out.split()
    assert Path(kernels_file).resolve().parent != ROOT / "kernels"
    assert root_on_path == "False"
