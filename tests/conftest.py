"""Shared fixtures: real processes for the integration tests (see procs.py)."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import procs
import pytest


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[procs.EmulatorProcess]:
    """One IMS emulator per test module (its keys take a while to make); reset per test."""
    with procs.emulator(tmp_path_factory.mktemp("emulator")) as emu:
        yield emu


@pytest.fixture
def ims(emulator: procs.EmulatorProcess) -> procs.EmulatorProcess:
    emulator.clear()
    return emulator


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[procs.AgentProcess]:
    """A real daemon on a real socket in a private temp dir, stopped after the test."""
    with procs.agent(tmp_path) as running:
        yield running


@pytest.fixture
def base() -> Iterator[Path]:
    """A short private directory (socket paths are limited to 107 bytes); afterwards no daemon
    serving under it survives."""
    directory = Path(tempfile.mkdtemp(prefix="aemt-"))
    try:
        yield directory
    finally:
        procs.kill_agents(str(directory))
        shutil.rmtree(directory, ignore_errors=True)


NOBODY = 65534


@pytest.fixture(scope="module")
def nobody() -> procs.UserPython:
    """Runs this package's Python as uid 65534 (`nobody`), or skips saying what is missing."""
    if os.getuid() != 0:
        pytest.skip("running processes as another user needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    try:
        gid = pwd.getpwuid(NOBODY).pw_gid
    except KeyError:
        pytest.skip(f"no user with uid {NOBODY}")
    user = procs.python_as(NOBODY, gid)
    if user is None:
        pytest.skip(f"no Python that uid {NOBODY} can run with aemagent importable")
    return user
