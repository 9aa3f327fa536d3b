"""llm.model: configs, presets, attention paths, packed documents, counts, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llm.checkpoint import load_checkpoint, save_checkpoint
from llm.model import (
    GPT,
    MANY_ROWS,
    PRESETS,
    KVCache,
    ModelConfig,
    attend,
    default_d_ff,
    document_positions_and_mask,
    flops_per_token,
    num_params,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and on a busy 2-core machine torch's two-thread
    kernels stall for seconds: pin one thread for this module, restore it after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Small versions of every architectural switch; each test model is a few thousand parameters.
VARIANTS = {
    "gpt2": dict(),
    "llama-gqa": dict(mlp="swiglu", norm="rmsnorm", position="rope", qkv_bias=False, bias=False, n_kv_head=1),
    "post-norm": dict(norm_placement="post"),
    "rope-layernorm-untied": dict(position="rope", tie_embeddings=False, qkv_bias=False),
    "qk-norm": dict(qk_norm=True, position="rope", n_kv_head=2),
}


def small(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=61, context_length=24, n_layer=2, n_head=4, d_model=32), **overrides})


def build(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(small(**overrides)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping cannot hide behind 1s and 0s
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (dict(n_head=3), "n_head"),                        # 3 does not divide 32
    (dict(n_kv_head=3), "n_kv_head"),                  # 3 does not divide 4
    (dict(d_model=12, n_head=4, position="rope"), "rope"),  # head dim 3 is odd
    (dict(context_length=0), "context_length"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(mlp="relu"), "mlp"),
    (dict(norm="batchnorm"), "norm"),
    (dict(norm_placement="middle"), "norm_placement"),
    (dict(position="alibi"), "position"),
    (dict(dropout=1.0), "dropout"),
    (dict(d_ff=-1), "d_ff"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_invalid_configs_fail_at_construction_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        small(**overrides)


def test_defaults_are_resolved_and_the_default_is_tiny():
    assert ModelConfig() == ModelConfig.from_preset("tiny")
    config = small(mlp="swiglu", n_kv_head=0)
    assert config.n_kv_head == config.n_head
    assert config.d_ff % 64 == 0 and config.d_ff >= 2 * config.d_model
    assert small().d_ff == 4 * 32


def test_presets_and_overrides():
    assert {"tiny", "gpt2-124m", "gpt2-medium", "llama-tiny", "llama-100m"} <= set(PRESETS)
    for name in PRESETS:
        ModelConfig.from_preset(name)  # every preset is valid
    assert ModelConfig.from_preset("tiny", n_layer=2).n_layer == 2
    assert ModelConfig.from_preset("llama-100m").n_kv_head < ModelConfig.from_preset("llama-100m").n_head
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig.from_preset("tiny", n_layers=2)


def test_one_depth_dial_sizes_a_preset_keeping_its_recipe():
    # The dial reproduces the hand-picked shapes: 'tiny' is depth 4, GPT-2 124M depth 12.
    assert ModelConfig.from_preset("tiny", depth=4) == ModelConfig.from_preset("tiny")
    assert ModelConfig.from_preset("gpt2-124m", depth=12) == ModelConfig.from_preset("gpt2-124m")
    deeper = ModelConfig.from_preset("llama-tiny", depth=8)
    assert (deeper.n_layer, deeper.d_model, deeper.n_head, deeper.head_dim) == (8, 512, 8, 64)
    assert deeper.n_kv_head == 4 and deeper.mlp == "swiglu"          # GQA's 2 heads per kv head kept
    assert ModelConfig.from_preset("llama-tiny", depth=5).n_kv_head == 5  # 2 does not divide 5: plain MHA
    # llama-100m's hand-set MLP width does not follow it to another size; explicit fields win.
    assert ModelConfig.from_preset("llama-100m", depth=6).d_ff == default_d_ff(384, "swiglu")
    assert ModelConfig.from_preset("tiny", depth=6, d_ff=1000).d_ff == 1000
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        ModelConfig.from_preset("tiny", depth=0)


# --- counts -------------------------------------------------------------------------------------

def test_params_and_flops_against_a_hand_count():
    config = ModelConfig(vocab_size=100, context_length=16, n_layer=2, n_head=2, d_model=8)
    # Per block: 2 LayerNorms (weight+bias) 2*16, qkv 8*24+24, attention out 8*8+8,
    # MLP in 8*32+32, MLP out 32*8+8  ->  32 + 216 + 72 + 288 + 264 = 872.
    non_embedding = 2 * 872 + 16                      # + final LayerNorm
    assert num_params(config, non_embedding=True) == non_embedding == 1760
    assert num_params(config) == 1760 + 100 * 8 + 16 * 8  # + tied token embedding + positions
    # 6 FLOPs per matmul weight per token (incl. the V*C output layer) + attention 12*L*H*D*T.
    assert flops_per_token(config) == 6 * (1760 + 800) + 12 * 2 * 2 * 4 * 16 == 18432
    assert flops_per_token(config, seq_len=8) == 6 * 2560 + 12 * 2 * 2 * 4 * 8


def test_gpt2_124m_has_its_published_parameter_count():
    assert num_params(ModelConfig.from_preset("gpt2-124m")) == 124_439_808


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_count_equals_model_count(variant):
    model = build(**VARIANTS[variant])
    for non_embedding in (False, True):
        assert num_params(model.config, non_embedding=non_embedding) == num_params(model, non_embedding=non_embedding)


# --- forward ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_explicit_attention_matches_sdpa(variant):
    model = build(**VARIANTS[variant])
    idx = torch.randint(0, 61, (2, 24))
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 3 + [1] * 5 + [2] * 16])
    for docs in (None, doc_ids):
        with torch.no_grad():
            fast = model(idx, doc_ids=docs)
            slow = model(idx, doc_ids=docs, return_attention=True)
        torch.testing.assert_close(slow.logits, fast.logits, atol=1e-5, rtol=1e-5)
        assert len(slow.attentions) == model.config.n_layer
        for probs in slow.attentions:
            assert probs.shape == (2, model.config.n_head, 24, 24)
            torch.testing.assert_close(probs.sum(-1), torch.ones(2, model.config.n_head, 24))
            assert probs.triu(diagonal=1).abs().max() == 0  # causal: nothing from the future


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_row_equals_documents_run_alone(variant):
    model = build(**VARIANTS[variant])
    docs = [torch.randint(0, 61, (n,)) for n in (5, 11, 8)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        together = model(packed, doc_ids=doc_ids).logits[0]
        together_explicit = model(packed, doc_ids=doc_ids, return_attention=True).logits[0]
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together_explicit, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_feeding_a_sequence_in_pieces_through_a_cache_equals_one_pass(variant):
    """The one forward pass with a KVCache: rows at different lengths, chunks and single tokens."""
    model = build(**VARIANTS[variant])
    idx = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx).logits
        cache = KVCache(model.config, 3, 24)
        pieces = [model(idx[:, :5], cache=cache).logits, model(idx[:, 5:6], cache=cache).logits,
                  model(idx[:, 6:20], cache=cache).logits]
        assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
        assert cache.lengths == [20, 20, 20]
        # Rows at their own lengths (a server's batch): row b holds b + 2 tokens, then gets one more.
        ragged = KVCache(model.config, 3, 24)
        for b in range(3):
            model(idx[b:b + 1, :b + 2], cache=ragged.rows(b, b + 1))
        step = idx[torch.arange(3), torch.arange(2, 5)][:, None]
        logits = model(step, cache=ragged).logits[:, 0]
        assert torch.allclose(logits, full[torch.arange(3), torch.arange(2, 5)], atol=1e-5)
        last = model(idx[:, :7], logits_at=torch.tensor([6, 3, 0])).logits[:, 0]
        assert torch.allclose(last, full[torch.arange(3), torch.tensor([6, 3, 0])], atol=1e-5)


def test_a_full_cache_is_refused():
    model = build()
    cache = KVCache(model.config, 1, 4)
    with pytest.raises(ValueError, match="cache holds 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    plain, normed = build(position="rope", qkv_bias=False), build(qk_norm=True, position="rope", qkv_bias=False)
    assert num_params(normed) - num_params(plain) == 2 * 2 * 8  # two layers, a q and a k weight of head_dim
    assert num_params(normed.config) == num_params(normed)
    idx = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2))
    for model, invariant in ((normed, True), (plain, False)):
        with torch.no_grad():
            before = model(idx).logits
            for block in model.blocks:
                block.attn.qkv.weight[:64] *= 5.0          # the query and key rows (4 + 4 heads of 8)
            after = model(idx).logits
        assert torch.allclose(before, after, atol=1e-4) == invariant


def test_document_positions_and_mask():
    positions, mask = document_positions_and_mask(torch.tensor([[7, 7, 7, 3, 3, 7]]))
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0]]  # a change of id starts a new document
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert mask.shape == (1, 1, 6, 6) and torch.equal(mask[0, 0], expected)


def test_loss_ignores_targets_of_minus_100():
    model = build()
    idx = torch.randint(0, 61, (2, 12))
    targets = torch.randint(0, 61, (2, 12))
    targets[0, :5] = -100  # e.g. prompt tokens in fine-tuning
    out = model(idx, targets)
    keep = targets != -100
    expected = F.cross_entropy(out.logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)


def test_introspection_outputs_are_only_there_when_asked():
    model = build(norm="rmsnorm")
    idx = torch.randint(0, 61, (1, 10))
    with torch.no_grad():
        plain = model(idx)
        full = model(idx, return_hidden=True, return_attention=True)
    assert plain.attentions is None and plain.hidden_states is None and plain.loss is None
    assert len(full.hidden_states) == model.config.n_layer + 1
    # The last residual stream, read out through the final norm and unembedding, is the output.
    torch.testing.assert_close(model.lm_head(model.final_norm(full.hidden_states[-1])), plain.logits)


def test_too_long_input_and_mismatched_doc_ids_raise():
    model = build()
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="doc_ids"):
        model(torch.zeros(1, 5, dtype=torch.long), doc_ids=torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains(variant):
    model = build(dropout=0.1, **VARIANTS[variant]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 61, (4, 16))
    losses = []
    for _ in range(8):
        loss = model(idx[:, :-1], idx[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_weights_are_tied_and_residual_projections_scaled():
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=100, n_layer=8))
    assert model.lm_head.weight is model.tok_emb.weight
    std = model.blocks[0].mlp.proj.weight.std().item()
    assert abs(std - 0.02 / 4) < 0.002  # 0.02 / sqrt(2 * 8 layers)
    assert GPT(small(tie_embeddings=False)).lm_head.weight is not GPT(small()).tok_emb.weight


# --- checkpoints --------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa", "rope-layernorm-untied"])
def test_checkpoint_round_trip(tmp_path, variant):
    model = build(**VARIANTS[variant])
    save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == model.config.to_dict()
    loaded = load_checkpoint(tmp_path / "ckpt", map_location="cpu").eval()
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == model.config.tie_embeddings
    idx = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(idx).logits, model(idx).logits)


def test_checkpoint_config_with_an_unknown_field_is_rejected(tmp_path):
    save_checkpoint(build(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    with pytest.raises(ValueError, match="n_layers"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("rows", [1, MANY_ROWS])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attend_one_query_per_row_matches_the_fused_kernel_on_either_side_of_many_rows(rows, kv_heads):
    # attend() picks plain matmuls or the fused kernel by row count: both must be the same attention.
    torch.manual_seed(0)
    q, k, v = torch.randn(rows, 4, 1, 16), torch.randn(rows, kv_heads, 9, 16), torch.randn(rows, kv_heads, 9, 16)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != 4).transpose(1, 2).reshape(rows, 1, 64)
    torch.testing.assert_close(attend(q, k, v, None), expected, atol=1e-6, rtol=1e-5)
    held = torch.arange(9) < 6   # a row holding 6 of the 9 slots: the same as attending to those 6
    masked = attend(q, k, v, held.view(1, 1, 1, 9))
    torch.testing.assert_close(masked, attend(q, k[:, :, :6], v[:, :, :6], None), atol=1e-6, rtol=1e-5)
