"""serving.text: from tokens to text (stop strings, UTF-8 split over byte tokens, logprob entries)."""

from __future__ import annotations

import pytest

from llm.tokenizer import train_char
from serving.text import TextStream, split_utf8

from test_serving_support import TEXTS

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
