"""The `aemagent` CLI's pure parts: durations, shell lines, the status table, input handling."""

from __future__ import annotations

import argparse
import json
import subprocess

import pytest

from aemagent import cli, exits
from aemagent.cli import agentctl, calls, credinput, parser, status
from aemagent.errors import CommandError
from aemagent.wire import Reply

NOW = 1_800_000_000


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("8h", 28800),
        ("30m", 1800),
        ("1d", 86400),
        ("90s", 90),
        ("1h30m", 5400),
        ("3600", 3600),
        ("1.5h", 5400),
        (" 2H ", 7200),
    ],
)
def test_parse_duration(text, seconds):
    assert parser.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "h", "8x", "-1h", "1h-", "abc"])
def test_parse_duration_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parser.parse_duration(text)


def test_sh_lines_evaluate_in_a_real_shell():
    path = "/tmp/odd dir/it's/agent.sock"
    script = (
        agentctl.shell_lines("sh", path, 4242) + 'printf "%s|%s" "$AEMAGENT_SOCK" "$AEMAGENT_PID"'
    )
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout == f"{path}|4242"


def test_csh_and_fish_lines():
    assert agentctl.shell_lines("csh", "/run/user/1000/aemagent/agent.sock", 7) == (
        "setenv AEMAGENT_SOCK '/run/user/1000/aemagent/agent.sock';\nsetenv AEMAGENT_PID 7;\n"
    )
    assert agentctl.shell_lines("fish", "/tmp/a'b/agent.sock", 7) == (
        "set -gx AEMAGENT_SOCK '/tmp/a\\'b/agent.sock';\nset -gx AEMAGENT_PID 7;\n"
    )
    with pytest.raises(CommandError):
        agentctl.shell_lines("csh", "/tmp/a'b/agent.sock", 7)


def profile(**kw):
    base = {
        "name": "p1-e2",
        "kind": "service",
        "state": "valid",
        "default": False,
        "expires_at": NOW + 5 * 3600 + 12 * 60 + 30,
        "refresh_at": NOW + 3600 * 4,
        "last_error": None,
        "certificate_expires_at": NOW + 200 * 86400,
    }
    base.update(kw)
    return base


def test_status_table_says_expires_in_and_never_a_timestamp():
    table = status.format_table(
        [
            profile(),
            profile(
                name="other",
                default=True,
                state="failed",
                expires_at=None,
                refresh_at=None,
                last_error="IMS refused the credential",
            ),
        ],
        NOW,
    )
    lines = table.splitlines()
    assert lines[0].split() == [
        "NAME",
        "KIND",
        "STATE",
        "EXPIRES",
        "IN",
        "NEXT",
        "REFRESH",
        "LAST",
        "ERROR",
    ]
    assert lines[1].split() == ["p1-e2", "service", "valid", "5h", "12m", "in", "4h", "0m", "-"]
    assert lines[2].split()[:4] == ["other", "*", "service", "failed"]
    assert lines[2].endswith("IMS refused the credential")
    assert str(NOW)[:5] not in table


def test_status_warnings():
    warnings = status.warnings_for(
        [
            profile(certificate_expires_at=NOW + 12 * 86400),
            profile(name="old", certificate_expires_at=NOW - 1),
            profile(
                name="dev", kind="devtoken", certificate_expires_at=None, expires_at=NOW + 3600
            ),
        ],
        NOW,
    )
    assert warnings == [
        "warning: p1-e2: the certificate expires in 12d 0h; create new service credentials in the AEM Developer Console",
        "warning: old: the certificate expired; create new service credentials in the AEM Developer Console",
        "warning: dev: the development token expires in 1h 0m",
    ]


def test_read_credential(tmp_path, capsys):
    good = tmp_path / "c.json"
    good.write_text('\ufeff{"ok": true}\n')
    good.chmod(0o644)
    assert credinput.read_credential(str(good)) == {"ok": True}
    assert "readable by other users" in capsys.readouterr().err
    bare = tmp_path / "token.txt"
    bare.write_text("  eyJhbGciOi.x.y \n")
    bare.chmod(0o600)
    assert credinput.read_credential(str(bare)) == "eyJhbGciOi.x.y"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b'{"a": ', "not valid JSON"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"x" * (1024 * 1024 + 1), "larger than"),
    ],
)
def test_read_credential_rejects(tmp_path, content, message):
    path = tmp_path / "bad"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(CommandError, match=message) as info:
        credinput.read_credential(str(path))
    assert info.value.exit_code == exits.USAGE
    with pytest.raises(CommandError, match="cannot read"):
        credinput.read_credential(str(tmp_path / "missing"))


@pytest.mark.parametrize(("status", "code"), [(400, 64), (404, 3), (409, 3), (503, 4), (500, 1)])
def test_api_errors_map_to_exit_codes(status, code):
    reply = Reply(status, {}, json.dumps({"error": "x", "message": "what went wrong"}).encode())
    with pytest.raises(CommandError, match="what went wrong") as info:
        calls.decode(reply)
    assert info.value.exit_code == code


def test_an_answer_we_do_not_understand_is_exit_1():
    with pytest.raises(CommandError, match="older version") as info:
        calls.decode(Reply(502, {}, b"<html>"))
    assert info.value.exit_code == 1


def test_usage_errors_exit_64(capsys):
    for argv in (["frobnicate"], ["add", "--lifetime", "soon"], ["start", "--sh", "--fish"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 64
        assert capsys.readouterr().err.startswith("aemagent: ")
    assert cli.main(["forget"]) == 64
    assert cli.main(["forget", "a", "--all"]) == 64


@pytest.mark.parametrize(
    ("pasted", "whole"),
    [
        (b'{"a": 1}', True),
        (b'{"a": ', False),
        (b"[" * 100_000, False),  # nested too deeply to parse: not whole, and no traceback
        (b"eyJ.a.b\n", True),
        (b"eyJ.a.b", False),
        (b"  \n", False),
    ],
)
def test_pasted_text_is_whole_when_json_parses_or_a_token_line_ends(pasted, whole):
    assert credinput._complete(pasted) is whole
