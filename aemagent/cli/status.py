"""`aemagent status` (and `list`): the profiles as a table, with warnings; durations for humans."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from aemagent import exits
from aemagent.cli.calls import call


def cmd_status(args: argparse.Namespace) -> int:
    answer = call(args, "GET", "/v1/profiles")
    profiles = answer.get("profiles", [])
    if args.json:
        print(json.dumps(answer, indent=2))
        return exits.OK
    if not profiles:
        print("no profiles loaded; add one with `aemagent add FILE`")
        return exits.OK
    print(format_table(profiles, time.time()))
    for line in warnings_for(profiles, time.time()):
        print(line)
    return exits.OK


def format_table(profiles: list[dict[str, Any]], now: float) -> str:
    rows = [("NAME", "KIND", "STATE", "EXPIRES IN", "NEXT REFRESH", "LAST ERROR")]
    for p in profiles:
        expires = p.get("expires_at")
        refresh = p.get("refresh_at")
        rows.append(
            (
                p["name"] + (" *" if p.get("default") else ""),
                p.get("kind", "?"),
                p.get("state", "?"),
                "-" if expires is None else human_until(expires, now),
                "-" if refresh is None else human_until(refresh, now, prefix="in "),
                (p.get("last_error") or "-"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5]
        for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def warnings_for(profiles: list[dict[str, Any]], now: float) -> list[str]:
    out = []
    for p in profiles:
        cert = p.get("certificate_expires_at")
        if isinstance(cert, int | float) and cert - now < 30 * 86400:
            when = "expired" if cert <= now else f"expires in {human_duration(cert - now)}"
            out.append(
                f"warning: {p['name']}: the certificate {when}; create new service credentials"
                " in the AEM Developer Console"
            )
        if p.get("kind") == "devtoken" and isinstance(p.get("expires_at"), int):
            left = p["expires_at"] - now
            if 0 < left < 2 * 3600:
                out.append(
                    f"warning: {p['name']}: the development token expires in {human_duration(left)}"
                )
    return out


def human_until(unix: float, now: float, prefix: str = "") -> str:
    left = unix - now
    if left <= 0:
        return "now" if prefix else "expired"
    return prefix + human_duration(left)


def human_duration(seconds: float) -> str:
    from aemagent.core.logs import describe_duration

    return describe_duration(seconds)
