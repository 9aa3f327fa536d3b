"""Training data: token files on disk, batches from them, and packed rows of fine-tuning examples.

Pretraining data is one flat array of token ids per split (`train.bin`), every document preceded
by the boundary token, with a JSON file beside it (`train.json`) that says how to read it and
which tokenizer wrote it:

    [EOT d0 d0 d0 EOT d1 d1 EOT d2 ...]

The boundary token *starts* each document, so the last token of a document learns to predict
"document ends here" and the boundary learns to predict how documents begin; each window's
document ids change exactly at boundary tokens.

`TokenDataset.batch(step)` is a pure function of (seed, step): a resumed run asks for step 1234
and gets exactly the batch it would have had, with no iterator state to save.

Fine-tuning examples differ in length. `pack_examples` bins them into full rows with document ids
(the model keeps attention inside each example); `pad_examples` pads each batch to its longest
example, the simple way, so the two can be compared.
"""

from __future__ import annotations

import bisect
import itertools
import multiprocessing
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np
import torch

from llm.files import atomic_file, read_json, write_json
from llm.model import IGNORE_INDEX  # target value the loss skips (torch's cross_entropy default)
from llm.tokenizer import Tokenizer, load_tokenizer

FORMAT = "llm-flat-tokens/1"
PADDING_DOC = -1      # document id of padding positions


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id: half the disk and memory of uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def meta_path(tokens_path: str | Path) -> Path:
    return Path(tokens_path).with_suffix(".json")


# --- writing token files ---------------------------------------------------------------------

def write_token_file(path: str | Path, documents: Iterable[Sequence[int] | np.ndarray], *,
                     vocab_size: int, boundary_id: int, tokenizer_fingerprint: str,
                     extra_meta: dict | None = None) -> dict:
    """Write documents (token id sequences, streamed) as one flat file; returns the metadata.

    The file appears under its real name only once complete, so a crashed run never leaves a
    half-written split that looks finished.
    """
    if not 0 <= boundary_id < vocab_size:
        raise ValueError(f"boundary_id {boundary_id} is outside the vocabulary (0..{vocab_size - 1})")
    dtype = token_dtype(vocab_size)
    boundary = np.array([boundary_id], dtype=dtype)
    doc_offsets, num_tokens = [], 0
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        for ids in documents:
            ids = np.asarray(ids)
            _check_ids(ids, vocab_size, len(doc_offsets))
            doc_offsets.append(num_tokens)
            boundary.tofile(f)
            ids.astype(dtype, copy=False).tofile(f)
            num_tokens += 1 + ids.size
    meta = {"format": FORMAT, "dtype": dtype.name, "vocab_size": vocab_size,
            "boundary_id": boundary_id, "boundary": "before each document",
            "tokenizer_fingerprint": tokenizer_fingerprint, **(extra_meta or {}),
            "num_documents": len(doc_offsets), "num_tokens": num_tokens, "doc_offsets": doc_offsets}
    write_json(meta_path(path), meta)
    return meta


def _check_ids(ids: np.ndarray, vocab_size: int, document: int) -> None:
    # Out-of-range ids would wrap around silently in a uint16 file.
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"document {document} has token ids outside 0..{vocab_size - 1} "
                         f"(min {ids.min()}, max {ids.max()}): wrong tokenizer or vocab_size?")


def read_meta(tokens_path: str | Path) -> dict:
    path = meta_path(tokens_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {tokens_path} was not written by the pack stage")
    meta = read_json(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, this code reads {FORMAT!r}")
    return meta


# --- encoding many documents in parallel -----------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _load_worker_tokenizer(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _encode_chunk(texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
    # One thread per process in a pool: the processes already use every core. Arrays, not lists
    # of ints, because they cross the process boundary several times faster.
    dtype = token_dtype(_worker_tokenizer.vocab_size)
    return [np.asarray(ids, dtype=dtype) for ids in _worker_tokenizer.encode_batch(texts, num_threads=num_threads)]


def _chunks(texts: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    """Consecutive texts, grouped until a group holds about chunk_chars characters."""
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def iter_encode_documents(tokenizer_dir: str | Path, texts: Iterable[str], workers: int | None = None,
                          *, chunk_chars: int = 1 << 18, min_parallel_chars: int = 1 << 21
                          ) -> Iterator[np.ndarray]:
    """Encode documents with `workers` processes (default: all cores), yielding ids in input order.

    Workers get chunks of about `chunk_chars` characters: big enough that sending work to a
    process costs little next to encoding it, small enough that the cores share the work evenly.
    Below `min_parallel_chars` in all, a process pool costs more to start than it saves (measured
    by bench/pack.py): the text is encoded here, with the tokenizer's own threads.
    Special-token strings in the texts stay ordinary text.
    """
    workers = workers or os.cpu_count() or 1
    chunks = _chunks(texts, chunk_chars)
    head, size = [], 0
    for chunk in chunks:  # look ahead: is there enough text for a pool to pay off?
        head.append(chunk)
        size += sum(map(len, chunk))
        if size >= min_parallel_chars:
            break
    chunks = itertools.chain(head, chunks)
    if workers == 1 or size < min_parallel_chars:
        _load_worker_tokenizer(str(tokenizer_dir))
        for chunk in chunks:
            yield from _encode_chunk(chunk, num_threads=workers)
        return
    # fork: workers start in milliseconds and inherit the imported modules.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _load_worker_tokenizer, (str(tokenizer_dir),)) as pool:
        for encoded in pool.imap(_encode_chunk, chunks):
            yield from encoded


def encode_documents(tokenizer_dir: str | Path, texts: Iterable[str], workers: int | None = None,
                     **options) -> list[np.ndarray]:
    """iter_encode_documents (same options), collected into a list."""
    return list(iter_encode_documents(tokenizer_dir, texts, workers, **options))


# --- batches for pretraining ------------------------------------------------------------------

class TokenDataset:
    """Fixed-length (input, target) windows of a token file, in a seeded order.

    Each epoch cuts the file into non-overlapping windows of seq_len + 1 tokens, starting at a
    random offset (so the tail is not always the part left out), and visits them in a random
    order. Both come from (seed, epoch) alone, so batch(step) never depends on earlier calls.
    """

    def __init__(self, path: str | Path, seq_len: int, batch_size: int, *, seed: int = 0,
                 with_doc_ids: bool = False, expected_fingerprint: str | None = None, max_tokens: int = 0):
        """max_tokens > 0: only the file's first max_tokens tokens (a subset, seen many times)."""
        self.path, self.seq_len, self.batch_size = Path(path), seq_len, batch_size
        self.seed, self.with_doc_ids = seed, with_doc_ids
        self.meta = read_meta(path)
        if expected_fingerprint is not None and self.meta["tokenizer_fingerprint"] != expected_fingerprint:
            raise ValueError(f"{path} was written by another tokenizer (fingerprint "
                             f"{self.meta['tokenizer_fingerprint'][:12]}, expected {expected_fingerprint[:12]}): "
                             "re-run the pack stage with this tokenizer")
        self.tokens = np.memmap(path, dtype=self.meta["dtype"], mode="r")
        if len(self.tokens) != self.meta["num_tokens"]:
            raise ValueError(f"{path} holds {len(self.tokens)} tokens but its metadata says "
                             f"{self.meta['num_tokens']}: the file is truncated or not the one described")
        if max_tokens:
            self.tokens = self.tokens[:max_tokens]
        self.boundary_id = self.meta["boundary_id"]
        self.windows_per_epoch = (len(self.tokens) - 1) // seq_len
        if self.windows_per_epoch < 1:
            which = (f"the first {max_tokens} tokens of {path} (max_tokens)" if max_tokens
                     else f"{path}'s {len(self.tokens)} tokens")
            raise ValueError(f"{which}: too few for one window of seq_len + 1 = {seq_len + 1}")
        self._epoch_cache: tuple[int, int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return max(self.windows_per_epoch // self.batch_size, 1)

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """(inputs, targets), each (batch_size, seq_len) int64; plus doc_ids if with_doc_ids."""
        starts = [self._window_start(step * self.batch_size + row) for row in range(self.batch_size)]
        windows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        inputs, targets = torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])
        if not self.with_doc_ids:
            return inputs, targets
        return inputs, targets, document_ids(inputs, self.boundary_id)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches from step 0 on; to resume, call batch(step) from the saved step instead."""
        step = 0
        while True:
            yield self.batch(step)
            step += 1

    def _window_start(self, sample: int) -> int:
        epoch, index = divmod(sample, self.windows_per_epoch)
        offset, order = self._epoch(epoch)
        return offset + int(order[index]) * self.seq_len

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        # Memoised because a batch draws all its rows from (usually) the same epoch; the result
        # depends only on (seed, epoch), so the cache is invisible to callers.
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            spare = len(self.tokens) - 1 - self.windows_per_epoch * self.seq_len
            offset = int(rng.integers(0, spare + 1))
            self._epoch_cache = (epoch, offset, rng.permutation(self.windows_per_epoch))
        return self._epoch_cache[1], self._epoch_cache[2]


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """The baseline a language model must beat: the validation loss (nats per token) of guessing
    every token from its frequency in the training tokens, blind to context. Add-one smoothing,
    so a token unseen in training costs a finite amount."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[val_tokens].mean())


def document_ids(inputs: torch.Tensor, boundary_id: int) -> torch.Tensor:
    """(B, T) ids that change exactly where a boundary token starts a new document."""
    return (inputs == boundary_id).long().cumsum(dim=1)


# --- packing fine-tuning examples ----------------------------------------------------------------

Example = tuple[Sequence[int], Sequence[bool]]   # (token ids, loss mask: True = train on this token)
TooLong = Literal["truncate", "drop"]


@dataclass
class Rows:
    """Training rows: targets are IGNORE_INDEX where nothing is learned (prompt, padding)."""

    inputs: torch.Tensor    # (N, T) int64
    targets: torch.Tensor   # (N, T) int64
    doc_ids: torch.Tensor   # (N, T) int64: example number within the row, PADDING_DOC for padding

    @property
    def padding(self) -> int:
        return int((self.doc_ids == PADDING_DOC).sum())


@dataclass
class LayoutReport:
    """What laying out examples into rows cost: how many were cut or dropped, how much is padding."""

    examples: int          # examples placed in rows
    truncated: int         # longer than seq_len, cut to fit
    dropped: int           # longer than seq_len, left out
    rows: int
    positions: int         # all row positions, padding included
    padding: int           # positions holding no example
    trained_targets: int   # positions whose target is learned

    @property
    def padding_waste(self) -> float:
        return self.padding / self.positions if self.positions else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "padding_waste": self.padding_waste}


def _example_pairs(examples: Iterable[Example], seq_len: int, too_long: TooLong
                   ) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, int]:
    """Each example as (inputs, targets) of equal length: ids[:-1] and the masked ids[1:]."""
    if too_long not in ("truncate", "drop"):
        raise ValueError(f"too_long must be 'truncate' or 'drop', got {too_long!r}")
    pairs, truncated, dropped = [], 0, 0
    for number, (ids, loss_mask) in enumerate(examples):
        ids, loss_mask = np.asarray(ids, dtype=np.int64), np.asarray(loss_mask, dtype=bool)
        if ids.shape != loss_mask.shape or ids.ndim != 1:
            raise ValueError(f"example {number}: {ids.shape} token ids but {loss_mask.shape} loss-mask entries")
        if len(ids) < 2:
            raise ValueError(f"example {number} has {len(ids)} token(s): nothing to predict")
        if len(ids) - 1 > seq_len:
            if too_long == "drop":
                dropped += 1
                continue
            ids, loss_mask, truncated = ids[:seq_len + 1], loss_mask[:seq_len + 1], truncated + 1
        pairs.append((ids[:-1], np.where(loss_mask[1:], ids[1:], IGNORE_INDEX)))
    return pairs, truncated, dropped


def _rows(groups: list[list[tuple[np.ndarray, np.ndarray]]], width: int, pad_id: int) -> Rows:
    """Lay each group's examples end to end in one row of `width`, padding the rest."""
    inputs = np.full((len(groups), width), pad_id, dtype=np.int64)
    targets = np.full((len(groups), width), IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.full((len(groups), width), PADDING_DOC, dtype=np.int64)
    for row, group in enumerate(groups):
        start = 0
        for doc, (example_inputs, example_targets) in enumerate(group):
            end = start + len(example_inputs)
            inputs[row, start:end], targets[row, start:end], doc_ids[row, start:end] = (
                example_inputs, example_targets, doc)
            start = end
    return Rows(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(doc_ids))


def _report(rows: list[Rows], n_examples: int, truncated: int, dropped: int) -> LayoutReport:
    return LayoutReport(
        examples=n_examples, truncated=truncated, dropped=dropped,
        rows=sum(len(r.inputs) for r in rows), positions=sum(r.inputs.numel() for r in rows),
        padding=sum(r.padding for r in rows),
        trained_targets=sum(int((r.targets != IGNORE_INDEX).sum()) for r in rows))


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, each bin's lengths summing to at most capacity.

    Longest first, each into the fullest bin it still fits (a sorted list of free space
    finds it by bisection): close to the fewest bins, in O(n log n).
    """
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []          # (space left, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([i])
            space, b = capacity - lengths[i], len(bins) - 1
        else:
            space, b = free.pop(slot)
            bins[b].append(i)
            space -= lengths[i]
        if space > 0:
            bisect.insort(free, (space, b))
    return [sorted(b) for b in bins]          # examples keep their original order within a row


def pack_examples(examples: Iterable[Example], seq_len: int, *, too_long: TooLong,
                  pad_id: int = 0) -> tuple[Rows, LayoutReport]:
    """Bin examples into rows of exactly seq_len; each example stays whole inside one row.

    An example of n tokens fills n - 1 positions (inputs ids[:-1], targets ids[1:]); a target
    counts only where the loss mask of the predicted token is True. Examples longer than
    seq_len + 1 tokens are cut or dropped (`too_long`) and counted in the report. pad_id: use
    the tokenizer's <|pad|> id (never trained on either way).
    """
    pairs, truncated, dropped = _example_pairs(examples, seq_len, too_long)
    bins = _best_fit_decreasing([len(inputs) for inputs, _ in pairs], seq_len)
    rows = _rows([[pairs[i] for i in b] for b in bins], seq_len, pad_id)
    return rows, _report([rows], len(pairs), truncated, dropped)


def pad_examples(examples: Iterable[Example], seq_len: int, batch_size: int, *, too_long: TooLong,
                 pad_id: int = 0) -> tuple[list[Rows], LayoutReport]:
    """The usual way, for comparison: one example per row, each batch padded to its longest."""
    pairs, truncated, dropped = _example_pairs(examples, seq_len, too_long)
    batches = []
    for start in range(0, len(pairs), batch_size):
        group = pairs[start:start + batch_size]
        batches.append(_rows([[pair] for pair in group], max(len(inputs) for inputs, _ in group), pad_id))
    return batches, _report(batches, len(pairs), truncated, dropped)
