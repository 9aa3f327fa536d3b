"""llm.generate: the cached forward pass against full recomputation, the sampler, stopping, streaming,
and the engine whose requests join and leave a running batch."""

from __future__ import annotations

import math

import pytest
import torch

from llm.generate import Engine, Sampling, Sequence, choose_tokens, generate, stream
from llm.model import GPT, ModelConfig

VARIANTS = {
    "gpt2": dict(),
    "llama-gqa": dict(mlp="swiglu", norm="rmsnorm", position="rope", qkv_bias=False, bias=False, n_kv_head=2),
    "post-norm-rmsnorm": dict(norm_placement="post", norm="rmsnorm"),
    "rope-gelu-mqa-untied": dict(position="rope", n_kv_head=1, tie_embeddings=False, bias=False),
    "qk-norm-llama": dict(mlp="swiglu", norm="rmsnorm", position="rope", bias=False, n_kv_head=2, qk_norm=True),
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
    # One batch with three prompt lengths: right padding and per-row positions are exercised too.
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
    decoder = Engine(model)
    steps = list(decoder.stream([[3, 4], [5]], max_new_tokens=6))
    assert len(steps) == 6
    rows = list(zip(*[step.tokens for step in steps]))
    assert [list(r) for r in rows] == [c.tokens for c in decoder.generate([[3, 4], [5]], max_new_tokens=6)]
    assert steps[-1].finish_reasons == ["length", "length"]
    assert all(r is None for step in steps[:-1] for r in step.finish_reasons)


def test_inference_mode_does_not_leak_into_the_callers_code_between_steps():
    for _ in stream(build(), [[1]], max_new_tokens=3):
        assert not torch.is_inference_mode_enabled()


def test_two_interleaved_streams_of_one_engine_are_independent():
    decoder = Engine(build())
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


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = build()
    greedy = generate(model, [[1, 2, 3]], max_new_tokens=10)[0].tokens
    assert generate(model, [[1, 2, 3]], 10, temperature=1.5, top_k=1, seed=0)[0].tokens == greedy
    assert generate(model, [[1, 2, 3]], 10, temperature=1.5, top_p=1e-6, seed=0)[0].tokens == greedy


def test_the_sampler_filters_with_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(300, 1)
    uniforms = torch.rand(300, generator=torch.Generator().manual_seed(0)).tolist()
    draws = lambda **kw: set(choose_tokens(logits, [Sampling(temperature=1.0, **kw)] * 300, uniforms))  # noqa: E731
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.6) == {0, 1}        # 0.5 alone is short of 0.6; 0.5 + 0.3 reaches it
    assert draws(top_p=0.5) == {0}
    assert draws(top_k=3, top_p=0.99) == {0, 1, 2}  # top-k cuts first, top-p then keeps what is left
    assert draws() == {0, 1, 2, 3}
    assert set(choose_tokens(logits, [Sampling()] * 300, uniforms)) == {0}  # temperature 0: greedy


def test_sampling_follows_the_distribution_and_top_p_cuts_the_tail():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0]).repeat(4000, 1)
    uniforms = torch.rand(4000, generator=torch.Generator().manual_seed(0)).tolist()
    counts = torch.bincount(torch.tensor(choose_tokens(logits, [Sampling(temperature=1.0)] * 4000, uniforms)),
                            minlength=5).float() / 4000
    assert torch.allclose(counts, logits[0].softmax(-1), atol=0.03)
    assert counts[4] == 0
    nucleus = choose_tokens(logits, [Sampling(temperature=1.0, top_p=0.7)] * 4000, uniforms)
    assert set(nucleus) == {0, 1}  # p = 0.64, 0.24, ...: two tokens reach 0.7


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


# --- the engine: requests join and leave a running batch ----------------------------------------

def build_varied(seed=0, **overrides) -> GPT:
    """The init's small weights (flat distributions: sampled tokens vary), non-trivial norms and biases."""
    torch.manual_seed(seed)
    config = ModelConfig(**{**dict(vocab_size=61, context_length=24, n_layer=2, n_head=4, d_model=32), **overrides})
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def greedy(max_tokens, **kw) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=0.0, **kw)


def drain(engine: Engine, arrivals: list[tuple[int, Sequence]]) -> dict[str, list]:
    """Run the engine, adding each sequence at its step; all events per uid."""
    out, step = {}, 0
    arrivals = sorted(arrivals, key=lambda a: a[0])
    while arrivals or len(engine):
        events = []
        while arrivals and arrivals[0][0] <= step and engine.free:
            events += engine.add([arrivals.pop(0)[1]])
        events += engine.step()
        for e in events:
            out.setdefault(e.uid, []).append(e)
        step += 1
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_requests_joining_a_running_batch_get_exactly_the_tokens_they_would_get_alone(variant):
    model = build_varied(**VARIANTS[variant])
    decoder = Engine(model)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [7] * 20, [9, 8]]
    alone = [decoder.generate([p], 30)[0].tokens for p in prompts]
    engine = Engine(model, max_batch_size=3)  # fewer rows than requests: some wait for a free row
    events = drain(engine, [(2 * i, Sequence(str(i), p, greedy(30))) for i, p in enumerate(prompts)])
    for i in range(len(prompts)):
        tokens = [e.token for e in events[str(i)] if e.token is not None]
        assert tokens == alone[i], f"prompt {i}"
        assert events[str(i)][-1].finish_reason == "length"  # max_tokens or the context, as generate
    assert len(engine) == 0


def test_newcomers_arriving_together_are_prefilled_together():
    model = build_varied()
    decoder = Engine(model)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    engine = Engine(model, max_batch_size=8)
    first = engine.add([Sequence(str(i), p, greedy(5)) for i, p in enumerate(prompts)])
    assert [e.uid for e in first] == ["0", "1", "2"]
    events = drain(engine, [])
    for i, p in enumerate(prompts):
        tokens = [first[i].token] + [e.token for e in events[str(i)]]
        assert tokens == decoder.generate([p], 5)[0].tokens


def test_stop_tokens_max_tokens_and_cancel():
    model = build_varied()
    sampled = lambda **kw: Sampling(max_tokens=12, temperature=1.0, seed=7, **kw)  # varied, reproducible
    reference = [e.token for e in drain(Engine(model, 4), [(0, Sequence("r", [1, 2], sampled()))])["r"]]
    k = next(k for k in range(1, 12) if reference[k] not in reference[:k])
    engine = Engine(model, max_batch_size=4)
    events = drain(engine, [(0, Sequence("s", [1, 2], sampled(stop_ids=frozenset({reference[k]})))),
                            (0, Sequence("m", [1, 2], Sampling(max_tokens=2, temperature=1.0, seed=7)))])
    assert [e.token for e in events["s"]] == [*reference[:k], None]
    assert events["s"][-1].finish_reason == "stop"
    assert [e.token for e in events["m"]] == reference[:2] and events["m"][-1].finish_reason == "length"
    engine.add([Sequence("a", [1], greedy(50)), Sequence("b", [2], greedy(50))])
    assert engine.cancel("a") and not engine.cancel("a")
    assert engine.uids() == ["b"]


def test_seeded_sampling_does_not_depend_on_the_batch_around_it():
    model = build_varied()
    sampling = Sampling(max_tokens=15, temperature=1.0, top_p=0.9, seed=123)
    alone = drain(Engine(model, 4), [(0, Sequence("x", [1, 2], sampling))])["x"]
    crowd = [(0, Sequence(f"n{i}", [i + 3], Sampling(max_tokens=15, temperature=1.0))) for i in range(3)]
    together = drain(Engine(model, 4), [*crowd, (1, Sequence("x", [1, 2], sampling))])["x"]
    assert [e.token for e in alone] == [e.token for e in together]


def test_logprobs_are_the_models_and_ids_beyond_the_tokenizer_are_never_produced():
    model = build_varied()
    engine = Engine(model, max_batch_size=2, vocab_limit=40)
    [event] = engine.add([Sequence("x", [1, 2, 3], greedy(1, logprobs=True, top_logprobs=3))])
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits[0, -1]
    logits[40:] = float("-inf")
    expected = logits.log_softmax(-1)
    assert event.token < 40 and event.token == int(expected.argmax())
    assert event.logprob == pytest.approx(float(expected[event.token]), abs=1e-4)
    assert [i for i, _ in event.top] == expected.topk(3).indices.tolist()
