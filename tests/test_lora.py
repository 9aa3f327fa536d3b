"""LoRA on our GPT: targets, frozen base, merge equals unmerged, tied output layer refused."""

from __future__ import annotations

import pytest
import torch

from llm.checkpoint import load_checkpoint, save_checkpoint
from llm.lora import (
    DEFAULT_TARGETS,
    LoraSettings,
    add_lora,
    count_parameters,
    is_lora,
    merge_and_check,
    merge_lora,
    resolve_targets,
)
from llm.model import GPT, ModelConfig


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**dict(vocab_size=50, context_length=16, n_layer=2, n_head=2, d_model=32),
                              **overrides}))


def with_nonzero_adapters(model):
    """LoRA's B starts at zero (a no-op update); give it values so merging has something to do."""
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    return model


def test_default_targets_are_the_block_linears_and_never_the_output_layer():
    names = resolve_targets(tiny_gpt(), DEFAULT_TARGETS)
    assert names == [f"blocks.{i}.{t}" for i in range(2) for t in DEFAULT_TARGETS]
    assert "lm_head" not in names


@pytest.mark.parametrize("targets", [("lm_head",), (".*",)])
def test_a_tied_output_layer_is_refused(targets):
    with pytest.raises(ValueError, match="tied embeddings.*lm_head|lm_head.*tied embeddings"):
        resolve_targets(tiny_gpt(), targets)


def test_an_untied_output_layer_may_be_targeted():
    assert resolve_targets(tiny_gpt(tie_embeddings=False), ("lm_head",)) == ["lm_head"]


def test_targets_by_suffix_or_regex_and_a_clear_error_when_nothing_matches():
    assert resolve_targets(tiny_gpt(), ("mlp.fc",)) == ["blocks.0.mlp.fc", "blocks.1.mlp.fc"]
    assert resolve_targets(tiny_gpt(), (r"blocks\.1\.attn\..*",)) == ["blocks.1.attn.qkv", "blocks.1.attn.proj"]
    with pytest.raises(ValueError, match="match no linear layer.*blocks.0.attn.qkv"):
        resolve_targets(tiny_gpt(), ("attention.query",))


def test_settings_are_validated():
    for bad in (dict(rank=0), dict(alpha=0), dict(dropout=1.0), dict(targets=())):
        with pytest.raises(ValueError, match="LoRA"):
            LoraSettings(**bad)


def test_only_adapters_train_and_their_count_is_rank_times_in_plus_out():
    model = tiny_gpt()
    _, total_before = count_parameters(model)
    lora_model = add_lora(model, LoraSettings(rank=4, targets=("attn.qkv",)))
    trainable, total = count_parameters(lora_model)
    # qkv: 32 -> 96 in each of 2 blocks
    assert trainable == 2 * 4 * (32 + 96)
    assert total == total_before + trainable
    assert all("lora_" in n for n, p in lora_model.named_parameters() if p.requires_grad)


def test_a_fresh_adapter_changes_nothing():
    model = tiny_gpt()
    x = torch.randint(0, 50, (2, 12))
    before = model(x).logits
    lora_model = add_lora(model, LoraSettings(dropout=0.0)).eval()
    torch.testing.assert_close(lora_model(x).logits, before)


def test_merged_output_equals_unmerged_within_1e5():
    lora_model = with_nonzero_adapters(add_lora(tiny_gpt(), LoraSettings(rank=4, dropout=0.1)))
    x = torch.randint(0, 50, (3, 16))
    doc_ids = torch.tensor([[0] * 6 + [1] * 10] * 3)
    lora_model.eval()
    unmerged = lora_model(x, doc_ids=doc_ids).logits
    base_only = lora_model.get_base_model()
    with lora_model.disable_adapter():
        assert (lora_model(x, doc_ids=doc_ids).logits - unmerged).abs().max() > 1e-2   # the adapters matter
    merged, max_diff = merge_and_check(lora_model, x, doc_ids=doc_ids)
    assert type(merged) is GPT and merged is base_only and not is_lora(merged)
    assert max_diff < 1e-5
    assert (merged(x, doc_ids=doc_ids).logits - unmerged).abs().max() < 1e-5
    assert merged.lm_head.weight is merged.tok_emb.weight        # still tied: the embedding was not touched


def test_merge_leaves_the_embedding_alone_and_the_merged_model_saves_as_a_plain_checkpoint(tmp_path):
    model = tiny_gpt()
    embedding = model.tok_emb.weight.detach().clone()
    merged = merge_lora(with_nonzero_adapters(add_lora(model, LoraSettings())))
    assert torch.equal(merged.tok_emb.weight, embedding)
    x = torch.randint(0, 50, (1, 10))
    loaded = load_checkpoint(save_checkpoint(merged, tmp_path / "merged"))
    torch.testing.assert_close(loaded(x).logits, merged(x).logits)


def test_training_moves_only_the_adapters():
    model = tiny_gpt()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_model = add_lora(model, LoraSettings(rank=2, dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 50, (2, 16))
    for _ in range(3):
        optimizer.zero_grad()
        lora_model(x, targets=x).loss.backward()
        optimizer.step()
    base = lora_model.get_base_model()
    for name, param in base.named_parameters():
        if "lora_" not in name:
            original = name.replace(".base_layer", "")
            assert torch.equal(param, frozen[original]), name
