"""The layering rule of docs/DESIGN.md, checked on the source: who may import whom at import time.

* A top-level module (`aemagent/*.py`) imports only the standard library and other top-level
  modules when it is imported: `aem-token`, the git helper and the Python client load nothing
  else. `__main__` (it is the `aemagent` command) and `httpx_auth` (an httpx plugin, used only by
  programs that have httpx) are the two exceptions, each for its stated reason.
* No module of `core/` imports `ims/`, `daemon/`, `cli/` or `emulator/`, at import time or later:
  the core decides, the outer layers do I/O.

Imports inside functions (lazy imports) are allowed at the top level: they are how the hot path
stays small. The checks parse the source; nothing is imported.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "aemagent"
SUBPACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
TOP_LEVEL = sorted(p for p in PACKAGE.glob("*.py"))
THIRD_PARTY_OK = {"httpx_auth.py": {"httpx"}}
SUBPACKAGE_OK = {"__main__.py"}


def _imports(tree: ast.AST, *, module_level_only: bool) -> list[str]:
    """Absolute module names imported by `tree` (at module level only, if asked)."""
    nodes = tree.body if module_level_only and isinstance(tree, ast.Module) else ast.walk(tree)
    names: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports are not used in aemagent"
            base = node.module or ""
            if base == "aemagent":  # `from aemagent import x`: x may be a module
                names += [f"aemagent.{alias.name}" for alias in node.names]
            else:
                names.append(base)
        elif isinstance(node, ast.If) and module_level_only:
            # `if TYPE_CHECKING:` blocks import nothing at run time.
            test = node.test
            if not (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"):
                names += _imports(
                    ast.Module(body=node.body, type_ignores=[]), module_level_only=True
                )
    return names


def test_there_are_at_least_three_subpackages_and_at_most_ten_top_level_modules() -> None:
    assert len(SUBPACKAGES) >= 3, SUBPACKAGES
    assert len(TOP_LEVEL) <= 10, [p.name for p in TOP_LEVEL]


@pytest.mark.parametrize("path", TOP_LEVEL, ids=lambda p: p.name)
def test_a_top_level_module_imports_only_the_standard_library_and_the_top_level(path: Path) -> None:
    stdlib = sys.stdlib_module_names | {"_socket", "__future__"}
    for name in _imports(ast.parse(path.read_text()), module_level_only=True):
        root = name.split(".")[0]
        if root == "aemagent":
            parts = name.split(".")
            if len(parts) > 1 and parts[1] in SUBPACKAGES:
                assert path.name in SUBPACKAGE_OK, f"{path.name} imports the subpackage {name}"
            continue
        assert root in stdlib or root in THIRD_PARTY_OK.get(path.name, set()), (
            f"{path.name} imports {name} at import time"
        )


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").glob("*.py")), ids=lambda p: p.name)
def test_the_core_never_imports_the_outer_layers(path: Path) -> None:
    outer = {"aemagent.ims", "aemagent.daemon", "aemagent.cli", "aemagent.emulator"}
    for name in _imports(ast.parse(path.read_text()), module_level_only=False):
        assert ".".join(name.split(".")[:2]) not in outer, f"core/{path.name} imports {name}"


def test_the_rule_checker_sees_a_violation() -> None:
    """The checks above would notice: a module-level subpackage import, and a lazy one in core."""
    top = ast.parse("import os\nfrom aemagent.daemon import server\n")
    assert "aemagent.daemon" in _imports(top, module_level_only=True)
    lazy = ast.parse("def f():\n    from aemagent.ims import client\n")
    assert _imports(lazy, module_level_only=True) == []
    assert _imports(lazy, module_level_only=False) == ["aemagent.ims"]
    guarded = ast.parse("if TYPE_CHECKING:\n    import httpx\n")
    assert _imports(guarded, module_level_only=True) == []
