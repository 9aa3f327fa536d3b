"""The memory table: counted from the model, and its activation count checked against a real pass."""

from __future__ import annotations

import pytest
import torch

from llm import memory
from llm.model import GPT, ModelConfig, num_params

TINY = ModelConfig(vocab_size=512, context_length=64, n_layer=2, n_head=4, d_model=64)


def test_weights_gradients_and_optimizer_state_follow_the_parameters():
    count = num_params(TINY)
    adamw, muon = memory.footprint(TINY, 4, "adamw"), memory.footprint(TINY, 4, "muon")
    assert adamw.parameters == count and adamw.weights == adamw.gradients == 4 * count
    assert adamw.optimizer == 8 * count   # two fp32 moments a parameter
    matrices = sum(p.numel() for p in GPT(TINY).blocks.parameters() if p.dim() == 2)
    assert muon.optimizer == 4 * matrices + 8 * (count - matrices)   # one momentum for Muon's matrices
    ddp, fsdp = adamw.per_device("ddp", 4), adamw.per_device("fsdp", 4)
    assert ddp == adamw.per_device("ddp", 1) == adamw.per_device("fsdp", 1)   # nothing to share
    assert fsdp["weights"] == ddp["weights"] / 4 and fsdp["optimizer"] == ddp["optimizer"] / 4
    # Gathered whole: the root and two blocks, here every parameter (two layers), in bf16.
    assert fsdp["gathered"] == 2 * count and fsdp["activations"] == ddp["activations"]
    assert memory.footprint(ModelConfig(**{**TINY.to_dict(), "n_layer": 6}), 4).gathered < 2 * num_params(
        ModelConfig(**{**TINY.to_dict(), "n_layer": 6}))
    assert fsdp["total"] == pytest.approx(sum(v for k, v in fsdp.items() if k != "total"))


def test_activations_are_what_a_real_forward_pass_keeps():
    """The meta-device count, with its stand-in for the fused attention kernel, equals the bytes
    autograd keeps in a real bf16 forward pass on the CPU, whose fused kernel keeps the same."""
    torch.manual_seed(0)
    model = GPT(TINY).to(torch.bfloat16)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, TINY.vocab_size, (3, TINY.context_length))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(tokens, targets=tokens)
    # Tensor for tensor the same, but for each layer norm's mean and 1/std (one number a row each),
    # which the CPU kernel keeps in bf16 and the meta one (like CUDA's) in fp32: 2 bytes more each.
    norms, rows = 2 * TINY.n_layer + 1, 3 * TINY.context_length
    assert memory.footprint(TINY, 3).activations == sum(saved.values()) + norms * 2 * rows * 2
    assert memory.footprint(TINY, 6).activations == pytest.approx(2 * sum(saved.values()), rel=0.01)


def test_the_command(capsys):
    memory.main(["--preset", "tiny", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert out.startswith("tiny: GiB per device, adamw, micro-batch of 2 rows")
    assert "| fsdp | 8 |" in out and "| ddp | 1 |" in out
    with pytest.raises(SystemExit):
        memory.main(["--help"])
    assert "python -m llm.memory --preset gpt2-xl" in capsys.readouterr().out
