"""The house's shape, checked on the source: no import circle among aopd_cli's modules (lazy imports
inside functions count: they run too), each package imports only the packages its `__init__` docstring
names, no grab-bag module, no file over the line budget.

    python -m pytest tests/test_architecture.py -q
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "aopd_cli"
SHARED = {"errors", "metrics", "progress"}  # the root's shared vocabulary: any package may import it
# package -> the packages it may import (besides itself and SHARED); what each __init__ docstring says
ALLOWED = {
    "config": {"data"},
    "data": set(),
    "training": {"config", "data"},
    "rollout": {"training"},
    "teacher": {"training", "rollout"},
    "eval": {"data", "training"},
    "tracking": set(),
    "stages": {"config", "data", "training", "rollout", "teacher", "eval", "tracking", "results", "plan"},
    "experiment": {"config", "stages", "tracking", "training"},
    "plan": {"config", "training", "teacher"},
    "results": {"config", "tracking"},
}
LINE_BUDGET = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every aopd_cli module `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("aopd_cli"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
    return found & known


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, set(known)) - {name} for name, path in known.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def package_of(module: str) -> str:
    """`training` for aopd_cli.training.loop; `aopd_cli` for the root's modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else "aopd_cli"


def test_no_import_circle():
    found = cycle(graph())
    assert found is None, "import circle: " + " -> ".join(found)


def test_the_cycle_finder_finds_one():  # the check above is only as good as this
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_each_package_imports_only_what_its_docstring_allows():
    wrong = []
    for module, targets in graph().items():
        source = package_of(module)
        if source not in ALLOWED:  # the root: cli and __main__ may import anything
            continue
        for target in targets:
            into = package_of(target)
            shared = into == "aopd_cli" and (target.rpartition(".")[2] in SHARED or target == "aopd_cli")
            if into != source and not shared and into not in ALLOWED[source]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_package_says_what_it_holds_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import:" in doc, f"{init}: its docstring says nothing of what it may import"
        body = [n for n in ast.parse(init.read_text()).body if not isinstance(n, ast.Expr)]
        assert not body, f"{init}: holds code; a package's __init__ is its docstring (imports would circle)"


def test_no_grab_bag_module_and_no_file_over_the_budget():
    files = [p for folder in ("aopd_cli", "tests", "benchmarks") for p in (PACKAGE.parent / folder).rglob("*.py")]
    assert not {path.name for path in files} & {"common.py", "utils.py", "helpers.py", "misc.py"}
    long = {str(p.relative_to(PACKAGE.parent)): n for p in files if (n := len(p.read_text().splitlines())) > LINE_BUDGET}
    assert not long, f"over {LINE_BUDGET} lines: {long}"


def test_the_root_holds_only_the_command_line_and_shared_vocabulary():
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root == {"__init__", "__main__", "cli"} | SHARED


def test_every_module_docstring_ends_with_a_command():
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
        lines = [line for line in doc.splitlines() if line.strip()]
        if not lines or not lines[-1].startswith("    "):
            missing.append(str(path.relative_to(PACKAGE)))
    assert not missing, f"no command at the end of the docstring: {missing}"
