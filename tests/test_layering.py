"""The package's layering is one-way: no module imports, at its top or inside a function, a module that
imports it, directly or through others (the project's rule; ``facegender.distributed`` once imported
``facegender.train``, which imports it)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "facegender"


def imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports (relative or absolute, anywhere in the file)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    found = {}
    for path in PACKAGE.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y, from . import x
                names |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("facegender."):
                names.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("facegender.")}
        found[path.stem] = (names & modules) - {path.stem}
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import chain per module that leads back to itself."""
    found = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    found.append(path + [start])
                    stack = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_no_module_imports_one_that_imports_it():
    graph = imports()
    # read as the code has them: train imports distributed at its top, cli inside a function
    assert "distributed" in graph["train"] and "distributed" in graph["cli"], (graph["train"], graph["cli"])
    loops = cycles(graph)
    assert not loops, "import cycles: " + "; ".join(" -> ".join(loop) for loop in loops)


def test_the_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"], ["b", "c", "a", "b"],
                                                                         ["c", "a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
