"""Process hardening for the daemon, which holds credentials in memory: no core dumps, no
debugger or ptrace from other processes of the user, and enough file descriptors to serve."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import sys
from typing import Any

log = logging.getLogger("aemagent.daemon")

# ptrace(2) on macOS: "deny future attaches", as ssh-agent does (platform_disable_tracing).
_PT_DENY_ATTACH = 31
# prctl(2) on Linux.
_PR_SET_DUMPABLE = 4


def deny_debuggers(platform: str | None = None, libc: Any = None) -> None:
    """Keep other processes of the user out of our memory: PR_SET_DUMPABLE 0 on Linux (no
    ptrace, /proc/PID/mem and environ root's), PT_DENY_ATTACH on macOS (no debugger attaches,
    no task port for others). `platform` and `libc` are there for tests."""
    platform = platform or sys.platform
    if platform.startswith("linux"):
        libc = libc or ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_DUMPABLE, 0) failed: %s", os.strerror(ctypes.get_errno()))
    elif platform == "darwin":
        libc = libc or ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.ptrace(_PT_DENY_ATTACH, 0, None, 0) != 0:
            log.warning("ptrace(PT_DENY_ATTACH) failed: %s", os.strerror(ctypes.get_errno()))


def harden_process(platform: str | None = None, libc: Any = None) -> None:
    """No core dumps, not ptrace-able by other processes of the user, enough file descriptors."""
    platform = platform or sys.platform
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    deny_debuggers(platform, libc)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if platform == "darwin":  # pragma: no cover - macOS caps at OPEN_MAX
        target = min(target, 10240)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d: %s", soft, exc)
