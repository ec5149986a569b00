"""A rank on another Mac: its command line through ssh, as `mlx.launch` builds it.

Why ssh and not a small agent on each Mac: ssh is already how `mlx.launch` reaches the other
Macs (so a user who ran mlx_lm under it has keys and `Remote Login` set up), it
authenticates and encrypts without a port or a key format of ours, and with `-tt` the
remote rank gets SIGHUP the moment the connection drops — when the supervisor, the orphan
guard or the stop escalation kills the local `ssh`, the remote rank dies with it, which is
the property an agent would have to re-implement (and keep alive itself). The cost: one
ssh connection per remote rank for the whole attempt, and no SIGSTOP/SIGCONT across it
(a stopped remote rank is seen as silent and killed through its connection).

The script is mlx's (mlx/_distributed_utils/launch.py `make_launch_script`, 0.32.4): change
to the working directory, export the variables, write the hostfile's *content* to a temp
file on the remote host (the hostfile lives there, not here), `exec` the command.

Secrets never go on a command line (the ssh command's argv is visible to every local user
in `ps`): the attempt's telemetry token and the rank's CURVE keys (telemetry from a remote
rank goes to the supervisor's CURVE-authenticated TCP endpoint, supervisor/daemon/curve.py)
travel in the ssh process's environment as one `LC_OVERNIGHT` variable (base64 of shell
exports), sent with `-o SendEnv=LC_OVERNIGHT`: macOS's sshd accepts `LC_*` by default
(`AcceptEnv LANG LC_*` in /etc/ssh/sshd_config). A server that does not accept it leaves
the rank without a token: its telemetry is not believed and the attempt ends as a hang
naming that rank — the README says to check AcceptEnv.
"""

from __future__ import annotations

import base64
import os
import shlex
import socket
import subprocess
import sys

from shared.errors import ConfigError

SECRETS_ENV = "LC_OVERNIGHT"  # LC_*: accepted by macOS's sshd by default
SSH_OPTIONS = ("-tt", "-o", "BatchMode=yes", "-o", "LogLevel=QUIET",
               "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
               "-o", f"SendEnv={SECRETS_ENV}")
SECRET = ("OVERNIGHT_TELEMETRY_TOKEN", "OVERNIGHT_CURVE_SERVER", "OVERNIGHT_CURVE_PUBLIC",
          "OVERNIGHT_CURVE_SECRET")
# What a remote rank's environment gets from ours (the rest is the remote login's own).
PASSED = ("MLX_RANK", "OVERNIGHT_WORLD_SIZE", "OVERNIGHT_TELEMETRY_TOKEN", "OVERNIGHT_INJECT",
          "OVERNIGHT_INJECT_RANK", "OVERNIGHT_CURVE_SERVER", "OVERNIGHT_CURVE_PUBLIC",
          "OVERNIGHT_CURVE_SECRET", "MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES",
          "PYTHONUNBUFFERED")


def resolve_ip(host: str) -> str:
    """The IPv4 address of an ssh host name (mlx's ring backend needs IPs in the hostfile);
    ConfigError naming the host when it does not resolve."""
    name = host.split("@")[-1]
    try:
        return socket.gethostbyname(name)
    except OSError as e:
        raise ConfigError(f"distributed.hosts: {host!r} does not resolve ({e}); use a "
                          "name in /etc/hosts or ~/.ssh/config, or its IP") from None


def check_hosts(hosts: list[str], timeout: float = 15.0) -> None:
    """Every remote host resolves and answers ssh without a password (`ssh -o BatchMode=yes
    -o ConnectTimeout=5 host true`), checked once when the supervisor starts; ConfigError
    (one line, exit 78) naming the first that does not, with ssh's last line."""
    for host in hosts:
        if host.split("@")[-1] in ("", "localhost", "127.0.0.1", "::1"):
            continue
        resolve_ip(host)
        try:
            res = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host,
                                  "true"], stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ConfigError(f"distributed.hosts: {host!r} is unreachable over ssh ({e})"
                              ) from None
        if res.returncode != 0:
            said = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
            raise ConfigError(f"distributed.hosts: {host!r} is unreachable over ssh "
                              f"without a password: {said}")


def launch_script(argv: list[str], env: dict[str, str], files: dict[str, str] | str,
                  cwd: str, python: str) -> str:
    """The bash script a remote rank runs (module docstring): cd, exports, each of `files`
    ({variable: content}; a str: the ring's hostfile) in a temp file named by its variable,
    exec. `argv[0]` (this machine's Python) becomes `python`."""
    if isinstance(files, str):
        files = {"MLX_HOSTFILE": files}
    q = shlex.quote
    script = "stty -echo 2>/dev/null; "
    script += (f"cd {q(cwd)} || {{ echo 'overnight: no directory '{q(cwd)}' on' "
               "$(hostname) >&2; exit 78; }; ")
    for key in PASSED:
        if key in env and key not in SECRET:
            script += f"export {key}={q(env[key])}; "
    script += (f'[ -n "${SECRETS_ENV}" ] && eval "$(printf %s "${SECRETS_ENV}" | base64 -d)"; '
               f"unset {SECRETS_ENV}; ")
    for name, content in files.items():
        script += f"fname=$(mktemp); printf '%s' {q(content)} > $fname; export {name}=$fname; "
    command = [python or argv[0], *argv[1:]]
    script += "exec " + " ".join(q(a) for a in command)
    return script


def secrets_env(env: dict[str, str]) -> dict[str, str]:
    """The ssh process's extra environment: the secrets of `env` as LC_OVERNIGHT."""
    exports = "".join(f"export {k}={shlex.quote(env[k])}; " for k in SECRET if k in env)
    return {SECRETS_ENV: base64.b64encode(exports.encode()).decode()} if exports else {}


def remote_argv(host: str, argv: list[str], env: dict[str, str], files: dict[str, str] | str,
                python: str = "", cwd: str = "") -> list[str]:
    """`ssh -tt … host script` for one remote rank (module docstring); no secret in it."""
    script = launch_script(argv, env, files, cwd or os.getcwd(), python or sys.executable)
    return ["ssh", *SSH_OPTIONS, host, script]
