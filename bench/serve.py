"""Serving throughput: aggregate generated tokens/s at 1 and at 32 concurrent clients, one server.

Starts `python -m serving` on a free port of 127.0.0.1 (the model given by --model, or by default
the 'tiny' preset with random weights and a character tokenizer, written to a temporary
folder), then runs rounds of closed-loop clients: each client sends a request, waits for the
whole answer, sends the next, for --seconds. Rounds alternate between the concurrency levels
(timings on a shared CPU drift) and the median of each level is reported, as one JSON line:

    {"clients_1": {"tokens_per_s": ..., "tokens_per_server_cpu_s": ..., "server_cpu_share": ...,
                   "requests_per_s": ..., "p50_ms": ..., "p99_ms": ...},
     "clients_32": {...}, "speedup": tokens/s at 32 over tokens/s at 1,
     "cpu_speedup": the same ratio per CPU-second used by the server's processes, ...}

On a machine shared with other work, the wall-clock speedup also measures the neighbours;
cpu_speedup (CPU time from psutil, summed over the server's process tree) does not.

--baseline-tree DIR also starts the server of another checkout (e.g. `git worktree add /tmp/old
REV`) on the same model and measures the two back to back in every round, each going first in
every other round, so both meet the same conditions; the report then has "baseline" (the same
fields) and "ratio" (this tree over the baseline, per level: tokens/s and tokens per server
CPU-second, the median of the rounds' paired ratios and their range). Run enough rounds to read
a few percent: two servers of the same tree came out up to 8% apart at the default 2 rounds
(--baseline-tree pointing at a worktree of the same commit).

Tokens are the `usage.completion_tokens` the server reports (a request may end early on a stop
token). Requests are non-streamed chat completions with max_tokens = --max-tokens, sampled at
temperature 1 with a seed per request, so runs are comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model folder or models:/ URI (default: random 'tiny' preset weights)")
    p.add_argument("--preset", default="tiny", help="preset for the random model (default: tiny)")
    p.add_argument("--clients", default="1,32", help="comma-separated concurrency levels (default: 1,32)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default: 64)")
    p.add_argument("--seconds", type=float, default=12.0, help="length of one round (default: 12)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per level, alternating; medians (default: 2)")
    p.add_argument("--max-batch-size", type=int, default=32, help="server's --max-batch-size (default: 32)")
    p.add_argument("--server-args", default="", help="extra arguments for python -m serving")
    p.add_argument("--baseline-tree", type=Path, help="another checkout whose server is measured alongside")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_model(folder: Path, preset: str) -> Path:
    import torch

    from llm.checkpoint import save_model_dir
    from llm.model import GPT, ModelConfig
    from llm.tokenizer import train_char

    text = (ROOT / "README.md").read_text()
    tokenizer = train_char([text], progress=False)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(preset, vocab_size=tokenizer.vocab_size))
    return save_model_dir(model, tokenizer, folder / "model")


def random_model_of(tree: Path, folder: Path, preset: str) -> Path:
    """The random model as `tree`'s code saves it: with a baseline, the older code writes it, since
    newer code reads older model folders and not the other way round."""
    code = (f"from pathlib import Path; from bench.serve import random_model; "
            f"print(random_model(Path({str(folder)!r}), {preset!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                          capture_output=True, text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def start_server(model: str, port: int, args, tree: Path = ROOT) -> subprocess.Popen:
    command = [sys.executable, "-m", "serving", "--model", model, "--port", str(port), "--name", "bench",
               "--max-batch-size", str(args.max_batch_size), "--max-tokens", str(max(args.max_tokens, 1)),
               *args.server_args.split()]
    env = {**os.environ, "PYTHONPATH": str(tree)}   # that tree's code, whatever is installed
    return subprocess.Popen(command, cwd=tree, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # backstop: nothing of the group may outlive the bench
    except ProcessLookupError:
        pass


async def wait_healthy(client, process, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        await asyncio.sleep(0.25)
    raise RuntimeError("the server did not become healthy")


def server_cpu_seconds(pid: int) -> float:
    """CPU time used so far by the server and every process it started."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


async def round_of(client, clients: int, seconds: float, max_tokens: int, seed_base: int, pid: int) -> dict:
    latencies, tokens, failures = [], 0, 0
    deadline = time.monotonic() + seconds
    cpu_before = server_cpu_seconds(pid)

    async def one_client(k: int):
        nonlocal tokens, failures
        n = 0
        while time.monotonic() < deadline:
            body = {"model": "bench", "max_tokens": max_tokens, "temperature": 1.0, "seed": seed_base + 1000 * k + n,
                    "messages": [{"role": "user", "content": "Tell me about the pipeline."}]}
            start = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                failures += 1
            else:
                tokens += response.json()["usage"]["completion_tokens"]
            n += 1

    start = time.perf_counter()
    await asyncio.gather(*(one_client(k) for k in range(clients)))
    elapsed = time.perf_counter() - start
    cpu = server_cpu_seconds(pid) - cpu_before
    latencies.sort()
    return {"tokens_per_s": tokens / elapsed, "tokens_per_server_cpu_s": tokens / max(cpu, 1e-9),
            "server_cpu_share": cpu / elapsed, "requests_per_s": len(latencies) / elapsed,
            "p50_ms": 1000 * latencies[len(latencies) // 2], "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "requests": len(latencies), "failures": failures}


async def measure(servers: list[tuple[int, subprocess.Popen]], args) -> tuple[list[dict], list[dict]]:
    """Per server, per level: the medians over rounds; every round visits each server in turn,
    in the opposite order the next round (whoever goes second meets a warmer or busier machine).
    Also, per server, per level, every round's result (for the paired ratios)."""
    import httpx

    levels = [int(c) for c in args.clients.split(",")]
    results = [{c: [] for c in levels} for _ in servers]
    limits = httpx.Limits(max_connections=max(levels) + 4)
    clients = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits) for port, _ in servers]
    try:
        for client, (_, process) in zip(clients, servers):
            await wait_healthy(client, process)
            await round_of(client, max(levels), 2.0, args.max_tokens, 0, process.pid)  # warm-up
        for r in range(args.rounds):
            order = list(range(len(servers)))[::-1 if r % 2 else 1]
            for c in levels:
                for i in order:
                    results[i][c].append(await round_of(clients[i], c, args.seconds, args.max_tokens,
                                                        10_000_000 * (r + 1), servers[i][1].pid))
    finally:
        for client in clients:
            await client.aclose()
    medians = [{c: {key: round(statistics.median(run[key] for run in runs), 2) for key in runs[0]}
                for c, runs in result.items()} for result in results]
    return medians, results


def paired_ratios(ours: dict, baseline: dict) -> dict:
    """Per level, this tree over the baseline round by round (each pair measured back to back):
    the median and the range, which is the noise to read any difference against."""
    report = {}
    for c in ours:
        level = {}
        for key in ("tokens_per_s", "tokens_per_server_cpu_s"):
            pairs = sorted(a[key] / b[key] for a, b in zip(ours[c], baseline[c]))
            level[key] = round(statistics.median(pairs), 3)
            level[f"{key}_range"] = [round(pairs[0], 3), round(pairs[-1], 3)]
        report[f"clients_{c}"] = level
    return report


def summary(levels: dict) -> dict:
    report = {f"clients_{c}": v for c, v in levels.items()}
    low, high = min(levels), max(levels)
    report["speedup"] = round(levels[high]["tokens_per_s"] / levels[low]["tokens_per_s"], 2)
    # The same ratio per CPU-second the server used: what batching saves, whatever else runs on
    # the machine (on a shared CPU the wall-clock ratio also measures the neighbours).
    report["cpu_speedup"] = round(levels[high]["tokens_per_server_cpu_s"] / levels[low]["tokens_per_server_cpu_s"], 2)
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        trees = [ROOT] + ([args.baseline_tree.resolve()] if args.baseline_tree else [])
        model = args.model or str(random_model_of(trees[-1], Path(tmp), args.preset) if args.baseline_tree
                                  else random_model(Path(tmp), args.preset))
        servers = []
        try:
            for tree in trees:
                port = free_port()
                servers.append((port, start_server(model, port, args, tree)))
            measured, rounds = asyncio.run(measure(servers, args))
        finally:
            for _, process in servers:
                stop_server(process)
    report = summary(measured[0])
    if args.baseline_tree:
        report["baseline"] = {**summary(measured[1]), "tree": str(args.baseline_tree)}
        report["ratio"] = paired_ratios(rounds[0], rounds[1])
    report.update(model=args.model or f"random {args.preset} preset", max_tokens=args.max_tokens,
                  seconds_per_round=args.seconds, rounds=args.rounds, max_batch_size=args.max_batch_size,
                  cpus=os.cpu_count(), torch=torch.__version__)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
