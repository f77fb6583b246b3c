"""The config file: agent-wide settings, and profiles that say where their secret lives.

    # ~/.config/aemagent/config.toml (or $AEMAGENT_CONFIG, or --config PATH)
    [agent]
    https_proxy = "http://proxy.example.com:3128"   # a daemon started by systemd/launchd does
    ca_file = "/etc/ssl/certs/corp-ca.pem"          # not inherit the login shell's environment

    [profiles.p12345-e67890]
    file = "~/secrets/aem-service.json"             # or:
    # command = "op read op://Private/aem/credential"
    hosts = ["author-p12345-e67890.adobeaemcloud.com"]
    default = true

The file never holds a secret, only where to get one. Unknown keys are errors naming the file and
the key (a typo must not silently drop a setting). Environment beats config file beats defaults:
`HTTPS_PROXY` set in the daemon's environment wins over `https_proxy` here. Writes (`add --save`)
go to a new temporary file (O_EXCL, O_NOFOLLOW, a random name), then `os.replace`, mode 0600;
through a symbolic link, the file it points to is the one replaced.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from aemagent.core.policy import PolicySettings
from aemagent.errors import ConfigError

# A credential is a few KiB; a command printing more than this is not printing a credential.
MAX_SOURCE_BYTES = 1024 * 1024
DEFAULT_COMMAND_TIMEOUT = 30.0

_AGENT_KEYS = {
    "https_proxy": str,
    "ca_file": str,
    "ims_timeout": float,
    "ims_concurrency": int,
    "log_level": str,
    "refresh_fraction": float,
    "refresh_jitter": float,
    "backoff_initial": float,
    "backoff_max": float,
    "request_wait": float,
}
_PROFILE_KEYS = {"file", "command", "timeout", "hosts", "default"}
_SINK_KEYS = {"profile", "path", "format", "mode", "allow_disk"}
SINK_FORMATS = ("token", "header", "json")


@dataclass(frozen=True)
class ProfileSource:
    """A config-file profile: where its credential comes from. Never the credential itself."""

    name: str
    file: str | None = None
    command: str | None = None
    timeout: float = DEFAULT_COMMAND_TIMEOUT
    hosts: tuple[str, ...] = ()
    default: bool = False

    def describe(self) -> str:
        return f"file {self.file}" if self.file else f"command `{self.command}`"

    def to_toml(self) -> dict[str, Any]:
        table: dict[str, Any] = {"file": self.file} if self.file else {"command": self.command}
        if self.command and self.timeout != DEFAULT_COMMAND_TIMEOUT:
            table["timeout"] = self.timeout
        if self.hosts:
            table["hosts"] = list(self.hosts)
        if self.default:
            table["default"] = True
        return table


@dataclass(frozen=True)
class SinkSpec:
    """A `[[sink]]`: a file the daemon keeps holding the profile's current token (sinks.py)."""

    profile: str
    path: str  # absolute
    format: str = "token"
    mode: int = 0o600
    allow_disk: bool = False


@dataclass(frozen=True)
class Config:
    path: str | None = None
    https_proxy: str | None = None
    ca_file: str | None = None
    ims_timeout: float = 20.0
    ims_concurrency: int = 4
    log_level: str | None = None
    policy: PolicySettings = field(default_factory=PolicySettings)
    profiles: tuple[ProfileSource, ...] = ()
    sinks: tuple[SinkSpec, ...] = ()

    def proxy_for_daemon(self, environ: dict[str, str] | os._Environ[str]) -> str | None:
        """The proxy to pass explicitly: the config's, unless the environment names one."""
        env_names = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
        if any(environ.get(name) for name in env_names):
            return None  # httpx reads the environment itself (trust_env), NO_PROXY included
        return self.https_proxy


def default_config_path(environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    explicit = environ.get("AEMAGENT_CONFIG")
    if explicit:
        return explicit
    import platformdirs

    return os.path.join(platformdirs.user_config_dir("aemagent"), "config.toml")


def load_config(path: str | None = None, *, required: bool = False) -> Config:
    """Read the config file; a missing default file is an empty config."""
    path = path or default_config_path()
    try:
        with open(path, "rb") as f:
            check_trusted(path, os.fstat(f.fileno()))
            data = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return Config(path=path)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    config = parse_config(data, path)
    if config.sinks:  # their directories and file systems, as they are now
        from aemagent.daemon.sinks import check_sink

        for sink in config.sinks:
            check_sink(sink, path)
    return config


def check_trusted(path: str, st: os.stat_result) -> None:
    """Refuse a config file that someone else could have written, as ssh does.

    Its `command` profiles run as us: a file another user can change is their code running
    as us. Root-owned files are fine (a Kubernetes ConfigMap is root's, mode 0644).
    """
    if st.st_uid not in (os.getuid(), 0):
        raise ConfigError(
            f"config file {path} belongs to uid {st.st_uid}, not to you: its commands would run"
            " as you; copy it and own the copy"
        )
    if st.st_mode & 0o022:
        raise ConfigError(
            f"config file {path} is writable by others (mode {st.st_mode & 0o777:04o}): its"
            f" commands would run as you; run `chmod go-w {path}`"
        )


def parse_config(data: dict[str, Any], path: str) -> Config:
    unknown = sorted(set(data) - {"agent", "profiles", "sink"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known: agent, profiles, sink)")
    agent = _table(data.get("agent", {}), path, "agent")
    settings: dict[str, Any] = {}
    for key, value in agent.items():
        kind = _AGENT_KEYS.get(key)
        if kind is None:
            raise ConfigError(
                f"{path}: unknown key agent.{key} (known: {', '.join(sorted(_AGENT_KEYS))})"
            )
        settings[key] = _typed(value, kind, path, f"agent.{key}")
    if settings.get("log_level", "info") not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{path}: agent.log_level must be debug, info, warning or error")
    policy_keys = {"refresh_fraction", "refresh_jitter", "backoff_initial", "backoff_max",
                   "request_wait"}  # fmt: skip
    policy = PolicySettings(**{k: settings.pop(k) for k in list(settings) if k in policy_keys})
    if not 0 < policy.refresh_fraction < 1 or not 0 <= policy.refresh_jitter < 1:
        raise ConfigError(f"{path}: refresh_fraction and refresh_jitter must be between 0 and 1")
    if settings.get("ims_concurrency", 4) < 1:
        raise ConfigError(f"{path}: agent.ims_concurrency must be at least 1")
    profiles = tuple(
        _profile(name, table, path)
        for name, table in _table(data.get("profiles", {}), path, "profiles").items()
    )
    defaults = [p.name for p in profiles if p.default]
    if len(defaults) > 1:
        raise ConfigError(f"{path}: several profiles say default = true: {', '.join(defaults)}")
    sinks = _sinks(data.get("sink", []), path)
    return Config(path=path, policy=policy, profiles=profiles, sinks=sinks, **settings)


def _table(value: Any, path: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {where} must be a table")
    return value


def _typed(value: Any, kind: type, path: str, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{path}: {where} must be a {kind.__name__}, got {type(value).__name__}")
    if isinstance(value, float) and (not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{path}: {where} must be a positive number")
    return value


def _profile(name: str, table: Any, path: str) -> ProfileSource:
    from aemagent.core.profiles import check_profile_name
    from aemagent.errors import UsageError

    where = f"profiles.{name}"
    try:
        check_profile_name(name)
    except UsageError as exc:
        raise ConfigError(f"{path}: {where}: {exc}") from None
    table = _table(table, path, where)
    unknown = sorted(set(table) - _PROFILE_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {where}.{unknown[0]} (known: {', '.join(sorted(_PROFILE_KEYS))})"
        )
    file, command = table.get("file"), table.get("command")
    if (file is None) == (command is None):
        raise ConfigError(f'{path}: {where} needs exactly one of file = "…" or command = "…"')
    for key, value in (("file", file), ("command", command)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"{path}: {where}.{key} must be a non-empty string")
    hosts = table.get("hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError(f"{path}: {where}.hosts must be a list of host patterns")
    default = table.get("default", False)
    if not isinstance(default, bool):
        raise ConfigError(f"{path}: {where}.default must be true or false")
    timeout = _typed(table.get("timeout", DEFAULT_COMMAND_TIMEOUT), float, path, f"{where}.timeout")
    if file is not None:
        file = os.path.expanduser(file)
        if not os.path.isabs(file):
            file = os.path.join(os.path.dirname(os.path.abspath(path)), file)
    return ProfileSource(
        name=name,
        file=file,
        command=command,
        timeout=timeout,
        hosts=tuple(h.lower() for h in hosts),
        default=default,
    )


def _sinks(value: Any, path: str) -> tuple[SinkSpec, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: sink must be an array of tables ([[sink]])")
    sinks = tuple(_sink(index, table, path) for index, table in enumerate(value, 1))
    seen: set[str] = set()
    for sink in sinks:
        if sink.path in seen:
            raise ConfigError(f"{path}: several sinks write {sink.path}")
        seen.add(sink.path)
    return sinks


def _sink(index: int, table: Any, path: str) -> SinkSpec:
    from aemagent.core.profiles import check_profile_name
    from aemagent.errors import UsageError

    where = f"sink {index}"
    table = _table(table, path, where)
    unknown = sorted(set(table) - _SINK_KEYS)
    if unknown:
        known = ", ".join(sorted(_SINK_KEYS))
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} in {where} (known: {known})")
    for key in ("profile", "path"):
        if not isinstance(table.get(key), str) or not table[key]:
            raise ConfigError(f'{path}: {where} needs {key} = "…"')
    try:
        profile = check_profile_name(table["profile"])
    except UsageError as exc:
        raise ConfigError(f"{path}: {where}: {exc}") from None
    target = os.path.expanduser(table["path"])
    if not os.path.isabs(target):
        raise ConfigError(f"{path}: {where}: path must be absolute, not {target!r}")
    target = os.path.normpath(target)
    where = f"sink {target}"
    fmt = table.get("format", "token")
    if fmt not in SINK_FORMATS:
        raise ConfigError(f"{path}: {where}: format must be token, header or json, not {fmt!r}")
    mode = _sink_mode(table.get("mode", 0o600), path, where)
    allow_disk = table.get("allow_disk", False)
    if not isinstance(allow_disk, bool):
        raise ConfigError(f"{path}: {where}: allow_disk must be true or false")
    return SinkSpec(profile, target, fmt, mode, allow_disk)


def _sink_mode(value: Any, path: str, where: str) -> int:
    """`mode = 0o600` (a TOML octal integer) or `mode = "0600"` (a string read as octal)."""
    if isinstance(value, str):
        text = value.removeprefix("0o")
        if not (text and text.isascii() and all(c in "01234567" for c in text)):
            raise ConfigError(f"{path}: {where}: mode {value!r} is not an octal number like 0600")
        value = int(text, 8)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f'{path}: {where}: mode must be like 0o600 or "0600"')
    if not 0 <= value <= 0o777:
        raise ConfigError(
            f"{path}: {where}: mode {value} is not permission bits (an integer mode is"
            ' written 0o600 in TOML; 600 is decimal); write 0o600 or "0600"'
        )
    if value & 0o400 == 0:
        raise ConfigError(f"{path}: {where}: mode {value:04o} would not let you read the file")
    return value


def save_profile(path: str, source: ProfileSource) -> None:
    """Record a profile's source in the config file: atomically, mode 0600, others kept.

    Comments in the file are not kept (tomli-w writes plain TOML); the README says so.
    """
    import tomli_w

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        data = {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot update config file {path}: {exc}") from None
    parse_config(data, path)  # refuse to rewrite a file we would refuse to read
    data.setdefault("profiles", {})[source.name] = source.to_toml()
    if source.default:
        for name, table in data["profiles"].items():
            if name != source.name:
                table.pop("default", None)
    target = _write_target(path)
    directory, name = os.path.split(target)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    _remove_stale_temporaries(directory, name)
    fd, temporary = _create_temporary(directory, name, path)
    try:
        with os.fdopen(fd, "wb") as f:
            tomli_w.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        with _suppress_oserror():
            os.unlink(temporary)
        raise


def _write_target(path: str) -> str:
    """The file to replace: `path` itself, or the file a symbolic link at `path` points to.

    A config.toml linked from a dotfiles repository stays a link: the file it points to is
    rewritten (in its own directory, so the rename is atomic). A link into a directory that
    does not exist is refused.
    """
    absolute = os.path.abspath(path)
    if not os.path.islink(absolute):
        return absolute
    target = os.path.realpath(absolute)
    if not os.path.isdir(os.path.dirname(target)):
        raise ConfigError(
            f"config file {path} is a symbolic link to {target}, whose directory does not exist"
        )
    if os.path.lexists(target) and not os.path.isfile(target):
        raise ConfigError(f"config file {path} points to {target}, which is not a regular file")
    return target


def _temporary_suffix() -> str:
    import secrets

    return secrets.token_hex(6)


def _create_temporary(directory: str, name: str, shown: str) -> tuple[int, str]:
    """A new 0600 file `.NAME.PID.RANDOM.tmp` beside NAME, created by us and never opened through
    a link: whatever was planted at that name makes us fail, not write somewhere else."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(3):
        temporary = os.path.join(directory, f".{name}.{os.getpid()}.{_temporary_suffix()}.tmp")
        try:
            fd = os.open(temporary, flags, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(
                f"cannot write config file {shown}: {exc.strerror or exc} ({temporary})"
            ) from None
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
        except BaseException:
            os.close(fd)
            with _suppress_oserror():
                os.unlink(temporary)
            raise
        return fd, temporary
    raise ConfigError(
        f"cannot write config file {shown}: temporary files named like {temporary} already exist"
    )


def _remove_stale_temporaries(directory: str, name: str) -> None:
    """Temporary files of saves killed before their rename (their process is gone).

    Their names are `.NAME.PID.RANDOM.tmp` (or `.NAME.PID.tmp` from older versions).
    """
    prefix, suffix = f".{name}.", ".tmp"
    for entry in os.listdir(directory):
        if not (entry.startswith(prefix) and entry.endswith(suffix)):
            continue
        pid, _, random = entry[len(prefix) : -len(suffix)].partition(".")
        if not pid.isdigit() or not (random == "" or random.isalnum()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with _suppress_oserror():
                os.unlink(os.path.join(directory, entry))
        except PermissionError:
            pass  # alive, someone else's


def _suppress_oserror() -> Any:
    import contextlib

    return contextlib.suppress(OSError)
