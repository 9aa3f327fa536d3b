"""Direct logit attribution and activation patching, against brute-force recomputation on tiny
random models: the contributions add up to the logit, a head's contribution is what ablating it
removes, and patching matches running the remaining blocks by hand."""

from __future__ import annotations

import math

import pytest
import torch

from llm.attribution import activation_patching, direct_logit_attribution, patch_residual
from llm.model import GPT, ModelConfig

GPT2_STYLE = dict(n_layer=3, n_head=4, d_model=32, vocab_size=50, context_length=16)
SHAPES = {
    "gpt2": ModelConfig.from_preset("tiny", **GPT2_STYLE),
    "llama-gqa": ModelConfig.from_preset("llama-tiny", n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                         vocab_size=50, context_length=16),
    "untied-qknorm": ModelConfig.from_preset("tiny", **GPT2_STYLE, tie_embeddings=False, qk_norm=True),
}
POST_NORM = ModelConfig.from_preset("tiny", **GPT2_STYLE, norm_placement="post")  # patching only
IDS = [3, 17, 8, 42, 5, 9, 11]


def trained_looking(config: ModelConfig, seed: int = 0) -> GPT:
    """A random model with non-trivial norms and biases (fresh ones are ones and zeros)."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.mul_(5)  # bigger weights: attention that is not uniform
    return model


@pytest.mark.parametrize("shape", SHAPES)
def test_contributions_sum_to_the_logit_minus_the_final_norm_bias(shape):
    model = trained_looking(SHAPES[shape])
    for position, target in ((-1, None), (2, 7)):
        result = direct_logit_attribution(model, IDS, position=position, target=target, digits=None)
        with torch.no_grad():
            logits = model(torch.tensor([IDS])).logits[0, position]
        assert result["target"]["id"] == (target if target is not None else int(logits.argmax()))
        assert math.isclose(result["logit"], float(logits[result["target"]["id"]]), abs_tol=1e-5)
        parts = sum(result["embeddings"].values()) + sum(
            sum(layer["heads"]) + layer["attention_bias"] + layer["mlp"] for layer in result["layers"])
        assert math.isclose(parts, result["sum"], abs_tol=1e-9)
        assert abs(result["sum"] - (result["logit"] - result["bias_term"])) < 1e-4
        for layer in result["layers"]:  # each head's part splits over the positions it read from
            assert [len(s) for s in layer["sources"]] == [result["position"] + 1] * model.config.n_head
            for total, sources in zip(layer["heads"], layer["sources"]):
                assert math.isclose(sum(sources), total, abs_tol=1e-6)
        if shape.startswith("llama"):  # RMSNorm has no bias: the contributions are the whole logit
            assert result["bias_term"] == 0 and "position" not in result["embeddings"]
        else:
            assert result["bias_term"] != 0


@pytest.mark.parametrize("shape", ["gpt2", "llama-gqa"])
@torch.no_grad()
def test_a_heads_contribution_is_what_ablating_the_head_removes(shape):
    """Zero head h's output before the output projection: the attention output changes by exactly
    the head's write, and that write read through the frozen final norm is its attribution."""
    model = trained_looking(SHAPES[shape])
    config = model.config
    result = direct_logit_attribution(model, IDS, digits=None)
    target, position = result["target"]["id"], result["position"]
    final = model(torch.tensor([IDS]), return_hidden=True).hidden_states[-1][0, position].double()
    norm = model.final_norm
    if isinstance(norm, torch.nn.LayerNorm):
        scale, centre = torch.sqrt(final.var(unbiased=False) + norm.eps), (lambda c: c - c.mean())
    else:
        scale, centre = torch.sqrt(final.pow(2).mean() + norm.eps), (lambda c: c)

    def read(write):  # the frozen read-out, written out by hand
        return float(model.lm_head.weight[target].double() @ (norm.weight.double() * centre(write.double()) / scale))

    D, outputs = config.head_dim, {}

    def keep(key):  # a hook that records the attention output at `position` under `key`
        return lambda module, args, out: outputs.update({key: out[0][0, position]})

    def ablate(head):  # a pre-hook that zeroes one head's slice of the output projection's input
        def hook(module, args):
            y = args[0].clone()
            y[..., head * D:(head + 1) * D] = 0
            return (y,)
        return hook

    for layer, block in enumerate(model.blocks):
        handle = block.attn.register_forward_hook(keep("full"))
        model(torch.tensor([IDS]))
        handle.remove()
        for head in range(config.n_head):
            handles = [block.attn.proj.register_forward_pre_hook(ablate(head)),
                       block.attn.register_forward_hook(keep("ablated"))]
            model(torch.tensor([IDS]))
            for handle in handles:
                handle.remove()
            write = outputs["full"] - outputs["ablated"]
            assert math.isclose(result["layers"][layer]["heads"][head], read(write), rel_tol=1e-4, abs_tol=1e-5)


def test_the_mlp_and_embedding_contributions_match_a_hand_recomputation():
    model = trained_looking(SHAPES["gpt2"])
    result = direct_logit_attribution(model, IDS, digits=None)
    target, p = result["target"]["id"], result["position"]
    with torch.no_grad():
        hidden = model(torch.tensor([IDS]), return_hidden=True).hidden_states
        final = hidden[-1][0, p].double()
        scale = torch.sqrt(final.var(unbiased=False) + model.final_norm.eps)
        direction = model.lm_head.weight[target].double() * model.final_norm.weight.double() / scale
        read = lambda c: float(direction @ (c.double() - c.double().mean()))  # noqa: E731
        assert math.isclose(result["embeddings"]["token"], read(model.tok_emb.weight[IDS[p]]), rel_tol=1e-6)
        assert math.isclose(result["embeddings"]["position"], read(model.pos_emb.weight[p]), rel_tol=1e-6)
        H, D, C = model.config.n_head, model.config.head_dim, model.config.d_model
        for layer, block in enumerate(model.blocks):
            x = hidden[layer]
            after_attention = x + block.attn(block.norm1(x), None, None, False)[0]
            mlp = block.mlp(block.norm2(after_attention))[0, p]
            assert math.isclose(result["layers"][layer]["mlp"], read(mlp), rel_tol=1e-4, abs_tol=1e-6)
            # Head h read from position k: its attention weight times its value vector, through W_O.
            qkv = block.attn.qkv(block.norm1(x))[0]                          # (T, 3C)
            q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
            for h in range(H):
                cols = slice(h * D, (h + 1) * D)
                scores = (q[p, cols] @ k[:p + 1, cols].T) / math.sqrt(D)
                weights = scores.softmax(-1)
                for src in range(p + 1):
                    by_hand = float(weights[src]) * read(block.attn.proj.weight[:, cols] @ v[src, cols])
                    assert math.isclose(result["layers"][layer]["sources"][h][src], by_hand, rel_tol=1e-4, abs_tol=1e-6)


def test_post_norm_models_are_refused_and_bad_targets_named():
    post = GPT(POST_NORM)
    with pytest.raises(ValueError, match="pre-norm"):
        direct_logit_attribution(post, IDS)
    model = trained_looking(SHAPES["gpt2"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        direct_logit_attribution(model, IDS, target=50)
    with pytest.raises(ValueError, match="position 7"):
        direct_logit_attribution(model, IDS, position=7)


# --- activation patching ----------------------------------------------------------------------

CLEAN, CORRUPTED = [3, 17, 8, 42, 5, 9, 11], [3, 17, 30, 42, 5, 21, 11]


def test_patching_a_prompt_with_itself_changes_nothing():
    model = trained_looking(SHAPES["gpt2"])
    result = activation_patching(model, CLEAN, CLEAN, digits=None)
    assert result["foil"] is None and result["clean"] == result["corrupted"]
    assert len(result["layers"]) == model.config.n_layer + 1
    for layer in result["layers"]:
        assert len(layer["values"]) == len(CLEAN)
        assert all(abs(v - result["clean"]) < 1e-4 for v in layer["values"])
        assert all(r is None for r in layer["restored"])


@pytest.mark.parametrize("shape", ["gpt2", "llama-gqa", "post-norm"])
def test_patching_a_whole_layer_restores_the_clean_logits(shape):
    model = trained_looking(SHAPES.get(shape, POST_NORM))
    with torch.no_grad():
        clean = model(torch.tensor([CLEAN])).logits[0, -1]
        corrupted = model(torch.tensor([CORRUPTED])).logits[0, -1]
    assert (clean - corrupted).abs().max() > 1e-2  # the corruption matters
    for layer in range(model.config.n_layer + 1):
        patched = patch_residual(model, CLEAN, CORRUPTED, layer, range(len(CLEAN)))
        torch.testing.assert_close(patched, clean, atol=1e-5, rtol=1e-5)


def test_patching_one_position_matches_running_the_rest_of_the_model_by_hand():
    model = trained_looking(SHAPES["gpt2"])
    result = activation_patching(model, CLEAN, CORRUPTED, digits=None)
    target, foil = result["target"]["id"], result["foil"]
    with torch.no_grad():
        clean_hidden = model(torch.tensor([CLEAN]), return_hidden=True).hidden_states
        corrupted_hidden = model(torch.tensor([CORRUPTED]), return_hidden=True).hidden_states
        for layer in range(model.config.n_layer + 1):
            for position in range(len(CLEAN)):
                x = corrupted_hidden[layer].clone()
                x[0, position] = clean_hidden[layer][0, position]
                for block in model.blocks[layer:]:
                    x, _ = block(x, None, None, False)
                logits = model.lm_head(model.final_norm(x))[0, -1]
                expected = logits[target] - (logits[foil["id"]] if foil else 0)
                got = result["layers"][layer]["values"][position]
                assert math.isclose(got, float(expected), abs_tol=1e-4), (layer, position)
    # After the last block only the last position feeds the prediction: it alone restores it all.
    last = result["layers"][-1]["restored"]
    assert math.isclose(last[-1], 1.0, abs_tol=1e-4) and all(abs(r) < 1e-4 for r in last[:-1])
    # At the embeddings only the changed positions (2 and 5) can matter.
    first = result["layers"][0]["restored"]
    assert all(abs(first[p]) < 1e-4 for p in (0, 1, 3, 4, 6))


def test_patching_needs_prompts_of_one_length():
    model = trained_looking(SHAPES["gpt2"])
    with pytest.raises(ValueError, match="same number of tokens"):
        activation_patching(model, CLEAN, CORRUPTED[:-1])
    with pytest.raises(ValueError, match="foil token 99"):
        activation_patching(model, CLEAN, CORRUPTED, foil=99)
