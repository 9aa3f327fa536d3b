"""llm.device: resolving the device and the autocast dtype, native bf16, the measured matmul rate,
python -m llm.device, and the GPU peak FLOP/s table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llm import device as devices
from llm.device import autocast, model_flops_utilisation, peak_flops_of, resolve_device, resolve_dtype


def test_device_and_precision_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(RuntimeError, match="device='cuda'"):
            resolve_device("cuda")


def test_float32_runs_without_autocast_and_bfloat16_with_it():
    x = torch.ones(2, 2)
    with autocast(torch.device("cpu"), torch.float32):
        assert (x @ x).dtype == torch.float32
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12), ("NVIDIA A10", 125e12),
    ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 3090", None), ("Tesla V100-SXM2-16GB", None),
])
def test_peak_flops_table_knows_common_gpus_and_does_not_guess(name, peak):
    assert peak_flops_of(name) == peak


def test_mfu_is_the_share_of_the_peak_and_unknown_without_one():
    assert model_flops_utilisation(1000.0, 6 * 10**9, 12e12) == pytest.approx(0.5)
    assert model_flops_utilisation(1000.0, 6 * 10**9, None) is None


def test_native_bf16_needs_the_instructions_and_kernels_allowed_to_use_them(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(devices, "cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert devices.native_bf16(cpu) and devices.matmul_dtype(cpu) == torch.bfloat16
    assert devices.precision_note(cpu, torch.bfloat16) is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not devices.native_bf16(cpu) and devices.matmul_dtype(cpu) == torch.float32
    assert "no native bf16" in devices.precision_note(cpu, torch.float32)
    assert "~100x slower" in devices.precision_note(cpu, torch.bfloat16)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not devices.native_bf16(cpu)


def test_matmul_rate_is_measured_and_plausible():
    rate = devices.matmul_flops(torch.float32, torch.device("cpu"), shape=(256, 128, 256), seconds=0.05)
    assert 1e8 < rate < 1e14


def test_python_m_llm_device_prints_the_machine():
    out = subprocess.run([sys.executable, "-m", "llm.device", "--json"], capture_output=True, text=True, check=True)
    facts = json.loads(out.stdout)
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert facts["native_bf16"] == devices.native_bf16(torch.device(facts["device"]))
    assert facts["matmul_float32_gflops"] > 0 and facts["matmul_bfloat16_gflops"] > 0
    assert facts["newton_schulz_dtype"] == ("bfloat16" if facts["native_bf16"] else "float32")
