"""nginx in front of local replicas: the shipped configuration (``nginx.conf`` here, linked
from ``deploy/nginx/bitserve.conf``) with the replicas' addresses, the listening port and
the log path filled in, run in the foreground as a child process.

The file is used as shipped apart from those three things (and, for the benchmark's
comparison, round-robin in place of the conversation hash), so what the tests and the
benchmark measure is the configuration a deployment gets.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import httpx

from bitserve.api.process import stop_process

START_TIMEOUT_S = 10.0
# a run of `server host:port options;` lines in an upstream block
_SERVER_RUN = re.compile(
    r"^(?P<indent>[ \t]*)server [^\s;]+(?P<options>[^;\n]*);\n(?:[ \t]*server [^\n]*\n)*", re.M
)


class NginxError(RuntimeError):
    """nginx is missing, its configuration is refused, or it did not start."""


def shipped_config() -> str:
    """The configuration deploy/ ships (an http-context file)."""
    return resources.files("bitserve.cluster").joinpath("nginx.conf").read_text()


def render_config(
    replicas: Sequence[str], port: int, access_log: Path, *, affinity: bool = True
) -> str:
    """The shipped file for ``replicas`` (``host:port`` each, in both upstream blocks,
    with the file's own options), listening on ``127.0.0.1:port``. ``affinity=False``
    drops the conversation hash (plain round-robin), for the benchmark's comparison."""
    text = shipped_config()

    def servers(match: re.Match[str]) -> str:
        indent, options = match["indent"], match["options"]
        return "".join(f"{indent}server {r}{options};\n" for r in replicas)

    text, runs = _SERVER_RUN.subn(servers, text)
    replaced = [
        (r"^(\s*)listen \d+;", rf"\1listen 127.0.0.1:{port};"),
        (r"^(\s*)access_log \S+ bitserve;", rf"\1access_log {access_log} bitserve;"),
    ]
    if not affinity:
        replaced.append((r"^(\s*)hash \$bitserve_conversation consistent;", r"\1# round-robin"))
    for pattern, replacement in replaced:
        text, n = re.subn(pattern, replacement, text, flags=re.M)
        if n != 1:
            raise NginxError(f"the shipped nginx.conf no longer matches {pattern!r}")
    if runs != 2:
        raise NginxError("the shipped nginx.conf should have two upstream blocks")
    return text


def main_config(directory: Path, include: Path) -> str:
    """A whole nginx.conf around ``include``, everything in ``directory``, in the
    foreground (``daemon off``), so the process we start is nginx itself. Request bodies
    stay in memory (up to the site's 16 MB limit): started by root, the workers run as
    ``nobody``, who may not reach a temporary folder inside root's own."""
    temp = directory / "temp"
    return f"""daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    client_body_buffer_size 16m;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {include};
}}
"""


@dataclass
class NginxServer:
    """nginx on ``127.0.0.1:port`` with its files in ``directory``."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    def log_tail(self, chars: int = 3000) -> str:
        return (self.directory / "error.log").read_text(errors="replace")[-chars:]

    def access_lines(self) -> list[str]:
        try:
            return self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        """Graceful stop (SIGQUIT lets the requests in flight finish), then kill."""
        stop_process(self.process, signal.SIGQUIT, timeout_s=10)

    def __enter__(self) -> NginxServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def find_nginx() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None
    )
    if found is None:
        raise NginxError("nginx is not installed: install the 'nginx' package")
    return found


def start_nginx(
    directory: Path, replicas: Sequence[str], port: int, *, affinity: bool = True
) -> NginxServer:
    """Write the configuration into ``directory``, check it (``nginx -t``), start nginx
    and wait until it answers on ``port``. Answers count only once nginx has written its
    pid into its pid file, which it does after binding the port (``nginx -t`` leaves the
    file empty): before that, whatever else holds the port may be the one answering."""
    nginx = find_nginx()
    temp = directory / "temp"
    temp.mkdir(parents=True, exist_ok=True)
    temp.chmod(0o777)  # workers run as nobody when root starts nginx
    site = directory / "bitserve.conf"
    site.write_text(render_config(replicas, port, directory / "access.log", affinity=affinity))
    conf = directory / "nginx.conf"
    conf.write_text(main_config(directory, site))
    command = [nginx, "-p", str(directory), "-c", str(conf)]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
    if checked.returncode:
        raise NginxError(f"nginx refused the configuration:\n{checked.stderr}")
    with (directory / "stderr.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = NginxServer(directory, port, process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise NginxError(f"nginx exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if _pid_written(directory / "nginx.pid") != process.pid:
                raise httpx.ConnectError("nginx has not bound its port yet")
            httpx.get(f"{server.url}/health", timeout=2)
            return server
        except httpx.TransportError:
            if time.monotonic() > deadline:
                server.stop()
                raise NginxError(f"nginx did not answer:\n{server.log_tail()}") from None
            time.sleep(0.05)


def _pid_written(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
