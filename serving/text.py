"""From generated token ids to the text a client sees: UTF-8 assembly, stop strings, logprob entries.

A token can end in the middle of a character (byte-fallback tokens spell one byte each), and a
stop string can span several tokens. So text is released carefully:

* bytes are cut into whole characters; a partial character waits for its next bytes (an
  invalid byte becomes U+FFFD, as `bytes.decode(errors="replace")` would make it);
* the last (longest stop string - 1) characters are held back until we know they do not start
  a stop string; when one is found, the text ends just before it and generation stops;
* each token's log-probability entry goes out with the text that holds the token's last byte
  (at the end, a token cut by a stop string goes out if any of its text did).

The same object counts tokens for `usage`, so counts and text never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


def _sequence_length(lead: int) -> int:
    """Bytes in the UTF-8 sequence that starts with `lead`; 0 if it cannot start one."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def split_utf8(data: bytes, final: bool = False) -> tuple[list[tuple[str, int]], bytes]:
    """(characters with the number of bytes each came from, the unfinished tail).

    With final=True there is no tail: its bytes become replacement characters.
    """
    if data.isascii():
        return [(c, 1) for c in data.decode("ascii")], b""
    chars, i = [], 0
    while i < len(data):
        n = _sequence_length(data[i])
        if n and i + n <= len(data):
            try:
                chars.append((data[i:i + n].decode("utf-8"), n))
                i += n
                continue
            except UnicodeDecodeError:
                pass
        elif n and not final:
            # Too few bytes left: keep them if they are a valid start of a character.
            try:
                data[i:].decode("utf-8")
            except UnicodeDecodeError as error:
                if error.reason == "unexpected end of data":
                    return chars, data[i:]
        chars.append((REPLACEMENT, 1))
        i += 1
    return chars, b""


def token_bytes(tokenizer: Tokenizer, id: int) -> bytes:
    """A token's bytes; none for an id the model has but the tokenizer does not (padded vocab)."""
    return tokenizer.decode_bytes([id]) if id < tokenizer.vocab_size else b""


def token_text(tokenizer: Tokenizer, id: int) -> str:
    return tokenizer.token_text(id) if id < tokenizer.vocab_size else f"<unused {id}>"


@dataclass
class _Token:
    id: int
    start: int          # byte offset of the token in the completion
    end: int
    offset: int         # character offset where its text starts
    logprob: float | None
    top: list[tuple[int, float]]


@dataclass
class Delta:
    """What may be sent now: new text, the log-probability entries of the tokens it completes,
    and the finish reason once the completion has ended."""
    text: str = ""
    tokens: list[dict] = field(default_factory=list)
    finish_reason: str | None = None


class TextStream:
    """One request's completion text, built token by token."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] = (), logprobs: bool = False):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.logprobs = logprobs
        self._fed = 0                  # bytes received
        self._chars = 0                # characters decoded
        self._partial = b""            # an unfinished character's first bytes
        self._held: list[tuple[str, int]] = []   # decoded, not yet released: (char, its byte count)
        self._released_bytes = 0
        self._pending: list[_Token] = []          # tokens not reported yet
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int | None, logprob: float | None = None, top=(),
            finish_reason: str | None = None) -> None:
        """Append a generated token (None when the model stopped on a stop token)."""
        if self.finished:
            return
        if token is not None:
            data = token_bytes(self.tokenizer, token)
            self.completion_tokens += 1
            self._pending.append(_Token(token, self._fed, self._fed + len(data), self._chars, logprob, list(top)))
            self._fed += len(data)
            chars, self._partial = split_utf8(self._partial + data)
            self._chars += len(chars)
            self._held.extend(chars)
            if self._cut_at_stop_string():
                finish_reason = "stop"
        if finish_reason is not None:
            if self._partial:  # a character the model never finished
                chars, self._partial = split_utf8(self._partial, final=True)
                self._held.extend(chars)
            self.finish_reason = finish_reason

    def _cut_at_stop_string(self) -> bool:
        if not self.stop:
            return False
        text = "".join(c for c, _ in self._held)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if not cuts:
            return False
        del self._held[min(cuts):]
        self._partial = b""
        return True

    def take(self) -> Delta:
        """Release what is safe to send: everything once finished, else all but the held-back tail."""
        keep = 0 if self.finished else min(self.hold, len(self._held))
        released, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        self._released_bytes += sum(n for _, n in released)
        tokens = []
        while self._pending and (self._pending[0].end <= self._released_bytes
                                 or (self.finished and self._pending[0].start < self._released_bytes)):
            tokens.append(self._pending.pop(0))
        if self.finished:
            self._pending.clear()  # past a stop string: generated and counted, never shown
        entries = [self._entry(t) for t in tokens] if self.logprobs else []
        return Delta("".join(c for c, _ in released), entries, self.finish_reason)

    def _entry(self, token: _Token) -> dict:
        tok = self.tokenizer
        return {
            "token": token_text(tok, token.id),
            "bytes": list(token_bytes(tok, token.id)),
            "logprob": token.logprob,
            "offset": token.offset,
            "top": [{"token": token_text(tok, i), "bytes": list(token_bytes(tok, i)), "logprob": lp}
                    for i, lp in token.top],
        }
