"""Token files, deterministic batches with document ids, parallel encoding, packing vs padding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm.data import (
    IGNORE_INDEX,
    PADDING_DOC,
    TokenDataset,
    document_ids,
    encode_documents,
    pack_examples,
    pad_examples,
    read_meta,
    token_dtype,
    unigram_loss,
    write_token_file,
)
from llm.tokenizer import ENDOFTEXT, train_char

BOUNDARY = 0
VOCAB = 1000


def random_documents(seed: int, n: int, vocab: int = VOCAB) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=rng.integers(0, 60)) for _ in range(n)]


@pytest.fixture
def token_file(tmp_path):
    documents = random_documents(0, 200)
    path = tmp_path / "train.bin"
    write_token_file(path, documents, vocab_size=VOCAB, boundary_id=BOUNDARY,
                     tokenizer_fingerprint="f" * 64, extra_meta={"split": "train"})
    return path, documents


# --- writing ---------------------------------------------------------------------------------------


def test_dtype_is_the_smallest_that_holds_the_vocabulary():
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(100_282) == np.uint32


def test_token_file_layout_and_metadata(token_file):
    path, documents = token_file
    meta = read_meta(path)
    tokens = np.fromfile(path, dtype=meta["dtype"])
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == VOCAB and meta["split"] == "train"
    assert meta["tokenizer_fingerprint"] == "f" * 64 and meta["boundary_id"] == BOUNDARY
    assert meta["num_documents"] == len(documents)
    assert meta["num_tokens"] == len(tokens) == sum(len(d) + 1 for d in documents)
    for offset, document in zip(meta["doc_offsets"], documents):
        assert tokens[offset] == BOUNDARY
        assert np.array_equal(tokens[offset + 1:offset + 1 + len(document)], document)


def test_large_vocabularies_are_written_as_uint32(tmp_path):
    path = tmp_path / "big.bin"
    meta = write_token_file(path, [[70_000, 100_000], [1]], vocab_size=100_282, boundary_id=100_257,
                            tokenizer_fingerprint="x")
    assert meta["dtype"] == "uint32" and path.stat().st_size == 4 * meta["num_tokens"]
    assert np.fromfile(path, dtype=np.uint32).tolist() == [100_257, 70_000, 100_000, 100_257, 1]


def test_ids_outside_the_vocabulary_are_refused_and_nothing_is_left(tmp_path):
    with pytest.raises(ValueError, match="outside 0..999"):
        write_token_file(tmp_path / "bad.bin", [[1, 2], [5, 1000]], vocab_size=VOCAB, boundary_id=0,
                         tokenizer_fingerprint="x")
    assert list(tmp_path.iterdir()) == []


# --- batches -----------------------------------------------------------------------------------------


def test_batches_depend_only_on_seed_and_step(token_file):
    path, _ = token_file
    first = TokenDataset(path, seq_len=16, batch_size=4, seed=7)
    walked = [first.batch(step) for step in range(12)]            # a run going step by step
    resumed = TokenDataset(path, seq_len=16, batch_size=4, seed=7)   # a run resumed at step 9
    for step in (9, 3, 11):
        for a, b in zip(walked[step], resumed.batch(step)):
            assert torch.equal(a, b)
    assert not torch.equal(walked[0][0], walked[1][0])
    other_seed = TokenDataset(path, seq_len=16, batch_size=4, seed=8)
    assert not torch.equal(walked[0][0], other_seed.batch(0)[0])


def test_max_tokens_trains_on_a_prefix_of_the_file_only(token_file):
    path, _ = token_file
    subset = TokenDataset(path, seq_len=16, batch_size=4, seed=7, max_tokens=100)
    assert subset.windows_per_epoch == 99 // 16 == 6
    prefix = torch.from_numpy(np.asarray(subset.tokens[:100], dtype=np.int64))
    for step in range(5):   # every row, over several epochs, is a window of the first 100 tokens
        for row in subset.batch(step)[0]:
            assert any(torch.equal(row, prefix[s:s + 16]) for s in range(0, 100 - 16))
    with pytest.raises(ValueError, match=r"the first 10 tokens of .* \(max_tokens\): too few"):
        TokenDataset(path, seq_len=16, batch_size=4, max_tokens=10)


def test_targets_are_inputs_shifted_by_one(token_file):
    path, _ = token_file
    meta = read_meta(path)
    tokens = torch.from_numpy(np.fromfile(path, dtype=meta["dtype"]).astype(np.int64))
    inputs, targets = TokenDataset(path, seq_len=16, batch_size=8, seed=1).batch(5)
    assert inputs.shape == targets.shape == (8, 16) and inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    for row_inputs, row_targets in zip(inputs, targets):      # each row is a window of the file
        window = torch.cat([row_inputs, row_targets[-1:]])
        starts = [s for s in range(len(tokens) - 16) if torch.equal(tokens[s:s + 17], window)]
        assert starts


def test_one_epoch_visits_every_window_once(tmp_path):
    documents = [np.arange(1 + 100 * i, 100 * (i + 1)) for i in range(20)]   # no token repeats
    path = tmp_path / "unique.bin"
    write_token_file(path, documents, vocab_size=4096, boundary_id=0, tokenizer_fingerprint="x")
    data = TokenDataset(path, seq_len=32, batch_size=5, seed=3)
    seen = []   # each window's first two tokens: unique to it, as no token or pair repeats
    for step in range(-(-data.windows_per_epoch // 5)):
        seen += [tuple(row) for row in data.batch(step)[0][:, :2].tolist()]
    assert len(set(seen[:data.windows_per_epoch])) == data.windows_per_epoch


def test_document_ids_change_exactly_at_boundaries(token_file):
    path, _ = token_file
    inputs, targets, doc_ids = TokenDataset(path, seq_len=64, batch_size=8, seed=0, with_doc_ids=True).batch(2)
    assert doc_ids.shape == inputs.shape
    changes = doc_ids[:, 1:] != doc_ids[:, :-1]
    assert torch.equal(changes, inputs[:, 1:] == BOUNDARY)
    assert changes.any()
    assert torch.equal(document_ids(torch.tensor([[5, 0, 3, 4, 0, 0, 2]]), 0),
                       torch.tensor([[0, 1, 1, 1, 2, 3, 3]]))


def test_dataset_refuses_data_from_another_tokenizer(token_file):
    path, _ = token_file
    with pytest.raises(ValueError, match="another tokenizer"):
        TokenDataset(path, seq_len=16, batch_size=2, expected_fingerprint="0" * 64)
    TokenDataset(path, seq_len=16, batch_size=2, expected_fingerprint="f" * 64)


def test_dataset_refuses_files_too_short_or_not_matching_metadata(token_file, tmp_path):
    path, _ = token_file
    with pytest.raises(ValueError, match="too few for one window"):
        TokenDataset(path, seq_len=100_000, batch_size=1)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["num_tokens"] += 1
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="truncated"):
        TokenDataset(path, seq_len=16, batch_size=2)
    with pytest.raises(FileNotFoundError, match="pack stage"):
        TokenDataset(tmp_path / "missing.bin", seq_len=16, batch_size=2)


# --- parallel encoding ----------------------------------------------------------------------------------


def test_parallel_encoding_matches_the_tokenizer_in_order(tmp_path):
    texts = [f"document {i}: " + "é日x " * (i % 13) + "<|endoftext|>" * (i % 2) for i in range(120)]
    tokenizer = train_char(texts[:60], progress=False)
    tokenizer.save(tmp_path / "tok")
    expected = tokenizer.encode_batch(texts)
    # min_parallel_chars: the in-process path (small input) and the process pool (forced)
    for workers, min_parallel_chars in ((1, 0), (2, 0), (2, 1 << 21)):
        encoded = encode_documents(tmp_path / "tok", texts, workers=workers, chunk_chars=200,
                                   min_parallel_chars=min_parallel_chars)
        assert [ids.tolist() for ids in encoded] == expected
        assert all(ids.dtype == np.uint16 for ids in encoded)
    assert tokenizer.special_tokens[ENDOFTEXT] not in {i for ids in expected for i in ids}


# --- packing and padding ---------------------------------------------------------------------------------


def example(length: int, prompt: int) -> tuple[list[int], list[bool]]:
    """An example of `length` tokens whose first `prompt` tokens are not trained on."""
    ids = list(range(100, 100 + length))
    return ids, [i >= prompt for i in range(length)]


examples_strategy = st.lists(st.tuples(st.integers(2, 40), st.integers(0, 40)), min_size=1, max_size=30).map(
    lambda specs: [example(length, prompt) for length, prompt in specs])


@settings(max_examples=60, deadline=None)
@given(examples=examples_strategy, seq_len=st.integers(8, 48), too_long=st.sampled_from(["truncate", "drop"]))
def test_packed_rows_hold_every_example_whole(examples, seq_len, too_long):
    rows, report = pack_examples(examples, seq_len, too_long=too_long, pad_id=7)
    kept = [(ids[:seq_len + 1], mask[:seq_len + 1]) for ids, mask in examples
            if too_long == "truncate" or len(ids) - 1 <= seq_len]
    assert report.examples == len(kept)
    assert report.truncated + report.dropped == sum(len(ids) - 1 > seq_len for ids, _ in examples)
    assert rows.inputs.shape == (report.rows, seq_len) and report.positions == report.rows * seq_len
    # positions: every example fills len - 1, the rest is padding
    assert report.positions - report.padding == sum(len(ids) - 1 for ids, _ in kept)
    assert report.padding == int((rows.doc_ids == PADDING_DOC).sum()) == int((rows.inputs == 7).sum())
    # targets: trained exactly where the predicted token's mask is True
    assert report.trained_targets == sum(sum(mask[1:]) for _, mask in kept)
    assert torch.all(rows.targets[rows.doc_ids == PADDING_DOC] == IGNORE_INDEX)
    # each example sits whole and in order inside one row
    found = sorted(rows.inputs[r][rows.doc_ids[r] == d].tolist()
                   for r in range(report.rows) for d in rows.doc_ids[r].unique().tolist() if d != PADDING_DOC)
    assert found == sorted(ids[:-1] for ids, _ in kept)


def test_targets_are_masked_where_not_trained():
    rows, report = pack_examples([example(5, prompt=3), example(4, prompt=0)], seq_len=10, too_long="drop")
    assert rows.inputs.tolist() == [[100, 101, 102, 103, 100, 101, 102, 0, 0, 0]]
    assert rows.targets.tolist() == [[-100, -100, 103, 104, 101, 102, 103, -100, -100, -100]]
    assert rows.doc_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, -1, -1, -1]]
    assert report.padding == 3 and report.trained_targets == 5


def test_too_long_examples_are_cut_or_dropped_and_counted():
    examples = [example(30, 0), example(5, 0), example(12, 0)]
    cut, cut_report = pack_examples(examples, 10, too_long="truncate")
    assert (cut_report.truncated, cut_report.dropped, cut_report.examples) == (2, 0, 3)
    assert int((cut.doc_ids != PADDING_DOC).sum()) == 10 + 4 + 10
    _, drop_report = pack_examples(examples, 10, too_long="drop")
    assert (drop_report.truncated, drop_report.dropped, drop_report.examples) == (0, 2, 1)
    with pytest.raises(ValueError, match="too_long"):
        pack_examples(examples, 10, too_long="ignore")
    with pytest.raises(ValueError, match="nothing to predict"):
        pack_examples([([1], [True])], 10, too_long="drop")


def test_padding_wastes_more_than_packing():
    rng = np.random.default_rng(0)
    examples = [example(int(n), prompt=int(n) // 3) for n in rng.integers(20, 257, size=200)]
    packed, pack_report = pack_examples(examples, 256, too_long="drop")
    batches, pad_report = pad_examples(examples, 256, batch_size=8, too_long="drop")
    assert pack_report.trained_targets == pad_report.trained_targets     # same learning signal
    assert all(b.inputs.shape[1] == max(len(examples[8 * i + j][0]) - 1 for j in range(len(b.inputs)))
               for i, b in enumerate(batches))
    assert pad_report.padding == sum(b.padding for b in batches)
    assert pack_report.padding_waste < 0.1 and pad_report.padding_waste > 0.3   # measured: 5.8% vs 37.9%
    assert pad_report.as_dict()["padding_waste"] == pad_report.padding_waste


def test_unigram_loss_is_the_cross_entropy_of_token_frequencies():
    train = np.array([0, 0, 0, 1], dtype=np.uint16)            # with add-one: p = 4/7, 2/7, 1/7
    val = np.array([0, 1, 2], dtype=np.uint16)
    expected = -(np.log(4 / 7) + np.log(2 / 7) + np.log(1 / 7)) / 3
    assert unigram_loss(train, val, vocab_size=3) == pytest.approx(expected)
    # Uniform data over the whole vocabulary: log(vocab_size), the loss of knowing nothing.
    uniform = np.arange(1000, dtype=np.uint16) % 10
    assert unigram_loss(uniform, uniform, vocab_size=10) == pytest.approx(np.log(10))
