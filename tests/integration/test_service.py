"""`aemagent service install|uninstall`, the shipped units and plist, and the sandbox's
MemoryDenyWriteExecute= under the real daemon.

`systemd-analyze --user verify` checks the shipped and the installed units for real (unknown
keys, bad values, an ExecStart= that is not executable); it needs no running systemd, only a
HOME and an XDG_RUNTIME_DIR, which point at a temporary directory here. Skipped, saying so, where
systemd-analyze is not installed (`.ci/run` installs it).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import plistlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import procs
import pytest

from aemagent.cli import service

ROOT = Path(__file__).resolve().parents[2]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze (Debian package systemd) is not installed"
)


def _home(tmp_path: Path) -> dict[str, str]:
    """An environment whose home and runtime directory are under tmp_path."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = procs.base_env(HOME=str(home), XDG_RUNTIME_DIR=str(runtime))
    env.pop("XDG_CONFIG_HOME", None)
    return env


def _verify(env: dict[str, str], *units: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze --user verify`: exit 0 and not a word of warning is a pass."""
    assert ANALYZE is not None
    clean = {k: env[k] for k in ("HOME", "XDG_RUNTIME_DIR")} | {"PATH": "/usr/bin:/bin"}
    if "XDG_CONFIG_HOME" in env:
        clean["XDG_CONFIG_HOME"] = env["XDG_CONFIG_HOME"]
    return subprocess.run(
        [ANALYZE, "--user", "verify", *map(str, units)],
        env=clean,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _service(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return procs.run(procs.aemagent("service", *args), env)


# ---- the shipped files


def test_the_shipped_files_are_what_service_install_generates() -> None:
    """systemd/ and launchd/ hold the generated texts with template paths, so they cannot drift
    from what users install. Regenerate: python -c 'from aemagent.cli.service import templates; ...'."""
    for relative, content in service.templates().items():
        assert (ROOT / relative).read_bytes() == content, relative


@needs_analyze
def test_the_shipped_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The template runs %h/.local/bin/aemagent (pipx, pip --user): put the venv's console
    script there, as such an installation would."""
    script = Path(sys.executable).parent / "aemagent"
    if not script.exists():
        pytest.skip(f"no console script at {script} to stand at %h/.local/bin/aemagent")
    env = _home(tmp_path)
    bin_dir = Path(env["HOME"]) / ".local" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "aemagent").symlink_to(script)
    done = _verify(env, ROOT / "systemd" / "aemagent.socket", ROOT / "systemd" / "aemagent.service")
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_shipped_plist_has_launchds_keys_and_types() -> None:
    shipped = ROOT / "launchd" / "io.github.aemagent.plist"
    _check_plist(plistlib.loads(shipped.read_bytes()), "/Users/YOU")


def _check_plist(job: dict[str, object], home: str) -> None:
    assert job["Label"] == "io.github.aemagent"  # launchd's reverse-DNS convention
    argv = job["ProgramArguments"]
    assert isinstance(argv, list)
    assert all(isinstance(a, str) for a in argv)
    assert argv[0].startswith("/")  # launchd does no PATH lookup and no ~ expansion
    assert argv[-1] == "serve"
    assert job["RunAtLoad"] is True
    # A crash restarts it; `aemagent stop` and a displaced agent (exit 0) stay stopped.
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    log = f"{home}/Library/Logs/aemagent.log"
    assert job["StandardOutPath"] == job["StandardErrorPath"] == log
    limits = job["SoftResourceLimits"]
    assert isinstance(limits, dict)
    assert isinstance(limits["NumberOfFiles"], int)
    assert limits["NumberOfFiles"] >= 1024  # the daemon's connection cap
    assert job["Umask"] == 0o077
    assert type(job["Umask"]) is int


# ---- service install / uninstall


@needs_analyze
def test_install_writes_units_that_verify_and_run_this_aemagent(tmp_path: Path) -> None:
    """Into $XDG_CONFIG_HOME/systemd/user when that is set, running this interpreter with -P;
    a second install changes nothing.

    Broken: a relative ExecStart= or one that names a missing executable fails verify; writing
    again on an identical file would make the second run say "wrote"."""
    env = _home(tmp_path)
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    done = _service(env, "install", "--systemd")
    assert done.returncode == 0, done.stderr
    units = tmp_path / "config" / "systemd" / "user"
    socket_unit, service_unit = units / "aemagent.socket", units / "aemagent.service"
    assert done.stdout.splitlines() == [
        f"wrote {socket_unit}",
        f"wrote {service_unit}",
        f"the agent will run as: {sys.executable} -P -m aemagent serve",
        "to start it now and at every login (on first use, through the socket):",
        "  systemctl --user daemon-reload",
        "  systemctl --user enable --now aemagent.socket",
    ]
    assert f"ExecStart={sys.executable} -P -m aemagent serve\n" in service_unit.read_text()
    verified = _verify(env, socket_unit, service_unit)
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")

    before = [os.stat(p) for p in (socket_unit, service_unit)]
    again = _service(env, "install")  # systemd is the default on Linux
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[:2] == [
        f"unchanged {socket_unit}",
        f"unchanged {service_unit}",
    ]
    after = [os.stat(p) for p in (socket_unit, service_unit)]
    assert [(s.st_ino, s.st_mtime_ns) for s in after] == [(s.st_ino, s.st_mtime_ns) for s in before]


@needs_analyze
def test_an_interpreter_path_with_spaces_percent_and_dollar_is_quoted_for_systemd(
    tmp_path: Path,
) -> None:
    """verify resolves ExecStart='s executable: it exists only if the quoting is right.

    Broken: no quoting splits the path at the space; an unescaped % is a specifier; escaping $
    as $$ in the executable (systemd expands variables in arguments only) names a missing file."""
    odd = tmp_path / "we ird%d$HOME"
    odd.mkdir()
    (odd / "python").symlink_to(sys.executable)
    env = _home(tmp_path)
    plan = service.systemd_plan(env, [str(odd / "python"), "-P", "-m", "aemagent"])
    service.install(plan)
    unit = Path(plan.files[1].path)
    assert 'ExecStart="' in unit.read_text()
    verified = _verify(env, unit)
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")


def test_a_changed_file_is_kept_without_force(tmp_path: Path) -> None:
    """Broken: writing whenever the content differs replaces the user's edit."""
    env = _home(tmp_path)
    assert _service(env, "install").returncode == 0
    unit = Path(env["HOME"]) / ".config" / "systemd" / "user" / "aemagent.service"
    edited = unit.read_text().replace("RestartSec=2s", "RestartSec=30s")
    unit.write_text(edited)

    refused = _service(env, "install")
    assert refused.returncode == 1
    assert refused.stdout == ""
    (line,) = refused.stderr.splitlines()
    assert str(unit) in line
    assert "--force" in line
    assert "systemctl --user edit" in line
    assert unit.read_text() == edited

    refused = _service(env, "uninstall")
    assert refused.returncode == 1
    assert unit.read_text() == edited

    forced = _service(env, "install", "--force")
    assert forced.returncode == 0, forced.stderr
    assert f"wrote {unit}" in forced.stdout
    assert "RestartSec=2s" in unit.read_text()


def test_uninstall_removes_only_our_files(tmp_path: Path) -> None:
    """The user's drop-in and other units stay; an enabled unit is not removed from under
    systemd without --force (then its `enable` symlinks go too).

    Broken: removing the directory, or every aemagent* entry, takes the drop-in with it."""
    env = _home(tmp_path)
    units = Path(env["HOME"]) / ".config" / "systemd" / "user"
    assert _service(env, "install").returncode == 0
    dropin = units / "aemagent.service.d" / "override.conf"
    dropin.parent.mkdir()
    dropin.write_text("[Service]\nMemoryDenyWriteExecute=no\n")
    other = units / "other.service"
    other.write_text("[Service]\nExecStart=/bin/true\n")
    wants = units / "sockets.target.wants"
    wants.mkdir()
    (wants / "aemagent.socket").symlink_to(units / "aemagent.socket")
    (wants / "other.socket").symlink_to(units / "other.socket")

    refused = _service(env, "uninstall")
    assert refused.returncode == 1
    assert "systemctl --user disable --now aemagent.socket aemagent.service" in refused.stderr
    assert (units / "aemagent.socket").exists()

    done = _service(env, "uninstall", "--force")
    assert done.returncode == 0, done.stderr
    assert sorted(p.relative_to(units).as_posix() for p in units.rglob("*")) == [
        "aemagent.service.d",
        "aemagent.service.d/override.conf",
        "other.service",
        "sockets.target.wants",
        "sockets.target.wants/other.socket",
    ]
    assert "systemctl --user daemon-reload" in done.stdout

    again = _service(env, "uninstall")
    assert again.returncode == 0, again.stderr
    assert f"not installed: {units / 'aemagent.service'}" in again.stdout


def test_install_launchd_writes_a_plist_for_this_user(tmp_path: Path) -> None:
    env = _home(tmp_path)
    home = env["HOME"]
    done = _service(env, "install", "--launchd")
    assert done.returncode == 0, done.stderr
    path = Path(home) / "Library" / "LaunchAgents" / "io.github.aemagent.plist"
    job = plistlib.loads(path.read_bytes())
    _check_plist(job, home)
    assert job["ProgramArguments"] == [sys.executable, "-P", "-m", "aemagent", "serve"]
    assert f"launchctl bootstrap gui/{os.getuid()} {path}" in done.stdout

    removed = _service(env, "uninstall", "--launchd")
    assert removed.returncode == 0, removed.stderr
    assert not path.exists()
    assert f"launchctl bootout gui/{os.getuid()}/io.github.aemagent" in removed.stdout


def _legacy_plist(env: dict[str, str], **changes: object) -> Path:
    """The plist an earlier aemagent wrote, under the label "aemagent", as plistlib lays it out
    (not byte for byte what we write: an older version's comment may differ)."""
    home = env["HOME"]
    job = plistlib.loads(service.launchd_plist(service.agent_argv(), home, "aemagent"))
    job.update(changes)
    path = Path(home) / "Library" / "LaunchAgents" / "aemagent.plist"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plistlib.dumps(job))
    return path


def test_the_plist_under_the_old_label_is_replaced_by_install_and_removed_by_uninstall(
    tmp_path: Path,
) -> None:
    """Ours (the same job): install replaces it, uninstall removes it, and each says how to
    unload the old job. Another (edited) stays without --force.

    Broken: without the legacy file in launchd_plan, the old plist stays beside the new one
    and launchd starts both at the next login."""
    env = _home(tmp_path)
    domain = f"gui/{os.getuid()}"
    legacy = _legacy_plist(env)
    done = _service(env, "install", "--launchd")
    assert done.returncode == 0, done.stderr
    assert f"removed {legacy} (the same agent under its old name)" in done.stdout
    assert f"launchctl bootout {domain}/aemagent" in done.stdout
    assert not legacy.exists()

    legacy = _legacy_plist(env)
    removed = _service(env, "uninstall", "--launchd")
    assert removed.returncode == 0, removed.stderr
    assert f"removed {legacy} (the same agent under its old name)" in removed.stdout
    assert f"launchctl bootout {domain}/aemagent)" in removed.stdout
    assert not legacy.exists()

    edited = _legacy_plist(env, RunAtLoad=False)
    kept = _service(env, "uninstall", "--launchd")
    assert kept.returncode == 0, kept.stderr
    assert f"left {edited}: not what this aemagent wrote" in kept.stdout
    assert edited.exists()
    forced = _service(env, "uninstall", "--launchd", "--force")
    assert forced.returncode == 0, forced.stderr
    assert not edited.exists()


# ---- MemoryDenyWriteExecute= and the real daemon


def _seccomp_mdwe() -> None:
    """systemd's MemoryDenyWriteExecute= (src/shared/seccomp-util.c) as a seccomp filter:
    EPERM for mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect with PROT_EXEC, shmat with
    SHM_EXEC. Runs in the child between fork and exec, after PR_SET_NO_NEW_PRIVS (as systemd
    does, and as NoNewPrivileges= asks)."""
    arch, mmap_nr, mprotect_nr, pkey_nr, shmat_nr = _ARCHES[platform.machine()]
    ld, jeq, jset, and_, ret = 0x20, 0x15, 0x45, 0x54, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM
    arg2 = 16 + 2 * 8  # seccomp_data.args[2]: its low 32 bits on a little-endian machine
    write_exec = 0x2 | 0x4
    code: list[object] = [
        (ld, 4), (jeq, arch, None, "allow"),
        (ld, 0), (jeq, mmap_nr, "mmap", None), (jeq, mprotect_nr, "exec", None),
        (jeq, pkey_nr, "exec", None), (jeq, shmat_nr, "shm", None), (ret, allow),
        "mmap", (ld, arg2), (and_, write_exec), (jeq, write_exec, "deny", "allow"),
        "exec", (ld, arg2), (jset, 0x4, "deny", "allow"),
        "shm", (ld, arg2), (jset, 0o100000, "deny", "allow"),
        "deny", (ret, deny),
        "allow", (ret, allow),
    ]  # fmt: skip
    labels: dict[str, int] = {}
    # (code, k), or a jump: (code, k, label if true, label if false), None to fall through
    ops: list[tuple[int, int] | tuple[int, int, str | None, str | None]] = []
    for item in code:
        if isinstance(item, str):
            labels[item] = len(ops)
        else:
            assert isinstance(item, tuple)
            ops.append(item)

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

    def offset(i: int, label: str | None) -> int:
        return 0 if label is None else labels[label] - i - 1

    filters = (SockFilter * len(ops))(
        *(
            SockFilter(op[0], offset(i, op[2]), offset(i, op[3]), op[1])
            if len(op) == 4  # the jumps, jeq and jset
            else SockFilter(op[0], 0, 0, op[1])
            for i, op in enumerate(ops)
        )
    )
    prog = SockFprog(len(ops), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def _kernel_mdwe() -> None:
    """The kernel's own MDWE (Linux 6.3+): PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_MDWE")


# AUDIT_ARCH and the numbers of mmap, mprotect, pkey_mprotect, shmat
_ARCHES = {"x86_64": (0xC000003E, 9, 10, 329, 30), "aarch64": (0xC00000B7, 222, 226, 288, 196)}

_WX_PROBE = """
import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    print("refused")
else:
    print("allowed")
"""


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="seccomp and prctl are Linux's")
@pytest.mark.parametrize("mdwe", [_seccomp_mdwe, _kernel_mdwe], ids=["seccomp", "prctl"])
def test_the_daemon_serves_tokens_under_memory_deny_write_execute(
    tmp_path: Path, ims: procs.EmulatorProcess, mdwe: Callable[[], None]
) -> None:
    """The service unit sets MemoryDenyWriteExecute=yes. systemd cannot run here (it is not
    init), so the test applies the same rule to a real `aemagent serve`: systemd's seccomp
    filter, and the kernel's PR_SET_MDWE. A control shows the rule bites (a W+X mapping is
    refused); under it the daemon starts, signs a JWT (cryptography, OpenSSL), fetches tokens
    over HTTP and serves them.

    Guards against: a new dependency that generates machine code at run time (a JIT, a ctypes
    callback on a libffi without static trampolines) would fail here, and the unit would then
    have to drop MemoryDenyWriteExecute=."""
    if platform.machine() not in _ARCHES:
        pytest.skip(f"no syscall table here for {platform.machine()}")
    if mdwe is _kernel_mdwe and _probe(mdwe).returncode != 0:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    probe = _probe(mdwe)
    assert (probe.returncode, probe.stdout.strip()) == (0, "refused"), probe.stderr
    sockdir = tmp_path / "s"
    sock = str(sockdir / "agent.sock")
    with procs.serving(sock, tmp_path / "agent.log", preexec_fn=mdwe) as agent:
        for kind, name in (("service", "jwt"), ("oauth", "client-credentials")):
            added = agent.cli("add", ims.credentials[kind], "--name", name)
            assert added.returncode == 0, (added.stderr, agent.log())
            header = agent.token("--profile", name, "--format", "header")
            assert header.returncode == 0, header.stderr
            key, _, value = header.stdout.strip().partition(": ")
            assert ims.aem("/aem/x.json", {key: value})[0] == 200
    assert "Traceback" not in agent.log()


def _probe(mdwe: Callable[[], None]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WX_PROBE],
        preexec_fn=mdwe,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
