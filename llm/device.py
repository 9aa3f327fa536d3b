"""Where training and inference run: the device, its precisions, and how fast it multiplies.

`resolve_device` turns a setting ('auto', 'cpu', 'cuda', 'mps') into a torch.device, failing with a
reason when the hardware is missing; `resolve_dtype` and `autocast` choose the precision of the
forward pass; `native_bf16` and `matmul_dtype` say whether the hardware multiplies bf16 itself;
`matmul_flops` measures a matmul's rate; `peak_flops` and `model_flops_utilisation` say how much of
the GPU the model uses. `python -m llm.device` prints all of it for this machine.

Why precision is the device's question: a GPU's tensor cores and a CPU with AMX or AVX512-BF16
multiply bf16 at 2x (or more) fp32's rate, but a CPU with only AVX2 (many AMD EPYCs, most laptops
before 2023) has no bf16 arithmetic: torch converts each number and a bf16 matmul runs ~100x
slower than fp32. So no path here hard-codes bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import time

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16")


# --- device and precision -----------------------------------------------------------------------

def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA GPU "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device='mps' but the Apple GPU backend is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype. bf16 on CUDA: tensor-core speed with fp32's exponent range, so no loss
    scaling. fp32 elsewhere: CPUs gain little from bf16, and exact resume is tested there."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware multiplies bf16 itself. On a CPU that takes AVX512-BF16 or AMX, and the
    kernels allowed to use them: ATEN_CPU_CAPABILITY=avx2 or ONEDNN_MAX_CPU_ISA=AVX2 (how one tries
    an AVX2 machine's paths on a newer CPU) rule them out even where the chip has them."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    has_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    onednn_capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith(("AVX2", "SSE", "AVX_"))
    return has_bf16 and cpu_capability().startswith("AVX512") and not onednn_capped


def cpu_capability() -> str:
    """The SIMD level torch's CPU kernels run at: 'AVX512', 'AVX2', 'DEFAULT' (honours ATEN_CPU_CAPABILITY)."""
    return torch.backends.cpu.get_cpu_capability()


def matmul_dtype(device: torch.device) -> torch.dtype:
    """The precision for work that is all matmuls and tolerates rounding (Muon's Newton-Schulz):
    bf16 where the hardware has it, fp32 where bf16 would be emulated."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def precision_note(device: torch.device, dtype: torch.dtype) -> str | None:
    """One line for a run whose precision falls back to fp32 for want of native bf16, or that asked
    for bf16 where it is emulated; None when the device does what was asked at full speed."""
    if device.type != "cpu" or native_bf16(device):
        return None
    if dtype == torch.bfloat16:
        return (f"warning: dtype=bfloat16 on a CPU without native bf16 ({cpu_capability()}): each bf16 matmul "
                "is emulated, ~100x slower than float32; use dtype: auto")
    return f"note: this CPU ({cpu_capability()}) has no native bf16: training runs in float32, Muon's Newton-Schulz too"


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- throughput ---------------------------------------------------------------------------------

def matmul_flops(dtype: torch.dtype, device: torch.device, shape: tuple[int, int, int] = (1024, 256, 1024),
                 seconds: float = 0.25) -> float:
    """FLOP/s of an (m x k) @ (k x n) matmul in `dtype`, the best of repeated calls for about
    `seconds` (after one warm-up call). The default shape is the tiny preset's MLP at 1024 tokens."""
    m, k, n = shape
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)

    def timed() -> float:
        began = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - began

    timed()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        took = timed()
        best, spent = min(best, took), spent + took
    return 2 * m * k * n / best


def describe(device: torch.device) -> dict:
    """What this machine is, as python -m llm.device prints it and the pretrain stage logs it."""
    facts = {"torch": torch.__version__, "device": str(device), "cpu_capability": cpu_capability(),
             "native_bf16": native_bf16(device), "threads": torch.get_num_threads(),
             "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
             "autocast_dtype": _name(resolve_dtype("auto", device)),
             "newton_schulz_dtype": _name(matmul_dtype(device))}
    for dtype in (torch.float32, torch.bfloat16):
        facts[f"matmul_{_name(dtype)}_gflops"] = round(matmul_flops(dtype, device) / 1e9, 1)
    return facts


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Dense (no sparsity) bf16 tensor-core peak FLOP/s per GPU, from the vendors' datasheets. The
# first pattern that matches torch.cuda.get_device_name() wins; unknown GPUs get no MFU rather
# than a guess.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"\bGH200\b", 989e12),
    (r"\bH200\b", 989e12),
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH100\b.*\bNVL\b", 835e12),
    (r"\bH100\b", 989e12),              # SXM, e.g. "NVIDIA H100 80GB HBM3"
    (r"\bB200\b", 2250e12),
    (r"\bA100\b", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),               # not A10G, whose figure NVIDIA does not publish
)


def peak_flops_of(gpu_name: str) -> float | None:
    """The bf16 dense peak of a GPU by its name, or None if it is not in the table."""
    return next((flops for pattern, flops in PEAK_BF16_FLOPS if re.search(pattern, gpu_name)), None)


def peak_flops(device: torch.device) -> float | None:
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def model_flops_utilisation(tokens_per_s: float, flops_per_tok: int, peak: float | None) -> float | None:
    """MFU: the share of the GPU's peak that the model's own arithmetic (6N + attention) uses.
    With several GPUs, tokens_per_s and peak are the totals of all of them."""
    return None if peak is None else tokens_per_s * flops_per_tok / peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="What this machine is: CPU SIMD level, native bf16 or not, threads, measured fp32 and bf16 "
                    "matmul GFLOP/s, the GPU if any, and the precisions training picks here.")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of aligned lines")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    facts = describe(device)
    if args.json:
        print(json.dumps(facts))
        return
    for key, value in facts.items():
        print(f"{key:<24}{value}")
    note = precision_note(device, resolve_dtype("auto", device))
    if note:
        print(note)


if __name__ == "__main__":
    main()
