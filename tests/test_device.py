"""llm.device: resolving the device and the autocast dtype, and the GPU peak FLOP/s table."""

from __future__ import annotations

import pytest
import torch

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
