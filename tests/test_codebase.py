"""The shape a newcomer relies on to read the code base: modules import each other in one
direction (no cycle, no import hidden inside a function to dodge one), and no file or function
is too long to hold in mind. Read with ast, nothing is imported."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted([*(ROOT / "nanostoney").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")])
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 60


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def ours(name):
    return name == "nanostoney" or name.startswith("nanostoney.")


def imported(node, module, is_package):
    """Full names an import statement names: `from a import b` gives a.b (a module or not) and a."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the package this module is in
        package = module.split(".")[:len(module.split(".")) - (node.level - 1) - (not is_package)]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def graph():
    """{module: modules of ours it imports at module level}."""
    trees = {module_name(p): (ast.parse(p.read_text(encoding="utf-8")), p.name == "__init__.py") for p in FILES}
    edges = {}
    for module, (tree, is_package) in trees.items():
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update(imported(node, module, is_package))
        edges[module] = {n for n in names if n in trees and n != module}
    return edges


def function_level_imports():
    """(file:line, statement) of every import of a nanostoney module inside a function."""
    found = []
    for path in FILES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module, is_package = module_name(path), path.name == "__init__.py"
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                        ours(n) for n in imported(node, module, is_package)):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return sorted(set(found))


def find_cycle(edges):
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        state[v] = "done"
        stack.pop()
        return None
    for v in sorted(edges):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def test_the_walk_sees_the_imports():
    edges = graph()  # (a walk that found nothing would pass the tests below without checking a thing)
    assert "nanostoney.errors" in edges["nanostoney.cli"] and "nanostoney.checkpoint" in edges["scripts.eval"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_level_import_of_our_modules():
    found = function_level_imports()
    assert not found, "import these at the top of the module:\n" + "\n".join(found)


def test_no_file_over_600_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in FILES
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES]
    assert not long, f"files over {MAX_FILE_LINES} lines:\n" + "\n".join(long)


def test_no_function_over_60_lines():
    long = []
    for path in FILES:
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = fn.end_lineno - fn.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}: {n}")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
