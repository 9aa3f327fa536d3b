"""serving.engine (continuous batching) and serving.text (from tokens to text), in-process."""

from __future__ import annotations

import pytest
import torch

from llm.generate import Decoder
from llm.model import GPT, ModelConfig
from llm.tokenizer import train_char
from serving.engine import Engine, Sampling, Sequence
from serving.text import TextStream, split_utf8
from test_serving_support import TEXTS

# Every architectural switch the engine's own forward pass must get right.
VARIANTS = {
    "gpt2": dict(),
    "llama-gqa": dict(mlp="swiglu", norm="rmsnorm", position="rope", qkv_bias=False, bias=False, n_kv_head=1),
    "post-norm": dict(norm_placement="post"),
    "rope-layernorm-untied": dict(position="rope", tie_embeddings=False, qkv_bias=False),
}


def build(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(**{**dict(vocab_size=61, context_length=24, n_layer=2, n_head=4, d_model=32), **overrides})
    model = GPT(config).eval()
    with torch.no_grad():  # non-trivial norms and biases
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
    model = build(**VARIANTS[variant])
    decoder = Decoder(model)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [7] * 20, [9, 8]]
    alone = [decoder.generate([p], 30)[0].tokens for p in prompts]
    engine = Engine(model, max_batch_size=3)  # fewer rows than requests: some wait for a free row
    events = drain(engine, [(2 * i, Sequence(str(i), p, greedy(30))) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        tokens = [e.token for e in events[str(i)] if e.token is not None]
        assert tokens == alone[i], f"prompt {i}"
        assert events[str(i)][-1].finish_reason == "length"  # max_tokens or the context, as Decoder
    assert len(engine) == 0


def test_newcomers_arriving_together_are_prefilled_together():
    model = build()
    decoder = Decoder(model)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    engine = Engine(model, max_batch_size=8)
    first = engine.add([Sequence(str(i), p, greedy(5)) for i, p in enumerate(prompts)])
    assert [e.uid for e in first] == ["0", "1", "2"]
    events = drain(engine, [])
    for i, p in enumerate(prompts):
        tokens = [first[i].token] + [e.token for e in events[str(i)]]
        assert tokens == decoder.generate([p], 5)[0].tokens


def test_stop_tokens_max_tokens_and_cancel():
    model = build()
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
    model = build()
    sampling = Sampling(max_tokens=15, temperature=1.0, top_p=0.9, seed=123)
    alone = drain(Engine(model, 4), [(0, Sequence("x", [1, 2], sampling))])["x"]
    crowd = [(0, Sequence(f"n{i}", [i + 3], Sampling(max_tokens=15, temperature=1.0))) for i in range(3)]
    together = drain(Engine(model, 4), [*crowd, (1, Sequence("x", [1, 2], sampling))])["x"]
    assert [e.token for e in alone] == [e.token for e in together]


def test_sampling_follows_the_distribution_and_top_p_cuts_the_tail():
    model = build()
    engine = Engine(model, max_batch_size=4000, seed=0)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0]).repeat(4000, 1)
    rows = [Sequence(str(i), [1], Sampling(max_tokens=1, temperature=1.0)) for i in range(4000)]
    counts = torch.bincount(torch.tensor(engine._choose(logits, rows)), minlength=5).float() / 4000
    assert torch.allclose(counts, logits[0].softmax(-1), atol=0.03)
    assert counts[4] == 0
    nucleus = [Sequence(str(i), [1], Sampling(max_tokens=1, temperature=1.0, top_p=0.7)) for i in range(4000)]
    assert set(engine._choose(logits, nucleus)) == {0, 1}  # p = 0.64, 0.24, ...: two tokens reach 0.7


def test_logprobs_are_the_models_and_ids_beyond_the_tokenizer_are_never_produced():
    model = build()
    engine = Engine(model, max_batch_size=2, vocab_limit=40)
    [event] = engine.add([Sequence("x", [1, 2, 3], greedy(1, logprobs=True, top_logprobs=3))])
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits[0, -1]
    logits[40:] = float("-inf")
    expected = logits.log_softmax(-1)
    assert event.token < 40 and event.token == int(expected.argmax())
    assert event.logprob == pytest.approx(float(expected[event.token]), abs=1e-4)
    assert [i for i, _ in event.top] == expected.topk(3).indices.tolist()


# --- text ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return train_char(TEXTS, progress=False)


def feed(stream: TextStream, ids, finish="length") -> list:
    deltas = []
    for i, token in enumerate(ids):
        stream.add(token, logprob=-1.0 * i, finish_reason=finish if i == len(ids) - 1 else None)
        deltas.append(stream.take())
        if stream.finished:
            break
    return deltas


def test_split_utf8_keeps_partial_characters_back():
    assert split_utf8("é".encode()[:1]) == ([], "é".encode()[:1])
    assert split_utf8("aé".encode()) == ([("a", 1), ("é", 2)], b"")
    assert split_utf8(b"\xff\xfe") == ([("\ufffd", 1), ("\ufffd", 1)], b"")
    assert split_utf8(b"\xe6\x9d", final=True) == ([("\ufffd", 1), ("\ufffd", 1)], b"")


def test_characters_split_over_byte_tokens_come_out_whole(tokenizer):
    ids = tokenizer.encode("a😀b")  # the emoji is not in the vocabulary: four byte tokens
    assert len(ids) == 6
    stream = TextStream(tokenizer, logprobs=True)
    deltas = feed(stream, ids)
    assert [d.text for d in deltas] == ["a", "", "", "", "😀", "b"]
    assert [len(d.tokens) for d in deltas] == [1, 0, 0, 0, 4, 1]  # an entry goes with the token's last byte
    assert [e["bytes"] for e in deltas[4].tokens] == [[b] for b in "😀".encode()]
    assert stream.completion_tokens == 6 and deltas[-1].finish_reason == "length"


def test_stop_strings_spanning_tokens_end_the_text_before_them(tokenizer):
    stream = TextStream(tokenizer, stop=["lo w", "zzz"], logprobs=True)
    deltas = feed(stream, tokenizer.encode("Hello world"))
    text = "".join(d.text for d in deltas)
    assert text == "Hel" and stream.finish_reason == "stop"
    assert deltas[-1].finish_reason == "stop"
    entries = [e for d in deltas for e in d.tokens]
    assert [e["token"] for e in entries] == ["H", "e", "l"]   # tokens past the cut are never shown...
    assert stream.completion_tokens == len("Hello w")           # ...but were generated, and are counted


def test_text_is_held_back_only_as_long_as_it_could_start_a_stop_string(tokenizer):
    stream = TextStream(tokenizer, stop=["xyz"])
    deltas = feed(stream, tokenizer.encode("abcdef"), finish=None)
    assert [d.text for d in deltas] == ["", "", "a", "b", "c", "d"]
    stream.add(None, finish_reason="stop")  # the model's own stop token
    assert stream.take().text == "ef"
