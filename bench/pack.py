"""Encode speed of the pack stage against the bare tokenizer, same text, one process.

Two ways of turning the same documents into token ids, timed in turns (A B, B A, A B, ...) so that
load on a shared machine hits both alike, medians reported:

* pack: the pack stage's encoding path (flows/pack.py): `llm.data.iter_encode_documents` with
  `--workers` processes (default: all cores), streamed into `llm.data.write_token_file` in a
  temporary folder. Pool start-up, chunking, moving ids between processes, the uint16 conversion
  and the file write are all inside the timing, as in the stage.
* bare: the tokenizer's own `encode_batch` on the same list of texts, with as many threads as pack
  has worker processes (SentencePiece spreads a batch over its own threads), ids left in memory.

The text is the downloaded pretraining corpus (data/download/sources, role 'pretrain') encoded with
the trained tokenizer (data/tokenizer/model). On a fresh clone, where those are missing, it falls
back to generated text and a small BPE trained on it (the JSON says which: "text", "tokenizer").

One JSON line: {"bench": "pack", "text_mb", "pack_mb_per_s", "bare_mb_per_s", "ratio", ...}.
ratio = pack_mb_per_s / bare_mb_per_s (the goal is >= 0.8). MB are megabytes (1e6) of UTF-8.
*_cpu_s_per_mb is CPU time (all processes and threads) per MB: unlike wall time it hardly moves
with other load on the machine, and it shows where extra work goes. The token count of the pack
output is checked against the bare encoding (one boundary token per document more).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script from anywhere: make the repository's `llm` package importable.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from llm import data  # noqa: E402
from llm.sources import iter_documents  # noqa: E402
from llm.tokenizer import ENDOFTEXT, load_tokenizer, train_sentencepiece  # noqa: E402

# --- text -------------------------------------------------------------------------------------------

def corpus_texts(sources_dir: Path, role: str) -> list[str]:
    """The pretraining documents the pack stage would read; [] when nothing is downloaded."""
    if not sources_dir.is_dir():
        return []
    return [d["text"] for d in iter_documents(sources_dir, role) if d.get("text")]


def generated_texts(total_mb: float, seed: int) -> list[str]:
    """English-looking documents of varied length (2k..200k characters) from Zipf-distributed
    made-up words: enough structure for a BPE to learn, no download needed."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ren", "li", "mo", "sa", "ve", "dun", "pri", "el", "or", "tha", "qu", "is",
                 "an", "ber", "st", "ing", "ed", "co", "na", "mi", "ul", "ex"]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(6000)})
    rng.shuffle(words)
    weights = [1 / (rank + 1) for rank in range(len(words))]
    texts, size, target = [], 0, int(total_mb * 1e6)
    while size < target:
        doc_chars, paragraphs = rng.randint(2_000, 200_000), []
        chars = 0
        while chars < doc_chars:
            sentences = []
            for _ in range(rng.randint(2, 8)):
                sentence = " ".join(rng.choices(words, weights, k=rng.randint(4, 25)))
                sentences.append(sentence[0].upper() + sentence[1:] + rng.choice(".....?!;"))
            paragraphs.append(" ".join(sentences))
            chars += len(paragraphs[-1]) + 2
        texts.append("\n\n".join(paragraphs))
        size += len(texts[-1].encode())
    return texts


def take_mb(texts: list[str], max_mb: float, seed: int) -> list[str]:
    """Whole documents in a seeded random order until max_mb; all of them if max_mb <= 0."""
    if max_mb <= 0:
        return texts
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    chosen, size = [], 0
    for i in order:
        if size >= max_mb * 1e6:
            break
        chosen.append(texts[i])
        size += len(texts[i].encode())
    return chosen


# --- the two ways of encoding -----------------------------------------------------------------------

def cpu_seconds() -> float:
    """User + system time of this process and of its waited-for children (the pool's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_pack(tokenizer_dir: Path, tokenizer, texts: list[str], workers: int, chunk_chars: int | None,
             out_dir: Path) -> tuple[float, float, int]:
    """The pack stage's encoding path; (wall s, cpu s, tokens written)."""
    kwargs = {} if chunk_chars is None else {"chunk_chars": chunk_chars}
    cpu, start = cpu_seconds(), time.perf_counter()
    encoded = data.iter_encode_documents(tokenizer_dir, texts, workers, **kwargs)
    meta = data.write_token_file(out_dir / "train.bin", encoded, vocab_size=tokenizer.vocab_size,
                                 boundary_id=tokenizer.special_tokens[ENDOFTEXT],
                                 tokenizer_fingerprint=tokenizer.fingerprint())
    return time.perf_counter() - start, cpu_seconds() - cpu, meta["num_tokens"]


def run_bare(tokenizer, texts: list[str], threads: int) -> tuple[float, float, int]:
    """The tokenizer's own batch encode; (wall s, cpu s, tokens)."""
    cpu, start = cpu_seconds(), time.perf_counter()
    encoded = tokenizer.encode_batch(texts, num_threads=threads)
    return time.perf_counter() - start, cpu_seconds() - cpu, sum(len(ids) for ids in encoded)


# --- main -------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Prints one JSON line; see the module docstring.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sources-dir", type=Path, default=ROOT / "data/download/sources",
                        help="download stage output; its role-'pretrain' documents are the text "
                             "(generated text if none)")
    parser.add_argument("--role", default="pretrain", help="source role to read from --sources-dir")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "data/tokenizer/model",
                        help="tokenizer folder (tokenizer.json); if missing, a small BPE is trained on "
                             "the text into a temporary folder")
    parser.add_argument("--max-mb", type=float, default=6.0,
                        help="use whole documents (seeded order) up to this many MB of text; 0 = all")
    parser.add_argument("--generated-mb", type=float, default=6.0,
                        help="MB of text to generate when --sources-dir has no documents")
    parser.add_argument("--fallback-vocab", type=int, default=4096,
                        help="vocab size of the BPE trained when --tokenizer is missing")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="pack: encoding processes; bare: encode_batch threads (the same cores)")
    parser.add_argument("--chunk-chars", type=int, default=None,
                        help="characters per work item of iter_encode_documents; unset: its own default")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each, interleaved")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each first")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch.set_num_threads (torch does no work here; pinned for the record)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.workers < 1:
        parser.error("--repeats and --workers must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        tmp = Path(tmp)
        texts = corpus_texts(args.sources_dir, args.role)
        text_source = f"{args.sources_dir} (role {args.role})"
        if not texts:
            texts, text_source = generated_texts(args.generated_mb, args.seed), "generated"
        texts = take_mb(texts, args.max_mb, args.seed)

        tokenizer_dir = args.tokenizer
        tokenizer_source = str(tokenizer_dir)
        if not (tokenizer_dir / "tokenizer.json").is_file():
            trained = train_sentencepiece(take_mb(texts, 2.0, args.seed), "bpe", args.fallback_vocab,
                                          progress=False, seed=args.seed)
            tokenizer_dir = trained.save(tmp / "tokenizer")
            tokenizer_source = f"bpe-{args.fallback_vocab} trained here"
        tokenizer = load_tokenizer(tokenizer_dir)

        mb = sum(len(t.encode()) for t in texts) / 1e6
        out_dir = tmp / "out"
        out_dir.mkdir()
        pack = lambda: run_pack(tokenizer_dir, tokenizer, texts, args.workers, args.chunk_chars, out_dir)  # noqa: E731
        bare = lambda: run_bare(tokenizer, texts, args.workers)  # noqa: E731

        for _ in range(args.warmup):
            pack(), bare()
        runs: dict[str, list[tuple[float, float, int]]] = {"pack": [], "bare": []}
        for r in range(args.repeats):
            # A B, B A, ...: neither side always runs first after the other's cache/heat.
            for name in (("pack", "bare") if r % 2 == 0 else ("bare", "pack")):
                runs[name].append(pack() if name == "pack" else bare())

    pack_tokens, bare_tokens = runs["pack"][0][2], runs["bare"][0][2]
    # The stage writes a boundary token before each document; otherwise the same ids.
    assert pack_tokens == bare_tokens + len(texts), (pack_tokens, bare_tokens, len(texts))

    med = lambda name, i: statistics.median(run[i] for run in runs[name])  # noqa: E731
    pack_rates = [mb / run[0] for run in runs["pack"]]
    bare_rates = [mb / run[0] for run in runs["bare"]]
    result = {
        "bench": "pack",
        "text_mb": round(mb, 3),
        "pack_mb_per_s": round(mb / med("pack", 0), 3),
        "bare_mb_per_s": round(mb / med("bare", 0), 3),
        "ratio": round(med("bare", 0) / med("pack", 0), 3),
        # per-pair ratios (each pack run against the bare run next to it in time), their median
        "pair_ratio_median": round(statistics.median(p / b for p, b in zip(pack_rates, bare_rates)), 3),
        "pack_cpu_s_per_mb": round(med("pack", 1) / mb, 3),
        "bare_cpu_s_per_mb": round(med("bare", 1) / mb, 3),
        "workers": args.workers,
        "bare_threads": args.workers,
        "chunk_chars": args.chunk_chars,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "documents": len(texts),
        "tokens": bare_tokens,
        "pack_mb_per_s_runs": [round(x, 3) for x in pack_rates],
        "bare_mb_per_s_runs": [round(x, 3) for x in bare_rates],
        "text": text_source,
        "tokenizer": tokenizer_source,
        "tokenizer_kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
