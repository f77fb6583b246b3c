"""A credential as `aemagent add` reads it: from a file, standard input, or pasted at a terminal.

A JSON object, or a bare string (a token); anything else is a usage error (exit 64) in one line.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from aemagent import exits
from aemagent.errors import CommandError

# A credential file is a few KiB; anything this big is a mistake (and the daemon refuses it).
_MAX_CREDENTIAL_BYTES = 1024 * 1024


def read_credential(source: str, notes: list[str] | None = None) -> Any:
    """The credential from a file or stdin: a JSON object, or a bare string (a token).

    A warning about the file (readable by others) goes to `notes` if given, else to stderr.
    """
    if source == "-":
        if sys.stdin.isatty():
            data = read_from_terminal(sys.stdin.fileno())
            label = "the pasted text"
        else:
            data = sys.stdin.buffer.read(_MAX_CREDENTIAL_BYTES + 1)
            label = "standard input"
    else:
        try:
            with open(source, "rb") as f:
                data = f.read(_MAX_CREDENTIAL_BYTES + 1)
                mode = os.fstat(f.fileno()).st_mode
        except OSError as exc:
            raise CommandError(f"cannot read {source}: {exc.strerror}", exits.USAGE) from None
        if mode & 0o077:
            note = (
                f"warning: {source} is readable by other users (mode {mode & 0o777:o});"
                " once added, consider deleting it or `chmod 600` it"
            )
            if notes is None:
                print(f"aemagent: {note}", file=sys.stderr)
            else:
                notes.append(note)
        label = source
    if len(data) > _MAX_CREDENTIAL_BYTES:
        raise CommandError(
            f"{label} is larger than {_MAX_CREDENTIAL_BYTES} bytes: not a credential", exits.USAGE
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CommandError(f"{label} is not UTF-8 text: not a credential", exits.USAGE) from None
    stripped = text.strip()
    if not stripped:
        raise CommandError(f"{label} is empty", exits.USAGE)
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise CommandError(
                f"{label} is not valid JSON: {exc.msg.removesuffix(' at')} at line"
                f" {exc.lineno} column {exc.colno}",
                exits.USAGE,
            ) from None
    return stripped


def read_from_terminal(fd: int) -> bytes:
    """A credential pasted at the terminal, not echoed (it would stay on the screen).

    The terminal is put in non-canonical mode without echo, so a one-line JSON document longer
    than the tty's 4 KiB line buffer is not cut short. Input ends at Ctrl-D, or as soon as it is
    a complete JSON document or one line of a bare token. Ctrl-C still interrupts (ISIG stays
    on); the terminal's settings are restored on every path.
    """
    import termios

    saved = termios.tcgetattr(fd)
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)
    quiet[6][termios.VMIN], quiet[6][termios.VTIME] = 1, 0
    data = bytearray()
    try:
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
        print(
            "aemagent: paste the credential (not shown); it is read once complete, or at Ctrl-D",
            file=sys.stderr,
            flush=True,
        )
        while len(data) <= _MAX_CREDENTIAL_BYTES:
            chunk = os.read(fd, 65536)
            end = chunk.find(b"\x04")  # Ctrl-D: the terminal does not turn it into EOF now
            if end >= 0:
                chunk = chunk[:end]
            for byte in chunk:
                if byte in (0x08, 0x7F):  # backspace: the line editing canonical mode would do
                    del data[-1:]
                else:
                    data.append(byte)
            if end >= 0 or not chunk or _complete(bytes(data)):
                break
    finally:
        # TCSAFLUSH: the rest of a paste (a trailing newline) must not reach the shell's prompt.
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
    if data.strip():  # said at once, so that nobody presses Ctrl-D for the shell to read
        print(f"aemagent: read {len(data)} bytes", file=sys.stderr, flush=True)
    return bytes(data)


def _complete(data: bytes) -> bool:
    """Whether pasted text is whole: a JSON document that parses, or one line of a token."""
    text = data.decode("utf-8", "replace").strip()
    if not text:
        return False
    if text.startswith(("{", "[")):
        try:
            json.loads(text)
        except (ValueError, RecursionError):  # incomplete, or bad: read on until Ctrl-D
            return False
        return True
    return data.rstrip(b" \t").endswith((b"\n", b"\r"))
