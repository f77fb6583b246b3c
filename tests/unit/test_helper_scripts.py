"""How aem-token and git-credential-aemagent are shipped: as the scripts in bin/, not as wrappers.

Both run on every call, so the wheel carries them as they are (hatchling's shared-scripts) rather
than leaving a console-script wrapper to the installer: the wrapper pip before 25.0 writes imports
`re` and compiles a regex on every run (docs/BENCHMARKS.md; bench/startup.py measures both).
"""

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from aemagent import __version__

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"aem-token": "main", "git-credential-aemagent": "git_main"}
MODULES = {"aem-token": "aemagent.helper", "git-credential-aemagent": "aemagent.gitcred"}


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_wheel_ships_the_scripts_not_wrappers():
    config = pyproject()
    shared = config["tool"]["hatch"]["build"]["targets"]["wheel"]["shared-scripts"]
    assert shared == {f"bin/{name}": name for name in SCRIPTS}
    # An entry point of the same name would make the installer write a wrapper over the script.
    assert not config["project"].get("scripts", {}).keys() & SCRIPTS.keys()
    # The wheel may be built from the sdist: the scripts must be in it.
    assert "bin" in config["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]


@pytest.mark.parametrize(("name", "function"), SCRIPTS.items())
def test_each_script_only_calls_the_helper(name, function):
    path = ROOT / "bin" / name
    text = path.read_text()
    # Installers rewrite exactly `#!python` to the environment's interpreter.
    assert text.startswith("#!python\n")
    assert os.access(path, os.X_OK)
    tree = ast.parse(text)
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
    found = [(getattr(node, "module", None), [a.name for a in node.names]) for node in imports]
    assert found == [(MODULES[name], [function])]
    assert ast.unparse(tree.body[-1]) == f"raise SystemExit({function}())"


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_runs(name):
    done = subprocess.run(
        [sys.executable, "-P", str(ROOT / "bin" / name), "--version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=20,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{name} {__version__}\n", "")
