"""llm.generate: the cached decoder against full recomputation, sampling, stopping, streaming."""

from __future__ import annotations

import math

import pytest
import torch

from llm.generate import Decoder, generate, sample_next_token, stream
from llm.model import GPT, ModelConfig

VARIANTS = {
    "gpt2": dict(),
    "llama-gqa": dict(mlp="swiglu", norm="rmsnorm", position="rope", qkv_bias=False, bias=False, n_kv_head=2),
    "post-norm-rmsnorm": dict(norm_placement="post", norm="rmsnorm"),
    "rope-gelu-mqa-untied": dict(position="rope", n_kv_head=1, tie_embeddings=False, bias=False),
}
CONTEXT = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(**{**dict(vocab_size=97, context_length=CONTEXT, n_layer=2, n_head=4, d_model=32),
                            **overrides})
    model = GPT(config).eval()
    with torch.no_grad():  # larger weights than the init: peaked distributions, no near-ties in argmax
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model


def greedy_by_recomputation(model: GPT, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The reference: run the whole sequence through model(...) for every new token."""
    ids, out = list(prompt), []
    with torch.no_grad():
        while len(out) < max_new_tokens and len(ids) <= model.config.context_length:
            token = model(torch.tensor([ids])).logits[0, -1].argmax().item()
            out.append(token)
            ids.append(token)
    return out


PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [42], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_greedy_equals_full_recomputation(variant):
    model = build(**VARIANTS[variant])
    # One batch with three prompt lengths: left padding and per-row positions are exercised too.
    completions = generate(model, PROMPTS, max_new_tokens=40)
    for prompt, completion in zip(PROMPTS, completions):
        expected = greedy_by_recomputation(model, prompt, 40)
        assert completion.tokens == expected
        # 40 new tokens do not fit: generation stops at the context limit.
        assert len(expected) == CONTEXT + 1 - len(prompt)
        assert completion.finish_reason == "length"
        assert completion.prompt_tokens == len(prompt)


def test_each_row_of_a_batch_equals_generating_it_alone():
    model = build(**VARIANTS["llama-gqa"])
    together = generate(model, PROMPTS, max_new_tokens=10)
    for prompt, completion in zip(PROMPTS, together):
        assert generate(model, [prompt], max_new_tokens=10)[0].tokens == completion.tokens


def test_max_new_tokens_and_the_context_limit():
    model = build()
    [short] = generate(model, [[1, 2, 3]], max_new_tokens=5)
    assert len(short.tokens) == 5 and short.finish_reason == "length"
    # A prompt that fills the context still gets its one next token (the last is never fed back).
    [full] = generate(model, [list(range(CONTEXT))], max_new_tokens=5)
    assert len(full.tokens) == 1 and full.finish_reason == "length"


def test_prompts_longer_than_the_context_are_rejected_or_truncated_explicitly():
    model = build()
    too_long = list(range(CONTEXT + 5))
    with pytest.raises(ValueError, match="context_length"):
        generate(model, [too_long], max_new_tokens=4)
    [completion] = generate(model, [too_long], max_new_tokens=4, truncate_prompt=True)
    assert completion.prompt_tokens == CONTEXT + 1 - 4  # room left for all 4 new tokens
    assert completion.tokens == greedy_by_recomputation(model, too_long[-completion.prompt_tokens:], 4)


@pytest.mark.parametrize("bad, message", [
    (dict(prompts=[[]]), "empty"),
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[1, 97]]), "outside"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_logprobs=-1), "top_logprobs"),
])
def test_invalid_requests_raise_before_the_stream_starts(bad, message):
    model = build()
    args = {"prompts": [[1, 2]], "max_new_tokens": 3, **bad}
    with pytest.raises(ValueError, match=message):
        stream(model, **args)  # raised by the call itself, not on the first next()


def test_stop_tokens_end_a_row_and_are_not_output():
    model = build()
    [free] = generate(model, [[5, 6]], max_new_tokens=12)
    stop = free.tokens[4]
    first = free.tokens.index(stop)
    [stopped] = generate(model, [[5, 6]], max_new_tokens=12, stop_token_ids=[stop])
    assert stopped.tokens == free.tokens[:first] and stopped.finish_reason == "stop"


def test_streaming_yields_each_step_and_matches_generate():
    model = build(**VARIANTS["llama-gqa"])
    decoder = Decoder(model)
    steps = list(decoder.stream([[3, 4], [5]], max_new_tokens=6))
    assert len(steps) == 6
    rows = list(zip(*[step.tokens for step in steps]))
    assert [list(r) for r in rows] == [c.tokens for c in decoder.generate([[3, 4], [5]], max_new_tokens=6)]
    assert steps[-1].finish_reasons == ["length", "length"]
    assert all(r is None for step in steps[:-1] for r in step.finish_reasons)


def test_inference_mode_does_not_leak_into_the_callers_code_between_steps():
    for _ in stream(build(), [[1]], max_new_tokens=3):
        assert not torch.is_inference_mode_enabled()


def test_two_interleaved_streams_of_one_decoder_are_independent():
    decoder = Decoder(build())
    a, b = decoder.stream([[1, 2]], max_new_tokens=8), decoder.stream([[7, 7, 7]], max_new_tokens=8)
    a_tokens, b_tokens = [], []
    for step_a, step_b in zip(a, b):
        a_tokens.append(step_a.tokens[0])
        b_tokens.append(step_b.tokens[0])
    assert a_tokens == decoder.generate([[1, 2]], 8)[0].tokens
    assert b_tokens == decoder.generate([[7, 7, 7]], 8)[0].tokens


def test_seeded_sampling_is_reproducible():
    model = build(seed=1)
    for p in model.parameters():  # flatter distributions, so samples vary
        p.data.div_(8.0 if p.dim() > 1 else 1.0)
    runs = [generate(model, [[1, 2, 3]], max_new_tokens=20, temperature=1.0, seed=s)[0].tokens for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    generator = torch.Generator().manual_seed(7)
    assert generate(model, [[1, 2, 3]], max_new_tokens=20, temperature=1.0, generator=generator)[0].tokens == runs[0]


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = build()
    greedy = generate(model, [[1, 2, 3]], max_new_tokens=10)[0].tokens
    assert generate(model, [[1, 2, 3]], 10, temperature=1.5, top_k=1, seed=0)[0].tokens == greedy
    assert generate(model, [[1, 2, 3]], 10, temperature=1.5, top_p=1e-6, seed=0)[0].tokens == greedy


def test_sample_next_token_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {sample_next_token(logits, 1.0, generator=g, **kw).item() for _ in range(300)}  # noqa: E731
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.6) == {0, 1}        # 0.5 alone is short of 0.6; 0.5 + 0.3 reaches it
    assert draws(top_p=0.5) == {0}
    assert draws() == {0, 1, 2, 3}
    assert sample_next_token(logits).item() == 0


def test_logprobs_are_the_models_log_probabilities():
    model = build()
    prompt = [4, 5, 6]
    [c] = generate(model, [prompt], max_new_tokens=5, logprobs=True, top_logprobs=3)
    ids = list(prompt)
    for token, logprob, top in zip(c.tokens, c.logprobs, c.top_logprobs):
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        assert math.isclose(logprob, expected[token].item(), abs_tol=1e-4)
        assert [t for t, _ in top] == expected.topk(3).indices.tolist()
        assert top[0][0] == token  # greedy picks the likeliest
        assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
        ids.append(token)


# --- the compiled decoder -------------------------------------------------------------------------

def counting_backend(graphs: list):
    """A torch.compile backend that runs the traced graph as it is and counts compilations.

    It also refuses a graph that takes the key/value cache more than once (as the cache and as
    views of it): torch would then rebuild a common base for every call, and a CUDA graph could
    not treat the cache as the one static buffer it writes to."""
    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        caches = [t.untyped_storage().data_ptr() for t in example_inputs
                  if isinstance(t, torch.Tensor) and t.dim() >= 4]
        assert len(caches) == len(set(caches)), "the cache enters the graph more than once"
        return graph_module.forward
    return backend


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_decoder_traces_one_graph_per_shape_and_equals_the_eager_one(variant):
    torch._dynamo.reset()  # compilations of other tests' decoders count against torch's limit
    model, graphs = build(**VARIANTS[variant]), []
    eager = Decoder(model)
    # fullgraph: any graph break (a Python branch on a tensor, an untraceable call) fails here.
    compiled = Decoder(model).compile(backend=counting_backend(graphs), fullgraph=True)
    for prompts, graphs_after in ((PROMPTS, 1), (PROMPTS[::-1], 1), ([[5, 6]], 2), ([[1, 2, 3], [4, 5, 6]], 3)):
        expected = eager.generate(prompts, max_new_tokens=40)
        assert [c.tokens for c in compiled.generate(prompts, max_new_tokens=40)] == [c.tokens for c in expected]
        # Same batch size and slot bucket: the cache and the graph are reused, whatever the lengths.
        assert len(graphs) == graphs_after
    sampled = dict(max_new_tokens=20, temperature=1.0, top_k=20, seed=3, logprobs=True)
    [a], [b] = eager.generate([[9, 1, 4]], **sampled), compiled.generate([[9, 1, 4]], **sampled)
    assert a.tokens == b.tokens
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_interleaved_streams_of_a_compiled_decoder_do_not_share_a_cache():
    torch._dynamo.reset()
    model = build(**VARIANTS["llama-gqa"])
    compiled = Decoder(model).compile(backend="eager", fullgraph=True)
    a, b = compiled.stream([[1, 2]], max_new_tokens=8), compiled.stream([[7, 7]], max_new_tokens=8)
    rows = [(step_a.tokens[0], step_b.tokens[0]) for step_a, step_b in zip(a, b)]
    assert [r[0] for r in rows] == generate(model, [[1, 2]], 8)[0].tokens
    assert [r[1] for r in rows] == generate(model, [[7, 7]], 8)[0].tokens


def test_compiled_decoder_with_torchs_default_compiler():
    torch._dynamo.reset()
    model = build(**VARIANTS["llama-gqa"])
    expected = [c.tokens for c in generate(model, PROMPTS, max_new_tokens=12)]
    assert [c.tokens for c in Decoder(model, compile=True).generate(PROMPTS, max_new_tokens=12)] == expected
