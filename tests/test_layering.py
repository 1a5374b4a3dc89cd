"""The package's layering, read from its source: every import (lazy ones inside functions included).

Rules (docs/README.md, "Package layout"):
- no import cycle between prores_megatron modules;
- subpackages are ranked utils < core < monitoring < checkpoint < training < export < analysis <
  data < bridge, and a module imports only its own subpackage and those ranked below it;
- ``core`` never imports ``megatron.training``, and only ``core/compat.py`` imports megatron at all;
- no module imports another module's private (``_name``) symbol.
The checker is tested on a small fabricated package first, so the rules can be seen to fire.
"""

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "prores_megatron"
LAYERS = ("utils", "core", "monitoring", "checkpoint", "training", "export", "analysis", "data", "bridge")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path):
    """(line, imported module, imported names) for every import statement in ``path``."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    modules = {module_name(p, root) for p in root.rglob("*.py")}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = tuple(a.name for a in node.names)
            # ``from pkg import module`` imports the module; ``from module import name`` the module.
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if submodules:
                for sub in submodules:
                    yield node.lineno, sub, ()
                rest = tuple(n for n in names if f"{target}.{n}" not in modules)
                if rest:
                    yield node.lineno, target, rest
            else:
                yield node.lineno, target, names


def layer_of(module: str, top: str):
    parts = module.split(".")
    if parts[0] != top or len(parts) < 2 or (len(parts) == 2 and parts[1] not in LAYERS):
        return None  # the top-level package itself (its __init__ re-exports the public API)
    return parts[1]


def check_layering(root: Path):
    """All violations of the rules above, as readable strings."""
    top = root.name
    problems, graph = [], {}
    for path in sorted(root.rglob("*.py")):
        me = module_name(path, root)
        my_layer = layer_of(me, top)
        where = f"{path.relative_to(root.parent)}"
        for line, target, names in imports_of(path, root):
            if target.startswith("megatron"):
                if my_layer == "core" and (target == "megatron.training" or target.startswith("megatron.training.")
                                           or (target == "megatron" and "training" in names)):
                    problems.append(f"{where}:{line}: core imports megatron.training")
                elif my_layer == "core" and path.name != "compat.py":
                    problems.append(f"{where}:{line}: core imports {target} outside core/compat.py")
                continue
            if not (target == top or target.startswith(top + ".")):
                continue
            graph.setdefault(me, set()).add(target)
            private = [n for n in names if n.startswith("_")]
            if private:
                problems.append(f"{where}:{line}: imports private {', '.join(private)} from {target}")
            their_layer = layer_of(target, top)
            if my_layer is None or their_layer is None or their_layer == my_layer:
                continue
            if my_layer not in LAYERS or their_layer not in LAYERS:
                problems.append(f"{where}:{line}: subpackage outside the known layers ({my_layer}, {their_layer})")
            elif LAYERS.index(their_layer) > LAYERS.index(my_layer):
                problems.append(f"{where}:{line}: {my_layer} imports {target}, a layer above it")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in find_cycles(graph)]
    return problems


def find_cycles(graph):
    """One cycle per strongly connected component with more than one module (or a self-import)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def write_tree(root: Path, files: dict):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_fires_on_each_rule(tmp_path):
    root = tmp_path / "pkg"
    write_tree(root, {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/compat.py": "from megatron.core import parallel_state\n",
        "core/spec.py": "def f():\n    from megatron.training import get_args\n",
        "core/steps.py": "from megatron.core.utils import x\nfrom ._hidden import y\n",
        "core/a.py": "from . import b\n",
        "core/b.py": "def g():\n    from .a import thing\n",
        "core/uses_export.py": "from ..export import writer\n",
        "export/__init__.py": "",
        "export/writer.py": "from ..core.steps import _private_helper\nfrom ..core import compat\n",
        "training/__init__.py": "",
        "training/ok.py": "from ..core import compat\nimport megatron.training\n",
    })
    problems = "\n".join(check_layering(root))
    assert "pkg/core/spec.py:2: core imports megatron.training" in problems
    assert "pkg/core/steps.py:1: core imports megatron.core.utils outside core/compat.py" in problems
    assert "pkg/core/steps.py:2: imports private y" not in problems  # a module named _hidden is not a private name
    assert "pkg/export/writer.py:1: imports private _private_helper from pkg.core.steps" in problems
    assert "pkg/core/uses_export.py:1: core imports pkg.export.writer, a layer above it" in problems
    assert "import cycle: pkg.core.a -> pkg.core.b -> pkg.core.a" in problems
    assert "pkg/training/ok.py" not in problems and "pkg/core/compat.py:" not in problems
    assert len(problems.splitlines()) == 5, problems


def test_the_package_follows_the_layering():
    assert {p.name for p in PACKAGE_DIR.iterdir() if (p / "__init__.py").exists()} <= set(LAYERS)
    assert check_layering(PACKAGE_DIR) == []


@pytest.mark.parametrize("layer", [layer for layer in LAYERS if (PACKAGE_DIR / layer).is_dir()])
def test_every_public_name_resolves(layer):
    """Each subpackage's ``__all__`` is its API, and every name in it imports."""
    import importlib

    if layer == "bridge":
        from bridge_env import load_bridge

        if (missing := load_bridge()) is not None:
            pytest.skip(missing)
    package = importlib.import_module(f"prores_megatron.{layer}")
    assert package.__all__, f"prores_megatron.{layer} has no public API"
    for name in package.__all__:
        assert getattr(package, name) is not None, name
