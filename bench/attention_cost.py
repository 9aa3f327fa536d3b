"""Attention's cost against the context length: one attention layer, explicit softmax vs. SDPA.

For each length T (doubling from --min-length to --max-length), one forward of the model's own
attention layer (`llm.model.Attention`, built from --preset) over --batch-size rows runs two ways:

- "explicit": the layer with return_attention=True, as the introspection endpoints run it:
  scores = q k^T / sqrt(D), masked, softmaxed and kept: (B, H, T, T) numbers, several copies.
- "sdpa": the layer as training runs it, F.scaled_dot_product_attention, a fused kernel that
  works through the keys in blocks and never holds the T x T matrix.

Time: the median of --repeats forwards after one warm-up, without autograd. Peak memory: what the
forward needed beyond its inputs. On a CPU each measurement runs in a fresh (forked) process and
reads the peak resident size from Linux (/proc/self/status VmHWM, reset before the forward); on
CUDA it is torch.cuda.max_memory_allocated.

Memory cap: every measurement may use at most --memory-cap-mb beyond its inputs (CPU: the
process's data limit, RLIMIT_DATA; CUDA: a per-process memory fraction). An allocation past it
fails, as on a machine with that much free memory: the path is recorded as out of memory at that
length and not tried at longer ones. The explicit path's memory grows with T^2, the fused
kernel's with T, so the explicit one runs out first.

Fit: the exponent p of time ~ T^p and memory ~ T^p by least squares on log-log over the lengths
>= --fit-from (short sequences are dominated by per-call costs that do not grow with T).

    .venv/bin/python bench/attention_cost.py                  # CPU: tiny preset, T = 128 .. 16384
    .venv/bin/python bench/attention_cost.py --device cuda --max-length 65536 --memory-cap-mb 8192 \\
        --out bench/results/h100-attention-cost-$(date +%Y%m%d).json

Prints one JSON line: {"bench": "attention_cost", "rows": [{"path", "length", "ms", "peak_mb",
"out_of_memory"}, ...], "fit": {"explicit": {"time_exponent", "memory_exponent"}, "sdpa": {...}},
"out_of_memory_at": {"explicit": T or null, "sdpa": T or null}, ...}.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

# Run as a script from anywhere: make the repository's packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.report import context, emit  # noqa: E402
from llm.allocator import return_freed_memory  # noqa: E402
from llm.model import Attention, ModelConfig  # noqa: E402

PATHS = ("explicit", "sdpa")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset whose attention layer is measured (default: tiny)")
    p.add_argument("--min-length", type=int, default=128, help="shortest sequence (default: 128)")
    p.add_argument("--max-length", type=int, default=16384, help="longest sequence; lengths double (default: 16384)")
    p.add_argument("--batch-size", type=int, default=1, help="rows per forward (default: 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per point; the median is kept (default: 5)")
    p.add_argument("--memory-cap-mb", type=float, default=1024,
                   help="memory a forward may use beyond its inputs; past it the path is out of memory (default: 1024)")
    p.add_argument("--fit-from", type=int, default=1024,
                   help="fit the exponents over lengths >= this (default: 1024; all lengths if fewer than 2)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0 = torch's default)")
    p.add_argument("--out", help="also save the JSON report here")
    args = p.parse_args(argv)
    if not (0 < args.min_length <= args.max_length):
        p.error("--min-length must be positive and at most --max-length")
    if args.memory_cap_mb <= 0:
        p.error("--memory-cap-mb must be positive")
    return args


def lengths(args) -> list[int]:
    out, T = [], args.min_length
    while T <= args.max_length:
        out.append(T)
        T *= 2
    return out


# --- one measurement --------------------------------------------------------------------------------

def _layer_and_input(args, T: int, device: torch.device):
    config = ModelConfig.from_preset(args.preset, context_length=max(T, 16), dropout=0.0)
    torch.manual_seed(0)
    layer = Attention(config, layer=0).to(device).eval()
    x = torch.randn(args.batch_size, T, config.d_model, device=device)
    return layer, x


def _forward(layer, x, path: str) -> None:
    # rope=None: positions do not change attention's cost; mask=None: plain causal attention.
    y, probs = layer(x, None, None, path == "explicit")
    del y, probs


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _is_out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text \
        or "out of memory" in text


def measure_cpu(args, path: str, T: int) -> dict:
    """In this (fresh) process: time and peak resident memory of the forward, under the cap."""
    return_freed_memory()   # the peak read is then what was live, not the heap's high-water mark
    layer, x = _layer_and_input(args, T, torch.device("cpu"))
    with torch.no_grad():
        _forward(layer, x[:, :16], path)      # start the thread pool before the limit is set
        # The cap: the data segment may grow by at most the cap from here (Linux counts anonymous
        # mappings, where large tensors live, as data).
        cap = int(args.memory_cap_mb * 2**20)
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        limit = _proc_status_kb("VmData") * 1024 + cap
        resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
        Path("/proc/self/clear_refs").write_text("5")     # reset the peak (VmHWM) to the current size
        before_kb = _proc_status_kb("VmRSS")
        try:
            times = []
            for i in range(args.repeats + 1):             # the first is the warm-up
                start = time.perf_counter()
                _forward(layer, x, path)
                if i:
                    times.append(time.perf_counter() - start)
        except RuntimeError as err:
            if not _is_out_of_memory(err):
                raise
            return {"path": path, "length": T, "ms": None, "peak_mb": None, "out_of_memory": True}
        finally:
            resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
        peak_mb = (_proc_status_kb("VmHWM") - before_kb) / 1024
    return {"path": path, "length": T, "ms": statistics.median(times) * 1e3, "peak_mb": peak_mb,
            "out_of_memory": False}


def measure_cuda(args, path: str, T: int) -> dict:
    device = torch.device("cuda")
    layer, x = _layer_and_input(args, T, device)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (base + args.memory_cap_mb * 2**20) / total))
    torch.cuda.reset_peak_memory_stats()
    try:
        with torch.no_grad():
            times = []
            for i in range(args.repeats + 1):
                torch.cuda.synchronize()
                start = time.perf_counter()
                _forward(layer, x, path)
                torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {"path": path, "length": T, "ms": None, "peak_mb": None, "out_of_memory": True}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"path": path, "length": T, "ms": statistics.median(times) * 1e3, "peak_mb": peak_mb,
            "out_of_memory": False}


def _child(args, path, T, conn):
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        conn.send(measure_cpu(args, path, T))
    except BaseException as err:  # hand the parent the error rather than dying silently
        conn.send({"error": f"{type(err).__name__}: {err}"})
    finally:
        conn.close()


def measure(args, path: str, T: int) -> dict:
    """One point. On a CPU in a forked process of its own, so the peak it reads is its own."""
    if args.device == "cuda":
        return measure_cuda(args, path, T)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(args, path, T, child))
    proc.start()
    child.close()
    try:
        row = parent.recv()
    except EOFError:  # killed (the kernel's OOM killer, say): the point ran out of memory
        row = {"path": path, "length": T, "ms": None, "peak_mb": None, "out_of_memory": True}
    proc.join()
    if "error" in row:
        raise RuntimeError(f"{path} at T={T}: {row['error']}")
    return row


# --- the fit ----------------------------------------------------------------------------------------

def fit_exponent(points: list[tuple[float, float]]) -> float | None:
    """The slope p of log y = p log x + c, least squares; None with fewer than 2 usable points."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None


def fits(rows: list[dict], fit_from: int) -> dict:
    out = {}
    for path in PATHS:
        done = [r for r in rows if r["path"] == path and not r["out_of_memory"]]
        upper = [r for r in done if r["length"] >= fit_from]
        use = upper if len(upper) >= 2 else done
        out[path] = {"time_exponent": fit_exponent([(r["length"], r["ms"]) for r in use]),
                     "memory_exponent": fit_exponent([(r["length"], r["peak_mb"]) for r in use]),
                     "fit_lengths": [r["length"] for r in use]}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA device; use --device cpu")
    if args.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        sys.exit("error: on a CPU this bench reads peak memory from Linux's /proc (VmHWM); run it on Linux")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = context("attention_cost", torch.device(args.device), "bench/attention_cost.py", argv)
    config = ModelConfig.from_preset(args.preset)
    report.update({"preset": args.preset, "n_head": config.n_head, "n_kv_head": config.n_kv_head,
                   "head_dim": config.head_dim, "batch_size": args.batch_size, "memory_cap_mb": args.memory_cap_mb,
                   "repeats": args.repeats})
    rows, out_of_memory_at = [], {path: None for path in PATHS}
    for T in lengths(args):
        for path in PATHS:   # the two paths take turns at each length (a shared machine drifts)
            if out_of_memory_at[path] is not None:
                continue
            row = measure(args, path, T)
            rows.append(row)
            if row["out_of_memory"]:
                out_of_memory_at[path] = T
            shown = "out of memory" if row["out_of_memory"] else f"{row['ms']:9.2f} ms {row['peak_mb']:9.1f} MB"
            print(f"{path:8s} T={T:6d}  {shown}", file=sys.stderr)
    measured = [r["peak_mb"] for r in rows if not r["out_of_memory"]]
    if args.device == "cpu" and measured and max(measured) <= 0:
        # Forked from a process whose freed memory is still resident, the forward reuses it and the
        # peak never moves: a figure of 0 would be wrong, not small.
        sys.exit("error: every peak memory read 0 MB; run this bench as its own process "
                 "(python bench/attention_cost.py), not from inside a long-running one")
    report.update({"rows": rows, "fit": fits(rows, args.fit_from), "out_of_memory_at": out_of_memory_at})
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
