"""Pack stage: encode the pretraining corpus into flat token files, split by document.

Output: data/pack/tokens/{train,val}.bin (uint16 ids when the vocabulary fits, else uint32, a
boundary token before each document) with {train,val}.json beside each (dtype, vocabulary,
tokenizer fingerprint, document offsets, counts), and data/pack/metrics.json.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from prefect import flow, task
from prefect.logging import get_run_logger
from tqdm import tqdm

from flows._stage import SOURCES, TOKENIZER, TOKENS, StageError, as_params, main, stage_run
from flows.params import Params
from llm import data
from llm.files import atomic_dir
from llm.sources import iter_documents
from llm.tokenizer import ENDOFTEXT, load_tokenizer


def split_by_document(texts: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded shuffle of whole documents: no document has tokens in both splits."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(texts) * val_fraction))
    if len(texts) < 2:
        raise StageError(f"{len(texts)} pretraining document(s): need at least 2 to split train/val")
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return {"train": [texts[i] for i in train], "val": [texts[i] for i in val]}


@task
def encode_split(name: str, texts: list[str], out_dir: Path, workers: int) -> dict:
    tokenizer = load_tokenizer(TOKENIZER)
    encoded = data.iter_encode_documents(TOKENIZER, texts, workers or None)
    chars = sum(len(t) for t in texts)
    # bytes and words: what tokens are compared against across vocabularies (bits per byte, tokens per word)
    n_bytes, words = sum(len(t.encode()) for t in texts), sum(len(t.split()) for t in texts)
    with tqdm(total=chars, unit="char", unit_scale=True, desc=f"pack {name}", mininterval=1.0) as bar:
        def counted():
            for text, ids in zip(texts, encoded):
                bar.update(len(text))
                yield ids
        start = time.perf_counter()
        meta = data.write_token_file(out_dir / f"{name}.bin", counted(), vocab_size=tokenizer.vocab_size,
                                     boundary_id=tokenizer.special_tokens[ENDOFTEXT],
                                     tokenizer_fingerprint=tokenizer.fingerprint(),
                                     extra_meta={"tokenizer_kind": tokenizer.kind, "characters": chars,
                                                 "bytes": n_bytes, "words": words})
        seconds = time.perf_counter() - start
    return {"documents": meta["num_documents"], "tokens": meta["num_tokens"], "characters": chars,
            "chars_per_token": chars / max(meta["num_tokens"], 1), "tokens_per_word": meta["num_tokens"] / max(words, 1),
            "seconds": seconds, "mb_per_s": n_bytes / 1e6 / max(seconds, 1e-9), "dtype": meta["dtype"]}


@flow(name="pack", log_prints=True, validate_parameters=False)
def pack_flow(params: Params) -> dict:
    params = as_params(params)
    p = params.pack
    log = get_run_logger()
    if not (TOKENIZER / "tokenizer.json").exists():
        raise StageError(f"{TOKENIZER} has no tokenizer: run the tokenizer stage first")
    with stage_run("pack", params) as stage:
        texts = [d["text"] for d in iter_documents(SOURCES, "pretrain")]
        kept = [t for t in texts if len(t) >= p.min_chars]
        if not kept:
            raise StageError("empty corpus: no pretraining document with at least "
                             f"{p.min_chars} characters (download stage, role 'pretrain')")
        splits = split_by_document(kept, p.val_fraction, params.project.seed)
        metrics: dict = {"dropped_short_documents": len(texts) - len(kept)}
        with atomic_dir(TOKENS) as tmp:
            for name, split_texts in splits.items():
                metrics[name] = encode_split(name, split_texts, tmp, p.workers)
                log.info(f"{name}: {metrics[name]['documents']} documents -> {metrics[name]['tokens']:,} tokens "
                         f"({metrics[name]['mb_per_s']:.1f} MB/s)")
        summary = ("| split | documents | tokens | chars/token | MB/s |\n|---|---|---|---|---|\n" +
                   "\n".join(f"| {n} | {m['documents']:,} | {m['tokens']:,} | {m['chars_per_token']:.2f} | "
                             f"{m['mb_per_s']:.1f} |" for n, m in metrics.items() if isinstance(m, dict)))
        return stage.finish(metrics, summary)


if __name__ == "__main__":
    main(pack_flow, "pack")
