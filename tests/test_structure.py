"""The layering that keeps the tree changeable in one place (docs/design.md): moss_kernels never
imports moss; nothing imports the command line; no import cycle among module-level imports."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("moss_kernels", "moss")


def _module(path: Path) -> str:
    """``moss/backbones/base.py`` -> ``moss.backbones.base``."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules of ours that ``path`` imports (``from . import x`` resolved to ``pkg.x``)."""
    tree = ast.parse(path.read_text())
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import sub` imports the module pkg.sub; `from pkg import name`, pkg
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in FILES else base
                      for a in node.names}
    # A module's own packages are initialised before it: importing them is no edge.
    ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    return {m for m in found if m.split(".")[0] in PACKAGES and m not in ancestors}


def test_the_kernels_never_import_the_layer_above():
    for module, path in FILES.items():
        if module.startswith("moss_kernels"):
            assert not {m for m in _imports(path, False) if m.split(".")[0] == "moss"}, module


def test_nothing_imports_the_command_line():
    for module, path in FILES.items():
        if module not in ("moss.cli", "moss.__main__"):
            assert "moss.cli" not in _imports(path, False), module


def test_module_level_imports_form_no_cycle():
    graph = {m: {i for i in _imports(p, True) if i in FILES and i != m} for m, p in FILES.items()}
    done, active = set(), []

    def visit(m):
        if m in active:
            raise AssertionError("import cycle: " + " -> ".join(active[active.index(m):] + [m]))
        if m not in done:
            active.append(m)
            for n in sorted(graph[m]):
                visit(n)
            active.pop()
            done.add(m)

    for m in sorted(graph):
        visit(m)
