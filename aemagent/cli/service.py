"""`aemagent service install|uninstall`: the agent as a systemd user service or a launchd agent.

The unit files and the plist are generated here, and only here: `systemd/` and `launchd/` in the
repository hold the same texts with template paths (a test keeps them equal), for packagers and
for reading.

The agent runs as `<this interpreter> -P -m aemagent serve`: exactly the Python and the package
that ran `service install`, whatever PATH the service manager has (neither systemd's nor
launchd's includes `~/.local/bin`) and however aemagent was installed (venv, pipx, `--user`,
editable); `-P` keeps the service's working directory (the home directory) off `sys.path`.
`sys.executable` is used as it is, never resolved: a venv's `bin/python` is a symlink whose
target would lose the venv.

A file that differs from what we would write (edited by hand, or written by another
installation) is never overwritten or removed without `--force`.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aemagent.errors import CommandError

SOCKET_UNIT = "aemagent.socket"
SERVICE_UNIT = "aemagent.service"
# launchd's convention is a reverse-DNS label, which also names the plist. The label before it,
# plain "aemagent", is still recognised by `service install` and `uninstall` (LEGACY_*).
LAUNCHD_LABEL = "io.github.aemagent"
LEGACY_LAUNCHD_LABEL = "aemagent"
# launchd starts a job with a soft open-files limit of 256; the daemon serves 1024 connections.
LAUNCHD_OPEN_FILES = 4096
# What the shipped templates in systemd/ and launchd/ run: where pipx and `pip install --user` put
# the console script.
TEMPLATE_SYSTEMD_EXEC = "%h/.local/bin/aemagent"
TEMPLATE_HOME = "/Users/YOU"

_HEADER = """\
# aemagent: Adobe IMS access tokens for AEM, held in memory, served on a Unix socket.
# `aemagent service install` writes this file with the path of the aemagent that runs it.
# Keep local changes in a drop-in (`systemctl --user edit {unit}`): a later install then
# leaves them alone.
"""

_SOCKET = """\
[Unit]
Description=aemagent socket (IMS access tokens for AEM)

[Socket]
# The default path every aemagent client computes ($XDG_RUNTIME_DIR/aemagent/agent.sock), so
# editors, cron jobs and tmux panes find the agent with no environment at all.
ListenStream=%t/aemagent/agent.sock
SocketMode=0600
DirectoryMode=0700
# Stopping the socket removes the file: clients then say "no agent" at once, and an agent still
# running on the old socket notices and exits.
RemoveOnStop=yes

[Install]
WantedBy=sockets.target
"""

_SERVICE = """\
[Unit]
Description=aemagent (IMS access tokens for AEM)
# Works alone too (`systemctl --user enable --now aemagent.service`): without an activated socket
# the agent binds the same path itself.

[Service]
Type=notify
ExecStart={exec_start} serve
# The shell's built-in kill: /bin/sh is everywhere, /bin/kill is not (NixOS, minimal images).
ExecReload=/bin/sh -c 'kill -HUP $MAINPID'
Restart=on-failure
RestartSec=2s
TimeoutStopSec=15s
# The socket's directory: writable for the agent (ProtectHome= below makes /run/user read-only),
# and kept when the service stops, because aemagent.socket owns the socket in it.
RuntimeDirectory=aemagent
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
UMask=0077
LimitCORE=0

# Sandboxing. The agent reads its config and credential files (so home stays readable), talks
# HTTPS to IMS and HTTP on its Unix socket, and writes nothing but its socket and lock.
# systemd 252 (Debian 12) applies the mount and device options in a user manager only with
# PrivateUsers=yes (later versions imply it). One consequence: root's connections arrive as
# "nobody" and are refused, as are other users'.
PrivateUsers=yes
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# CPython (without the experimental JIT of 3.13+), trio, httpx and cryptography (Rust and
# OpenSSL) never need memory that is writable and executable: ctypes is used for one plain call,
# never a callback. A profile `command` runs under the same rules: one built on a JIT (Node.js,
# such as Bitwarden's `bw`, or Java) needs MemoryDenyWriteExecute=no in a drop-in.
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

[Install]
WantedBy=default.target
"""

# No two hyphens in a row in here: XML comments may not contain them.
_PLIST_COMMENT = b"""\
<!-- aemagent: Adobe IMS access tokens for AEM. On macOS `aemagent service install` writes this
     file with the paths of the aemagent that runs it and of your home directory.
     Only a crash restarts the agent (KeepAlive/SuccessfulExit=false): `aemagent stop`, or an
     agent that finds another one serving its socket, exits 0 and stays stopped. -->
"""


@dataclass(frozen=True)
class ServiceFile:
    path: str
    content: bytes


@dataclass(frozen=True)
class Plan:
    """What `service install` writes for one service manager, and how to turn it on and off."""

    manager: str  # "systemd" or "launchd"
    files: tuple[ServiceFile, ...]
    argv: tuple[str, ...]
    enable: tuple[str, ...]  # commands to run after installing
    disable: tuple[str, ...]  # commands to run before (systemd) or after (launchd) uninstalling
    # A file an earlier aemagent wrote under another name (the launchd plist before its
    # reverse-DNS label), and the command that unloads its job: replaced by `files`.
    legacy: tuple[ServiceFile, ...] = ()
    legacy_disable: tuple[str, ...] = ()


def agent_argv() -> list[str]:
    """How the service runs this aemagent: this interpreter, `-P -m aemagent`."""
    return [os.path.abspath(sys.executable), "-P", "-m", "aemagent"]


def default_manager(platform: str | None = None) -> str:
    return "launchd" if (platform or sys.platform) == "darwin" else "systemd"


# ---- systemd


def systemd_quote(arg: str, *, executable: bool = False) -> str:
    """One word of an Exec*= line: specifiers (and, in arguments, variables) escaped, quoted
    when needed. systemd expands $VARIABLES in arguments only, never in the executable's path."""
    word = arg.replace("%", "%%")
    if not executable:
        word = word.replace("$", "$$")
    if word and not any(c in word for c in " \t\n\"'\\;"):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def socket_unit() -> str:
    return _HEADER.format(unit=SOCKET_UNIT) + _SOCKET


def service_unit(exec_start: str) -> str:
    """The service unit; `exec_start` is the command before `serve`, in systemd's syntax."""
    return _HEADER.format(unit=SERVICE_UNIT) + _SERVICE.format(exec_start=exec_start)


def systemd_unit_dir(environ: Mapping[str, str]) -> str:
    """Where systemd looks for a user's own units: $XDG_CONFIG_HOME/systemd/user."""
    config = environ.get("XDG_CONFIG_HOME", "")
    if not config.startswith("/"):
        config = os.path.join(_home(environ), ".config")
    return os.path.join(config, "systemd", "user")


def systemd_plan(environ: Mapping[str, str], argv: Sequence[str]) -> Plan:
    directory = systemd_unit_dir(environ)
    exec_start = " ".join(systemd_quote(a, executable=i == 0) for i, a in enumerate(argv))
    files = (
        ServiceFile(os.path.join(directory, SOCKET_UNIT), socket_unit().encode()),
        ServiceFile(os.path.join(directory, SERVICE_UNIT), service_unit(exec_start).encode()),
    )
    return Plan(
        "systemd",
        files,
        (*argv, "serve"),
        enable=("systemctl --user daemon-reload", f"systemctl --user enable --now {SOCKET_UNIT}"),
        disable=(f"systemctl --user disable --now {SOCKET_UNIT} {SERVICE_UNIT}",),
    )


def _enabled_links(directory: str) -> list[str]:
    """`systemctl enable`'s symlinks to our units (`*.wants/aemagent.socket`, …)."""
    links = []
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    for entry in entries:
        if not entry.endswith((".wants", ".requires")):
            continue
        for unit in (SOCKET_UNIT, SERVICE_UNIT):
            link = os.path.join(directory, entry, unit)
            if os.path.islink(link):
                links.append(link)
    return links


# ---- launchd


def launchd_plist(argv: Sequence[str], home: str, label: str = LAUNCHD_LABEL) -> bytes:
    import plistlib

    log = os.path.join(home, "Library", "Logs", "aemagent.log")
    job = {
        "Label": label,
        "ProgramArguments": [*argv, "serve"],
        "RunAtLoad": True,
        # Restart after a crash, not after a clean exit (`aemagent stop`, or displaced by
        # another agent: fighting it is what the exit 0 avoids).
        "KeepAlive": {"SuccessfulExit": False},
        "StandardOutPath": log,
        "StandardErrorPath": log,
        "SoftResourceLimits": {"NumberOfFiles": LAUNCHD_OPEN_FILES},
        "Umask": 0o077,
    }
    xml = plistlib.dumps(job, fmt=plistlib.FMT_XML, sort_keys=False)
    head, _, rest = xml.partition(b"<plist")
    return head + _PLIST_COMMENT + b"<plist" + rest


def launchd_plan(environ: Mapping[str, str], argv: Sequence[str], uid: int | None = None) -> Plan:
    home = _home(environ)
    path = os.path.join(home, "Library", "LaunchAgents", f"{LAUNCHD_LABEL}.plist")
    legacy = os.path.join(home, "Library", "LaunchAgents", f"{LEGACY_LAUNCHD_LABEL}.plist")
    domain = f"gui/{os.getuid() if uid is None else uid}"
    return Plan(
        "launchd",
        (ServiceFile(path, launchd_plist(argv, home)),),
        (*argv, "serve"),
        enable=(f"launchctl bootstrap {domain} {shlex.quote(path)}",),
        disable=(f"launchctl bootout {domain}/{LAUNCHD_LABEL}",),
        legacy=(ServiceFile(legacy, launchd_plist(argv, home, LEGACY_LAUNCHD_LABEL)),),
        legacy_disable=(f"launchctl bootout {domain}/{LEGACY_LAUNCHD_LABEL}",),
    )


def plan_for(
    manager: str, environ: Mapping[str, str] | None = None, argv: Sequence[str] | None = None
) -> Plan:
    env = os.environ if environ is None else environ
    argv = agent_argv() if argv is None else argv
    return systemd_plan(env, argv) if manager == "systemd" else launchd_plan(env, argv)


def _home(environ: Mapping[str, str]) -> str:
    home = environ.get("HOME", "")
    if not home.startswith("/"):
        import pwd

        home = pwd.getpwuid(os.getuid()).pw_dir
    return home


def templates() -> dict[str, bytes]:
    """The repository's systemd/ and launchd/ files: the generated texts with template paths."""
    return {
        f"systemd/{SOCKET_UNIT}": socket_unit().encode(),
        f"systemd/{SERVICE_UNIT}": service_unit(TEMPLATE_SYSTEMD_EXEC).encode(),
        f"launchd/{LAUNCHD_LABEL}.plist": launchd_plist(
            [f"{TEMPLATE_HOME}/.local/bin/aemagent"], TEMPLATE_HOME
        ),
    }


# ---- install, uninstall


def _current(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None


def _write(path: str, content: bytes) -> None:
    """Atomically, 0644 (unit files and plists are not secret; the managers read them)."""
    import tempfile

    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".aemagent-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                os.fchmod(f.fileno(), 0o644)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None


def _changed(plan: Plan, *, force: bool, doing: str) -> None:
    differ = [f.path for f in plan.files if _current(f.path) not in (None, f.content)]
    if differ and not force:
        names = " and ".join(differ)
        hint = (
            " (local changes belong in a drop-in: systemctl --user edit UNIT)"
            if plan.manager == "systemd"
            else ""
        )
        raise CommandError(
            f"{names} differ{'s' if len(differ) == 1 else ''} from what this aemagent would"
            f" write (edited by hand, or from another installation); not {doing} without"
            f" --force{hint}"
        )


def _legacy_present(plan: Plan, *, force: bool) -> tuple[list[str], list[str]]:
    """The plan's legacy files that exist: (ours, or any with `force`), (others)."""
    ours: list[str] = []
    others: list[str] = []
    for f in plan.legacy:
        current = _current(f.path)
        if current is None:
            continue
        (ours if force or _same_plist(current, f.content) else others).append(f.path)
    return ours, others


def _same_plist(current: bytes, expected: bytes) -> bool:
    """The same job, whatever the comments and layout (an older aemagent's may differ)."""
    import plistlib

    try:
        return bool(plistlib.loads(current) == plistlib.loads(expected))
    except Exception:  # not a plist at all: not ours
        return False


def _remove(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise CommandError(f"cannot remove {path}: {exc.strerror}") from None
    return True


def install(plan: Plan, *, force: bool = False) -> list[str]:
    """Write the plan's files; the lines to print (what happened, and how to enable it)."""
    _changed(plan, force=force, doing="overwriting")
    lines = []
    for f in plan.files:
        if _current(f.path) == f.content:
            lines.append(f"unchanged {f.path}")
        else:
            _write(f.path, f.content)
            lines.append(f"wrote {f.path}")
    # The same agent under its old name would run beside the new one from the next login on.
    ours, others = _legacy_present(plan, force=force)
    lines += [
        f"removed {path} (the same agent under its old name)" for path in ours if _remove(path)
    ]
    lines += [f"left {path}: not what this aemagent wrote (--force removes it)" for path in others]
    lines.append(f"the agent will run as: {shlex.join(plan.argv)}")
    if plan.manager == "systemd":
        lines.append("to start it now and at every login (on first use, through the socket):")
    else:
        lines.append("to start it now and at every login:")
    lines += [f"  {command}" for command in plan.enable]
    if plan.manager == "launchd":
        older = " and ".join((plan.disable[0], *plan.legacy_disable))
        lines.append(f"  (if an older one is loaded, first: {older})")
    return lines


def uninstall(plan: Plan, *, force: bool = False) -> list[str]:
    """Remove the plan's files (ours only), and a legacy file if ours; the lines to print."""
    lines = []
    links: list[str] = []
    if plan.manager == "systemd":
        links = _enabled_links(os.path.dirname(plan.files[0].path))
        if links and not force:
            raise CommandError(
                f"the units are enabled ({', '.join(links)}); first run"
                f" `{plan.disable[0]}`, or pass --force"
            )
    _changed(plan, force=force, doing="removing")
    ours, others = _legacy_present(plan, force=force)
    for path in [*links, *(f.path for f in plan.files)]:
        if _remove(path):
            lines.append(f"removed {path}")
        else:
            lines.append(f"not installed: {path}")
    legacy_removed = [path for path in ours if _remove(path)]
    lines += [f"removed {path} (the same agent under its old name)" for path in legacy_removed]
    lines += [f"left {path}: not what this aemagent wrote (--force removes it)" for path in others]
    if plan.manager == "systemd":
        if links:
            units = f"{SOCKET_UNIT} {SERVICE_UNIT}"
            lines.append(f"then stop what still runs: systemctl --user stop {units}")
        lines.append("then: systemctl --user daemon-reload")
    else:
        lines.append(f"to stop the running agent: {plan.disable[0]}")
        if legacy_removed:
            lines.append(f"  (one started under the old name: {plan.legacy_disable[0]})")
    return lines
