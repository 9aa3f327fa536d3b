"""Starting, finding and stopping the local Prefect and MLflow servers (for `make run`, `make ui`, tests).

Servers are started in their own process session, so one signal to the group stops the server and
every worker it spawned, and they outlive the command that started them (the UI stays browsable).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows.environment import mlflow_tracking_uri

STATE_DIR = Path(".cache/servers")


def bin_path(name: str) -> str:
    """A console script of this virtualenv (prefect, mlflow, dvc), whatever PATH says."""
    return str(Path(sys.executable).with_name(name))


def prefect_command(host: str, port: int) -> list[str]:
    return [bin_path("prefect"), "server", "start", "--host", host, "--port", str(port)]


def mlflow_command(host: str, port: int) -> list[str]:
    return [bin_path("mlflow"), "server", "--backend-store-uri", mlflow_tracking_uri(),
            "--host", host, "--port", str(port), "--workers", "1"]


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def start(name: str, command: list[str], health_url: str, timeout: float = 120.0,
          env: dict | None = None, state_dir: Path = STATE_DIR) -> int:
    """Start `command` detached, wait until `health_url` answers, return its pid."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log = open(state_dir / f"{name}.log", "ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, env=env)
    (state_dir / f"{name}.pid").write_text(str(process.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(health_url):
            return process.pid
        if process.poll() is not None:
            raise RuntimeError(f"{name} server exited with code {process.returncode}; see {state_dir / name}.log")
        time.sleep(0.5)
    stop_pid(process.pid)
    raise TimeoutError(f"{name} server did not answer {health_url} within {timeout:.0f} s; see {state_dir / name}.log")


def stop_pid(pid: int, grace: float = 10.0) -> None:
    """SIGINT the process group (servers shut down cleanly on it), then SIGKILL what is left."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            _reap(pid)
            time.sleep(0.2)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(name: str, state_dir: Path = STATE_DIR) -> bool:
    pid_file = state_dir / f"{name}.pid"
    if not pid_file.exists():
        return False
    stop_pid(int(pid_file.read_text()))
    pid_file.unlink()
    return True


def ensure_prefect(host: str = "127.0.0.1", port: int = 4200) -> str:
    """The API URL of a local Prefect server, started if none is answering."""
    api = f"http://{host}:{port}/api"
    if not healthy(f"{api}/health"):
        print(f"starting a Prefect server on http://{host}:{port} (log: {STATE_DIR}/prefect.log)", flush=True)
        start("prefect", prefect_command(host, port), f"{api}/health")
    return api


def ensure_mlflow(host: str = "127.0.0.1", port: int = 5000) -> str:
    url = f"http://{host}:{port}"
    if not healthy(f"{url}/health"):
        print(f"starting the MLflow UI on {url} (log: {STATE_DIR}/mlflow.log)", flush=True)
        start("mlflow", mlflow_command(host, port), f"{url}/health")
    return url
