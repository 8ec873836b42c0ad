"""The house's shape, checked: the package is wings along the data flow and no wing imports one after it,
there is no import loop (type-only and function-level imports included), only the cli wing imports typer or
rich, and a module stays readable (~300 lines unless a concept is whole in it, ~50 a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "simclr_cli"
# The ground floor, in its own order (each module may import the ones before it), then the wings along the
# data flow: config -> data -> augment -> models -> methods, then what is done with a trained encoder (how it
# leaves, what serves it, what scores it, the run's report: the training loop's monitor scores with them)
# before the loop itself, and the command line last. figures: matplotlib drawing that serve and report share.
GROUND = ["__init__", "errors", "runtime", "files", "figures", "typed", "registry", "owned", "artifacts", "config", "rundir"]
WINGS = ["data", "augment", "models", "methods", "exports", "serve", "score", "report", "train", "cli"]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 300, 50


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found[name.removesuffix(".__init__") if name != "__init__" else name] = path
    return found


def rank(name: str) -> tuple[int, int]:
    """(floor, place): the ground floor's modules one by one, then each wing as a whole, __main__ last."""
    if name in GROUND:
        return 0, GROUND.index(name)
    if name == "__main__":
        return 1 + len(WINGS), 0
    return 1 + WINGS.index(name.split(".")[0]), 0


def project_imports(path: Path) -> set[str]:
    """The simclr_cli modules a file imports, anywhere in it (TYPE_CHECKING blocks and functions too):
    `from simclr_cli.x import y` counts as x.y where that is a module (a submodule), else as x."""
    known, names = modules(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("simclr_cli"):
            base = node.module.removeprefix("simclr_cli").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}".lstrip(".")
                names.add(sub if sub in known else base or "__init__")
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("simclr_cli.") for a in node.names if a.name.startswith("simclr_cli.")}
    return {n for n in names if n in known}


def test_every_module_is_on_the_ground_floor_or_in_a_wing():
    strays = [m for m in modules() if m not in GROUND and m != "__main__" and m.split(".")[0] not in WINGS]
    assert not strays


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_imports_a_wing_after_its_own(name):
    later = [m for m in project_imports(modules()[name]) if rank(m) > rank(name)]
    assert not later, f"{name} imports {later}, which come after it"


def test_there_is_no_import_loop():
    graph = {name: project_imports(path) - {name} for name, path in modules().items()}
    done, path = set(), []

    def visit(node: str) -> None:
        if node in path:
            pytest.fail(f"import loop: {' -> '.join(path[path.index(node):] + [node])}")
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


@pytest.mark.parametrize("name", sorted(modules()))
def test_only_the_cli_speaks_rich_and_typer(name):
    tree = ast.parse(modules()[name].read_text())
    used = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    used |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert name.split(".")[0] == "cli" or not used & {"typer", "rich"}


@pytest.mark.parametrize("name", sorted(modules()))
def test_sizes(name):
    """A module may pass the line cap where one concept is whole in it, saying so in its docstring."""
    source = modules()[name].read_text()
    whole = "Longer than 300 lines:" in (ast.get_docstring(ast.parse(source)) or "")
    assert len(source.splitlines()) <= MAX_MODULE_LINES or whole
    long = [f"{n.name}: {n.end_lineno - n.lineno + 1}" for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_class_outgrows_a_screenful_or_two(name):
    big = [f"{n.name}: {n.end_lineno - n.lineno + 1}" for n in ast.walk(ast.parse(modules()[name].read_text()))
           if isinstance(n, ast.ClassDef) and n.end_lineno - n.lineno + 1 > 210]
    assert not big
