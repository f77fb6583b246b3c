"""Shared fixtures: real processes for the integration tests (see procs.py)."""

from __future__ import annotations

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
