"""The installation users get: this checkout built into a wheel, pip-installed into a fresh venv.

bench/startup.py times the scripts installed there (the `aem-token` users run, with the bytecode
pip compiled), not the development checkout's.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from common import BIN, PY, STEP_TIMEOUT, BenchError, say

REPO = Path(__file__).resolve().parent.parent


def install_venv(tmp: Path, env: dict[str, str]) -> dict:
    """Build a wheel of this checkout and pip-install it (no dependencies) into a fresh venv.

    The wheel is built with the development venv's hatchling where it has one (what an isolated
    build would fetch from PyPI), else by pip with build isolation. aem-token needs only the
    standard library, so `--no-deps` is all it takes. If anything fails, the development venv's
    own scripts stand in, and the report says so.
    """
    wheels, venv = tmp / "wheels", tmp / "v"
    try:
        build = [PY, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)]
        has_hatchling = subprocess.run(
            [PY, "-c", "import hatchling"], capture_output=True, check=False
        )
        if has_hatchling.returncode == 0:
            build.insert(4, "--no-build-isolation")
        _run(build, env, timeout=300)
        (wheel,) = wheels.glob("aemagent-*.whl")
        _run([PY, "-m", "venv", str(venv)], env, timeout=300)
        install = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps"]
        _run([*install, "--no-index", str(wheel)], env, timeout=300)
        pip = _run([str(venv / "bin" / "python"), "-m", "pip", "--version"], env).split()[1]
    except (BenchError, ValueError, subprocess.SubprocessError) as exc:
        say(f"could not install into a fresh venv ({exc}); timing the development venv's scripts")
        return {"installed": False, "bin": str(BIN), "python": PY, "why": str(exc)[:300]}
    bindir = venv / "bin"
    for script in ("aem-token", "git-credential-aemagent"):
        first = (bindir / script).read_text().partition("\n")[0]
        if first != f"#!{bindir / 'python'}" and not first.startswith(f"#!{bindir}/python"):
            raise BenchError(f"pip did not rewrite the shebang of {script}: {first!r}")
    return {
        "installed": True,
        "bin": str(bindir),
        "python": str(bindir / "python"),
        "pip": pip,
        "wheel": wheel.name,
        "isolated": has_hatchling.returncode != 0,
        # How aem-token got there: a script shipped in the wheel, or an entry-point wrapper.
        "aem_token_is_wrapper": "aemagent.helper import main\nif __name__"
        in (bindir / "aem-token").read_text(),
    }


def _run(argv: list[str], env: dict[str, str], timeout: float = STEP_TIMEOUT) -> str:
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def wrapper_for_helper(install: dict, tmp: Path) -> Path | None:
    """aem-token as a console-script wrapper, in the words this venv's pip wrote for `aemagent`.

    For comparison with the script shipped in the wheel: the same text pip generated for the
    `aemagent` entry point, with `aemagent.cli` replaced by `aemagent.helper`.
    """
    if not install["installed"]:
        return None
    text = (Path(install["bin"]) / "aemagent").read_text()
    if "from aemagent.cli import main" not in text:
        return None
    wrapper = tmp / "aem-token-wrapper"
    wrapper.write_text(
        text.replace("from aemagent.cli import main", "from aemagent.helper import main")
    )
    wrapper.chmod(0o755)
    return wrapper
