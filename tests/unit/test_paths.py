import os
from pathlib import Path

import pytest

from aemagent import paths

UID = os.getuid()
OTHER_UID = UID + 4242


@pytest.fixture
def run_user(tmp_path: Path) -> Path:
    """A stand-in for /run/user, holding a private directory for this user."""
    private = tmp_path / str(UID)
    private.mkdir(mode=0o700)
    private.chmod(0o700)  # mkdir's mode is subject to the umask
    return tmp_path


def default(**kwargs):
    kwargs.setdefault("uid", UID)
    kwargs.setdefault("platform", "linux")
    kwargs.setdefault("environ", {})
    kwargs.setdefault("run_user_base", "/nonexistent")
    return paths.default_socket_path(**kwargs)


FALLBACK = f"/tmp/aemagent-{UID}/agent.sock"


def test_xdg_runtime_dir():
    got = default(environ={"XDG_RUNTIME_DIR": "/run/user/1000"})
    assert got == "/run/user/1000/aemagent/agent.sock"


def test_xdg_runtime_dir_with_trailing_slash():
    assert default(environ={"XDG_RUNTIME_DIR": "/xdg/"}) == "/xdg/aemagent/agent.sock"


def test_xdg_runtime_dir_wins_over_run_user(run_user):
    got = default(environ={"XDG_RUNTIME_DIR": "/xdg"}, run_user_base=str(run_user))
    assert got == "/xdg/aemagent/agent.sock"


@pytest.mark.parametrize("value", ["", "relative/dir"])
def test_empty_or_relative_xdg_runtime_dir_is_ignored(value, run_user):
    got = default(environ={"XDG_RUNTIME_DIR": value}, run_user_base=str(run_user))
    assert got == f"{run_user}/{UID}/aemagent/agent.sock"


def test_run_user_dir_when_private(run_user):
    assert default(run_user_base=str(run_user)) == f"{run_user}/{UID}/aemagent/agent.sock"


def test_run_user_dir_missing_falls_back_to_tmp(tmp_path):
    assert default(run_user_base=str(tmp_path)) == FALLBACK


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o711, 0o1700])
def test_run_user_dir_not_0700_falls_back_to_tmp(run_user, mode):
    (run_user / str(UID)).chmod(mode)
    assert default(run_user_base=str(run_user)) == FALLBACK


def test_run_user_dir_of_another_owner_falls_back_to_tmp(tmp_path):
    # A 0700 directory named after OTHER_UID but owned by us: for OTHER_UID it is someone else's.
    (tmp_path / str(OTHER_UID)).mkdir(mode=0o700)
    (tmp_path / str(OTHER_UID)).chmod(0o700)
    got = default(uid=OTHER_UID, run_user_base=str(tmp_path))
    assert got == f"/tmp/aemagent-{OTHER_UID}/agent.sock"


def test_run_user_symlink_falls_back_to_tmp(tmp_path):
    target = tmp_path / "real"
    target.mkdir(mode=0o700)
    target.chmod(0o700)
    (tmp_path / str(UID)).symlink_to(target)
    assert default(run_user_base=str(tmp_path)) == FALLBACK


def test_run_user_file_falls_back_to_tmp(tmp_path):
    (tmp_path / str(UID)).write_text("")
    (tmp_path / str(UID)).chmod(0o700)
    assert default(run_user_base=str(tmp_path)) == FALLBACK


def test_darwin_uses_the_per_user_temp_dir():
    temp = "/var/folders/zz/zyxvpxvq6csfxvn_n0000000000000/T/"
    got = default(platform="darwin", darwin_temp_dir=temp, environ={"XDG_RUNTIME_DIR": "/x"})
    assert got == temp + "aemagent/agent.sock"
    assert len(got.encode()) < 100


def test_darwin_long_temp_dir_falls_back_to_tmp():
    temp = "/var/folders/" + "x" * 80
    assert default(platform="darwin", darwin_temp_dir=temp) == FALLBACK


def test_darwin_path_limit_counts_bytes_not_characters():
    temp = "/Users/" + "é" * 40  # with the suffix: 107 bytes, 67 characters
    assert len(temp + "/aemagent/agent.sock") < 100 <= len((temp + "/aemagent/agent.sock").encode())
    assert default(platform="darwin", darwin_temp_dir=temp) == FALLBACK


@pytest.mark.parametrize("temp", ["", "relative/T"])
def test_darwin_without_a_usable_temp_dir_falls_back_to_tmp(temp):
    assert default(platform="darwin", darwin_temp_dir=temp) == FALLBACK


@pytest.mark.skipif(os.uname().sysname == "Darwin", reason="confstr answers on macOS")
def test_darwin_confstr_missing_falls_back_to_tmp():
    assert default(platform="darwin") == FALLBACK


def test_other_platforms_follow_the_linux_rules():
    assert default(platform="freebsd14", environ={"XDG_RUNTIME_DIR": "/x"}) == (
        "/x/aemagent/agent.sock"
    )
    assert default(platform="freebsd14") == FALLBACK


def test_default_reads_the_real_process_state(monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/xdg")
    if os.uname().sysname != "Darwin":
        assert paths.default_socket_path() == "/xdg/aemagent/agent.sock"
    assert paths.default_socket_path().startswith("/")


def test_socket_path_precedence(monkeypatch):
    env = {"AEMAGENT_SOCK": "/env/agent.sock", "XDG_RUNTIME_DIR": "/xdg"}
    assert paths.socket_path("/explicit.sock", env) == "/explicit.sock"
    assert paths.socket_path(None, env) == "/env/agent.sock"
    assert paths.socket_path("", env) == "/env/agent.sock"
    env["AEMAGENT_SOCK"] = ""
    expected = paths.default_socket_path(environ=env)
    assert paths.socket_path(None, env) == expected
    monkeypatch.setenv("AEMAGENT_SOCK", "relative.sock")  # kept as given, like SSH_AUTH_SOCK
    assert paths.socket_path() == "relative.sock"
    monkeypatch.delenv("AEMAGENT_SOCK")
    assert paths.socket_path() == paths.default_socket_path()


def test_lock_path_is_next_to_the_socket():
    assert paths.lock_path("/run/user/1/aemagent/agent.sock") == (
        "/run/user/1/aemagent/agent.sock.lock"
    )
