"""The package's floors: data flows down the pipeline, and no module reaches a floor above its own.

Read from the source with ``ast`` (imports inside functions count too; ``if TYPE_CHECKING`` blocks do
not), so the test fails on a new climb or import circle before anyone trips on it at run time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pyro_blora"

# Bottom to top, in pipeline order. A module may import its own floor and the floors below.
FLOORS = (
    ("config", "checkpoint", "features", "offline", "markdown"),
    ("base_models", "data", "testbed", "metrics"),
    ("model",),
    ("posterior",),
    ("predict",),
    ("interop",),
    ("runs",),
    ("evaluation",),
    ("training",),
    ("report",),
    ("experiments",),
    ("commands", "cli", "__init__", "__main__"),
)
FLOOR_OF = {part: number for number, parts in enumerate(FLOORS) for part in parts}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself: its __init__ is the public API, on top
        return FLOOR_OF["__init__"]
    return FLOOR_OF[parts[1]]


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported pyro_blora module, at module level?) of every import statement in ``path``."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("pyro_blora"):
                names = [f"{child.module}.{a.name}" for a in child.names]
                found.extend((_existing(n) or child.module, top) for n in names)
            elif isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names if a.name.startswith("pyro_blora"))
            nested = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, nested)

    visit(ast.parse(path.read_text()), True)
    return found


def _existing(name: str) -> str | None:
    """``name`` if it is a module of the package (``from pyro_blora.training import distributed``)."""
    relative = Path(*name.split("."))
    return name if (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file() else None


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_floor():
    missing = sorted({m.split(".")[1] for m in MODULES if "." in m} - set(FLOOR_OF))
    assert not missing, f"put {missing} on a floor of FLOORS"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_floor(module):
    mine = floor(module)
    climbs = sorted({target for target, _ in imports(MODULES[module]) if floor(target) > mine})
    assert not climbs, f"{module} (floor {mine}) imports {climbs} from a higher floor"


def test_no_import_circle():
    """Module-level imports form no cycle (Tarjan's strongly connected components)."""
    graph = {m: sorted({t for t, top in imports(p) if top and t in MODULES and t != m}) for m, p in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            # A package's __init__ re-exporting its own submodules is not a circle.
            if len(component) > 1 and not all(c == node or c.startswith(node + ".") for c in component):
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    assert not circles, f"import circles: {circles}"


def test_scripts_and_package_never_import_the_tests():
    offenders = [str(p.relative_to(ROOT)) for p in [*PACKAGE.rglob("*.py"), *(ROOT / "scripts").glob("*.py")]
                 if any(isinstance(n, (ast.Import, ast.ImportFrom)) and
                        any(name.split(".")[0] == "tests" for name in
                            ([n.module or ""] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names]))
                        for n in ast.walk(ast.parse(p.read_text())))]
    assert not offenders, f"{offenders} import tests/: move what they need into the package"


def test_the_checker_sees_a_climb(tmp_path):
    """The floor test can fail: a data module importing the training loop is caught."""
    path = tmp_path / "climb.py"
    path.write_text("def f():\n    from pyro_blora.training.loop import train\n")
    assert [(t, top) for t, top in imports(path)] == [("pyro_blora.training.loop", False)]
    assert floor("pyro_blora.training.loop") > floor("pyro_blora.data.sources")
