"""`vimpac server`: a Prefect server and an MLflow server for one data root.

Both keep their state in the data root (Prefect's SQLite database under `prefect/`, MLflow's
`mlflow/mlflow.db` and `mlflow/artifacts/`), so the UIs show the runs the CLI made before the
servers existed. They bind to 127.0.0.1 unless `--host` says otherwise: neither server has
authentication. While they run, `<home>/servers.json` tells every other vimpac command in the
same data root where they are (flows/env.py), so CLI runs and UI runs land in the same place.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from warehouse.layout import DataRoot

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SERVERS_FILE = "servers.json"


@dataclass
class Service:
    name: str
    command: list[str]
    url: str  # what a browser opens
    health: str  # answers 200 once the server is ready
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment
    process: subprocess.Popen | None = None

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _executable(name: str) -> str:
    """The console script installed beside this interpreter (the venv's), else one on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"`{name}` is not installed in this environment (pip install -e . installs it)")
    return found


def services(root: DataRoot, host: str, prefect_port: int, mlflow_port: int) -> list[Service]:
    logs = root.home / "logs"
    h = _url_host(host)
    prefect = Service(
        "prefect",
        [_executable("prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
        f"http://{h}:{prefect_port}", f"http://{h}:{prefect_port}/api/health", logs / "prefect-server.log",
        # The browser app asks this address for its data; left alone it assumes port 4200.
        # Behind a proxy or on another interface, set PREFECT_UI_API_URL to what browsers reach.
        {"PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL") or f"http://{h}:{prefect_port}/api"}
        # SQLite waits this long for a writer's lock before the API answers 503. Its 10 s default
        # expired on a loaded 2-core machine while `serve` wrote task runs (CI, stop 20).
        | {"PREFECT_SERVER_DATABASE_TIMEOUT": os.environ.get("PREFECT_SERVER_DATABASE_TIMEOUT") or "60"},
    )
    mlflow = Service(
        "mlflow",
        [_executable("mlflow"), "server", "--host", host, "--port", str(mlflow_port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root.mlflow_dir / 'mlflow.db'}",
         # Artifacts stay where CLI runs put them, so runs made before and after the server
         # started read the same way.
         "--default-artifact-root", (root.mlflow_dir / "artifacts").as_uri()],
        f"http://{h}:{mlflow_port}", f"http://{h}:{mlflow_port}/health", logs / "mlflow-server.log",
    )
    return [prefect, mlflow]


def healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(svc: Service, grace_s: float = 20.0) -> None:
    p = svc.process
    if p is None or p.poll() is not None:
        return
    # Each server runs in its own session: signal the whole group (uvicorn/gunicorn workers too).
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class ServerNotAnswering(RuntimeError):
    """`vimpac server` runs for this data root but its Prefect server does not answer."""


def _server_process_alive(info: dict) -> bool | None:
    """Whether the `vimpac server` that wrote `info` still runs: None when it ran on another
    machine (a data root on shared storage), where its process cannot be checked."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return None
    try:
        cmdline = Path(f"/proc/{info['pid']}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # A recycled pid belongs to some other program.
    return b"server" in cmdline


def running_servers(root: DataRoot, *, patience_s: float = 30.0) -> dict | None:
    """What `vimpac server` wrote for this data root, if those servers still run.

    A server busy with a large flow run can take seconds to answer, and a command that gave
    up on it would silently run against a private temporary server instead, invisible in the
    UI. So while the `vimpac server` process is alive its servers get `patience_s` to answer,
    and then this raises ServerNotAnswering rather than guessing. A file left by a server
    that is gone is ignored."""
    path = root.home / SERVERS_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    health = info.get("prefect_api_url", "") + "/health"
    alive = _server_process_alive(info)
    if alive is False:
        return None
    deadline = time.monotonic() + (patience_s if alive else 0.0)
    while True:
        if healthy(health, timeout=5.0):
            return info
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if alive is None:
        return None
    raise ServerNotAnswering(
        f"`vimpac server` (pid {info['pid']}) runs for data root {root.home} but its Prefect server at {health} "
        f"did not answer within {patience_s:.0f} s; see {root.home / 'logs' / 'prefect-server.log'}, or stop that "
        f"`vimpac server` (Ctrl-C) to run without it")


def run_servers(root: DataRoot, host: str = "127.0.0.1", prefect_port: int = 4200, mlflow_port: int = 5000, *,
                startup_timeout_s: float = 180.0, say: Callable[[str], None] = print) -> int:
    """Start both servers, wait until they answer, print where they are, and keep them running
    until Ctrl-C/SIGTERM (then stop both) or until one of them dies (then stop the other and
    fail with its log)."""
    root.ensure()
    if host not in LOOPBACK:
        say(f"warning: binding to {host}: the Prefect and MLflow servers have no authentication; "
            "anyone who can reach this address can read and start runs. MLflow answers only requests addressed to "
            "localhost or a private IP (DNS-rebinding protection); for a host name, set MLFLOW_SERVER_ALLOWED_HOSTS "
            "(e.g. 'ml-head:5000,localhost:*'), and PREFECT_UI_API_URL to the Prefect API address browsers reach")
    svcs = services(root, host, prefect_port, mlflow_port)
    info_path = root.home / SERVERS_FILE
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    env = dict(os.environ)
    # The servers must not talk to themselves (or another server) as clients.
    env.pop("PREFECT_API_URL", None)
    try:
        for svc in svcs:
            svc.log.parent.mkdir(parents=True, exist_ok=True)
            with open(svc.log, "ab") as log:
                svc.process = subprocess.Popen(svc.command, stdout=log, stderr=subprocess.STDOUT, env=env | svc.env,
                                               start_new_session=True, cwd=root.home)
        deadline = time.monotonic() + startup_timeout_s
        pending = list(svcs)
        while pending and not stopping:
            for svc in list(pending):
                if svc.process.poll() is not None:
                    say(f"vimpac server: the {svc.name} server exited with code {svc.process.returncode} while starting; "
                        f"last lines of {svc.log}:\n{svc.tail()}")
                    return 1
                if healthy(svc.health):
                    pending.remove(svc)
            if pending and time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                say(f"vimpac server: {names} did not answer within {startup_timeout_s:.0f} s; see {', '.join(str(s.log) for s in pending)}")
                return 1
            time.sleep(0.5)
        if stopping:
            return 0
        prefect, mlflow = svcs
        info = {"prefect_ui_url": prefect.url, "prefect_api_url": f"{prefect.url}/api", "mlflow_url": mlflow.url,
                "pid": os.getpid(), "host": socket.gethostname(), "home": str(root.home)}
        tmp = info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(info_path)
        say(f"Prefect UI:  {prefect.url}        (API {prefect.url}/api; log {prefect.log})")
        say(f"MLflow UI:   {mlflow.url}        (log {mlflow.log})")
        say(f"data root:   {root.home}")
        say("vimpac commands with this data root now report to these servers; in another shell:")
        say(f"  vimpac --home {root.home} serve       # register and serve the deployments")
        say(f"  export PREFECT_API_URL={prefect.url}/api MLFLOW_TRACKING_URI={mlflow.url}   # for other Prefect/MLflow clients")
        say("Ctrl-C stops both servers.")
        while not stopping:
            for svc in svcs:
                if svc.process.poll() is not None:
                    say(f"vimpac server: the {svc.name} server exited with code {svc.process.returncode}; "
                        f"stopping the other. Last lines of {svc.log}:\n{svc.tail()}")
                    return 1
            time.sleep(0.5)
        say("vimpac server: stopping")
        return 0
    finally:
        for svc in reversed(svcs):
            _stop(svc)
        try:
            if json.loads(info_path.read_text()).get("pid") == os.getpid():
                info_path.unlink()
        except (OSError, ValueError):
            pass
        for s, handler in previous.items():
            signal.signal(s, handler)
