"""House rules on imports, read from the source with ``ast`` (every import, also inside functions):
no import cycle between the modules of synqt/ and launcher/; synqt/ never imports launcher/ or Ray;
launcher/ray_backend.py is the only module importing Ray. The checker is also run on a small tree
written here, with one breach of each rule, to show that it finds them."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("synqt", "launcher")
RAY_MODULE = "launcher.ray_backend"


def module_files(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of every .py file of the project packages under ``root``."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imported_names(path: Path, module: str) -> list[str]:
    """Every module an ``import`` / ``from ... import`` anywhere in the file names (relative ones resolved);
    ``from pkg import name`` also yields ``pkg.name`` (it may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.append(target)
            names += [f"{target}.{a.name}" for a in node.names]
    return names


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """(edges between project modules, every imported name per module)."""
    files = module_files(root)
    edges: dict[str, set[str]] = {m: set() for m in files}
    raw: dict[str, list[str]] = {}
    for mod, path in files.items():
        raw[mod] = imported_names(path, mod)
        for name in raw[mod]:
            if name in files and name != mod:
                edges[mod].add(name)
    return edges, raw


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def breaches(root: Path) -> list[str]:
    """Every breach of the three rules, as readable lines (empty: the tree is clean)."""
    edges, raw = import_graph(root)
    found = [f"import cycle: {' <-> '.join(c)}" for c in find_cycles(edges)]
    for mod, names in sorted(raw.items()):
        uses_ray = sorted({n for n in names if n == "ray" or n.startswith("ray.")})
        if mod.split(".")[0] == "synqt":
            found += [f"{mod} imports {n}" for n in sorted(set(names)) if n.split(".")[0] == "launcher"]
            found += [f"{mod} imports {n} (synqt/ never imports Ray)" for n in uses_ray]
        elif uses_ray and mod != RAY_MODULE:
            found.append(f"{mod} imports {uses_ray[0]} (only {RAY_MODULE} may)")
    return found


def test_project_imports_follow_the_house_rules():
    assert breaches(REPO) == []
    edges, raw = import_graph(REPO)
    # the graph really was read: known edges are present (also imports inside functions)
    assert "synqt.rundir" in edges["launcher.aggregate"]
    assert "launcher.ray_backend" in edges["launcher.commands"]  # imported inside run_sweep_command
    assert any(n == "ray" for n in raw[RAY_MODULE])


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_finds_each_kind_of_breach(tmp_path):
    for pkg in PACKAGES:
        _write(tmp_path, f"{pkg}/__init__.py", "")
    _write(tmp_path, "synqt/a.py", "from synqt import b\n")
    _write(tmp_path, "synqt/b.py", "def f():\n    from . import a\n    return a\n")  # cycle, inside a function
    _write(tmp_path, "synqt/c.py", "def g():\n    import ray.tune\n    from launcher.stages import x\n")
    _write(tmp_path, "launcher/stages.py", "import ray\n")
    _write(tmp_path, "launcher/ray_backend.py", "import ray\n")
    found = breaches(tmp_path)
    assert found == [
        "import cycle: synqt.a <-> synqt.b",
        "launcher.stages imports ray (only launcher.ray_backend may)",
        "synqt.c imports launcher.stages",
        "synqt.c imports launcher.stages.x",
        "synqt.c imports ray.tune (synqt/ never imports Ray)",
    ]
