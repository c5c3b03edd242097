"""How `make test` splits the suite: the inference core's test files (the Makefile's CORE_TESTS) run in a clean
environment without the training extra, and here only their tests marked ``needs_train``. A core test that
needs PyTorch or onnx and is not marked would skip there and never run here."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINING_EXTRA = {"torch", "torchvision", "onnx"}


def core_test_files() -> list[str]:
    lines = iter((ROOT / "Makefile").read_text().splitlines())
    words = next((line.split(":=", 1)[1] for line in lines if line.startswith("CORE_TESTS :=")), None)
    assert words is not None, "no CORE_TESTS in the Makefile"
    while words.endswith("\\"):  # continued on the next line
        words = words[:-1] + next(lines)
    return words.split()


def _needed(code: ast.AST) -> set[str]:
    """The training extra's packages that code (a test, an import) imports or asks pytest.importorskip for."""
    needed = set()
    for node in ast.walk(code):
        if isinstance(node, ast.Import):
            needed |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            needed.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
              and node.args and isinstance(node.args[0], ast.Constant)):
            needed.add(str(node.args[0].value).split(".")[0])
    return needed & TRAINING_EXTRA


def _marked(test: ast.FunctionDef) -> bool:
    return any(ast.unparse(d) == "pytest.mark.needs_train" for d in test.decorator_list)


def test_the_core_tests_that_need_the_training_extra_are_exactly_those_marked_needs_train():
    files = core_test_files()
    assert "tests/test_core.py" in files and all((ROOT / f).is_file() for f in files), files
    wrong, marked = [], 0
    for name in files:
        tree = ast.parse((ROOT / name).read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):  # at the top of a file, it fails the whole file there
                assert not _needed(node), name
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                marked += _marked(node)
                if _marked(node) != bool(_needed(node)):
                    wrong.append(f"{name}::{node.name} needs {sorted(_needed(node)) or 'nothing'} of the training extra")
    assert not wrong, wrong
    assert marked >= 4  # what the Makefile runs here from those files: PyTorch's answers, the graphs read by onnx
