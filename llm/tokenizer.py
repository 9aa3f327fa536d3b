"""Tokenizers: one small interface over SentencePiece (BPE, unigram), characters and tiktoken.

A tokenizer turns text into integer ids and back. Every kind here keeps two promises:

* decode(encode(text)) == text for any Unicode text. Nothing is ever "unknown": a character the
  vocabulary lacks is spelled as its UTF-8 bytes (SentencePiece's byte fallback, the character
  tokenizer's byte ids, tiktoken's byte-level BPE).
* Special-token strings typed into ordinary text stay ordinary text. A user who writes
  "<|endoftext|>" in a prompt must not be able to end a document or fake a chat turn; only a
  caller that passes `allowed_special` gets special ids from encode().

Every kind shares the same special tokens (below), saves into a folder with a small
`tokenizer.json` that says which kind it is, and loads back with `load_tokenizer(folder)`.
`fingerprint()` hashes exactly the files `save()` writes, so packed data can name the tokenizer
that made it and refuse another one.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import time
from abc import ABC, abstractmethod
from collections import Counter
from functools import cached_property
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Literal

import sentencepiece as spm
import tiktoken
from tqdm.auto import tqdm

# --- special tokens shared by every kind ----------------------------------------------------

ENDOFTEXT = "<|endoftext|>"   # document boundary: packed between documents
PAD = "<|pad|>"               # fills rows of padded batches (never trained on)
SYSTEM = "<|system|>"         # chat roles, reserved now so the instruct stage needs no new ids
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"               # end of one chat turn
SPECIAL_TOKENS = (ENDOFTEXT, PAD, SYSTEM, USER, ASSISTANT, END)

META_FILE = "tokenizer.json"
FORMAT_VERSION = 1

AllowedSpecial = Literal["all"] | Iterable[str]


def _fingerprint(files: dict[str, bytes]) -> str:
    """sha256 over file names and contents, in name order."""
    digest = hashlib.sha256()
    for name in sorted(files):
        content = files[name]
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def _display(token: bytes) -> str:
    """A token's text, or <0xNN> per byte when it is a piece of a multi-byte character."""
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"<0x{b:02X}>" for b in token)


# --- the interface ----------------------------------------------------------------------------

class Tokenizer(ABC):
    """What every stage uses. Subclasses supply ordinary-text encoding, byte decoding and files."""

    kind: str                          # the name written into tokenizer.json
    special_tokens: dict[str, int]     # SPECIAL_TOKENS -> id
    byte_fallback_ids: frozenset[int]  # ids that spell one raw byte of an unknown character

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids: the size of the model's embedding table (max id + 1)."""

    @abstractmethod
    def _encode_ordinary(self, text: str) -> list[int]:
        """Encode text in which every character is ordinary (special strings included)."""

    def _encode_ordinary_batch(self, texts: list[str], num_threads: int | None) -> list[list[int]]:
        return [self._encode_ordinary(text) for text in texts]

    @abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes the ids spell, special tokens as their strings."""

    @abstractmethod
    def _files(self) -> dict[str, bytes]:
        """The model files save() writes beside tokenizer.json: name -> content."""

    @abstractmethod
    def _meta(self) -> dict:
        """Kind-specific entries of tokenizer.json."""

    # --- encoding and decoding ---

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self._encode_ordinary(text)
        ids: list[int] = []
        # re.split with a capturing group alternates: ordinary text, special, ordinary text, ...
        for i, part in enumerate(_special_pattern(allowed).split(text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._encode_ordinary(part))
        return ids

    def encode_batch(self, texts: Iterable[str], allowed_special: AllowedSpecial = (),
                     *, num_threads: int | None = None) -> list[list[int]]:
        """encode() for many texts; SentencePiece and tiktoken spread the batch over threads."""
        texts = list(texts)
        if self._allowed(allowed_special):
            return [self.encode(text, allowed_special) for text in texts]
        return self._encode_ordinary_batch(texts, num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        # Decode bytes once at the end: a character split over several byte-fallback tokens
        # only becomes text when all its bytes are together.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_text(self, id: int) -> str:
        """One token for display: its text, <0xNN> for a byte, the string of a special token."""
        return _display(self.decode_bytes([id]))

    def is_byte_fallback(self, id: int) -> bool:
        return id in self.byte_fallback_ids

    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        allowed = frozenset([allowed_special] if isinstance(allowed_special, str) else allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}; "
                             f"known: {list(self.special_tokens)}")
        return allowed

    # --- files ---

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in self._saved_files.items():
            (directory / name).write_bytes(content)
        return directory

    def fingerprint(self) -> str:
        """sha256 of the files save() writes: equal for equal tokenizers, saved or not."""
        return _fingerprint(self._saved_files)

    @cached_property
    def _saved_files(self) -> dict[str, bytes]:
        # Tokenizers never change after construction, so the serialised form can be cached.
        meta = {"format_version": FORMAT_VERSION, "kind": self.kind,
                "vocab_size": self.vocab_size, "special_tokens": self.special_tokens, **self._meta()}
        return {**self._files(), META_FILE: (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def _special_pattern(allowed: frozenset[str]) -> re.Pattern:
    # Longest first, so a special that is a prefix of another never wins by accident.
    alternatives = "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True))
    return re.compile(f"({alternatives})")


class _TableDecoder:
    """Decoding by table lookup (id -> bytes), for kinds whose vocabulary fits in a list."""

    _id_bytes: list[bytes]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids, table = [int(i) for i in ids], self._id_bytes
        if ids and not (min(ids) >= 0 and max(ids) < len(table)):
            # A negative index would silently read from the end of the table.
            bad = next(i for i in ids if not 0 <= i < len(table))
            raise ValueError(f"token id {bad} is outside this vocabulary (0..{len(table) - 1})")
        return b"".join(table[i] for i in ids)


# --- SentencePiece (BPE and unigram) ---------------------------------------------------------

# SentencePiece writes a space as U+2581 "▁" and turns every "▁" back into a space when it
# decodes, so a real "▁" in the text would come back as a space. We spell real ones as bytes.
_SP_SPACE = "\u2581"


class SentencePieceTokenizer(_TableDecoder, Tokenizer):
    kind = "sentencepiece"
    MODEL_FILE = "sentencepiece.model"

    def __init__(self, model_proto: bytes, model_type: str):
        self.model_proto = model_proto
        self.model_type = model_type
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.special_tokens = {s: self._sp.piece_to_id(s) for s in SPECIAL_TOKENS}
        missing = [s for s, i in self.special_tokens.items() if not self._sp.is_control(i)]
        if missing or not self._sp.is_byte(self._sp.piece_to_id("<0x00>")):
            raise ValueError("this SentencePiece model was not made by train_sentencepiece "
                             f"(needs byte fallback and control symbols {list(SPECIAL_TOKENS)})")
        self._id_bytes = [self._piece_bytes(i) for i in range(self._sp.get_piece_size())]
        self.byte_fallback_ids = frozenset(i for i in range(self.vocab_size) if self._sp.is_byte(i))
        self._space_sign_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SP_SPACE.encode()]

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _piece_bytes(self, id: int) -> bytes:
        piece = self._sp.id_to_piece(id)
        if self._sp.is_byte(id):
            return bytes([int(piece[3:5], 16)])           # "<0xE2>" -> b"\xe2"
        if self._sp.is_control(id):
            return piece.encode()                          # our special tokens
        if self._sp.is_unknown(id):
            return "\ufffd".encode()                       # never produced: byte fallback covers all
        return piece.replace(_SP_SPACE, " ").encode()

    def _encode_ordinary(self, text: str) -> list[int]:
        if _SP_SPACE not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(_SP_SPACE)):
            if i:
                ids.extend(self._space_sign_ids)
            ids.extend(self._sp.encode(part))
        return ids

    def _encode_ordinary_batch(self, texts: list[str], num_threads: int | None) -> list[list[int]]:
        batch = self._sp.encode(texts, num_threads=-1 if num_threads is None else num_threads)
        for i, text in enumerate(texts):
            if _SP_SPACE in text:
                batch[i] = self._encode_ordinary(text)
        return batch

    def pieces(self) -> list[tuple[str, float, int]]:
        """(piece, score, type) of every id, as the model file stores them: what a converter to
        another format (a Hugging Face tokenizer.json, a GGUF vocabulary) needs. Types are
        SentencePiece's, which GGUF shares: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte."""
        from sentencepiece import sentencepiece_model_pb2  # protobuf: only converters need it

        proto = sentencepiece_model_pb2.ModelProto.FromString(self.model_proto)
        return [(p.piece, p.score, p.type) for p in proto.pieces]

    def _files(self) -> dict[str, bytes]:
        return {self.MODEL_FILE: self.model_proto}

    def _meta(self) -> dict:
        return {"model_file": self.MODEL_FILE, "model_type": self.model_type}

    @classmethod
    def load(cls, directory: Path, meta: dict) -> "SentencePieceTokenizer":
        return cls((directory / meta["model_file"]).read_bytes(), meta["model_type"])


def train_sentencepiece(texts: Iterable[str], kind: Literal["bpe", "unigram"] = "bpe",
                        vocab_size: int = 8000, *, character_coverage: float = 0.9995,
                        input_sentence_size: int = 2_000_000, max_sentence_chars: int = 4096,
                        num_threads: int | None = None, seed: int = 0,
                        progress: bool = True) -> SentencePieceTokenizer:
    """Train a SentencePiece BPE or unigram model on texts (documents, any length).

    Texts are cut into lines; SentencePiece keeps a random sample of at most
    `input_sentence_size` of them (reservoir sampling while it streams), so a large corpus costs
    time to read but never more memory than the sample. Characters rarer than
    `character_coverage` get no piece of their own and are spelled as bytes.
    """
    if kind not in ("bpe", "unigram"):
        raise ValueError(f"kind must be 'bpe' or 'unigram', got {kind!r}")
    sentences = _non_empty(_sentences(texts, max_sentence_chars))
    if progress:
        sentences = iter(tqdm(sentences, desc=f"{kind} tokenizer: reading", unit=" lines", mininterval=1.0))
    options = dict(
        model_type=kind, vocab_size=vocab_size, character_coverage=character_coverage,
        byte_fallback=True,                       # no text is ever unknown
        normalization_rule_name="identity",       # no NFKC: decode must give back the exact text
        add_dummy_prefix=False, remove_extra_whitespaces=False,  # keep whitespace exactly
        allow_whitespace_only_pieces=True,        # runs of spaces (code, indentation) become pieces
        split_digits=True,                        # numbers as digits: fewer, better-shared pieces
        user_defined_symbols=["\n"],              # lines are the training unit; a newline is a token, not bytes
        control_symbols=list(SPECIAL_TOKENS),     # reserved ids that encode() never produces from text
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        max_sentence_length=4 * max_sentence_chars,  # bytes; a character is at most 4
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=1 if progress else 2,
    )
    spm.set_random_generator_seed(seed)           # which sentences are sampled
    model = io.BytesIO()
    start = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model, **options)
    except RuntimeError as error:
        raise ValueError(_explain_training_error(str(error), vocab_size)) from None
    if progress:
        tqdm.write(f"{kind} tokenizer: {vocab_size} pieces in {time.perf_counter() - start:.1f} s")
    return SentencePieceTokenizer(model.getvalue(), kind)


def _sentences(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Non-blank lines, long ones cut into pieces (SentencePiece skips over-long sentences)."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                for start in range(0, len(line), max_chars):
                    yield line[start:start + max_chars]


def _non_empty(items: Iterator[str]) -> Iterator[str]:
    first = next(items, None)
    if first is None:
        raise ValueError("empty corpus: there is no non-blank text to train a tokenizer on")
    return chain([first], items)


def _explain_training_error(message: str, vocab_size: int) -> str:
    too_large = re.search(r"value <= (\d+)", message)
    if too_large:
        return (f"vocab_size={vocab_size} is larger than this corpus supports: SentencePiece can "
                f"build at most {too_large[1]} pieces from it. Use vocab_size <= {too_large[1]} "
                "or train on more text.")
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_small:
        return (f"vocab_size={vocab_size} is too small: the 256 byte pieces, the special tokens "
                f"and the corpus's characters need {too_small[1]}. Raise vocab_size or lower "
                "character_coverage.")
    return f"SentencePiece training failed: {message}"


# --- characters --------------------------------------------------------------------------------

class CharTokenizer(_TableDecoder, Tokenizer):
    """One id per character seen in training; any other character is spelled as UTF-8 bytes.

    Ids: the special tokens, then the 256 bytes, then the characters in code-point order.
    """

    kind = "char"
    VOCAB_FILE = "char_vocab.json"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("every entry of a character vocabulary must be a single character")
        self.special_tokens = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
        self._first_byte = len(SPECIAL_TOKENS)
        first_char = self._first_byte + 256
        self._char_ids = {c: first_char + i for i, c in enumerate(self.chars)}
        self._id_bytes = ([s.encode() for s in SPECIAL_TOKENS] + [bytes([b]) for b in range(256)]
                          + [c.encode() for c in self.chars])
        self.byte_fallback_ids = frozenset(range(self._first_byte, first_char))

    @property
    def vocab_size(self) -> int:
        return len(self._id_bytes)

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for char in text:
            id = self._char_ids.get(char)
            if id is None:
                ids.extend(self._first_byte + b for b in char.encode())
            else:
                ids.append(id)
        return ids

    def _files(self) -> dict[str, bytes]:
        # ensure_ascii: every character is written as an escape, so no encoding can mangle it
        return {self.VOCAB_FILE: (json.dumps(self.chars, ensure_ascii=True) + "\n").encode()}

    def _meta(self) -> dict:
        return {"vocab_file": self.VOCAB_FILE}

    @classmethod
    def load(cls, directory: Path, meta: dict) -> "CharTokenizer":
        return cls(json.loads((directory / meta["vocab_file"]).read_text()))


def train_char(texts: Iterable[str], vocab_size: int | None = None, *,
               progress: bool = True) -> CharTokenizer:
    """Keep the most frequent characters; vocab_size None keeps every character seen."""
    counts: Counter[str] = Counter()
    for text in tqdm(texts, desc="char tokenizer: counting", unit=" texts", disable=not progress):
        counts.update(text)
    if not any(not c.isspace() for c in counts):
        raise ValueError("empty corpus: there is no non-blank text to train a tokenizer on")
    fixed = len(SPECIAL_TOKENS) + 256
    if vocab_size is None:
        return CharTokenizer(counts)
    if vocab_size > fixed + len(counts):
        raise ValueError(f"vocab_size={vocab_size} is larger than this corpus supports: it has "
                         f"{len(counts)} distinct characters, so at most {fixed + len(counts)} ids "
                         f"({fixed} special and byte ids + characters).")
    if vocab_size < fixed:
        raise ValueError(f"vocab_size={vocab_size} is too small: the special tokens and the 256 "
                         f"byte ids alone take {fixed}")
    # Ties broken by character, so the same corpus always gives the same vocabulary.
    by_frequency = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return CharTokenizer(char for char, _ in by_frequency[:vocab_size - fixed])


# --- tiktoken ----------------------------------------------------------------------------------

# The split pattern and special tokens of cl100k_base, as tiktoken_ext.openai_public defines them.
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
CL100K_SPECIAL_TOKENS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                         "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}


class TiktokenTokenizer(Tokenizer):
    """A byte-level BPE (tiktoken.Encoding) with our special tokens added after its own ids."""

    kind = "tiktoken"
    RANKS_FILE = "ranks.tiktoken"
    byte_fallback_ids = frozenset()  # byte-level: every text is bytes already, nothing falls back

    def __init__(self, name: str, mergeable_ranks: dict[bytes, int], pat_str: str,
                 native_special_tokens: dict[str, int] | None = None):
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise ValueError(f"{name}: {len(missing)} single bytes have no rank (e.g. {missing[0]}), "
                             "so some text could not be encoded; a byte-level BPE needs all 256")
        self.name = name
        self.pat_str = pat_str
        self.native_special_tokens = dict(native_special_tokens or {})
        specials = dict(self.native_special_tokens)
        next_id = max(chain(mergeable_ranks.values(), specials.values())) + 1
        for token in SPECIAL_TOKENS:
            if token not in specials:
                specials[token], next_id = next_id, next_id + 1
        self._mergeable_ranks = mergeable_ranks
        self._encoding = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                           special_tokens=specials)
        self.special_tokens = {token: specials[token] for token in SPECIAL_TOKENS}

    @classmethod
    def from_file(cls, path: str | Path, name: str = "cl100k_base", pat_str: str | None = None,
                  special_tokens: dict[str, int] | None = None) -> "TiktokenTokenizer":
        """From a .tiktoken ranks file (base64 token, rank per line), offline.

        For name 'cl100k_base' the pattern and special tokens default to cl100k's; for any other
        name the pattern defaults to cl100k's and there are no native special tokens.
        """
        is_cl100k = name == "cl100k_base"
        return cls(name, read_tiktoken_ranks(path), pat_str or CL100K_PATTERN,
                   special_tokens if special_tokens is not None else
                   (CL100K_SPECIAL_TOKENS if is_cl100k else {}))

    @classmethod
    def named(cls, name: str) -> "TiktokenTokenizer":
        """A named encoding ('gpt2', 'cl100k_base', ...): tiktoken downloads it, so needs network."""
        encoding = tiktoken.get_encoding(name)
        # The private fields are how tiktoken's README shows extending an encoding.
        return cls(name, encoding._mergeable_ranks, encoding._pat_str, encoding._special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    def _encode_ordinary(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def _encode_ordinary_batch(self, texts: list[str], num_threads: int | None) -> list[list[int]]:
        return self._encoding.encode_ordinary_batch(texts, num_threads=num_threads or 8)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return self._encoding.decode_bytes([int(i) for i in ids])
        except (KeyError, OverflowError, TypeError) as error:
            raise ValueError(f"token id outside this vocabulary (0..{self.vocab_size - 1}): {error}") from None

    def _files(self) -> dict[str, bytes]:
        by_rank = sorted(self._mergeable_ranks.items(), key=lambda item: item[1])
        return {self.RANKS_FILE: b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in by_rank)}

    def _meta(self) -> dict:
        return {"name": self.name, "pat_str": self.pat_str, "ranks_file": self.RANKS_FILE,
                "native_special_tokens": self.native_special_tokens}

    @classmethod
    def load(cls, directory: Path, meta: dict) -> "TiktokenTokenizer":
        return cls(meta["name"], read_tiktoken_ranks(directory / meta["ranks_file"]), meta["pat_str"],
                   meta["native_special_tokens"])


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a .tiktoken file. (tiktoken.load would also copy it into a cache folder.)"""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{number}: not a .tiktoken line (base64 token, rank): {line[:60]!r}") from None
    if not ranks:
        raise ValueError(f"{path}: no ranks in this file")
    return ranks


# --- loading -------------------------------------------------------------------------------------

_KINDS: dict[str, type[Tokenizer]] = {
    SentencePieceTokenizer.kind: SentencePieceTokenizer,
    CharTokenizer.kind: CharTokenizer,
    TiktokenTokenizer.kind: TiktokenTokenizer,
}


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load any tokenizer saved with Tokenizer.save(), by the kind named in its tokenizer.json."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {directory} is not a tokenizer folder "
                                "(one written by Tokenizer.save)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}, "
                         f"this code reads {FORMAT_VERSION}")
    kind = _KINDS.get(meta.get("kind"))
    if kind is None:
        raise ValueError(f"{meta_path}: unknown tokenizer kind {meta.get('kind')!r}; known: {list(_KINDS)}")
    return kind.load(directory, meta)


def save_tokenizers(tokenizers: dict[str, Tokenizer], directory: str | Path) -> Path:
    """Several tokenizers side by side: each saved in directory/<name>/ (a comparison's set)."""
    directory = Path(directory)
    for name, tokenizer in tokenizers.items():
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"tokenizer name {name!r} must be a plain folder name")
        tokenizer.save(directory / name)
    return directory


def load_tokenizers(directory: str | Path) -> dict[str, Tokenizer]:
    """What save_tokenizers wrote: {name: tokenizer} for each subfolder holding a tokenizer.json,
    by name."""
    folders = sorted(p for p in Path(directory).iterdir() if (p / META_FILE).is_file())
    return {folder.name: load_tokenizer(folder) for folder in folders}


def fingerprint_dir(directory: str | Path) -> str:
    """The fingerprint of a saved tokenizer, without loading it."""
    return load_tokenizer(directory).fingerprint()


# --- measuring -----------------------------------------------------------------------------------

def measure(tokenizer: Tokenizer, texts: Iterable[str], *, repeats: int = 1) -> dict[str, float]:
    """How much a tokenizer "charges" for some text, and how fast it encodes it.

    tokens_per_word: words are whitespace-separated, so it is comparable across languages that
    put spaces between words (English, Arabic), not for Chinese or Japanese.
    byte_fallback_rate: the fraction of tokens that are raw bytes of characters the vocabulary
    lacks; 0 for tiktoken, whose every token is bytes by design.
    encode_mb_per_s: UTF-8 megabytes per second through encode_batch, best of `repeats`.
    """
    texts = list(texts)
    n_bytes = sum(len(text.encode()) for text in texts)
    if n_bytes == 0:
        raise ValueError("measure needs some text")
    seconds = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        encoded = tokenizer.encode_batch(texts)
        seconds = min(seconds, time.perf_counter() - start)
    n_tokens = sum(len(ids) for ids in encoded)
    n_words = sum(len(text.split()) for text in texts)
    n_chars = sum(len(text) for text in texts)
    fallback = tokenizer.byte_fallback_ids
    n_fallback = sum(1 for ids in encoded for id in ids if id in fallback) if fallback else 0
    return {
        "tokens": n_tokens, "words": n_words, "chars": n_chars, "bytes": n_bytes,
        "tokens_per_word": n_tokens / max(n_words, 1),
        "chars_per_token": n_chars / n_tokens,
        "bytes_per_token": n_bytes / n_tokens,
        "byte_fallback_rate": n_fallback / n_tokens,
        "encode_mb_per_s": n_bytes / 1e6 / max(seconds, 1e-9),
    }
