"""Logging: one line per event on stderr, never a secret or a token.

A token appears in logs only as `fingerprint(token)`: a short hash that lets a user match a log
line to `aem-token --format json | sha256sum` without the log being worth stealing.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time

LEVELS = ("debug", "info", "warning", "error")


def fingerprint(token: str) -> str:
    """A short, non-reversible name for a token: the first 12 hex digits of its SHA-256."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def describe_duration(seconds: float) -> str:
    """Human duration for logs and `status`: '5h 12m', '3m 20s', '45s', '2d 3h'."""
    if seconds < 0:
        return "-" + describe_duration(-seconds)
    s = int(seconds)  # down: a token with 23h 59m 59.9s left has not got a day left
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def utc_iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        del datefmt
        return utc_iso(record.created)


def configure(level: str = "info") -> None:
    """Log to stderr as `2026-11-30T10:00:00Z aemagent[PID] INFO message`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _UTCFormatter("%(asctime)s aemagent[%(process)d] %(levelname)s %(message)s")
    )
    root = logging.getLogger("aemagent")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # httpx logs every request URL at INFO and h11/httpcore log wire events at DEBUG; the URLs
    # are harmless but the wire events would carry request bodies (secrets) and tokens.
    for noisy in ("httpx", "httpcore", "h11", "hpack", "trio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
