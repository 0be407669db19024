"""House rules on imports, read from the source with ``ast`` (every import, also inside functions):
no import cycle between the modules of synqt/ and launcher/; synqt/ never imports launcher/ or Ray;
launcher/run/ray_backend.py is the only module importing Ray; and each room imports only what its
``__init__`` docstring allows (``May import: a, b`` for the folder; ``x.py, y.py  may import: ...`` in a
package's docstring for its top-level modules; a module may always import its own folder). The checker
is also run on a small tree written here, with one breach of each rule, to show that it finds them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("synqt", "launcher")
RAY_MODULE = "launcher.run.ray_backend"


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


def _names(text: str) -> list[str]:
    text = text.strip().rstrip(".")
    return [] if text in ("", "nothing") else [n.strip() for n in text.split(",") if n.strip()]


def allowed_imports(root: Path) -> dict[str, list[str]]:
    """{room: the project modules / packages it may import}, read from the ``__init__`` docstrings: a folder
    (``synqt.data``) from its own ``May import:`` paragraph, a top-level module (``synqt.config``) from its
    package's ``name.py ... may import:`` line. ``ValueError`` naming the file when a folder states no rule."""
    rules: dict[str, list[str]] = {}
    for pkg in PACKAGES:
        for init in sorted((root / pkg).rglob("__init__.py")):
            doc = ast.get_docstring(ast.parse(init.read_text())) or ""
            folder = ".".join(init.parent.relative_to(root).parts)
            if folder != pkg:
                m = re.search(r"^May import:(.*?)(?:\n\s*\n|\Z)", doc, re.M | re.S)
                if not m:
                    raise ValueError(f"{init}: the docstring says no 'May import:' rule for {folder}")
                rules[folder] = _names(m.group(1).replace("\n", " "))
            for line in doc.splitlines():
                m = re.match(r"\s*((?:\w+\.py,?\s*)+)\s+may import:(.*)$", line)
                if m:
                    for mod in re.findall(r"(\w+)\.py", m.group(1)):
                        rules[f"{folder}.{mod}"] = _names(m.group(2))
    return rules


def room_of(module: str, rules: dict[str, list[str]]) -> str | None:
    """The room (the longest rule key that is the module or a folder above it) a module belongs to."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in rules:
            return ".".join(parts[:n])
    return None


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def breaches(root: Path) -> list[str]:
    """Every breach of the house rules, as readable lines (empty: the tree is clean)."""
    edges, raw = import_graph(root)
    found = [f"import cycle: {' <-> '.join(c)}" for c in find_cycles(edges)]
    rules = allowed_imports(root)
    for mod, targets in sorted(edges.items()):
        room = room_of(mod, rules)
        if mod in PACKAGES:
            continue  # the package roots import nothing but lazily, by name (synqt.__getattr__)
        if room is None:
            found.append(f"{mod} belongs to no room with a stated rule")
            continue
        for t in sorted(targets):
            if t in PACKAGES or _within(t, room):
                continue
            if not any(_within(t, ok) for ok in rules[room]):
                found.append(f"{mod} imports {t} ({room} may import: {', '.join(rules[room]) or 'nothing'})")
    for mod, names in sorted(raw.items()):
        uses_ray = sorted({n for n in names if n == "ray" or n.startswith("ray.")})
        if mod.split(".")[0] == "synqt":
            found += [f"{mod} imports {n}" for n in sorted(set(names)) if n.split(".")[0] == "launcher"]
            found += [f"{mod} imports {n} (synqt/ never imports Ray)" for n in uses_ray]
        elif uses_ray and mod != RAY_MODULE:
            found.append(f"{mod} imports {uses_ray[0]} (only {RAY_MODULE} may)")
    return sorted(found)


def test_project_imports_follow_the_house_rules():
    assert breaches(REPO) == []
    rules = allowed_imports(REPO)
    # every folder of both packages states its rule, and every module belongs to a room
    folders = {".".join(p.parent.relative_to(REPO).parts) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    assert folders - set(PACKAGES) <= set(rules), folders - set(rules)
    assert rules["synqt.errors"] == [] and "synqt.training" not in rules["launcher.results"]
    edges, raw = import_graph(REPO)
    # the graph really was read: known edges are present (also imports inside functions)
    assert "synqt.run.rundir" in edges["launcher.results.aggregate"]
    assert "launcher.run.ray_backend" in edges["launcher.run.commands"]  # imported inside run_sweep_command
    assert any(n == "ray" for n in raw[RAY_MODULE])


def test_the_design_table_states_the_rules_of_the_init_docstrings():
    """docs/DESIGN.md shows each room's rule in a table; the rule itself is the ``__init__`` docstring."""
    rules = allowed_imports(REPO)
    rows = re.findall(r"^\| (`[^|]+`) \| ([^|]+) \|$", (REPO / "docs" / "DESIGN.md").read_text(), re.M)
    shown = {}
    for rooms, allowed in rows:
        for room in re.findall(r"`([\w/.]+)`", rooms):
            if room.endswith("/") or room.endswith(".py"):
                shown[room.rstrip("/").removesuffix(".py").replace("/", ".")] = _names(allowed)
    assert shown == rules


def test_each_folder_docstring_lists_exactly_its_modules():
    """A folder's ``__init__`` names each of its modules in a ``- ``name``  what it holds`` line: a module added,
    moved or renamed without its line (or a line left for a module that is gone) is caught here."""
    for pkg in PACKAGES:
        for init in sorted((REPO / pkg).rglob("__init__.py")):
            if init.parent == REPO / pkg:
                continue
            doc = ast.get_docstring(ast.parse(init.read_text())) or ""
            listed = set(re.findall(r"^- ``(\w+)``", doc, re.M))
            files = {p.stem for p in init.parent.glob("*.py") if p.stem != "__init__"}
            assert listed == files, (init, "listed, no file:", listed - files, "unlisted:", files - listed)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_finds_each_kind_of_breach(tmp_path):
    _write(tmp_path, "synqt/__init__.py",
           '"""x\n\n  errors.py  may import: nothing\n  a.py, b.py, c.py  may import: synqt\n"""\n')
    _write(tmp_path, "launcher/__init__.py", '"""x\n\n  cli.py  may import: synqt, launcher\n"""\n')
    _write(tmp_path, "synqt/a.py", "from synqt import b\n")
    _write(tmp_path, "synqt/b.py", "def f():\n    from . import a\n    return a\n")  # cycle, inside a function
    _write(tmp_path, "synqt/c.py", "def g():\n    import ray.tune\n    from launcher.run.stages import x\n")
    _write(tmp_path, "synqt/errors.py", "from synqt import c\n")  # errors may import nothing
    _write(tmp_path, "synqt/data/__init__.py", '"""Data.\n\nMay import: synqt.errors\n"""\n')
    _write(tmp_path, "synqt/data/splits.py", "from synqt.errors import E\nfrom synqt.data import leaks\n")  # allowed
    _write(tmp_path, "synqt/data/leaks.py", "import synqt.model.branch\n")  # data may not import model
    _write(tmp_path, "synqt/model/__init__.py", '"""Model.\n\nMay import: synqt.data,\nsynqt.errors\n"""\n')
    _write(tmp_path, "synqt/data/images.py", "")
    _write(tmp_path, "synqt/model/branch.py", "from synqt.data.images import load\n")  # allowed (a 2-line rule)
    _write(tmp_path, "synqt/tools/__init__.py", '"""Tools without a rule."""\n')
    _write(tmp_path, "launcher/run/__init__.py", '"""Run.\n\nMay import: synqt, launcher.plan\n"""\n')
    _write(tmp_path, "launcher/run/stages.py", "import ray\n")
    _write(tmp_path, "launcher/run/ray_backend.py", "import ray\nfrom launcher.results import status\n")
    _write(tmp_path, "launcher/results/__init__.py", '"""Results.\n\nMay import: synqt.run\n"""\n')
    _write(tmp_path, "launcher/results/status.py", "")
    try:
        breaches(tmp_path)
    except ValueError as err:  # a folder without a stated rule is refused, naming its __init__
        assert "synqt/tools/__init__.py" in str(err) and "May import" in str(err)
    else:
        raise AssertionError("a folder without a rule was accepted")
    _write(tmp_path, "synqt/tools/__init__.py", '"""Tools.\n\nMay import: synqt\n"""\n')
    found = breaches(tmp_path)
    assert found == [
        "import cycle: synqt.a <-> synqt.b",
        "launcher.run.ray_backend imports launcher.results (launcher.run may import: synqt, launcher.plan)",
        "launcher.run.ray_backend imports launcher.results.status (launcher.run may import: synqt, launcher.plan)",
        "launcher.run.stages imports ray (only launcher.run.ray_backend may)",
        "synqt.c imports launcher.run.stages",
        "synqt.c imports launcher.run.stages (synqt.c may import: synqt)",
        "synqt.c imports launcher.run.stages.x",
        "synqt.c imports ray.tune (synqt/ never imports Ray)",
        "synqt.data.leaks imports synqt.model.branch (synqt.data may import: synqt.errors)",
        "synqt.errors imports synqt.c (synqt.errors may import: nothing)",
    ]
