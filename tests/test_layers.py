"""The import layers hold: every import in the package, function-local ones included (they hide cycles as well
as they hide cost), goes to the same layer or a lower one, so there is no cycle and no upward import.
Imports under ``if TYPE_CHECKING:`` are annotations only and do not count."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "conceptor"

# Lowest first. Two packages' __init__ sit low on purpose: conceptor.toyworld's holds only paths, and
# conceptor.methods' is the registry (names -> module paths, imported by name when a method is asked for),
# so config can resolve a method name.
LAYERS = [
    ["conceptor._version", "conceptor.errors", "conceptor.fileio", "conceptor.compat", "conceptor.config_checks",
     "conceptor.toyworld"],
    ["conceptor.config", "conceptor.methods"],
    ["conceptor.formats", "conceptor.data", "conceptor.training.diffusion", "conceptor.training.flow"],  # pure maths
    ["conceptor.models", "conceptor.families"],
    ["conceptor.sampling", "conceptor.training.method", "conceptor.training.lock",
     "conceptor.training.manifest", "conceptor.training.checkpoint", "conceptor.training.metrics"],
    ["conceptor.methods.*"],
    ["conceptor.training"],
    ["conceptor.api"],
    ["conceptor.eval", "conceptor.toyworld.*", "conceptor.demo", "conceptor.lora_tools"],  # applications of the api
    ["conceptor", "conceptor.cli", "conceptor.__main__", "conceptor.ui"],  # the face: api re-exports, CLI, page
]


def layer_of(module: str) -> int:
    """The layer of the longest entry that covers ``module``. ``X.*`` covers X's submodules; ``X`` covers X
    and its submodules, or X alone where ``X.*`` is listed too (and the root package alone)."""
    entries = [(name, i) for i, names in enumerate(LAYERS) for name in names]
    starred = {name[:-2] for name, _ in entries if name.endswith(".*")}
    best = None
    for name, i in entries:
        if name.endswith(".*"):
            covers = module.startswith(name[:-1])
        elif name in starred or name == "conceptor":
            covers = module == name
        else:
            covers = module == name or module.startswith(name + ".")
        if covers and (best is None or len(name) > best[0]):
            best = (len(name), i)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt) if hasattr(n, "lineno")}
    return lines


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            targets = [a.name for a in node.names]
        for t in targets:
            while t and t not in known and "." in t:
                t = t.rpartition(".")[0]
            if t in known and t != name:
                found.add(t)
    return found


def test_no_import_goes_up_a_layer():
    known = modules()
    upward = []
    for name, path in sorted(known.items()):
        for target in sorted(imports(name, path, known)):
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_checker_sees_function_local_imports(tmp_path):
    """The checker itself: a function-local import is an edge like any other."""
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    known = {"conceptor.x.a": tmp_path / "a.py", "conceptor.x.b": tmp_path / "b.py"}
    assert imports("conceptor.x.a", tmp_path / "a.py", known) == {"conceptor.x.b"}
