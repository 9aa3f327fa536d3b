"""llm.optim: which parameters each optimizer gets, and the combined optimizer's round trip."""

from __future__ import annotations

import pytest
import torch
from train_driver import tiny_model_config

from llm.model import GPT
from llm.optim import Combined, make_optimizer, param_groups


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
