"""Shared fixtures: a real Prefect server for the session, and throwaway pipeline repositories."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flows  # noqa: F401  (the project's quiet/offline environment defaults)
from flows import servers

from judge_model import judge_gguf  # noqa: F401  (a session fixture shared by the judge tests)

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Prefect binds its console log handler to the sys.stderr of the moment it is first imported:
    # import it now (after flows' environment defaults, under pytest's session-wide capture), not
    # first inside a test whose capsys stream closes after it (later in-process flow runs then fail
    # writing their logs).
    import prefect.main  # noqa: F401
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """train.bin / val.bin of learnable token documents (train_driver.make_token_files), per module."""
    from train_driver import make_token_files

    directory = tmp_path_factory.mktemp("tokens")
    make_token_files(directory)
    return directory


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and on a busy 2-core machine torch's two-thread
    kernels stall for seconds: modules that use this pin one thread, and restore it after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> str:
    """A real Prefect server on a free port with its own database, for the whole test session.

    One server instead of an ephemeral API per stage saves starting one for every stage run.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    api = f"http://127.0.0.1:{port}/api"
    pid = servers.start("prefect", servers.prefect_command("127.0.0.1", port), f"{api}/health",
                        env=env, state_dir=home)
    os.environ["PREFECT_API_URL"] = api  # for stage subprocesses
    with temporary_settings(updates={PREFECT_API_URL: api}):  # for this process's client
        yield api
    servers.stop_pid(pid)
    os.environ.pop("PREFECT_API_URL", None)


def drain_flow_workers() -> None:
    """Flows run in this process ship their logs and events from background workers: let them
    finish while the session's Prefect server still answers, or they retry at exit for a minute."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()


@pytest.fixture
def pipeline_repo(tmp_path) -> Path:
    """A fresh git + DVC repository holding this project's pipeline code and dvc.yaml."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("llm", "flows"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / ".gitignore").write_text("/data/\n/mlflow.db\n/mlruns/\n/.cache/\n/.prefect/\n")
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "test@example.invalid"], repo)
    run(["git", "config", "user.name", "test"], repo)
    run([str(VENV_BIN / "dvc"), "init", "-q"], repo)
    return repo


def stage_env(repo: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
    env.pop("LLM_PIPELINE_RUN_ID", None)
    env.update(extra)
    return env


def run(command: list[str], cwd: Path, env: dict | None = None, check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess:
    began = time.monotonic()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    # Shown with a failure (and with -s): which command of a long end-to-end test took the time.
    print(f"[{time.monotonic() - began:6.1f} s] {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(command))}")
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
    return result


def dvc(repo: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(VENV_BIN / "dvc"), *args], repo, env or stage_env(repo), check=check)


# The longest files first (pytest --durations on 2 cores): with two workers (make test) they then
# run beside each other and the short ones fill in after, instead of one long file ending the run alone.
LONGEST_FIRST = ("test_pipeline.py", "test_experiments.py", "test_workers.py", "test_download_stage.py",
                 "test_distributed.py", "test_scale_out.py", "test_serving.py", "test_judge_server.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: each file keeps its order
