"""The package's modules import each other in one direction: no cycle, and no import inside a function to
dodge one (a function may import a heavy third-party module lazily), nothing from outside the package (e.g. the
`data/` scripts)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mllm_cl"
INTERNAL = {"mllm_cl", "data", "tests", "bench", "train", "eval", "consolidate", "convert"}  # ours, not third-party


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_package(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] in INTERNAL for alias in node.names)
    return isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in INTERNAL


def imports_of(path: Path) -> tuple[set[str], list[str], set[str]]:
    """(package modules imported at module level, imports found inside functions, top-level names imported)."""
    tree = ast.parse(path.read_text())
    local, nested, top = set(), [], set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested += [f"{path.name}:{n.lineno}" for n in ast.walk(node) if _imports_package(n)]
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        top |= {name.split(".")[0] for name in names}
        local |= {name for name in names if name.startswith("mllm_cl")}
    return local, nested, top


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = {t for t in imports_of(path)[0] if t in modules and t != name}
        edges[name] = {t for t in targets if not name.startswith(t + ".")}  # a submodule may use its package
    return edges


def test_no_import_cycle() -> None:
    edges, state, cycles = graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_imports_are_at_module_level_and_inside_the_package() -> None:
    nested, outside = [], []
    for path in PACKAGE.rglob("*.py"):
        _, inside_functions, top = imports_of(path)
        nested += inside_functions
        outside += [f"{path.name} imports {name}" for name in top & (INTERNAL - {"mllm_cl"})]
    assert not nested, f"imports inside functions: {nested}"
    assert not outside, outside
