"""Where training and inference run: the device, the autocast precision, and the GPU's peak FLOP/s.

`resolve_device` turns a setting ('auto', 'cpu', 'cuda', 'mps') into a torch.device, failing with a
reason when the hardware is missing; `resolve_dtype` and `autocast` choose the precision of the
forward pass; `peak_flops` and `model_flops_utilisation` say how much of the GPU the model uses.
"""

from __future__ import annotations

import contextlib
import re

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


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- throughput ---------------------------------------------------------------------------------

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
