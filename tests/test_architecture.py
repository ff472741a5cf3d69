"""The house rules of the layout (docs/ARCHITECTURE.md), checked over the source with the standard library's ``ast``.

- the trainer knows nothing of Gradio or the page: nothing under ``trainer/`` imports ``gradio`` or ``ui``;
- the page enters the trainer by its front door only: ``ui/`` imports ``trainer.api``, ``trainer.events`` and
  ``trainer.errors`` and no other trainer module;
- no import circles among the project's modules (imports inside functions count: a lazy import that closes a circle
  is still a circle, only hidden);
- no module over ``MAX_LINES`` lines unless ``LONG_MODULES`` gives the reason.
Each rule is also checked against a deliberately broken tree, so a guard that can no longer fail is noticed.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 350
UI_MAY_IMPORT = {"trainer.api", "trainer.events", "trainer.errors"}
LONG_MODULES: dict[str, str] = {
    # module: why it is one file of more than MAX_LINES lines
}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    paths = [*(root / "trainer").rglob("*.py"), *(root / "ui").rglob("*.py"), root / "app.py"]
    out = {}
    for path in paths:
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imported_names(path: Path) -> set[str]:
    """Every module name an ``import`` / ``from … import`` anywhere in the file names (``from a import b`` gives
    ``a`` and ``a.b``: b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def trainer_modules_imported(path: Path) -> set[str]:
    """The trainer modules a file imports, by statement: ``from trainer.x import y`` is ``trainer.x``, ``from trainer
    import api`` is ``trainer.api``, ``import trainer.x`` is ``trainer.x``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "trainer")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "trainer":
            found.update(f"trainer.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("trainer."):
            found.add(node.module)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    def owner(name: str) -> str | None:  # the project module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in map(owner, imported_names(path)) if m and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def forbidden_imports(modules: dict[str, Path]) -> list[str]:
    problems = []
    for name, path in sorted(modules.items()):
        imported = imported_names(path)
        if name.startswith("trainer"):
            bad = sorted(n for n in imported if n.split(".")[0] in ("gradio", "ui"))
            problems += [f"{name} imports {b}" for b in bad]
        elif name.startswith("ui"):
            bad = sorted(trainer_modules_imported(path) - UI_MAY_IMPORT)
            problems += [f"{name} imports {b}: the page may use trainer.api, trainer.events, trainer.errors" for b in bad]
    return problems


def long_modules(modules: dict[str, Path]) -> list[str]:
    too_long = []
    for name, path in sorted(modules.items()):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES and name not in LONG_MODULES:
            too_long.append(f"{name}: {lines} lines")
    return too_long


# ---- the tree as it is


def test_the_trainer_never_imports_gradio_and_the_page_enters_by_the_front_door():
    assert forbidden_imports(project_modules()) == []


def test_no_import_circles():
    assert circles(import_graph(project_modules())) == []


def test_no_module_is_long_without_a_written_reason():
    assert long_modules(project_modules()) == []
    assert all(reason.strip() for reason in LONG_MODULES.values())


def test_what_the_front_door_lists_exists():
    from trainer import api

    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert missing == []
    with pytest.raises(AttributeError, match="may use only what trainer/api.py lists"):
        getattr(api, "RunLock")  # a trainer name that is not on the list


# ---- each guard fails on a tree that breaks its rule


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in {"app.py": "", "trainer/__init__.py": "", "ui/__init__.py": "", **files}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return project_modules(tmp_path)


def test_the_guards_catch_a_broken_tree(tmp_path):
    modules = _tree(tmp_path, {
        "trainer/api.py": "",
        "trainer/a.py": "def f():\n    import gradio\n    from trainer.b import g\n",  # nested imports count
        "trainer/b.py": "from trainer import a\n",
        "ui/page.py": "from trainer.api import x\nfrom trainer import errors\nfrom trainer.runs.folder import RunFolder\n",
        "trainer/runs/__init__.py": "", "trainer/runs/folder.py": "\n" * (MAX_LINES + 1),
    })
    assert forbidden_imports(modules) == [
        "trainer.a imports gradio",
        "ui.page imports trainer.runs.folder: the page may use trainer.api, trainer.events, trainer.errors"]
    assert circles(import_graph(modules)) == [["trainer.a", "trainer.b"]]
    assert long_modules(modules) == [f"trainer.runs.folder: {MAX_LINES + 1} lines"]
