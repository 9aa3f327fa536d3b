"""Shared pieces of the serving tests: a tiny model folder, and a real server in a subprocess.

(No tests here; pytest puts this folder on sys.path, so the other test_serving* modules import it.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from llm.checkpoint import save_model_dir
from llm.model import GPT, ModelConfig
from llm.tokenizer import save_tokenizers, train_char, train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]

# Some multi-byte text, so byte-fallback tokens and byte spans get exercised.
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world! How are you today?",
         "Café naïve résumé", "東京 and 大阪", "a b c d e f g h i j k l m n o p"] * 10


def make_model_dir(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random 2-layer model with a character tokenizer, saved as a model folder."""
    tokenizer = train_char(TEXTS, progress=False)
    torch.manual_seed(seed)
    config = ModelConfig.from_preset("tiny", **{**dict(n_layer=2, d_model=64, n_head=4,
                                                       vocab_size=tokenizer.vocab_size), **overrides})
    return save_model_dir(GPT(config), tokenizer, folder)


def make_comparison_dir(folder: Path) -> Path:
    """Comparison tokenizers laid out as the tokenizer stage saves them: a small BPE and a char one."""
    return save_tokenizers({"bpe": train_sentencepiece(TEXTS, "bpe", 340, progress=False),
                            "char": train_char(TEXTS, progress=False)}, folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


class Server:
    """`python -m serving ...` in its own session (so Ctrl-C semantics are ours to test and the
    whole group can be killed as a backstop)."""

    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A file, not a pipe: a chatty server must never block on a full pipe.
        self.log = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, "-m", "serving", "--port", str(self.port), *args]
        self.process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=self.log,
                                        stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_healthy(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}:\n{self.output()[-5000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("server did not become healthy")

    def stop(self, timeout_s: float = 30, presses: int = 1) -> float:
        """SIGINT the server as Ctrl-C would (`presses` times, 0.2 s apart); the seconds until its
        whole process group was gone. Kills the group as a backstop and fails if anything had to be
        killed."""
        start = time.monotonic()
        try:
            for press in range(presses):
                if press:
                    time.sleep(0.2)
                self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=timeout_s)
            while group_alive(self.process.pid) and time.monotonic() - start < timeout_s:
                time.sleep(0.1)
            orphans = group_alive(self.process.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            if self.process.poll() is None:
                self.process.kill()
        assert not orphans, f"processes of the server outlived it:\n{self.output()[-3000:]}"
        return time.monotonic() - start


@contextlib.contextmanager
def running(*args: str, env: dict | None = None):
    server = Server(*args, env=env)
    try:
        server.wait_healthy()
        yield server
    finally:
        if server.process.poll() is None or group_alive(server.process.pid):
            server.stop()


def make_model_dir_with_snapshots(folder: Path, steps: int = 40, keep: int = 3, eval_every: int = 10,
                                  **snapshot_options) -> Path:
    """A tiny model trained for a few steps on TEXTS by the real loop, keeping snapshots as the
    pretrain stage does (step 0, then at evaluations), saved as a model folder with snapshots/."""
    from llm.data import write_token_file
    from llm.snapshots import SNAPSHOTS_DIR, Probe, SnapshotConfig, Snapshots, chosen_steps
    from llm.train import TrainConfig, evaluation_steps, load_datasets, train

    tokenizer = train_char(TEXTS, progress=False)
    work = folder.parent / f"{folder.name}-work"
    for split in ("train", "val"):
        write_token_file(work / f"{split}.bin", [tokenizer.encode(t) for t in TEXTS], vocab_size=tokenizer.vocab_size,
                         boundary_id=tokenizer.special_tokens["<|endoftext|>"],
                         tokenizer_fingerprint=tokenizer.fingerprint())
    config = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=steps, batch_size=4, eval_every=eval_every,
                         eval_steps=1, checkpoint_every=0, sample_tokens=0, threads=1, seed=0, progress=False)
    train_data, val_data = load_datasets(work / "train.bin", work / "val.bin", 32, config)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", n_layer=2, d_model=64, n_head=4, context_length=32,
                                        vocab_size=tokenizer.vocab_size))
    snapshot_config = SnapshotConfig(keep=keep, probe_text="The quick brown fox.", tokens=16, **snapshot_options)
    snapshots = Snapshots(work / SNAPSHOTS_DIR, snapshot_config, chosen_steps(evaluation_steps(config), keep),
                          [Probe("probe text", tokenizer.encode(snapshot_config.probe_text)),
                           Probe("training row", train_data.batch(0)[0][0].tolist())], tokenizer.token_text)
    snapshots.take(model, 0)
    result = train(model, train_data, val_data, config, work,
                   on_eval=lambda step, m: snapshots.take(model, step, m["val_loss"]))
    save_model_dir(model, tokenizer, folder)
    snapshots.finish(model, result.history, folder / SNAPSHOTS_DIR)
    return folder


def fuzz(url: str, *, max_examples: int, max_time_s: int, only: str | None = None) -> None:
    """schemathesis against the server's own /openapi.json (the operations whose path matches the
    regex `only`, or all): every check but positive_data_acceptance, since some valid-by-schema
    requests are refused on purpose (a prompt longer than the context, both `text` and `token_ids`).
    One worker: with several, hypothesis parses lambdas' source in threads, which CPython 3.11
    can fail on ("AST constructor recursion depth mismatch", seen once in CI here)."""
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    start = time.monotonic()
    result = subprocess.run(
        [cli, "--no-color", "run", f"{url}/openapi.json", "--checks", "all",
         "--exclude-checks", "positive_data_acceptance", "--max-examples", str(max_examples), "--seed", "1",
         "--max-time", str(max_time_s), "--workers", "1", "--request-timeout", "20", "--suppress-health-check", "all",
         *(["--include-path-regex", only] if only else [])],
        capture_output=True, text=True, timeout=120)
    print(f"schemathesis: {time.monotonic() - start:.0f} s\n{result.stdout[-1500:]}")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
