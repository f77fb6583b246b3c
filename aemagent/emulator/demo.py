"""`aemagent demo`: the whole flow on one machine, no Adobe account needed.

Runs the real programs, as a user would, each in its own process: the IMS emulator, the agent on a
private socket, `aemagent add`, `aemagent status`, `aem-token | curl` against the emulator's AEM
stand-in, `aemagent forget`. Everything lives in a temporary directory that is removed at the end,
and every process started here is stopped here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

from aemagent.errors import AemAgentError

_STEP_TIMEOUT = 40.0


class DemoError(AemAgentError):
    """A step of the demo failed; `aemagent demo` exits 1."""


def _aemagent(*args: str) -> list[str]:
    return [sys.executable, "-m", "aemagent", *args]


def _aem_token(*args: str) -> list[str]:
    return [sys.executable, "-m", "aemagent.helper", *args]


def _show(command: str) -> None:
    print(f"\n$ {command}", flush=True)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.rstrip().splitlines())


def _run(argv: list[str], env: dict[str, str], *, stdin: bytes | None = None) -> tuple[int, str]:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, env=env, timeout=_STEP_TIMEOUT, check=False
    )
    out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    if out.strip():
        print(_indent(out), flush=True)
    return done.returncode, done.stdout.decode(errors="replace")


@contextlib.contextmanager
def _process(
    argv: list[str], env: dict[str, str], log_path: str
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()


def _wait_for_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    from aemagent.cli.launch import agent_pid

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent_pid(path) is not None:
            return
        if proc.poll() is not None:
            raise DemoError(f"the agent exited with code {proc.returncode}")
        time.sleep(0.02)
    raise DemoError("the agent did not start in time")


def _fetch(url: str, header_line: str) -> tuple[int, str]:
    name, _, value = header_line.partition(":")
    req = urllib.request.Request(url, headers={name.strip(): value.strip()})  # noqa: S310 - ours
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def run(keep: bool = False) -> int:
    try:
        return _demo(keep)
    except DemoError as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        return 1


def _demo(keep: bool) -> int:
    workdir = tempfile.mkdtemp(prefix="aemagent-demo-")
    sock = os.path.join(workdir, "agent", "agent.sock")
    creds = os.path.join(workdir, "credentials")
    # The demo's programs see none of the user's aemagent settings: not their socket, not their
    # config file (its default profile would answer instead of the demo's credential, and its
    # `command`s would run), not their $AEMAGENT_PROFILE.
    config = os.path.join(workdir, "config.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEMAGENT_")}
    env.update(AEMAGENT_SOCK=sock, AEMAGENT_CONFIG=config)
    print(f"aemagent demo: everything below runs on this machine, in {workdir}")
    try:
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("# aemagent demo: an empty config file, so that the user's is not read\n")
        _show(f"aemagent emulator --port 0 --write-credentials {creds} &")
        with _process(
            _aemagent("emulator", "--port", "0", "--write-credentials", creds),
            env,
            os.path.join(workdir, "emulator.log"),
        ) as emulator:
            assert emulator.stdout is not None
            line = emulator.stdout.readline()
            if not line:
                raise DemoError("the IMS emulator did not start (see emulator.log)")
            started = json.loads(line)
            base, service = started["url"], started["credentials"]["service"]
            print(_indent(f"IMS emulator at {base}; service credentials in {service}"))

            _show(f"aemagent serve --socket {sock} &    # what `aemagent start` runs, detached")
            os.mkdir(os.path.dirname(sock), 0o700)
            with _process(
                _aemagent("serve", "--socket", sock), env, os.path.join(workdir, "agent.log")
            ) as agent:
                _wait_for_socket(sock, agent)
                print(_indent(f"agent pid {agent.pid} serving on {sock}"))
                _demo_steps(env, service, base)
                if keep:
                    print(f"\n--keep: leaving both running; AEMAGENT_SOCK={sock}")
                    print("press Ctrl-C to stop them")
                    with contextlib.suppress(KeyboardInterrupt):
                        agent.wait()
                _show("aemagent stop")
                _run(_aemagent("stop"), env)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ndemo OK: cleaned up {workdir}")
    return 0


def _demo_steps(env: dict[str, str], service: str, base: str) -> None:
    _show(f"aemagent add {service}")
    code, _ = _run(_aemagent("add", service), env)
    if code != 0:
        raise DemoError(f"`aemagent add` failed with exit code {code}")

    _show("aemagent status")
    _run(_aemagent("status"), env)

    url = f"{base}/aem/content/demo.json"
    curl = shutil.which("curl")
    _show(f"aem-token --format header | curl -sS -H @- {url}")
    token = subprocess.run(
        _aem_token("--format", "header"),
        capture_output=True,
        env=env,
        timeout=_STEP_TIMEOUT,
        check=False,
    )
    if token.returncode != 0:
        raise DemoError(f"aem-token failed: {token.stderr.decode().strip()}")
    if curl:
        done = subprocess.run(
            [curl, "-sS", "--noproxy", "*", "-w", "HTTP %{http_code}\n", "-H", "@-", url],
            input=token.stdout,
            capture_output=True,
            timeout=_STEP_TIMEOUT,
            check=False,
        )
        output = done.stdout.decode(errors="replace")
        print(_indent(output))
        ok = output.rstrip().endswith("HTTP 200")
    else:
        status, body = _fetch(url, token.stdout.decode())
        print(_indent(f"(no curl here: fetched with Python)\n{body}\nHTTP {status}"))
        ok = status == 200
    if not ok:
        raise DemoError("the authenticated request to the AEM stand-in failed")

    _show("aem-token --format json    # the token is shown here only as its fingerprint")
    done = subprocess.run(
        _aem_token("--format", "json"),
        capture_output=True,
        env=env,
        timeout=_STEP_TIMEOUT,
        check=False,
    )
    info = json.loads(done.stdout)
    from aemagent.core.logs import fingerprint

    info["access_token"] = f"<{fingerprint(info['access_token'])}>"
    print(_indent(json.dumps(info)))

    name = info["profile"]
    _show(f"aemagent forget {name}")
    _run(_aemagent("forget", name), env)
    _show('aem-token; echo "exit $?"')
    done = subprocess.run(
        _aem_token(), capture_output=True, env=env, timeout=_STEP_TIMEOUT, check=False
    )
    print(_indent(done.stderr.decode() + f"exit {done.returncode}"))
    if done.returncode != 3 or done.stdout:
        raise DemoError("aem-token still answered after `forget`")
