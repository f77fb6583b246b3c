"""What a new user meets at the `aemagent` and `aem-token` command lines: the demo on a machine
that already has a config, pasting a credential at a terminal, `reload`, `start` with options,
a slow IMS, and the wording of the messages. Real processes, real sockets, loopback only.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import procs
import pytest

from aemagent import cli

pytestmark = pytest.mark.integration


# ---- 1. the demo does not read the user's config file


def test_demo_ignores_the_users_config_and_profile(tmp_path, ims):
    home = tmp_path / "home"
    confdir = home / ".config" / "aemagent"
    confdir.mkdir(parents=True)
    marker = tmp_path / "command-ran"
    # A default profile whose token comes from another IMS (the test's emulator): were the demo to
    # read this file, its aem-token would pick this profile and the demo's AEM stand-in say 401.
    (confdir / "config.toml").write_text(
        "[profiles.mine]\n"
        f"command = \"touch {marker}; cat {ims.credentials['oauth']}\"\n"
        "default = true\n"
    )
    os.chmod(confdir / "config.toml", 0o600)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = procs.base_env(
        TMPDIR=str(tmp),
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        AEMAGENT_PROFILE="mine",
    )
    done = procs.run(procs.aemagent("demo"), env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo OK" in done.stdout
    assert not marker.exists()  # the user's `command` did not run
    assert list(tmp.iterdir()) == []
