"""The package's shape: the layers import only downwards and never another layer's private
modules; no module of rednet/ over 400 lines, no function over 80 (issue 15)."""
import ast
from pathlib import Path

from .helpers import ROOT

PACKAGE = ROOT / "rednet"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# The layers, lowest first (the README's Layout): a module may import its own layer and those
# below it. fileio is plumbing every layer shares; the top-level package re-exports the models.
LAYERS = ["fileio", "ops", "layers", "models", "data", "engine", "analysis", "tools"]


def _python_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))  # kernel sources (.cu, .cpp) are not Python and not counted


def test_no_module_over_the_limit():
    long = {f"{p.relative_to(PACKAGE).as_posix()}: {n} lines" for p in _python_files()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
}
    assert not long, f"split these modules (at most {MAX_MODULE_LINES} lines): {sorted(long)}"


def test_no_function_over_the_limit():
    long = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # decorators not counted, docstring counted
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"split these functions (at most {MAX_FUNCTION_LINES} lines): {long}"


def _imports(path: Path) -> list[list[str]]:
    """The rednet modules ``path`` imports, each as its dotted parts (relative imports resolved)."""
    package = ["rednet", *path.relative_to(PACKAGE).parts[:-1]]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = [*base, *(node.module.split(".") if node.module else [])]
            found += [[*module, alias.name] for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [alias.name.split(".") for alias in node.names]
    return [m for m in found if m[0] == "rednet" and len(m) > 1]


def test_layers_import_downwards_only_and_nothing_private_of_another():
    wrong = []
    for path in _python_files():
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own not in LAYERS:  # rednet/__init__.py and __main__.py: the front door over everything
            continue
        for module in _imports(path):
            layer = module[1]
            if layer == own or layer not in LAYERS:
                continue
            if LAYERS.index(layer) > LAYERS.index(own):
                wrong.append(f"{path.relative_to(PACKAGE)} imports {'.'.join(module)}, a higher layer")
            elif any(part.startswith("_") for part in module[2:]):
                wrong.append(f"{path.relative_to(PACKAGE)} imports {'.'.join(module)}, private to {layer}")
    assert not wrong, wrong
