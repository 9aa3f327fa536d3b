"""llm.optim: which parameters each optimizer gets, the combined optimizer's round trip, and Muon:
the same steps as torch.optim.Muon in bf16, its Newton-Schulz in the precision the device has."""

from __future__ import annotations

import pytest
import torch
from train_driver import tiny_model_config

from llm import device as devices
from llm import optim
from llm.model import GPT
from llm.optim import Combined, Muon, make_optimizer, newton_schulz, param_groups


def test_weight_decay_applies_to_matrices_only():
    model = GPT(tiny_model_config())   # tied embedding: the output layer shares tok_emb.weight
    decayed, plain = param_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert any(p is model.tok_emb.weight for p in decayed["params"])
    assert any(p is model.blocks[0].norm1.weight for p in plain["params"])
    ids = [id(p) for p in decayed["params"] + plain["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))   # each once, tied weight too


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else():
    model = GPT(tiny_model_config())
    optimizer = make_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    assert isinstance(optimizer, Combined)
    muon = [p for g in optimizer.optimizers["muon"].param_groups for p in g["params"]]
    adamw = [p for g in optimizer.optimizers["adamw"].param_groups for p in g["params"]]
    block_matrices = {id(p) for p in model.blocks.parameters() if p.dim() == 2}
    assert {id(p) for p in muon} == block_matrices
    assert any(p is model.tok_emb.weight for p in adamw) and any(p is model.pos_emb.weight for p in adamw)
    assert sorted(map(id, muon + adamw)) == sorted(map(id, model.parameters()))   # each parameter once
    # The schedule sets one rate on every group of both.
    assert len(optimizer.param_groups) == 3 and all(g["lr"] == 1e-3 for g in optimizer.param_groups)


def test_combined_state_round_trips_and_refuses_another_layout():
    model = GPT(tiny_model_config())
    optimizer = make_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    model(torch.randint(0, 50, (2, 8)), targets=torch.randint(0, 50, (2, 8))).loss.backward()
    optimizer.step()
    again = make_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    again.load_state_dict(optimizer.state_dict())
    for name in ("muon", "adamw"):
        a, b = optimizer.optimizers[name].state_dict()["state"], again.optimizers[name].state_dict()["state"]
        assert a.keys() == b.keys() and all(torch.equal(a[k][s], b[k][s]) for k in a for s in a[k])
    with pytest.raises(ValueError, match="optimizer state holds"):
        again.load_state_dict({"adamw": {}})
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer(model, "sgd", 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))


# --- Muon -------------------------------------------------------------------------------------------

def test_newton_schulz_brings_every_singular_value_near_one():
    torch.manual_seed(0)
    for shape in ((64, 256), (256, 64)):   # wide and tall
        u, _ = torch.linalg.qr(torch.randn(shape[0], 64))
        v, _ = torch.linalg.qr(torch.randn(shape[1], 64))
        matrix = u @ torch.diag(torch.logspace(-1, 1, 64)) @ v.T     # singular values from 0.1 to 10
        orthogonalised = newton_schulz(matrix)
        singular = torch.linalg.svdvals(orthogonalised)
        assert orthogonalised.dtype == torch.float32 and orthogonalised.shape == shape
        assert singular.min() > 0.6 and singular.max() < 1.25          # measured: 0.68 and 1.20
        # The singular vectors stay: U^T X V is (near) diagonal.
        core = u.T @ orthogonalised @ v
        assert (core - torch.diag(torch.diagonal(core))).abs().max() < 1e-4


def test_muon_in_bf16_takes_torch_muons_steps():
    """The reference: torch.optim.Muon, whose Newton-Schulz is always bf16."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(48, 96)), torch.nn.Parameter(torch.randn(96, 32))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    mine = Muon(ours, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    reference = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(4):
        grads = [torch.randn_like(p) for p in ours]
        for params, optimizer in ((ours, mine), (theirs, reference)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_newton_schulz_runs_in_float32_without_native_bf16_and_in_bf16_with_it(monkeypatch):
    """On this machine's CPU as it is, then as one with AVX512-BF16: the dtype make_optimizer's Muon
    actually orthogonalises in."""
    seen = []
    real = optim.newton_schulz

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(optim, "newton_schulz", spy)

    def dtype_of_one_step() -> torch.dtype:
        model = GPT(tiny_model_config())
        optimizer = make_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
        model(torch.randint(0, 50, (2, 8)), targets=torch.randint(0, 50, (2, 8))).loss.backward()
        seen.clear()
        optimizer.step()
        assert len(seen) == sum(p.dim() == 2 for p in model.blocks.parameters())
        return set(seen).pop()

    native = devices.native_bf16(torch.device("cpu"))
    assert dtype_of_one_step() == (torch.bfloat16 if native else torch.float32)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(devices, "cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert dtype_of_one_step() == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_capability", lambda: "AVX2")   # ATEN_CPU_CAPABILITY=avx2 on that CPU
    assert dtype_of_one_step() == torch.float32
