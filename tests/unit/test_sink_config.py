"""`[[sink]]` parsing, the sink directory checks, and the file-system check (faked statfs)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from aemagent.daemon.config import SinkSpec, parse_config
from aemagent.daemon.sinks import (
    RAMFS_MAGIC,
    TMPFS_MAGIC,
    SinkFile,
    check_sink,
    filesystem_type,
)
from aemagent.errors import ConfigError


def parse(*sinks: dict[str, object]) -> tuple[SinkSpec, ...]:
    return parse_config({"sink": list(sinks)}, "/c.toml").sinks


def test_a_sink_has_defaults_and_takes_modes_as_octal_integers_or_strings():
    (one,) = parse({"profile": "p", "path": "/run/a/token"})
    assert one == SinkSpec("p", "/run/a/token", "token", 0o600, False)
    (two, three) = parse(
        {"profile": "p", "path": "/run/a/h", "format": "header", "mode": 0o640},
        {"profile": "p", "path": "/run/a/j", "format": "json", "mode": "0640", "allow_disk": True},
    )
    assert (two.mode, two.format, three.mode, three.allow_disk) == (0o640, "header", 0o640, True)
    assert parse({"profile": "p", "path": "/x/t", "mode": "0o400"})[0].mode == 0o400


@pytest.mark.parametrize(
    ("table", "said"),
    [
        ({"path": "/x/t"}, 'sink 1 needs profile = "…"'),
        ({"profile": "p"}, 'sink 1 needs path = "…"'),
        ({"profile": "p", "path": "rel/t"}, "path must be absolute"),
        ({"profile": "bad name", "path": "/x/t"}, "invalid profile name"),
        ({"profile": "p", "path": "/x/t", "format": "env"}, "format must be token, header or json"),
        ({"profile": "p", "path": "/x/t", "mode": 600}, "600 is decimal"),
        ({"profile": "p", "path": "/x/t", "mode": "rw"}, "not an octal number"),
        ({"profile": "p", "path": "/x/t", "mode": 0o200}, "would not let you read"),
        ({"profile": "p", "path": "/x/t", "allow_disk": "yes"}, "allow_disk must be true or false"),
        ({"profile": "p", "path": "/x/t", "owner": "me"}, "unknown key 'owner' in sink 1"),
    ],
)
def test_a_bad_sink_is_a_one_line_config_error(table, said):
    with pytest.raises(ConfigError, match=None) as caught:
        parse(table)
    assert said in str(caught.value)
    assert str(caught.value).startswith("/c.toml: ")
    assert "\n" not in str(caught.value)


def test_two_sinks_of_one_path_and_a_sink_that_is_not_an_array_are_refused():
    with pytest.raises(ConfigError, match="several sinks write /x/t"):
        parse({"profile": "a", "path": "/x/t"}, {"profile": "b", "path": "/x//t"})
    with pytest.raises(ConfigError, match=r"array of tables \(\[\[sink\]\]\)"):
        parse_config({"sink": {"profile": "a"}}, "/c.toml")


def fake_linux(magic: int, result: int = 0):
    def statfs(path: bytes, buffer: ctypes.Array[ctypes.c_char]) -> int:
        ctypes.memmove(buffer, ctypes.byref(ctypes.c_long(magic)), ctypes.sizeof(ctypes.c_long))
        return result

    return statfs


def fake_darwin(name: bytes):
    def statfs(path: bytes, buffer: ctypes.Array[ctypes.c_char]) -> int:
        ctypes.memmove(ctypes.addressof(buffer) + 72, name, len(name))
        return 0

    return statfs


def test_the_linux_magic_numbers_and_the_macos_type_name_are_read():
    assert filesystem_type("/x", platform="linux", statfs=fake_linux(TMPFS_MAGIC)) == "tmpfs"
    assert filesystem_type("/x", platform="linux", statfs=fake_linux(RAMFS_MAGIC)) == "ramfs"
    assert filesystem_type("/x", platform="linux", statfs=fake_linux(0xEF53)) == "ext4"
    assert filesystem_type("/x", platform="darwin", statfs=fake_darwin(b"apfs\0")) == "apfs"
    assert filesystem_type("/x", platform="darwin", statfs=fake_darwin(b"tmpfs")) == "tmpfs"
    with pytest.raises(OSError):
        filesystem_type("/x", platform="linux", statfs=fake_linux(0, result=-1))


def test_the_real_statfs_tells_tmpfs_from_the_disk(tmp_path):
    if os.path.isdir("/dev/shm"):
        assert filesystem_type("/dev/shm") == "tmpfs"
    assert filesystem_type(str(tmp_path)) not in ("tmpfs", "ramfs") or pytest.skip("tmp is tmpfs")


def private(tmp_path: Path) -> Path:
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    return directory


def test_the_check_names_the_path_and_its_file_system(tmp_path):
    directory = private(tmp_path)
    spec = SinkSpec("p", str(directory / "t"))
    with pytest.raises(ConfigError) as caught:
        check_sink(spec, "/c.toml", fstype=lambda d: "ext4")
    assert str(caught.value) == (
        f"/c.toml: sink {directory}/t: {directory} is on ext4, not a memory file system"
        " (tmpfs/ramfs); set allow_disk = true to allow it"
    )
    check_sink(spec, fstype=lambda d: "tmpfs")
    check_sink(SinkSpec("p", str(directory / "t"), allow_disk=True), fstype=lambda d: "ext4")


def test_the_directory_must_exist_and_be_private(tmp_path):
    tmpfs = lambda d: "tmpfs"  # noqa: E731
    with pytest.raises(ConfigError, match="directory .*/nope does not exist"):
        check_sink(SinkSpec("p", str(tmp_path / "nope" / "t")), fstype=tmpfs)
    assert not (tmp_path / "nope").exists()  # never created
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by other users") as caught:
        check_sink(SinkSpec("p", str(shared / "t")), fstype=tmpfs)
    assert "socket" not in str(caught.value)
    (private(tmp_path) / "t").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        check_sink(SinkSpec("p", str(tmp_path / "d" / "t"), allow_disk=True))


def test_a_write_is_a_new_file_with_the_mode_and_removal_spares_a_file_not_ours(tmp_path):
    directory = private(tmp_path)
    target = directory / "t"
    sink = SinkFile(SinkSpec("p", str(target), mode=0o640, allow_disk=True))
    old = os.umask(0o077)
    try:
        sink.write(b"one\n")
    finally:
        os.umask(old)
    first = os.stat(target)
    assert (target.read_bytes(), first.st_mode & 0o777) == (b"one\n", 0o640)
    sink.write(b"two\n")
    assert target.read_bytes() == b"two\n"
    assert os.stat(target).st_ino != first.st_ino
    assert os.listdir(directory) == ["t"]  # no temporary left
    target.unlink()
    target.write_text("someone else's")
    sink.remove()
    assert target.read_text() == "someone else's"
